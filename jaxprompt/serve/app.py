"""The HTTP API (FastAPI): OpenAI-compatible completions, rank classification, prompt admin, health and metrics.

  POST /v1/completions    OpenAI's completions API (model = a prompt's name, or the base's name for no prompt); a
                          templated prompt's input may be its fields by name ({"premise": ..., "hypothesis": ...});
                          `logprobs` (k <= 5) gives each generated token's log-probability and alternatives
                          (`serve.logprobs`, streamed too); `echo` + `logprobs` with max_tokens 0 (or 1 at
                          temperature 0) score the prompt's tokens (`serve.scoring`, decoder-only bases), `n` samples
                          per prompt, token-id prompts
  GET  /v1/models         the served names (with the labels each prompt's task records)
  POST /v1/classify       {"model", "input": str | {field: str} | [...], "labels"?: [str]} -> per-label
                          log-probabilities
  POST /v1/prompts        {"name", "path"} add a prompt (needs --admin-token: `Authorization: Bearer TOKEN`)
  DELETE /v1/prompts/{n}  remove one (the same)
  GET  /health            200 {"status": "ok"} (503 while draining)
  GET  /metrics           Prometheus text
  GET  /                  the playground page (static/playground.html, plain HTML + JS over the endpoints above)

A prompt that records its task's input format (`data.input_format`) gets its inputs in that format: a plain string
fills the task's single text field, an object gives the fields by name; `"raw": true` sends text as it is (and
token ids always are). Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}; `param`
names the field. Parameters of OpenAI's API this server does not implement are refused (400 naming them), never
ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxprompt.data import encoding, input_format
from jaxprompt.errors import UserError
from jaxprompt.serve.engine import Draining, Engine, Overloaded, Request, Sampling
from jaxprompt.serve.logprobs import TOP_LOGPROBS, openai_logprobs
from jaxprompt.serve.scoring import Scorer

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
Flag = Annotated[bool, Field(strict=True)]
Finite = dict(strict=True, allow_inf_nan=False)  # NaN / Infinity (which Python's JSON reads) are no numbers here
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # alternatives per token of a scored prompt (echo); generated tokens: TOP_LOGPROBS


Input = Text | dict[str, Text]  # text, or a templated prompt's fields by name


class CompletionRequest(BaseModel):
  model_config = ConfigDict(extra="allow")
  model: Text
  prompt: Any  # text, [text], token ids [int], [[int]], or (a prompt with an input format) {field: text}, [{...}]
  max_tokens: Annotated[int, Field(strict=True, ge=0)] = 16
  temperature: Annotated[float, Field(ge=0.0, le=2.0, **Finite)] = 1.0
  top_p: Annotated[float, Field(gt=0.0, le=1.0, **Finite)] = 1.0
  n: Annotated[int, Field(strict=True, ge=1, le=MAX_N)] = 1
  stop: Text | list[Text] | None = None
  seed: Annotated[int, Field(strict=True, ge=0, lt=2**32)] | None = None  # as `jaxprompt generate --seed`
  stream: Flag = False
  echo: Flag = False
  logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
  raw: Flag = False  # send text as given, not in the prompt's recorded input format


class ClassifyRequest(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: Text
  input: Any  # text, {field: text}, or a list of them
  labels: list[Text] | None = None
  raw: Flag = False


class AddPrompt(BaseModel):
  model_config = ConfigDict(extra="forbid")
  name: Text
  path: Text


# OpenAI parameters this server accepts only at the value that means "off" (anything else: a 400 naming it); `user`
# (an end-user id for the provider's monitoring) is accepted and not used
_OFF = {
  "presence_penalty": (0, 0.0, None),
  "frequency_penalty": (0, 0.0, None),
  "logit_bias": (None, {}),
  "suffix": (None, ""),
}
_ACCEPTED = {"user", "best_of", "stream_options"}  # stream_options: include_usage is honoured


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


_USAGE = ("prompt_tokens", "completion_tokens", "total_tokens")


def _is_token(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _completion(rid: str, created: int, model: str, choices: list[dict], used: tuple[int, int]) -> dict:
  return {
    "id": rid,
    "object": "text_completion",
    "created": created,
    "model": model,
    "choices": choices,
    "usage": {"prompt_tokens": used[0], "completion_tokens": used[1], "total_tokens": sum(used)},
  }


def _sse(rid: str, created: int, model: str, choice: dict | None, usage: dict | None = None) -> str:
  event = {"id": rid, "object": "text_completion", "created": created, "model": model}
  event["choices"] = [choice] if choice else []
  if usage is not None:
    event["usage"] = usage
  return "data: " + json.dumps(event) + "\n\n"


class _Api:
  """The endpoints over one engine (registered by `create_app`)."""

  def __init__(self, engine: Engine, base_name: str, admin_token: str | None, max_labels: int = 256):
    self.engine, self.base_name, self.admin_token, self.max_labels = engine, base_name, admin_token, max_labels
    self.draining = False
    self.scorer = Scorer(engine.base, engine.store, max_batch=engine.max_batch)

  # -- helpers -------------------------------------------------------------------------------------------------

  def prompt(self, name: str):
    if name == self.base_name:
      return None
    p = self.engine.store.get(name)
    if p is None:
      raise ApiError(404, f"model {name!r} is not served (GET /v1/models lists them)", "model", "not_found_error")
    return p

  def items(self, value, field: str, copies: int = 1) -> list:
    """A request's inputs: text, token ids or objects of fields; at most this server's per-request limit."""
    if isinstance(value, (str, dict)) or (isinstance(value, list) and value and all(map(_is_token, value))):
      value = [value]
    if not isinstance(value, list):
      raise ApiError(400, f"{field}: expected text, token ids, an object of fields, or a list of them", field)
    if not value:
      raise ApiError(400, f"{field}: give at least one input", field)
    for i, x in enumerate(value):
      if not (isinstance(x, (str, dict)) or (isinstance(x, list) and x and all(map(_is_token, x)))):
        raise ApiError(400, f"{field}[{i}]: expected text, token ids or an object of fields", field)
    limit = self.engine.queue_size
    if len(value) * copies > limit:
      many = f"{len(value)} inputs" + (f" x n={copies}" if copies > 1 else "")
      raise ApiError(400, f"{field}: {many}, over this server's limit of {limit} per request", field)
    return value

  def tokens(self, items: list, prompt, field: str, raw: bool) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each input: a templated prompt lays out its fields (a plain string: its single field);
    other text goes in the prompt's input format (unless raw); token ids as given."""
    fmt = prompt.record.task.input if prompt is not None and prompt.record.task is not None else None
    templated = prompt is not None and prompt.template is not None
    vocab = self.engine.base.config.vocab_size
    out = []
    for i, item in enumerate(items):
      where = f"{field}[{i}]" if len(items) > 1 else field
      if isinstance(item, list):
        bad = [t for t in item if not 0 <= t < vocab]
        if bad:
          raise ApiError(400, f"{where}: token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})", field)
        text, toks = self.engine.tokenizer.decode(item), list(item)
      else:
        try:
          text = item if templated else input_format.apply(fmt, item, raw=raw)
          toks = self.engine.encode(text, prompt, where)
        except UserError as e:
          raise ApiError(400, str(e).splitlines()[0] if templated else f"{where}: {e}", field) from None
      if len(toks) > self.engine.max_input_tokens:
        raise ApiError(
          400, f"{where}: {len(toks)} tokens, over this server's limit of {self.engine.max_input_tokens}", field
        )
      out.append((text, toks))
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
    stats = self.engine.store.stats()
    return {
      "status": "ok",
      "prompts": stats.host_prompts,
      "queue_depth": self.engine.queue_depth,
      "prompt_cache": dataclasses.asdict(stats.cache),
    }

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

  @staticmethod
  def check_params(body: CompletionRequest) -> None:
    """OpenAI parameters this server does not implement: refused unless at their "off" value; unknown ones too."""
    for field, value in (body.model_extra or {}).items():
      if field in _OFF:
        if value not in _OFF[field]:
          raise ApiError(400, f"{field}: not supported by this server (leave it out)", field)
      elif field == "best_of":
        if value not in (None, body.n):
          raise ApiError(400, "best_of: only best_of = n is supported (every choice is returned)", field)
      elif field not in _ACCEPTED:
        raise ApiError(400, f"{field}: unknown parameter", field)
    if body.max_tokens > 0 and not body.echo:  # generation (`serve.logprobs` with logprobs)
      if body.logprobs is not None and body.logprobs > TOP_LOGPROBS:
        raise ApiError(
          400,
          f"logprobs: at most {TOP_LOGPROBS} alternatives per generated token (up to {MAX_LOGPROBS} when scoring a "
          "prompt: echo with max_tokens 0)",
          "logprobs",
        )
      return
    if body.stream:
      raise ApiError(400, "stream: not with echo or max_tokens 0 (their answer is one piece)", "stream")
    if body.max_tokens > 1 or (body.max_tokens == 1 and body.temperature != 0):
      raise ApiError(
        400,
        "echo: the prompt's tokens are scored with max_tokens 0, or 1 at temperature 0 (the log-probabilities of "
        "longer generations come without echo)",
        "echo",
      )

  def _completion_requests(self, body: CompletionRequest) -> list[Request]:
    """Checked requests (no callbacks yet), n per input (prompt-major, as OpenAI orders choices)."""
    if body.max_tokens > self.engine.max_tokens:
      raise ApiError(
        400, f"max_tokens: {body.max_tokens} is over this server's limit of {self.engine.max_tokens}", "max_tokens"
      )
    prompt = self.prompt(body.model)
    inputs = self.tokens(self.items(body.prompt, "prompt", body.n), prompt, "prompt", body.raw)
    stop = tuple([body.stop] if isinstance(body.stop, str) else body.stop or ())
    if len(stop) > 4:
      raise ApiError(400, "stop: at most 4 stop sequences", "stop")
    sampling = (
      Sampling("greedy")
      if body.temperature == 0
      else Sampling("sample", temperature=float(body.temperature), top_p=float(body.top_p))
    )
    seeds = [None if body.seed is None else (body.seed + j) % 2**32 for j in range(body.n)]
    return [
      Request(
        "complete",
        prompt,
        text,
        toks,
        None,
        max_tokens=body.max_tokens,
        sampling=sampling,
        stop=stop,
        seed=s,
        logprobs=body.logprobs,
      )
      for text, toks in inputs
      for s in seeds
    ]

  async def completions(self, body: CompletionRequest):
    self.check_params(body)
    if body.max_tokens == 0 or body.echo:
      return await self.scored_completions(body)
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
        dict(text=r["text"], index=i, logprobs=self.logprobs(q, r.get("logprobs")), finish_reason=r["finish_reason"])
        for i, (q, r) in enumerate(zip(reqs, results, strict=True))
      ]
      used = sum(r["prompt_tokens"] for r in results), sum(r["completion_tokens"] for r in results)
      return _completion(rid, created, body.model, choices, used)
    options = (body.model_extra or {}).get("stream_options") or {}
    return self.stream(reqs, rid, created, body.model, bool(isinstance(options, dict) and options.get("include_usage")))

  def logprobs(self, r: Request, items: list | None, before: list[int] | None = None) -> dict | None:
    """A choice's (or a stream chunk's) OpenAI `logprobs` object: None unless the request asked for them."""
    if r.logprobs is None:
      return None
    return openai_logprobs(self.engine.tokenizer, items or [], r.logprobs, before or [])

  def stream(
    self, reqs: list[Request], rid: str, created: int, model: str, include_usage: bool = False
  ) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(reqs):
      done = r.on_done
      r.on_delta = lambda delta, items, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, delta, items, None))
      r.on_done = lambda result, i=i, done=done: (
        done(result),
        loop.call_soon_threadsafe(queue.put_nowait, (i, None, None, result)),
      )
    self.submit(reqs)

    async def events():
      left, used = len(reqs), [0, 0]
      sent: list[list[int]] = [[] for _ in reqs]  # each choice's tokens whose log-probabilities went out
      try:
        while left:
          i, delta, items, result = await queue.get()
          if result is None:
            logprobs = self.logprobs(reqs[i], items, sent[i])
            sent[i] += [x.token for x in items]
            yield _sse(rid, created, model, dict(text=delta, index=i, logprobs=logprobs, finish_reason=None))
            continue
          left -= 1
          if isinstance(result, Exception):
            yield f"data: {json.dumps({'error': {'message': f'internal error: {result}', 'type': 'server_error'}})}\n\n"
            continue
          used = [used[0] + result["prompt_tokens"], used[1] + result["completion_tokens"]]
          rest = self.logprobs(reqs[i], (result.get("logprobs") or [])[len(sent[i]) :], sent[i])
          yield _sse(rid, created, model, dict(text="", index=i, logprobs=rest, finish_reason=result["finish_reason"]))
        if include_usage:  # OpenAI's usage chunk (stream_options.include_usage)
          yield _sse(rid, created, model, None, dict(zip(_USAGE, [*used, sum(used)], strict=True)))
        yield "data: [DONE]\n\n"
      finally:  # the client went away (or the stream ended): a request still decoding frees its slot
        for r in reqs:
          r.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream")

  async def scored_completions(self, body: CompletionRequest):
    """echo / logprobs / max_tokens 0: one scoring call (`serve.scoring`), not the decode loop."""
    if body.max_tokens > 1:  # (checked) max_tokens 0 without echo or logprobs
      raise ApiError(400, "max_tokens: at most 1 here", "max_tokens")
    prompt = self.prompt(body.model)
    inputs = self.tokens(self.items(body.prompt, "prompt", body.n), prompt, "prompt", body.raw)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    needs_model = body.echo or body.logprobs is not None or body.max_tokens == 1
    if needs_model and not Scorer.scores(self.engine.base):
      field = "echo" if body.echo else "logprobs"
      raise ApiError(400, f"{field}: scoring a prompt's tokens needs a decoder-only base; use /v1/classify", field)
    if self.draining:
      raise ApiError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "5"})
    scored = [None] * len(inputs)
    if needs_model:
      rows, tok = [toks for _, toks in inputs], self.engine.tokenizer
      k = max(body.logprobs or 0, 1)
      scored = await asyncio.get_running_loop().run_in_executor(
        None, self.scorer.score, prompt, rows, k, encoding.pad_id(tok)
      )
    choices = []
    for (text, toks), sc in zip(inputs, scored, strict=True):
      choice = self.scored_choice(body, text, toks, sc)
      choices += [dict(choice, index=len(choices) + j) for j in range(body.n)]
    used = sum(len(t) for _, t in inputs) * body.n, body.max_tokens * len(choices)
    return _completion(rid, created, body.model, choices, used)

  def scored_choice(self, body: CompletionRequest, text: str, toks: list[int], sc) -> dict:
    tok = self.engine.tokenizer
    ids = list(toks) if body.echo else []
    lps = list(sc.token_logprobs) if body.echo and sc is not None else []
    tops = list(sc.top) if body.echo and sc is not None else []
    out, finish = (text if body.echo else ""), "length"
    if body.max_tokens == 1:
      ids.append(sc.next_token)
      lps.append(sc.next_logprob)
      tops.append(sc.next_top)
      if sc.next_token == tok.eos_token_id:
        finish = "stop"
      else:
        out += tok.decode([sc.next_token], skip_special_tokens=True)
    logprobs = None
    if body.logprobs is not None:
      pieces = [tok.decode([t]) for t in ids]
      offsets = [0, *itertools.accumulate(len(p) for p in pieces)][: len(pieces)]
      logprobs = dict(
        tokens=pieces,
        token_logprobs=lps,
        top_logprobs=[None if t is None else {tok.decode([j]): v for j, v in t[: body.logprobs]} for t in tops],
        text_offset=offsets,
      )
    return dict(text=out, index=0, logprobs=logprobs, finish_reason=finish)

  async def classify(self, body: ClassifyRequest):
    prompt = self.prompt(body.model)
    items = self.items(body.input, "input")
    if any(isinstance(x, list) for x in items):
      raise ApiError(400, "input: give text or objects of fields (token ids are for /v1/completions)", "input")
    if body.labels is not None and not body.labels:
      raise ApiError(400, "labels: give at least one label (or leave labels out for the prompt's own)", "labels")
    labels = tuple(body.labels) if body.labels is not None else (prompt.labels if prompt is not None else None)
    if not labels:
      raise ApiError(400, f"labels: model {body.model!r} records no labels; give them", "labels")
    if len(set(labels)) != len(labels) or any(not lab for lab in labels):
      raise ApiError(400, "labels: give distinct, non-empty label strings", "labels")
    self.check_labels(labels)
    loop = asyncio.get_running_loop()
    futures, reqs = [], []
    for text, toks in self.tokens(items, prompt, "input", body.raw):
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

  def check_labels(self, labels: tuple[str, ...]) -> None:
    """At most `max_labels` labels of at most `max_input_tokens` tokens each (a longer one would be cut)."""
    if len(labels) > self.max_labels:
      raise ApiError(400, f"labels: {len(labels)} labels, over this server's limit of {self.max_labels}", "labels")
    ids = encoding.ids_of(self.engine.tokenizer, list(labels), self.engine.base.batch_type.LABEL_SPECIAL)
    for i, (lab, row) in enumerate(zip(labels, ids, strict=True)):
      if len(row) + 1 > self.engine.max_input_tokens:  # + EOS
        raise ApiError(
          400,
          f"labels[{i}]: {len(row) + 1} tokens with EOS ({lab[:40]!r}...), over this server's limit of "
          f"{self.engine.max_input_tokens} (--max-input-tokens)",
          "labels",
        )

  async def add_prompt(self, body: AddPrompt, request: HttpRequest):
    self.admin(request)
    if body.name == self.base_name:
      raise ApiError(400, f"name: {self.base_name!r} is the base model's name", "name")
    if body.name in self.engine.store.names():
      raise ApiError(409, f"name: prompt {body.name!r} is already served (DELETE it first)", "name")
    if not body.name or "/" in body.name:
      raise ApiError(400, f"name: {body.name!r}: give a non-empty name without '/'", "name")
    try:
      served = await asyncio.get_running_loop().run_in_executor(None, self.engine.store.add, body.name, body.path)
    except UserError as e:
      field = "name" if "already served" in str(e) else "path"
      raise ApiError(409 if field == "name" else 400, str(e).splitlines()[0], field) from None
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


def _not_found(request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
  """Unknown routes and methods, in OpenAI's error shape."""
  if e.status_code == 404:
    message, kind = f"{request.method} {request.url.path}: no such route (this server has {_ROUTES})", "not_found_error"
  elif e.status_code == 405:
    message, kind = f"{request.method} {request.url.path}: method not allowed", "invalid_request_error"
  else:
    message, kind = str(e.detail), "invalid_request_error"
  return _error(e.status_code, message, kind=kind, headers=getattr(e, "headers", None))


class BodyLimit:
  """ASGI middleware: a request body over `limit` bytes is answered 413 before anything reads it (Content-Length),
  or as soon as it has sent more (a chunked body)."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    length = dict(scope.get("headers") or ()).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > self.limit:
      return await self.too_large(scope, receive, send)
    messages, size = [], 0
    while True:  # read the body here (bounded), then hand it on
      message = await receive()
      messages.append(message)
      size += len(message.get("body", b""))
      if size > self.limit:
        return await self.too_large(scope, receive, send)
      if message["type"] != "http.request" or not message.get("more_body"):
        break

    async def replay():
      return messages.pop(0) if messages else await receive()

    return await self.app(scope, replay, send)

  async def too_large(self, scope, receive, send):
    message = f"the request body is over this server's limit of {self.limit} bytes (--max-request-bytes)"
    await _error(413, message)(scope, receive, send)


_ROUTES = "/v1/completions, /v1/classify, /v1/models, /v1/prompts, /health, /metrics, /"


def create_app(
  engine: Engine, *, base_name: str, admin_token: str | None = None, max_request_bytes: int = 2_000_000
) -> FastAPI:
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

  app.add_middleware(BodyLimit, limit=max_request_bytes)
  app.add_exception_handler(ApiError, lambda _, e: _error(e.status, e.message, e.param, e.kind, e.headers))
  app.add_exception_handler(RequestValidationError, _validation_error)
  app.add_exception_handler(StarletteHTTPException, _not_found)
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
