"""`jaxprompt serve`: load the base and the prompts, warm up, serve until SIGTERM / SIGINT (then drain, exit 0)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


def build(
  model: str,
  *,
  prompts: str | None = None,
  tokenizer: str | None = None,
  name: str | None = None,
  admin_token: str | None = None,
  allow_other_base: bool = False,
  mesh: str | None = None,
  dtype: str = "float32",
  max_request_bytes: int = 2_000_000,
  prompt_cache: int | None = None,
  prompt_cache_mb: float | None = None,
  **engine_options,
):
  """(app, engine, problems): the FastAPI app over an engine serving `model` and the prompts in folder `prompts`;
  `mesh` and `dtype` say where and how its frozen weights live (`load_base`); `prompt_cache` (prompts) and
  `prompt_cache_mb` (MiB) bound the device cache of prompts (`serve.cache`; None: no bound)."""
  from jaxprompt.models.interface import require_lm_head
  from jaxprompt.models.loading import load_tokenizer
  from jaxprompt.serve.app import create_app
  from jaxprompt.serve.engine import Engine, PromptStore
  from jaxprompt.serve.metrics import Metrics

  base = load_base(model, mesh=mesh, dtype=dtype)
  require_lm_head(base, "serving")
  tok = load_tokenizer(tokenizer or model)
  store = PromptStore(base, allow_other_base=allow_other_base, cache=cache_limits(prompt_cache, prompt_cache_mb))
  problems = store.load_dir(prompts) if prompts else []
  engine = Engine(base, tok, store, metrics=Metrics(), **engine_options)
  base_name = name or Path(str(model).rstrip("/")).name or "base"
  if base_name in store.names():
    from jaxprompt.errors import UsageError

    raise UsageError(f"--name {base_name!r} is also a prompt's name; pick another --name for the base")
  app = create_app(engine, base_name=base_name, admin_token=admin_token, max_request_bytes=max_request_bytes)
  return app, engine, problems


DTYPES = ("float32", "bfloat16")


def cache_limits(prompts: int | None, mb: float | None):
  """The device cache's `CacheLimits` from --prompt-cache / --prompt-cache-mb (a UsageError naming a bad one)."""
  from jaxprompt.errors import UsageError
  from jaxprompt.serve.cache import CacheLimits

  if prompts is not None and prompts < 1:
    raise UsageError(f"--prompt-cache {prompts}: give at least 1 (prompts held on the device)")
  if mb is not None and not mb > 0:
    raise UsageError(f"--prompt-cache-mb {mb}: give a size above 0 (MiB of prompts held on the device)")
  return CacheLimits(prompts=prompts, bytes=None if mb is None else int(mb * 2**20))


def load_base(model: str, *, mesh: str | None = None, dtype: str = "float32"):
  """The frozen base a server runs: its weights in `dtype` (activations stay float32), on one device, or with
  `mesh` ("data=N,fsdp=N,model=N": a config's `mesh` section, as `jaxprompt plan --mesh` takes it) read straight
  into their shards as `jaxprompt.sharding.RULES` says, so a base larger than one accelerator is served. Warns
  when the weights alone take most of a device's memory. Every jitted call of the engine then runs on that mesh:
  its shardings follow the weights'."""
  import jax.numpy as jnp
  from flax import nnx

  from jaxprompt import config as C
  from jaxprompt import sharding as shd
  from jaxprompt.errors import ConfigError, UsageError
  from jaxprompt.models.loading import load_model
  from jaxprompt.run import mesh_from_config

  if dtype not in DTYPES:
    raise UsageError(f"--dtype {dtype!r}: the frozen weights' dtype is one of {', '.join(DTYPES)}")
  if mesh is None:
    return load_model(model, dtype=jnp.dtype(dtype))
  sizes = shd.mesh_sizes(mesh)
  if sizes is None:
    raise UsageError(f"--mesh {mesh!r}: expected data=N,fsdp=N,model=N (axes left out are 1)")
  try:
    placed = mesh_from_config(C.MeshConfig(**sizes))
  except ConfigError as e:
    raise UsageError(f"--mesh {mesh!r}: {str(e).removeprefix('mesh: ')}") from None
  base = load_model(model, dtype=jnp.dtype(dtype), mesh=placed)
  shd.check_weights_fit(nnx.state(base), placed)
  return base


def _server_class():
  import uvicorn

  class Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM / SIGINT that shut it down gracefully ends the process normally (exit 0):
    uvicorn re-raises the signal after its shutdown, so the process would die of it."""

    @contextlib.contextmanager
    def capture_signals(self):
      handled = (signal.SIGINT, signal.SIGTERM)
      previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
      try:
        yield
      finally:
        for sig, handler in previous.items():
          signal.signal(sig, handler)

  return Server


def run(args) -> int:
  try:
    import uvicorn
  except ImportError:
    from jaxprompt.errors import UsageError

    raise UsageError(
      "jaxprompt serve needs the serve extra: pip install 'jaxprompt[serve]' (FastAPI, uvicorn)"
    ) from None
  check_port(args.host, args.port)  # before loading anything
  token = args.admin_token or os.environ.get("JAXPROMPT_ADMIN_TOKEN") or None
  app, engine, problems = build(
    args.model,
    prompts=args.prompts,
    tokenizer=args.tokenizer,
    name=args.name,
    admin_token=token,
    allow_other_base=args.allow_other_base,
    mesh=args.mesh,
    dtype=args.dtype,
    max_batch=args.max_batch,
    max_wait_ms=args.max_wait_ms,
    queue_size=args.queue_size,
    max_input_tokens=args.max_input_tokens,
    max_tokens=args.max_tokens,
    scheduler=args.scheduler,
    slots=args.slots,
    prompt_slots=args.prompt_slots,
    decode_steps=args.decode_steps,
    prompt_cache=args.prompt_cache,
    prompt_cache_mb=args.prompt_cache_mb,
    max_request_bytes=args.max_request_bytes,
  )
  for line in problems:
    print(f"jaxprompt: warning: {line}", file=sys.stderr)
  if args.warmup:
    start = time.monotonic()
    programs, _ = engine.warmup()
    print(f"jaxprompt: warmed up {programs} shapes in {time.monotonic() - start:.0f} s", file=sys.stderr)
  names = engine.store.names()
  print(
    f"jaxprompt: serving {len(names)} prompt(s) ({', '.join(names) or 'none'}) on http://{args.host}:{args.port}",
    file=sys.stderr,
    flush=True,
  )
  config = uvicorn.Config(
    app,
    host=args.host,
    port=args.port,
    log_level="warning",
    lifespan="on",
    timeout_graceful_shutdown=args.drain_seconds,
  )
  _server_class()(config).run()  # SIGTERM / SIGINT: stop accepting, answer in-flight requests, then return
  print("jaxprompt: server stopped", file=sys.stderr)
  return 0


def check_port(host: str, port: int) -> None:
  """A UsageError naming --host / --port unless a server could listen there now (binding as uvicorn does)."""
  from jaxprompt.errors import UsageError

  if not 0 <= port <= 65535:
    raise UsageError(f"--port {port}: a port is 0..65535")
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except (socket.gaierror, UnicodeError, OverflowError) as e:
    raise UsageError(f"--host {host} --port {port}: not an address to listen on ({e})") from None
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(address)
    except OSError as e:
      taken = e.errno == errno.EADDRINUSE
      why = "is already in use (another server?); pick another --port" if taken else f"cannot be bound: {e.strerror}"
      raise UsageError(f"--port {port}: {host}:{port} {why}") from None


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, *, timeout: float = 240.0):
  """Serve `app` from a thread on a free 127.0.0.1 port (benchmarks, tests, notebooks); yields its URL once /health
  answers; always stopped on exit."""
  import httpx
  import uvicorn

  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  try:
    end = time.monotonic() + timeout
    while True:
      try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.monotonic() > end or not thread.is_alive():
        raise RuntimeError(f"the server at {url} did not start")
      time.sleep(0.1)
    yield url
  finally:
    server.should_exit = True
    thread.join(30)
