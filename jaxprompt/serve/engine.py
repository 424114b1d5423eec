"""The serving engine: one frozen base model, many prompts, requests coalesced into mixed-prompt batches.

Notation: B batch (bucketed), L input length (bucketed), T new tokens (bucketed), P prompt length, C labels.

The HTTP layer (asyncio) submits `Request`s to one queue. Two schedulers drain it: "continuous" (the default,
`serve.slots`: decode slots, a request admitted as soon as one is free, every prompt and setting in one step) and
"static", described here. Its worker thread takes the oldest, waits up to `max_wait_ms` for more
that can share its batch (the same prompt *group* and decoding settings; `max_batch` at most), runs them as one
mixed-prompt batch and hands each request its result through callbacks. Shapes are bucketed (powers of two), so a
running server compiles a bounded set of programs: per prompt group, batch bucket, length bucket and new-token
bucket one prefill and one decode-chunk program (`inference.decoding.start` / `advance`).

A prompt is turned, once, when it is loaded, into what every request reuses (`ServedPrompt.prefix`, batch 1):
  decoders: its keys and values at every layer (a soft prompt of any method run once at positions 0..P-1, as
    `Decoder.shared_prompt` does in training; a prefix-tuning table as it is), so a request prefills only its own
    tokens: a prompt is a pre-filled cache; an adaption prompt's per-layer keys/values (`FrozenLM.adaption_kv`),
    which every decoding step attends to without projecting them again;
  T5: its input embeddings (the encoder is bidirectional: nothing to precompute) or a prefix's keys/values;
  a templated prompt (`prompt.template`): its input embeddings, scattered into each request's virtual tokens when the
    request is prefilled (its template lays out the request's fields: `Engine.encode`).
That form is kept on the host (numpy); a bounded LRU device cache in front of it (`serve.cache`) holds the prompts
requests use, filled when a request is admitted, before its prefill. Prompts whose arrays have the same shapes form
a group; a static batch is of one group and concatenates its requests' cached rows. A group never mixes kinds or
lengths (the base alone is the group of no prompt).

Decoding runs in chunks of `chunk` tokens so streams receive text as it is made and a batch stops once every
request in it is done (EOS, its own max_tokens, or a stop string); greedy is exact against `jaxprompt generate`,
and a seeded sampled request draws from its own key (the same text alone or in any batch).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.config import GenerateConfig
from jaxprompt.data import encoding
from jaxprompt.data.encoding import pad_id
from jaxprompt.data.templates import Template
from jaxprompt.errors import PromptError, UserError
from jaxprompt.inference import decoding
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts import methods
from jaxprompt.prompts.io import is_prompt_source, load_prompt_source, prompt_task_names, task_slug
from jaxprompt.prompts.record import PromptRecord
from jaxprompt.serve import logprobs as lp
from jaxprompt.serve.cache import CacheLimits, CacheStats, DeviceCache, tree_bytes

log = logging.getLogger(__name__)

_FIELDS = (
  "embeds",
  "keys",
  "values",
  "input_offset",
  "adaption_keys",
  "adaption_values",
  "adaption_gate",
  "adaption_on",
)
_BATCH_AXIS = {
  "embeds": 0,
  "keys": 1,
  "values": 1,
  "input_offset": 0,
  "adaption_keys": 1,
  "adaption_values": 1,
  "adaption_gate": 0,
  "adaption_on": 0,
}
_AT_SLOTS = "at_slots"  # a group key: the prompts' rows go into template slots (`Prefix.at_slots`)


class Overloaded(Exception):
  """The queue is full (HTTP 503 with Retry-After)."""


class Draining(Exception):
  """The server is stopping and takes no new requests (HTTP 503)."""


def buckets(limit: int, smallest: int) -> tuple[int, ...]:
  """Powers of two from `smallest` below `limit`, then `limit`."""
  out, b = [], smallest
  while b < limit:
    out.append(b)
    b *= 2
  return tuple(out) + (limit,)


def bucket(n: int, sizes: Sequence[int]) -> int:
  return next(s for s in sizes if s >= n)


# -- prompts ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServedPrompt:
  name: str
  source: str
  method: str
  prefix: Prefix  # batch-1 numpy arrays on the host (see the module docstring); `PromptStore.device` caches them
  labels: tuple[str, ...] | None  # the labels recorded with the prompt's task (classify's default)
  record: PromptRecord

  @property
  def group(self) -> tuple:
    """Prompts whose prefixes have these shapes (and are placed alike: in front or at template slots) share a bank
    (and a batch)."""
    shapes = tuple((f, tuple(getattr(self.prefix, f).shape)) for f in _FIELDS if getattr(self.prefix, f) is not None)
    return shapes + ((_AT_SLOTS, ()),) if self.prefix.at_slots else shapes

  @property
  def template(self) -> Template | None:
    """Where its rows go in a request's input (its record's `prompt.template`); None: in front."""
    return None if self.record.spec.template is None else Template.parse(self.record.spec.template)

  @property
  def length(self) -> int:
    slots = self.prefix.embeds.shape[1] if self.prefix.at_slots else 0
    return max(self.prefix.length, self.prefix.kv_length, slots)


def _prompt_source_paths(folder: Path) -> list[Path]:
  """What a prompts folder holds: workdirs, checkpoint steps, PEFT adapter folders, .npy / .safetensors files."""
  out = []
  for p in sorted(folder.iterdir()):
    if p.name.startswith("."):
      continue
    if p.is_dir() or p.suffix in (".npy", ".safetensors"):
      out.append(p)
  return out


def _named_sources(paths: Sequence[Path]) -> list[tuple[str, str]]:
  """(name, source) of each prompt in `paths`, named after its file or folder; a per-task run or bank gives one
  prompt per task, "NAME.TASK" (`task_slug`) — except an export's bank (bank.safetensors, a multitask bank/
  adapter) beside its tasks' own exports, which it would only repeat."""
  names = {p.stem if p.is_file() else p.name for p in paths}
  out = []
  for path in paths:
    name = path.stem if path.is_file() else path.name
    try:
      tasks = prompt_task_names(path)
    except UserError:  # reported when the source itself is loaded
      tasks = None
    if tasks is None:
      out.append((name, str(path)))
    elif all(task_slug(t) in names for t in tasks):  # bank.safetensors, or a multitask export's bank/ adapter
      log.info("%s: its tasks are served from their own exports", path)
    else:
      out += [(f"{name}.{task_slug(t)}", f"{path}@{t}") for t in tasks]
  return out


class PromptStore:
  """Prompts by name, each checked against the base and precomputed for serving once, kept on the host (numpy);
  a bounded device cache (`serve.cache`, `limits`) holds the ones requests use. Thread-safe; adding or removing a
  prompt is O(1)."""

  def __init__(self, base, *, allow_other_base: bool = False, cache: CacheLimits | None = None):
    self.base = base
    self.allow_other_base = allow_other_base
    self._graphdef, self._state = nnx.split(base)
    self._shared = jax.jit(
      lambda state, embeds: nnx.merge(self._graphdef, state).shared_prompt(Prefix(embeds=embeds), 1)[0]
    )
    self._adaption = jax.jit(lambda state, prefix: nnx.merge(self._graphdef, state).adaption_kv(prefix))
    self._lock = threading.Lock()
    self._prompts: dict[str, ServedPrompt] = {}
    self._host_bytes = 0
    self.cache = DeviceCache(cache or CacheLimits())
    # set by a continuous scheduler: why a prompt's prefix does not fit its decode slots (None: it fits)
    self.check: Callable[[Prefix], str | None] | None = None

  def load_dir(self, folder: str | Path) -> list[str]:
    """Load every prompt in `folder` (named after its file or folder); a bad one is skipped with a one-line log.
    -> the problems (one line each)."""
    folder = Path(folder)
    if not folder.is_dir():
      raise PromptError(f"--prompts {folder} is not a folder")
    problems = []
    # one workdir or export is served under its own folder's name (a workdir's checkpoints/: the workdir's)
    whole = folder.resolve().parent if folder.resolve().name == "checkpoints" else folder.resolve()
    paths = [whole] if is_prompt_source(folder) else _prompt_source_paths(folder)
    for name, source in _named_sources(paths):
      try:
        self.add(name, source)
      except UserError as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        problems.append(f"{source}: skipped: {line}")  # the caller reports them (once)
    return problems

  def prepare(self, name: str, path: str | Path) -> ServedPrompt:
    """Load and check one prompt and compute what requests reuse, on the host (does not add it)."""
    if not name or "/" in name:
      raise PromptError(f"prompt name {name!r}: give a non-empty name without '/'")
    src = load_prompt_source(path)
    for warning in src.check(self.base, str(path), strict=not self.allow_other_base):
      log.warning(warning)
    module = methods.fixed(src.value, src.spec, self.base.prefix_slots(), where=str(path))
    prefix = module.prefix(1)
    # a decoder runs a prompt in front once (`shared_prompt`); T5 keeps the embeddings, and so does a templated
    # prompt (its rows sit among each request's own tokens, which prefill them)
    if prefix.embeds is not None and not prefix.at_slots:
      # a DePT offset stays: it goes on each request's own input tokens when it is prefilled
      prefix = self._shared(self._state, jnp.asarray(prefix.embeds)).replace(input_offset=prefix.input_offset)
    if prefix.adaption is not None:  # adaption prompts: their keys/values at every layer, projected once
      prefix = self._adaption(self._state, prefix)
    prefix = jax.device_get(prefix)  # the host tier: the device cache copies it in when a request needs it
    labels = src.record.task.labels if src.record.task is not None else ()
    return ServedPrompt(
      name=name, source=str(path), method=src.method, prefix=prefix, labels=labels or None, record=src.record
    )

  def add(self, name: str, path: str | Path, *, replace: bool = False) -> ServedPrompt:
    if name in self._prompts and not replace:
      raise PromptError(f"prompt {name!r} is already served (DELETE it first)")
    served = self.prepare(name, path)
    why = self.check(served.prefix) if self.check is not None else None
    if why is not None:
      raise PromptError(f"prompt {name!r} ({path}): {why}")
    with self._lock:
      old = self._prompts.get(name)
      self._prompts[name] = served
      self._host_bytes += tree_bytes(served.prefix) - (tree_bytes(old.prefix) if old is not None else 0)
    if old is not None:
      self.cache.drop(old)
    return served

  def remove(self, name: str) -> None:
    with self._lock:
      if name not in self._prompts:
        raise KeyError(name)
      old = self._prompts.pop(name)
      self._host_bytes -= tree_bytes(old.prefix)
    self.cache.drop(old)

  def get(self, name: str) -> ServedPrompt | None:
    return self._prompts.get(name)

  def names(self) -> list[str]:
    with self._lock:
      return list(self._prompts)

  def served(self, prompt: ServedPrompt) -> bool:
    """Is `prompt` (this object) served now (not removed or replaced)?"""
    return self._prompts.get(prompt.name) is prompt

  def device(self, prompt: ServedPrompt, variant: str, make: Callable[[], object]) -> object:
    """`prompt`'s `variant` (a scheduler's form of it, `make()` from its host arrays) on the device, through the
    cache: what a request's prefill takes when it is admitted."""
    return self.cache.get(prompt, variant, make, lambda: self.served(prompt))

  def stats(self) -> "PromptStats":
    with self._lock:
      prompts, host = len(self._prompts), self._host_bytes
    return PromptStats(host_prompts=prompts, host_bytes=host, cache=self.cache.stats())

  def rows(self, prompts: Sequence[ServedPrompt]) -> Prefix:
    """The batch's prefix [.., B, ..] (all of one group): row b is prompt b's prefix, from the device cache. A
    request whose prompt was removed or replaced since it was queued still runs with the prompt it asked for."""
    group = prompts[0].group
    fields, at_slots = _group_fields(group), _placed(group)
    on_device = {}
    for p in prompts:
      if id(p) not in on_device:
        on_device[id(p)] = self.device(p, "prefix", lambda p=p: jax.tree.map(jnp.asarray, p.prefix))
    rows = {f: jnp.concatenate([getattr(on_device[id(p)], f) for p in prompts], axis=_BATCH_AXIS[f]) for f in fields}
    return Prefix(**rows, at_slots=at_slots)


@dataclasses.dataclass(frozen=True)
class PromptStats:
  """The prompt tiers now: every prompt on the host, the hot ones in the device cache."""

  host_prompts: int
  host_bytes: int
  cache: CacheStats


def _group_fields(group: tuple) -> list[str]:
  return [f for f, _ in group if f != _AT_SLOTS]


def _placed(group: tuple) -> bool:
  return any(f == _AT_SLOTS for f, _ in group)


# -- requests --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
  """A completion's decoding settings (requests share a batch only with equal settings)."""

  method: str = "greedy"  # greedy | sample
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0


@dataclasses.dataclass(eq=False)
class Request:
  """One input under one prompt (None: the base alone). kind "complete": generate up to `max_tokens` (with
  `logprobs` not None: each token's log-probability and its `logprobs` best alternatives, `serve.logprobs`);
  "classify": score `labels`. `on_delta(text, logprobs)` receives a stream's new text (and the TokenLogprobs of
  the tokens it completes; [] without `logprobs`); `on_done(result | exception)` is called exactly once."""

  kind: str
  prompt: ServedPrompt | None
  text: str | Mapping[str, str]  # the input: text, or a templated prompt's fields by name
  tokens: list[int]
  on_done: Callable
  max_tokens: int = 16
  sampling: Sampling = Sampling()
  stop: tuple[str, ...] = ()
  seed: int | None = None
  logprobs: int | None = None  # alternatives per generated token (0..TOP_LOGPROBS); None: no log-probabilities
  labels: tuple[str, ...] = ()
  on_delta: Callable | None = None
  created: float = dataclasses.field(default_factory=time.monotonic)
  cancelled: bool = False  # set when its client went away (a continuous scheduler frees its slot)
  answered: bool = False

  @property
  def key(self) -> tuple:
    group = self.prompt.group if self.prompt is not None else ()
    if self.kind == "classify":
      return ("classify", group, self.labels)
    return ("complete", group, self.sampling, self.wants_top)

  @property
  def wants_top(self) -> bool:
    """Does it ask for alternatives (the decode loop then keeps TOP_LOGPROBS per token)?"""
    return bool(self.logprobs)


class _Text:
  """A completion's text as tokens arrive: stop strings cut it, a stream gets only text that can no longer change
  (the last token and a possible start of a stop string are held back until the end), with the log-probabilities
  of the tokens that text completes when the request asks for them (`logprobs` is then their list so far)."""

  def __init__(self, tokenizer, stop: tuple[str, ...], on_delta, logprobs: list | None = None):
    self.tokenizer, self.stop, self.on_delta = tokenizer, stop, on_delta
    self.sent = ""
    self.text = ""
    self.stopped = False
    self.logprobs, self.streamed = logprobs, 0  # TokenLogprobs so far; how many went out with text

  def _cut(self, text: str) -> tuple[str, bool]:
    at = [text.find(s) for s in self.stop if s and s in text]
    return (text[: min(at)], True) if at else (text, False)

  def stops(self, tokens: list[int]) -> bool:
    """Whether the text of `tokens` holds a stop string."""
    return self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))[1]

  def update(self, tokens: list[int], final: bool) -> None:
    text, self.stopped = self._cut(self.tokenizer.decode(tokens, skip_special_tokens=True))
    self.text = text
    if self.on_delta is None:
      return
    if not (final or self.stopped):
      safe = self._cut(self.tokenizer.decode(tokens[:-1], skip_special_tokens=True))[0]
      hold = max((len(s) - 1 for s in self.stop), default=0)
      text = safe[: max(len(self.sent), len(safe) - hold)]
      text = text.rstrip("\ufffd")  # an unfinished multi-byte character
    if text.startswith(self.sent) and len(text) > len(self.sent):
      new = []
      if self.logprobs is not None:
        done = lp.covered(self.tokenizer, tokens, self.streamed, len(text))
        new, self.streamed = self.logprobs[self.streamed : done], done
      self.on_delta(text[len(self.sent) :], new)
      self.sent = text


# -- the engine ------------------------------------------------------------------------------------------------


SCHEDULERS = ("auto", "continuous", "static")
DECODE_STEPS = 8  # continuous: decode steps per call at most, when every slot is busy (`slots.SlotBatcher._steps`)


class Engine:
  """Queue, batcher and the jitted calls. `scheduler` "continuous" (or "auto", the same; `serve.slots`: `slots`
  decode slots, a request admitted as soon as one is free, `max_batch` requests prefilled at once at most,
  `prompt_slots` room for prompts added later, up to `decode_steps` decode steps per call while every slot is busy)
  or "static" (see the module docstring: a batch runs until its longest request ends). `start()` runs the worker
  thread; `stop()` lets it finish every queued request first."""

  def __init__(
    self,
    base,
    tokenizer,
    store: PromptStore,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 5.0,
    queue_size: int = 256,
    max_input_tokens: int = 512,
    max_tokens: int = 256,
    chunk: int = 8,
    metrics=None,
    scheduler: str = "auto",
    slots: int = 16,
    prompt_slots: int = 0,
    decode_steps: int = DECODE_STEPS,
  ):
    self.base, self.tokenizer, self.store = base, tokenizer, store
    self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
    self.queue_size, self.max_input_tokens, self.max_tokens, self.chunk = (
      queue_size,
      max_input_tokens,
      max_tokens,
      chunk,
    )
    self.batch_sizes = buckets(max_batch, 1)
    self.lengths = buckets(max_input_tokens, min(16, max_input_tokens))
    self.new_tokens = buckets(max_tokens, min(16, max_tokens))
    self.metrics = metrics
    if metrics is not None:
      metrics.watch_prompts(store.stats)
    self.graphdef, self.state = nnx.split(base)
    self._pad = pad_id(tokenizer)
    self._labels: dict[tuple, tuple[jax.Array, jax.Array]] = {}
    self._rank = jax.jit(
      lambda state, batch, ids, mask, prefix: nnx.merge(self.graphdef, state).label_logprobs(batch, ids, mask, prefix)
    )
    self._pending: list[Request] = []
    self._cond = threading.Condition()
    self._stopping = False
    self._thread: threading.Thread | None = None
    if scheduler not in SCHEDULERS:
      raise UserError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if slots < 1:
      raise UserError(f"--slots {slots}: give at least 1")
    self.slots = None
    if scheduler in ("auto", "continuous"):
      from jaxprompt.serve.slots import SlotBatcher

      self.slots = SlotBatcher(self, slots=slots, prompt_slots=prompt_slots, decode_steps=decode_steps)
      if metrics is not None:
        metrics.slots.set(slots)

  # -- intake ------------------------------------------------------------------------------------------------

  def encode(
    self, text: str | Mapping[str, str], prompt: ServedPrompt | None = None, where: str = "input"
  ) -> list[int]:
    """A request's input as token ids: text, or laid out by a templated prompt's template (its fields by name, or
    a string as its single field); a DataError naming `where` when they do not fit it."""
    template = prompt.template if prompt is not None else None
    return encoding.input_rows(self.base.batch_type, self.tokenizer, [text], template, where)[0]

  def submit(self, requests: Sequence[Request]) -> None:
    """Queue all of `requests` or none (Overloaded when they do not fit, Draining while stopping)."""
    with self._cond:
      if self._stopping:
        raise Draining()
      if len(self._pending) + len(requests) > self.queue_size:
        raise Overloaded()
      self._pending.extend(requests)
      self._cond.notify_all()
      self._gauge()

  @property
  def queue_depth(self) -> int:
    return len(self._pending)

  def _gauge(self) -> None:
    if self.metrics is not None:
      self.metrics.queue_depth.set(len(self._pending))

  # -- the worker ----------------------------------------------------------------------------------------------

  def start(self) -> None:
    self._thread = threading.Thread(target=self._loop, name="jaxprompt-engine", daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None) -> None:
    """Take no new requests, answer every queued one, then stop the worker."""
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  def _take(self) -> list[Request] | None:
    with self._cond:
      while not self._pending:
        if self._stopping:
          return None
        self._cond.wait()
      key = self._pending[0].key
      deadline = self._pending[0].created + self.max_wait
      while not self._stopping:
        same = sum(1 for r in self._pending if r.key == key)
        left = deadline - time.monotonic()
        if same >= self.max_batch or left <= 0:
          break
        self._cond.wait(left)
      batch = [r for r in self._pending if r.key == key][: self.max_batch]
      taken = set(map(id, batch))
      self._pending = [r for r in self._pending if id(r) not in taken]
      self._gauge()
      return batch

  def new_text(self, r: Request) -> "_Text":
    """A completion's text as its tokens arrive (stop strings, streaming, log-probabilities)."""
    return _Text(self.tokenizer, r.stop, r.on_delta, [] if r.logprobs is not None else None)

  def _loop(self) -> None:
    if self.slots is not None:
      return self.slots.run()
    while True:
      batch = self._take()
      if batch is None:
        return
      try:
        started = time.monotonic()
        if self.metrics is not None:  # counted before any answer leaves
          self.metrics.batch_size.observe(len(batch))
          self.metrics.batches.inc()
        tokens = self._run(batch)
        if self.metrics is not None and tokens:
          self.metrics.generated_tokens.inc(tokens)
          self.metrics.tokens_per_second.set(tokens / max(time.monotonic() - started, 1e-9))
      except Exception as e:  # noqa: BLE001 — a failed batch answers its requests, the server goes on
        log.exception("batch of %d failed", len(batch))
        for r in batch:
          r.on_done(e)

  def _run(self, batch: list[Request]) -> int:
    return self._classify(batch) if batch[0].kind == "classify" else self._complete(batch)

  def _prefix(self, batch: list[Request], size: int) -> Prefix | None:
    if batch[0].prompt is None:
      return None
    prompts = [r.prompt for r in batch]
    return self.store.rows(prompts + [prompts[0]] * (size - len(batch)))

  def _complete(self, batch: list[Request]) -> int:
    n = len(batch)
    b = bucket(n, self.batch_sizes)
    rows = [r.tokens for r in batch] + [batch[0].tokens] * (b - n)
    length = bucket(max(len(r) for r in rows), self.lengths)
    ids, mask = self.base.batch_type.layout_inputs(rows, length, self._pad)
    t_new = bucket(max(r.max_tokens for r in batch), self.new_tokens)
    s = batch[0].sampling
    opts = decoding.options(
      self.base,
      GenerateConfig(method=s.method, max_new_tokens=t_new, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k),
      top_logprobs=lp.TOP_LOGPROBS if batch[0].wants_top else 0,
    )
    seeds = [r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little") for r in batch]
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds + [seeds[0]] * (b - n), jnp.uint32))
    state = decoding.start(
      self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(mask), self._prefix(batch, b), keys, opts=opts
    )
    temperature = jnp.asarray(s.temperature, jnp.float32)
    texts = [self.new_text(r) for r in batch]
    counts: list[int | None] = [None] * n
    t = 0
    while any(c is None for c in counts):
      t = min(t + self.chunk, t_new)
      state = decoding.advance(self.graphdef, self.state, state, temperature, jnp.int32(t), opts=opts)
      self._read(batch, state, texts, counts, t >= t_new, set(opts.eos))
      if t >= t_new:
        break
    return sum(c or 0 for c in counts)

  def _read(self, batch: list[Request], state: dict, texts: list, counts: list, last: bool, eos: set) -> None:
    """After a chunk of steps: stream each unfinished request's text and answer those that ended (counts[i]: the
    tokens it got; None while it runs)."""
    tokens, lengths = np.asarray(state["tokens"]), np.asarray(state["lengths"])
    host = {}
    if any(r.logprobs is not None for r in batch):
      host = {f: np.asarray(state[f]) for f in ("logprobs", "top_values", "top_ids") if f in state}
    for i, r in enumerate(batch):
      if counts[i] is not None:
        continue
      k = min(int(lengths[i]), r.max_tokens)
      row = tokens[i, :k].tolist()
      if texts[i].logprobs is not None:
        top = (host["top_values"][i], host["top_ids"][i]) if "top_ids" in host else (None, None)
        texts[i].logprobs[:] = lp.entries(row, host["logprobs"][i], *top, k=r.logprobs)
      ended = bool(row) and row[-1] in eos
      final = ended or k >= r.max_tokens or last
      texts[i].update(row[:-1] if ended else row, final)
      if final or texts[i].stopped:
        counts[i] = k
        finish = "stop" if ended or texts[i].stopped else "length"
        r.on_done(
          dict(
            text=texts[i].text,
            finish_reason=finish,
            prompt_tokens=len(r.tokens),
            completion_tokens=k,
            logprobs=texts[i].logprobs,
          )
        )

  def labels(self, labels: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """The label strings as decoder targets / continuations [C, longest] (cached)."""
    if labels not in self._labels:
      rows = encoding.encode_labels(self.base.batch_type, self.tokenizer, labels, self.max_input_tokens)
      width = max(int(np.asarray(rows[1]).sum(axis=1).max()), 1)  # the longest label, no padding beyond it
      self._labels[labels] = tuple(jnp.asarray(a[:, :width]) for a in rows)
    return self._labels[labels]

  def classify_inputs(self, rows: list[Request], labels: tuple, template: Template | None, length: int, width: int):
    """A classification batch: each request's input (its text, or its fields laid out by `template`, the prompt's)
    before the first label (the scores need none), inputs padded to `length`, targets to `width`."""
    examples = [
      {"inputs": r.text, "targets": labels[0]}
      if template is None
      else {"fields": template.values(r.text), "targets": labels[0]}
      for r in rows
    ]
    return encoding.encode(
      self.base.batch_type,
      examples,
      self.tokenizer,
      input_length=length,
      target_length=width,
      name="classify",
      template=template,
    )

  def _classify(self, batch: list[Request]) -> int:
    n = len(batch)
    b = bucket(n, self.batch_sizes)
    labels = batch[0].labels
    label_ids, label_mask = self.labels(labels)
    rows = [r for r in batch] + [batch[0]] * (b - n)
    length = bucket(max(len(r.tokens) for r in rows), self.lengths)
    template = batch[0].prompt.template if batch[0].prompt is not None else None
    data = self.classify_inputs(rows, labels, template, length, label_ids.shape[1])
    scores = np.asarray(
      self._rank(self.state, jax.tree.map(jnp.asarray, data), label_ids, label_mask, self._prefix(batch, b))
    )
    for i, r in enumerate(batch):
      row = scores[i]
      r.on_done(
        dict(
          label=labels[int(np.argmax(row))],
          scores={lab: float(v) for lab, v in zip(labels, row, strict=False)},
          prompt_tokens=len(r.tokens),
        )
      )
    return 0

  def warmup(self) -> tuple[int, float]:
    """Compile before serving: continuous, every admission (batch bucket x length bucket) and the generate step;
    static, greedy completion for every prompt group, batch bucket and length bucket (the smallest new-token
    bucket). -> (programs, seconds)."""
    start, count = time.monotonic(), 0
    if self.slots is not None:
      return self.slots.warmup(), time.monotonic() - start
    groups = {p.group: p for p in map(self.store.get, self.store.names())}
    for prompt in [None, *groups.values()]:
      for b in self.batch_sizes:
        for length in self.lengths:
          self._complete(
            [Request("complete", prompt, "", [self._pad] * length, lambda _: None, max_tokens=1) for _ in range(b)]
          )
          count += 1
    return count, time.monotonic() - start
