"""The HTTP API (FastAPI): OpenAI-compatible completions, rank classification, prompt admin, health and metrics.

  POST /v1/completions    OpenAI's completions API (model = a prompt's name, or the base's name for no prompt); a
                          templated prompt's input may be its fields by name ({"premise": ..., "hypothesis": ...})
  GET  /v1/models         the served names (with the labels each prompt's task records)
  POST /v1/classify       {"model", "input": str | [str], "labels"?: [str]} -> per-label log-probabilities
  POST /v1/prompts        {"name", "path"} add a prompt (needs --admin-token: `Authorization: Bearer TOKEN`)
  DELETE /v1/prompts/{n}  remove one (the same)
  GET  /health            200 {"status": "ok"} (503 while draining)
  GET  /metrics           Prometheus text
  GET  /                  the playground page (static/playground.html, plain HTML + JS over the endpoints above)

Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}; `param` names the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from jaxprompt.errors import UserError
from jaxprompt.serve.engine import Draining, Engine, Overloaded, Request, Sampling

STATIC = Path(__file__).resolve().parent / "static"  # the playground's files (package data)


class ApiError(Exception):
  def __init__(
    self,
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict | None = None,
  ):
    super().__init__(message)
    self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(
  status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers: dict | None = None
) -> JSONResponse:
  return JSONResponse(
    {"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers
  )


Text = Annotated[str, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # JSON ints are numbers too


Input = Text | dict[str, Text]  # text, or a templated prompt's fields by name


class CompletionRequest(BaseModel):
  model_config = ConfigDict(extra="allow")
  model: Text
  prompt: Input | list[Input]
  max_tokens: Annotated[int, Field(strict=True, ge=1)] = 16
  temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] = 1.0
  top_p: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] = 1.0
  n: Annotated[int, Field(strict=True)] = 1
  stop: Text | list[Text] | None = None
  seed: Annotated[int, Field(strict=True, ge=0, lt=2**32)] | None = None  # as `jaxprompt generate --seed`
  stream: Annotated[bool, Field(strict=True)] = False


class ClassifyRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: Text
  input: Input | list[Input]
  labels: list[Text] | None = None


class AddPrompt(BaseModel):
  model_config = ConfigDict(extra="forbid")
  name: Text
  path: Text


_UNSUPPORTED = {"echo": False, "logprobs": None, "best_of": 1, "suffix": None, "logit_bias": None}


def _validation_error(_, e: RequestValidationError) -> JSONResponse:
  first = e.errors()[0] if e.errors() else {}
  loc = [x for x in first.get("loc", ()) if x != "body"]
  if first.get("type") == "json_invalid":
    return _error(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'invalid')})")
  if not loc or first.get("type") in ("model_attributes_type", "dict_type"):
    return _error(400, "the request body must be a JSON object")
  param = str(loc[0])
  where = param + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))  # union member names left out
  return _error(400, f"{where}: {first.get('msg', 'invalid value')}", param)


def _sse(rid: str, created: int, model: str, choice: dict) -> str:
  return (
    "data: "
    + json.dumps({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]})
    + "\n\n"
  )


class _Api:
  """The endpoints over one engine (registered by `create_app`)."""

  def __init__(self, engine: Engine, base_name: str, admin_token: str | None):
    self.engine, self.base_name, self.admin_token = engine, base_name, admin_token
    self.draining = False

  # -- helpers -------------------------------------------------------------------------------------------------

  def prompt(self, name: str):
    if name == self.base_name:
      return None
    p = self.engine.store.get(name)
    if p is None:
      raise ApiError(404, f"model {name!r} is not served (GET /v1/models lists them)", "model", "not_found_error")
    return p

  @staticmethod
  def inputs(value, field: str) -> list:
    texts = [value] if isinstance(value, (str, dict)) else list(value)
    if not texts:
      raise ApiError(400, f"{field}: give at least one input", field)
    return texts

  def tokens(self, prompt, texts: list, field: str) -> list[list[int]]:
    """Each input's tokens (a templated prompt lays out its fields; a plain string is its single field)."""
    out = []
    for i, text in enumerate(texts):
      where = f"{field}[{i}]" if len(texts) > 1 else field
      try:
        toks = self.engine.encode(text, prompt, where)
      except UserError as e:
        raise ApiError(400, str(e).splitlines()[0], field) from None
      if len(toks) > self.engine.max_input_tokens:
        raise ApiError(
          400, f"{where}: {len(toks)} tokens, over this server's limit of {self.engine.max_input_tokens}", field
        )
      out.append(toks)
    return out

  def submit(self, reqs: list[Request]) -> None:
    try:
      if self.draining:
        raise Draining()
      self.engine.submit(reqs)
    except Overloaded:
      raise ApiError(
        503,
        f"the queue is full ({self.engine.queue_size} requests); retry shortly",
        kind="server_error",
        headers={"Retry-After": "1"},
      ) from None
    except Draining:
      raise ApiError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "5"}) from None

  async def answers(self, reqs: list[Request], futures: list[asyncio.Future]) -> list[Any]:
    self.submit(reqs)
    results = await asyncio.gather(*futures)
    for r in results:
      if isinstance(r, Exception):
        raise ApiError(500, f"internal error: {type(r).__name__}: {r}", kind="server_error")
    return results

  @staticmethod
  def future(loop) -> tuple[asyncio.Future, Any]:
    fut = loop.create_future()
    return fut, lambda result: loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

  def admin(self, request: HttpRequest) -> None:
    if self.admin_token is None:
      raise ApiError(403, "prompt administration is off (start the server with --admin-token)", kind="permission_error")
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {self.admin_token}".encode()):
      raise ApiError(401, "a valid admin token is needed (Authorization: Bearer TOKEN)", kind="authentication_error")

  # -- endpoints -----------------------------------------------------------------------------------------------

  async def health(self):
    if self.draining:
      return _error(503, "the server is shutting down", kind="server_error")
    return {"status": "ok", "prompts": len(self.engine.store.names()), "queue_depth": self.engine.queue_depth}

  async def metrics(self):
    self.engine.metrics.prompts.set(len(self.engine.store.names()))
    return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

  async def models(self):
    now = int(time.time())
    served = [(self.base_name, None)] + [(n, self.engine.store.get(n)) for n in self.engine.store.names()]
    return {
      "object": "list",
      "data": [
        {
          "id": n,
          "object": "model",
          "created": now,
          "owned_by": "jaxprompt",
          "labels": list(p.labels) if p is not None and p.labels else None,  # /v1/classify's default labels
        }
        for n, p in served
      ],
    }

  def _completion_requests(self, body: CompletionRequest) -> list[Request]:
    """Checked requests (no callbacks yet), one per input."""
    for field, default in _UNSUPPORTED.items():
      if (body.model_extra or {}).get(field, default) not in (default, None, False):
        raise ApiError(400, f"{field}: not supported by this server", field)
    if body.n != 1:
      raise ApiError(400, "n: only n=1 is supported (send the prompt again for more samples)", "n")
    if body.max_tokens > self.engine.max_tokens:
      raise ApiError(
        400, f"max_tokens: {body.max_tokens} is over this server's limit of {self.engine.max_tokens}", "max_tokens"
      )
    prompt = self.prompt(body.model)
    texts = self.inputs(body.prompt, "prompt")
    stop = tuple([body.stop] if isinstance(body.stop, str) else body.stop or ())
    if len(stop) > 4:
      raise ApiError(400, "stop: at most 4 stop sequences", "stop")
    sampling = (
      Sampling("greedy")
      if body.temperature == 0
      else Sampling("sample", temperature=float(body.temperature), top_p=float(body.top_p))
    )
    return [
      Request(
        "complete", prompt, text, toks, None, max_tokens=body.max_tokens, sampling=sampling, stop=stop, seed=body.seed
      )
      for text, toks in zip(texts, self.tokens(prompt, texts, "prompt"), strict=False)
    ]

  async def completions(self, body: CompletionRequest):
    reqs = self._completion_requests(body)
    loop = asyncio.get_running_loop()
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    futures = []
    for r in reqs:
      fut, r.on_done = self.future(loop)
      futures.append(fut)
    if not body.stream:
      results = await self.answers(reqs, futures)
      choices = [
        dict(text=r["text"], index=i, logprobs=None, finish_reason=r["finish_reason"]) for i, r in enumerate(results)
      ]
      used = sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)
      return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": choices,
        "usage": {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)},
      }
    stream: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(reqs):
      done = r.on_done
      r.on_delta = lambda delta, i=i: loop.call_soon_threadsafe(stream.put_nowait, (i, delta, None))
      r.on_done = lambda result, i=i, done=done: (
        done(result),
        loop.call_soon_threadsafe(stream.put_nowait, (i, None, result)),
      )
    self.submit(reqs)

    async def events():
      left = len(reqs)
      while left:
        i, delta, result = await stream.get()
        if result is None:
          yield _sse(rid, created, body.model, dict(text=delta, index=i, logprobs=None, finish_reason=None))
          continue
        left -= 1
        if isinstance(result, Exception):
          yield f"data: {json.dumps({'error': {'message': f'internal error: {result}', 'type': 'server_error'}})}\n\n"
        else:
          yield _sse(
            rid, created, body.model, dict(text="", index=i, logprobs=None, finish_reason=result["finish_reason"])
          )
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  async def classify(self, body: ClassifyRequest):
    prompt = self.prompt(body.model)
    texts = self.inputs(body.input, "input")
    labels = tuple(body.labels) if body.labels is not None else (prompt.labels if prompt is not None else None)
    if not labels:
      raise ApiError(400, f"labels: model {body.model!r} records no labels; give them", "labels")
    if len(set(labels)) != len(labels) or any(not lab for lab in labels):
      raise ApiError(400, "labels: give distinct, non-empty label strings", "labels")
    loop = asyncio.get_running_loop()
    futures, reqs = [], []
    for text, toks in zip(texts, self.tokens(prompt, texts, "input"), strict=False):
      fut, done = self.future(loop)
      futures.append(fut)
      reqs.append(Request("classify", prompt, text, toks, done, labels=labels))
    results = await self.answers(reqs, futures)
    return {
      "object": "list",
      "model": body.model,
      "labels": list(labels),
      "data": [dict(index=i, label=r["label"], scores=r["scores"]) for i, r in enumerate(results)],
    }

  async def add_prompt(self, body: AddPrompt, request: HttpRequest):
    self.admin(request)
    if body.name == self.base_name:
      raise ApiError(400, f"name: {self.base_name!r} is the base model's name", "name")
    try:
      served = await asyncio.get_running_loop().run_in_executor(None, self.engine.store.add, body.name, body.path)
    except UserError as e:
      raise ApiError(409 if "already served" in str(e) else 400, str(e).splitlines()[0], "path") from None
    return JSONResponse(
      {"id": served.name, "object": "model", "method": served.method, "length": served.length, "source": served.source},
      status_code=201,
    )

  async def remove_prompt(self, name: str, request: HttpRequest):
    self.admin(request)
    try:
      self.engine.store.remove(name)
    except KeyError:
      raise ApiError(404, f"model {name!r} is not served", "name", "not_found_error") from None
    return {"id": name, "object": "model", "deleted": True}


def create_app(engine: Engine, *, base_name: str, admin_token: str | None = None) -> FastAPI:
  """The FastAPI app: the engine runs from startup to shutdown (which waits for every queued request)."""
  api = _Api(engine, base_name, admin_token)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    engine.start()
    yield
    api.draining = True
    await asyncio.get_running_loop().run_in_executor(None, engine.stop)

  app = FastAPI(title="jaxprompt", lifespan=lifespan)

  @app.middleware("http")
  async def count(request: HttpRequest, call_next):
    start = time.monotonic()
    response = await call_next(request)
    endpoint = getattr(request.scope.get("route"), "path", "other")
    engine.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    engine.metrics.latency.labels(endpoint=endpoint).observe(time.monotonic() - start)
    return response

  app.add_exception_handler(ApiError, lambda _, e: _error(e.status, e.message, e.param, e.kind, e.headers))
  app.add_exception_handler(RequestValidationError, _validation_error)
  for method, path, fn in (
    ("GET", "/health", api.health),
    ("GET", "/metrics", api.metrics),
    ("GET", "/v1/models", api.models),
    ("POST", "/v1/completions", api.completions),
    ("POST", "/v1/classify", api.classify),
    ("POST", "/v1/prompts", api.add_prompt),
    ("DELETE", "/v1/prompts/{name}", api.remove_prompt),
  ):
    app.add_api_route(path, fn, methods=[method])
  app.add_api_route("/", lambda: FileResponse(STATIC / "playground.html"), methods=["GET"], include_in_schema=False)
  app.mount("/static", StaticFiles(directory=STATIC), name="static")
  return app
