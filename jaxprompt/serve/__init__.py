"""`jaxprompt serve`: one frozen model, many soft prompts, one HTTP server with dynamic mixed-prompt batching.

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client): `pip install -e ".[serve]"`. `engine` holds the
batching and the model calls, `app` the HTTP API, `server` the process (signals, warm-up).
"""
