"""Model side of nuwa-serve: Nüwa pruning maths, model-family adapters, the built-in model.

Nothing in this package imports `service/` or FastAPI: the worker process imports models, never the reverse.
"""
