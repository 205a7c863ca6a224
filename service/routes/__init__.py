"""HTTP routes: thin handlers that parse, call `service.serving.run_task`, and shape the response."""
