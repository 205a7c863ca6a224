"""Model side of nuwa-serve: the Nüwa pruning engine, applicable to any supported transformers VLM.

Layout (one job per module; details in README.md's layout table and docs/PRUNING.md):

* planning and maths: `budget` (request -> per-stage token counts), `pruning` (selection and aggregation on plain
  tensors), `methods/` (one module per pruning method, one registry);
* the engine: `attention` (SDPA plus one attention row for probed modules), `stage2` (the LLM-side drop),
  `engine` (stage 1, sequence rebuild with original positions, the LLM run), `decoding` (greedy loop, KV cache),
  `reports` (what was kept, FLOPs), `clocks` (stage timings);
* per family: `llava`, `qwen2_5_vl`, `qwen3_vl` (one adapter each, reading top to bottom);
* the serving contract: `tasks` (torch-free request/result records), `boxes` (box formats and the `Frame` that
  maps them to original pixels), `runner` (tasks in, answers out), `loading` (a local directory -> a runner);
* around the engine, never imported by it: `builtin/` (the built-in model and how it is made) and `eval/` (the
  retention study, `python -m models.eval`).

Nothing in this package imports `service/` or FastAPI: the worker process imports models, never the reverse.
"""
