"""Continuous batching over decode slots (JetStream's shape), for decoders and T5 alike.

Notation: N decode slots, b requests admitted at once (bucketed), L input length (bucketed; Lmax the longest),
T new tokens (Tmax: `--max-tokens`), Pe / Pk prompt embedding / key-value slots, s a DePT offset's positions.

The device holds one fixed-shape state of N decode slots: the model's own decoding cache (`prefill`'s, laid out by
`pad_inputs` for inputs of Lmax; decoders: keys/values, T5: self-attention keys/values plus the encoder's
cross-attention keys/values and mask, per slot), each slot's next token, step, sampling key and settings. One worker
thread loops:

  admit: newly queued requests (at most the free slots) are prefilled together — one jitted call per batch bucket x
    length bucket, whatever their prompts and settings — their first token sampled and their rows written into free
    slots (`models.kv.insert_rows`); classification requests are scored in the same loop (`label_logprobs`);
  step:  one jitted call advances every slot by one token (`decode_step` with each row's own step), each row under
    its own temperature / top-k / top-p / key (`decoding.choose_rows`); the host reads the N tokens, streams text
    and frees the slot of every request that ended (EOS, its max_tokens, a stop string, its client gone), so the
    next admission reuses it at once. Each token comes with its log-probability (`decoding.chosen_logprobs`) and,
    in a step where some row asks for them, every row's top 5 (`serve.logprobs`; a conditional, not a program).
    While every slot is busy a call runs up to `--decode-steps` steps, and a request's tokens from one call reach
    its stream together.

The loop runs one call ahead of the host: each step is dispatched before the host reads the previous call's tokens
(JAX dispatches asynchronously), so the device computes while the host streams text and frees slots. A request whose
last token is in the call just dispatched frees its slot then (the next admission writes it after that call); one
that ends at EOS or a stop string is stepped once more, unread.

Prompts of every method share a call: each prompt is padded to the server's prompt slots (`Layout`; on the
left, with a per-row mask, so positions and relative distances are the row's own) and a request's prefill takes its
prompt's row, from the store's device cache (`serve.cache`; copied in from the host at admission when missing); the
base alone is a row of masked slots. An adaption prompt's per-layer keys/values (projected once, when the prompt is
loaded) and gates, padded to A slots with a mask, stay in its slot's cache and are only attended to at every step
(no projection per step); a templated prompt's rows (padded to V) go into the request's virtual tokens at prefill
(`Prefix.template_embeds`). Programs compiled: one admission per batch
bucket x length bucket, one generate step, and one classification per batch bucket x length bucket x label set.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import UserError
from jaxprompt.inference import decoding
from jaxprompt.models import kv as KV
from jaxprompt.models.interface import Prefix
from jaxprompt.serve import logprobs as lp

log = logging.getLogger(__name__)

_AXIS = {
  "embeds": 0,
  "embeds_mask": 0,
  "keys": 1,
  "values": 1,
  "kv_mask": 0,
  "input_offset": 0,
  "adaption_keys": 1,
  "adaption_values": 1,
  "adaption_gate": 0,
  "adaption_on": 0,
  "adaption_mask": 0,
  "template_embeds": 0,
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """The decode-slot state's fixed shapes (static: part of every program's compilation key)."""

  slots: int
  input_length: int  # Lmax
  max_new_tokens: int  # Tmax
  embeds: int  # Pe: prompt embedding positions before the input (0: none)
  kv: int  # Pk: prompt key/value slots before the input (0: none)
  kv_shape: tuple[int, int, int]  # (layers, heads, head dim) of a key/value prefix
  offset: int  # s: a DePT offset's input positions (0: none)
  hidden: int
  adaption: int = 0  # A: adaption prompt slots in every layer (0: none)
  virtual: int = 0  # V: a prompt template's rows, placed at the input's virtual tokens (0: none)


def layout_for(base, prompts, *, slots: int, input_length: int, max_new_tokens: int, prompt_slots: int = 0) -> Layout:
  """The smallest layout that holds every prompt in `prompts` (ServedPrompt) and `prompt_slots` more of any method."""
  # whether this kind serves a soft prompt as keys/values (decoders: computed once) or as embeddings (T5)
  probe = Prefix(embeds=jax.ShapeDtypeStruct((1, 1, base.hidden_size), jnp.float32))
  as_kv = jax.eval_shape(lambda e: base.shared_prompt(e, 1)[0], probe).keys is not None
  embeds = max([p.prefix.length for p in prompts] + [0 if as_kv else prompt_slots])
  kv = max([p.prefix.kv_length for p in prompts] + [prompt_slots])
  offset = max([p.prefix.input_offset.shape[1] for p in prompts if p.prefix.input_offset is not None] + [0])
  # adaption room comes from the prompts loaded at start only: every step pays for it in every layer
  adaption = max([p.prefix.adaption_length for p in prompts] + [0])
  virtual = max([p.prefix.embeds.shape[1] for p in prompts if p.prefix.at_slots] + [prompt_slots])
  s = base.prefix_slots()
  return Layout(
    slots=slots,
    input_length=input_length,
    max_new_tokens=max_new_tokens,
    embeds=embeds,
    kv=kv,
    kv_shape=(len(s.layer_of), s.heads, s.head_dim),
    offset=offset,
    hidden=base.hidden_size,
    adaption=adaption,
    virtual=virtual,
  )


def misfit(layout: Layout, prefix: Prefix) -> str | None:
  """Why a prompt's prefix does not fit the layout's prompt slots (None: it fits)."""
  offset = 0 if prefix.input_offset is None else prefix.input_offset.shape[1]
  adaption = prefix.adaption_length
  if adaption > layout.adaption:
    return (
      f"its {adaption} adaption slots are over this server's {layout.adaption} (the longest adaption prompt loaded "
      "at start sets them: start it with this one loaded)"
    )
  for what, n, room in (
    ("template rows", prefix.embeds.shape[1] if prefix.at_slots else 0, layout.virtual),
    ("embedding positions", prefix.length, layout.embeds),
    ("key/value slots", prefix.kv_length, layout.kv),
    ("offset positions", offset, layout.offset),
  ):
    if n > room:
      return f"its {n} {what} are over this server's {room} (start it with a larger --prompt-slots)"
  return None


def prompt_row(layout: Layout, prefix: Prefix | None) -> Prefix | None:
  """One prompt as a row of the layout (batch 1, numpy): embeddings and keys/values left-padded with a mask, a
  DePT offset, template rows and adaption prompts right-padded (adaption slots with a mask); None: the base alone
  (every slot masked)."""
  if not (layout.embeds or layout.kv or layout.offset or layout.adaption or layout.virtual):
    return None
  out, h = {}, layout.hidden
  if layout.embeds:
    e, m = np.zeros((1, layout.embeds, h), np.float32), np.zeros((1, layout.embeds), np.int32)
    if prefix is not None and prefix.embeds is not None and not prefix.at_slots:
      p = prefix.length
      e[:, layout.embeds - p :], m[:, layout.embeds - p :] = np.asarray(prefix.embeds, np.float32), 1
    out.update(embeds=e, embeds_mask=m)
  if layout.kv:
    y, heads, d = layout.kv_shape
    k, v = (np.zeros((y, 1, layout.kv, heads, d), np.float32) for _ in range(2))
    m = np.zeros((1, layout.kv), np.int32)
    if prefix is not None and prefix.keys is not None:
      p = prefix.kv_length
      k[:, :, layout.kv - p :], v[:, :, layout.kv - p :] = np.asarray(prefix.keys), np.asarray(prefix.values)
      m[:, layout.kv - p :] = 1
    out.update(keys=k, values=v, kv_mask=m)
  if layout.offset:
    out["input_offset"] = _right((1, layout.offset, h), prefix.input_offset if prefix is not None else None)
  if layout.virtual:
    rows = prefix.embeds if prefix is not None and prefix.at_slots else None
    out["template_embeds"] = _right((1, layout.virtual, h), rows)
  if layout.adaption:
    out.update(_adaption_row(layout, prefix))
  return Prefix(**out)


def _right(shape: tuple, a) -> np.ndarray:
  """Zeros of `shape` [1, n, ...] with `a` [1, m, ...] (m <= n; None: nothing) in its first m along axis 1."""
  out = np.zeros(shape, np.float32)
  if a is not None:
    out[:, : a.shape[1]] = np.asarray(a, np.float32)
  return out


def _adaption_row(layout: Layout, prefix: Prefix | None) -> dict:
  """A row's adaption prompts' keys/values [Y, 1, A, K, D] (right-padded; projected when the prompt was loaded),
  gates and switches [1, Y] and slot mask [1, A]; a prompt of another method (or none) is switched off in every
  layer."""
  y, heads, d = layout.kv_shape
  a = layout.adaption
  k, v = (np.zeros((y, 1, a, heads, d), np.float32) for _ in range(2))
  gate, on, m = np.zeros((1, y), np.float32), np.zeros((1, y), np.float32), np.zeros((1, a), np.int32)
  if prefix is not None and prefix.adaption_keys is not None:
    n = prefix.adaption_length
    k[:, :, :n], v[:, :, :n], m[:, :n] = np.asarray(prefix.adaption_keys), np.asarray(prefix.adaption_values), 1
    gate[:], on[:] = np.asarray(prefix.adaption_gate, np.float32), np.asarray(prefix.adaption_on)
  return dict(adaption_keys=k, adaption_values=v, adaption_gate=gate, adaption_on=on, adaption_mask=m)


def _stack(rows: tuple) -> Prefix | None:
  if rows[0] is None:
    return None
  fields = [f for f in _AXIS if getattr(rows[0], f) is not None]
  return Prefix(**{f: jnp.concatenate([getattr(r, f) for r in rows], axis=_AXIS[f]) for f in fields})


# -- the jitted programs ---------------------------------------------------------------------------------------


def _scored(logits, tok, want) -> tuple:
  """The tokens [b] with their log-probabilities [b] and, when a row wants them (want [b] bool), every row's
  TOP_LOGPROBS alternatives (values, ids) [b, k]; zeros otherwise (the top-k is skipped: no request pays for it
  unless one asks)."""
  b, k = logits.shape[0], decoding.TOP_LOGPROBS
  top = jax.lax.cond(
    jnp.any(want),
    decoding.top_logprobs,
    lambda x: (jnp.zeros((b, k), jnp.float32), jnp.zeros((b, k), jnp.int32)),
    logits,
  )
  return tok, decoding.chosen_logprobs(logits, tok), *top


def _new_rows(model, ids, mask, rows, settings, seeds, want, layout: Layout) -> tuple[dict, tuple]:
  """Prefill b requests -> (their decode-slot rows, their first tokens [b] as `_scored`)."""
  logits0, cache = model.prefill(
    input_ids=ids, attention_mask=mask, prefix=_stack(rows), max_new_tokens=layout.max_new_tokens
  )
  cache = model.pad_inputs(cache, layout.input_length - ids.shape[1])
  keys = jax.vmap(jax.random.key)(seeds)
  first, keys = decoding.choose_rows(logits0, keys, *settings)
  greedy, temperature, top_k, top_p = settings
  b = ids.shape[0]
  new = dict(
    cache=cache,
    tokens=first,
    t=jnp.zeros((b,), jnp.int32),
    keys=jax.random.key_data(keys),
    greedy=greedy,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  return new, _scored(logits0, first, want)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"), donate_argnames=("slots",))
def admit(graphdef, state, slots, ids, mask, rows, settings, seeds, want, at, *, layout: Layout):
  """Prefill requests and write them into slots `at` [b] (N: a padding row, dropped) -> (slots, first tokens [b]
  with their log-probabilities: `_scored`)."""
  new, first = _new_rows(nnx.merge(graphdef, state), ids, mask, rows, settings, seeds, want, layout)
  return KV.insert_rows(slots, new, at), first


def _one_step(model, slots, want, live, layout: Layout) -> tuple[dict, tuple]:
  logits, cache = model.decode_step(slots["cache"], slots["tokens"], slots["t"])
  settings = (slots["greedy"] | ~live, slots["temperature"], slots["top_k"], slots["top_p"])
  tok, keys = decoding.choose_rows(logits, jax.random.wrap_key_data(slots["keys"]), *settings)
  t = jnp.minimum(slots["t"] + 1, layout.max_new_tokens - 1)  # a free slot's step stays in range
  return dict(slots, cache=cache, tokens=tok, t=t, keys=jax.random.key_data(keys)), _scored(logits, tok, want)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout", "k"), donate_argnames=("slots",))
def step(graphdef, state, slots, want, live, *, layout: Layout, k: int = 1):
  """`k` tokens for every slot (k decode steps in one call) -> (slots, the tokens [k, N] with their
  log-probabilities: `_scored`, each [k, N, ...]; want [N]: the slots whose requests ask for alternatives; live [N]:
  the slots holding a request — a free one decodes greedily, so the settings a finished request left behind (or a
  never used slot's zeros) never make a step sample)."""
  model = nnx.merge(graphdef, state)
  return jax.lax.scan(lambda s, _: _one_step(model, s, want, live, layout), slots, None, length=k)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def rank(graphdef, state, batch, label_ids, label_mask, rows):
  """Rank classification of a batch whose rows carry any prompts -> [b, C]."""
  return nnx.merge(graphdef, state).label_logprobs(batch, label_ids, label_mask, _stack(rows))


def empty_slots(graphdef, state, layout: Layout, row: Prefix | None, pad: int) -> dict:
  """The decode-slot state with every slot free (zeros)."""

  def shapes():
    ids, mask = jnp.full((1, 1), pad, jnp.int32), jnp.ones((1, 1), jnp.int32)
    settings = (jnp.ones((1,), bool), jnp.ones((1,), jnp.float32), jnp.zeros((1,), jnp.int32), jnp.ones((1,)))
    model = nnx.merge(graphdef, state)
    seeds, want = jnp.zeros((1,), jnp.uint32), jnp.zeros((1,), bool)
    return _new_rows(model, ids, mask, (row,), settings, seeds, want, layout)[0]

  def zeros(a):
    axis = 1 if a.ndim == 5 else 0
    return jnp.zeros(a.shape[:axis] + (layout.slots,) + a.shape[axis + 1 :], a.dtype)

  return jax.tree.map(zeros, jax.eval_shape(shapes))


# -- the host side ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Live:
  """A request in a decode slot."""

  request: object
  text: object  # engine._Text
  slot: int
  tokens: list = dataclasses.field(default_factory=list)
  last: float = 0.0
  sent: int = 1  # tokens the device was asked for (its first at admission): len(tokens) plus those still in flight

  @property
  def active(self) -> bool:
    """Whether a call still has to run for it (its remaining tokens not all asked for yet)."""
    return self.sent < self.request.max_tokens


class SlotBatcher:
  """The continuous scheduler of an `engine.Engine` (which owns the queue, the metrics and the text handling)."""

  def __init__(self, engine, *, slots: int, prompt_slots: int, decode_steps: int):
    self.engine = e = engine
    prompts = [p for p in map(e.store.get, e.store.names()) if p is not None]
    self.layout = layout_for(
      e.base, prompts, slots=slots, input_length=e.lengths[-1], max_new_tokens=e.max_tokens, prompt_slots=prompt_slots
    )
    e.store.check = lambda prefix: misfit(self.layout, prefix)  # a prompt added later must fit
    if decode_steps < 1:
      raise UserError(f"--decode-steps {decode_steps}: give at least 1")
    self.decode_steps = decode_steps
    most = min(decode_steps, e.max_tokens)  # a call never runs past a request's max_tokens
    self.step_sizes = tuple(2**i for i in range(most.bit_length()) if 2**i <= most)
    self.batch_sizes = tuple(b for b in e.batch_sizes if b <= slots) or (1,)
    self.max_prefill = self.batch_sizes[-1]
    self.eos = set(decoding.eos_ids(None, e.base.config))
    self._none = self._device_row(None)
    self.state = empty_slots(e.graphdef, e.state, self.layout, self._none, e._pad)
    self.free = list(range(slots))[::-1]
    self.live: dict[int, _Live] = {}  # the requests the next call steps (all active: the others retire)
    self.retiring: dict[int, _Live] = {}  # by id: requests whose last tokens are in flight (their slots freed)
    self.inflight: collections.deque = collections.deque()  # dispatched calls whose tokens the host has not read

  # -- prompts as rows ---------------------------------------------------------------------------------------------

  def _device_row(self, prompt) -> Prefix | None:
    row = prompt_row(self.layout, None if prompt is None else prompt.prefix)
    return None if row is None else jax.tree.map(jnp.asarray, row)

  def row(self, prompt) -> Prefix | None:
    """A prompt's padded row on the device, through the store's device cache (filled here, at admission)."""
    if prompt is None:
      return self._none
    return self.engine.store.device(prompt, "slot row", lambda: self._device_row(prompt))

  def rows(self, prompts: list) -> tuple:
    """The rows of a batch's prompts (each distinct prompt looked up in the cache once)."""
    seen: dict[int, Prefix | None] = {}
    for p in prompts:
      if id(p) not in seen:
        seen[id(p)] = self.row(p)
    return tuple(seen[id(p)] for p in prompts)

  # -- the loop --------------------------------------------------------------------------------------------------

  def run(self) -> None:
    """The loop, pipelined one call deep: a step is dispatched before the host reads the previous call's tokens, so
    the device runs it while the host streams text and frees slots (JetStream's and vLLM's asynchronous
    scheduling). The cost: a request that ended at EOS or a stop string is stepped once more (its tokens from that
    call are dropped), and its slot refilled a call later."""
    while True:
      new = self._take()
      if new is None:
        return
      self._guarded(self._classify, [r for r in new if r.kind == "classify"])
      self._guarded(self._admit, [r for r in new if r.kind != "classify"])
      self._drop_cancelled()
      stepped = bool(self.live)
      if stepped:
        self._guarded(self._step, None)
      self._guarded(self._read, 1 if stepped else 0)

  def _guarded(self, fn, arg) -> None:
    """Run a device call (or read calls' results); when it fails, its requests and every live one get the exception
    (the slots' state was handed to the failed call) and the slots start empty again."""
    if arg == []:
      return
    try:
      fn(arg) if arg is not None else fn()
    except Exception as ex:  # noqa: BLE001 — failed requests are answered, the server goes on
      log.exception("serving call failed")
      reqs = arg if isinstance(arg, list) else []
      for r in reqs + [x.request for x in [*self.live.values(), *self.retiring.values()]]:
        if not r.answered:
          self._finish(r, ex)
      self.live.clear()
      self.retiring.clear()
      self.inflight.clear()
      self.free = list(range(self.layout.slots))[::-1]
      self.state = empty_slots(self.engine.graphdef, self.engine.state, self.layout, self._none, self.engine._pad)

  def _read(self, keep: int) -> None:
    """Read the results of every dispatched call but the last `keep` (in order): stream, answer, free slots."""
    while len(self.inflight) > keep:
      read, *args = self.inflight.popleft()
      read(*args)

  def _take(self) -> list | None:
    """The requests to admit now ([] to keep stepping; None: stopped and nothing left)."""
    e = self.engine
    with e._cond:
      while not e._pending and not self.live and not self.inflight:
        if e._stopping:
          return None
        e._cond.wait()
      if e._pending and not self.live and not self.inflight and not e._stopping:  # idle: a burst shares a prefill
        deadline = e._pending[0].created + e.max_wait
        while len(e._pending) < self.max_prefill and (left := deadline - time.monotonic()) > 0 and not e._stopping:
          e._cond.wait(left)
      take, rest, room, ranks = [], [], min(len(self.free), self.max_prefill), self.max_prefill
      for r in e._pending:
        if r.cancelled:
          self._finish(r, dict(text="", finish_reason="cancelled", prompt_tokens=len(r.tokens), completion_tokens=0))
        elif r.kind == "classify" and ranks:
          take.append(r)
          ranks -= 1
        elif r.kind != "classify" and room:
          take.append(r)
          room -= 1
        else:
          rest.append(r)
      e._pending = rest
      e._gauge()
      return take

  @staticmethod
  def _settings(pairs: list, b: int):
    """Per-row sampling settings and seeds [b] of (Sampling, seed or None) pairs (padding repeats the first)."""
    pad = list(pairs) + [pairs[0]] * (b - len(pairs))
    s = [x for x, _ in pad]
    greedy = np.asarray([x.method == "greedy" for x in s])
    temperature = np.asarray([1.0 if x.method == "greedy" else x.temperature for x in s], np.float32)
    top_k = np.asarray([x.top_k for x in s], np.int32)
    top_p = np.asarray([x.top_p for x in s], np.float32)
    seeds = [seed if seed is not None else int.from_bytes(os.urandom(4), "little") for _, seed in pad]
    return (greedy, temperature, top_k, top_p), np.asarray(seeds, np.uint32)

  def _admit(self, reqs: list) -> None:
    e, n = self.engine, len(reqs)
    b = next(s for s in self.batch_sizes if s >= n)
    rows = [r.tokens for r in reqs] + [reqs[0].tokens] * (b - n)
    length = next(s for s in e.lengths if s >= max(map(len, rows)))
    ids, mask = e.base.batch_type.layout_inputs(rows, length, e._pad)
    prefixes = self.rows([r.prompt for r in reqs] + [reqs[0].prompt] * (b - n))
    settings, seeds = self._settings([(r.sampling, r.seed) for r in reqs], b)
    slots = [self.free.pop() for _ in reqs]
    at = np.asarray(slots + [self.layout.slots] * (b - n), np.int32)
    if e.metrics is not None:
      e.metrics.batch_size.observe(n)
      e.metrics.batches.inc()
    want = np.asarray([r.wants_top for r in reqs] + [False] * (b - n))
    self.state, first = admit(
      e.graphdef, e.state, self.state, ids, mask, prefixes, settings, seeds, want, at, layout=self.layout
    )
    entries = [_Live(r, e.new_text(r), slot) for r, slot in zip(reqs, slots, strict=False)]
    self.live.update((x.slot, x) for x in entries)
    self._retire(entries)
    self.inflight.append((self._admitted, first, entries))

  def _retire(self, entries: list) -> None:
    """Free the slots of requests whose last tokens were just dispatched: the next admission may write them at once
    (after the call in flight, in the device's order), while those tokens are still to be read."""
    for x in entries:
      if not x.active:
        del self.live[x.slot]
        self.free.append(x.slot)
        self.retiring[id(x)] = x

  def _admitted(self, first: tuple, entries: list) -> None:
    """An admission's first tokens: each request's first text (a request gone meanwhile is skipped)."""
    e = self.engine
    first, now = self._host(first, [x.request for x in entries]), time.monotonic()
    for j, entry in enumerate(entries):
      if entry.request.answered:  # cancelled meanwhile
        continue
      entry.last = now
      if e.metrics is not None:
        e.metrics.time_to_first_token.observe(now - entry.request.created)
        e.metrics.generated_tokens.inc()
      self._feed(entry, tuple(None if a is None else a[j : j + 1] for a in first))

  def _steps(self) -> int:
    """How many decode steps the next call runs: 1 while a slot is free (a request that arrives is admitted after
    the next step); when every slot is busy, up to `decode_steps` at once (a power of two), but no more than any
    active request has left of its max_tokens, so none ends by its length inside the call and its slot is refilled
    right after it (one that ends at EOS or a stop string leaves its slot idle for the rest of the call)."""
    if len(self.live) < self.layout.slots:
      return 1
    left = min(x.request.max_tokens - x.sent for x in self.live.values())
    return max((k for k in self.step_sizes if k <= left), default=1)

  def _step(self) -> None:
    """Dispatch a call of k decode steps over every slot (the active ones sample under their settings, the others
    decode greedily, unread)."""
    e = self.engine
    active = list(self.live.values())
    k = self._steps()
    want = np.zeros((self.layout.slots,), bool)
    want[np.asarray([x.slot for x in active if x.request.wants_top], np.int32)] = True
    live = np.zeros((self.layout.slots,), bool)
    live[np.asarray([x.slot for x in active], np.int32)] = True
    self.state, out = step(e.graphdef, e.state, self.state, want, live, layout=self.layout, k=k)
    for x in active:
      x.sent += k
    self._retire(active)
    self.inflight.append((self._stepped, out, active, k, time.monotonic()))

  def _stepped(self, out: tuple, active: list, k: int, start: float) -> None:
    """A call's tokens [k, N]: each request that was active in it takes its own (one that ended meanwhile none)."""
    e = self.engine
    out, now = self._host(out, [x.request for x in active]), time.monotonic()
    taken = []  # how many of the call's k tokens each slot took (a request that ends takes no more)
    for entry in active:
      if entry.request.answered:  # it ended in an earlier call (EOS, a stop string) or was cancelled
        continue
      gap = (now - entry.last) / k  # a call's tokens arrive together
      entry.last = now
      n = self._feed(entry, tuple(None if a is None else a[:, entry.slot] for a in out))
      taken.append(n)
      if e.metrics is not None:
        for _ in range(n):
          e.metrics.inter_token_latency.observe(gap)
    if e.metrics is not None:
      for j in range(k):  # the slots still decoding at each of the call's steps
        e.metrics.step_slots.observe(sum(n > j for n in taken))
      e.metrics.steps_per_call.observe(k)
      e.metrics.generated_tokens.inc(sum(taken))
      e.metrics.tokens_per_second.set(sum(taken) / max(now - start, 1e-9))
      e.metrics.slots_busy.set(len(self.live))

  @staticmethod
  def _host(out: tuple, reqs: list) -> tuple:
    """A call's `_scored` arrays on the host: the tokens always; log-probabilities only when a request asks (and
    the alternatives when one asks for them)."""
    tokens, logprobs, *top = out
    asked = [r for r in reqs if r.logprobs is not None]
    return (
      np.asarray(tokens),
      np.asarray(logprobs) if asked else None,
      *(np.asarray(a) if any(r.wants_top for r in asked) else None for a in top),
    )

  def _feed(self, entry: _Live, out: tuple) -> int:
    """A slot's next tokens (`_host`'s arrays for this slot, [m, ...]: one call's steps, in order): take them up to
    the end of its request (EOS, max_tokens, a stop string), stream their text at once (one update, one stream
    event, however many tokens), and when the request ended answer it and free the slot -> the tokens taken."""
    r = entry.request
    tokens, logprobs, top_values, top_ids = out
    before = len(entry.tokens)
    new = tokens[: r.max_tokens - before].tolist()
    ends = [j for j, tok in enumerate(new) if tok in self.eos]
    new = new[: ends[0] + 1] if ends else new
    if len(new) > 1 and entry.text.stop:  # a stop string ends the request at the first token that completes it
      new = new[: self._stop_at(entry, new)]
    if entry.text.logprobs is not None:
      top = (top_values, top_ids) if r.logprobs else (None, None)
      entry.text.logprobs += lp.entries(new, logprobs, *top, k=r.logprobs)
    entry.tokens += new
    ended = new[-1] in self.eos
    final = ended or len(entry.tokens) >= r.max_tokens
    entry.text.update(entry.tokens[:-1] if ended else entry.tokens, final)
    if final or entry.text.stopped:
      finish = "stop" if ended or entry.text.stopped else "length"
      self._release(entry)
      result = dict(
        text=entry.text.text, finish_reason=finish, prompt_tokens=len(r.tokens), completion_tokens=len(entry.tokens)
      )
      self._finish(r, dict(result, logprobs=entry.text.logprobs))
    return len(new)

  @staticmethod
  def _stop_at(entry: _Live, new: list) -> int:
    """How many of `new` a request takes when a stop string may end it among them: up to the first whose text
    completes one (all of them when none does)."""
    text = entry.text
    if not text.stops(entry.tokens + new):
      return len(new)
    for n in range(1, len(new)):
      if text.stops(entry.tokens + new[:n]):
        return n
    return len(new)

  def _release(self, entry: _Live) -> None:
    """A request ends (answered next): its results still in flight are dropped, its slot freed (unless it retired)."""
    if self.live.get(entry.slot) is entry:
      del self.live[entry.slot]
      self.free.append(entry.slot)
    self.retiring.pop(id(entry), None)

  @staticmethod
  def _finish(r, result) -> None:
    r.answered = True
    r.on_done(result)

  def _drop_cancelled(self) -> None:
    """Free the slots of requests whose client went away."""
    for entry in [*self.live.values(), *self.retiring.values()]:
      if entry.request.cancelled:
        self._release(entry)
        r = entry.request
        self._finish(
          r,
          dict(
            text=entry.text.text,
            finish_reason="cancelled",
            prompt_tokens=len(r.tokens),
            completion_tokens=len(entry.tokens),
          ),
        )

  # -- classification --------------------------------------------------------------------------------------------

  def _classify(self, reqs: list) -> None:
    groups: dict[tuple, list] = {}  # one label set and one template (or none) a call: each encodes its inputs
    for r in reqs:
      template = r.prompt.template if r.prompt is not None else None
      groups.setdefault((r.labels, template), []).append(r)
    for (labels, template), group in groups.items():
      self._rank(labels, template, group)

  def _rank(self, labels: tuple, template, reqs: list) -> None:
    e, n = self.engine, len(reqs)
    b = next(s for s in self.batch_sizes if s >= n)
    label_ids, label_mask = e.labels(labels)
    pad = list(reqs) + [reqs[0]] * (b - n)
    length = next(s for s in e.lengths if s >= max(len(r.tokens) for r in pad))
    data = e.classify_inputs(pad, labels, template, length, label_ids.shape[1])
    if e.metrics is not None:
      e.metrics.batch_size.observe(n)
      e.metrics.batches.inc()
    rows = self.rows([r.prompt for r in pad])
    scores = np.asarray(rank(e.graphdef, e.state, jax.tree.map(jnp.asarray, data), label_ids, label_mask, rows))
    for i, r in enumerate(reqs):
      row = scores[i]
      result = dict(
        label=labels[int(np.argmax(row))],
        scores={lab: float(v) for lab, v in zip(labels, row, strict=False)},
        prompt_tokens=len(r.tokens),
      )
      self._finish(r, result)

  # -- warm-up ---------------------------------------------------------------------------------------------------

  def warmup(self) -> int:
    """Compile every admission (batch bucket x length bucket) and the generate step (each number of steps per call)
    -> programs compiled."""
    e, count = self.engine, 0
    for b in self.batch_sizes:
      for length in e.lengths:
        ids = np.full((b, length), e._pad, np.int32)
        mask = np.ones((b, length), np.int32)
        settings = (np.ones(b, bool), np.ones(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32))
        seeds = np.zeros(b, np.uint32)
        at = np.full((b,), self.layout.slots, np.int32)  # every row dropped: no slot is touched
        want = np.zeros(b, bool)
        self.state, first = admit(
          e.graphdef, e.state, self.state, ids, mask, (self._none,) * b, settings, seeds, want, at, layout=self.layout
        )
        first[0].block_until_ready()
        count += 1
    idle = np.zeros(self.layout.slots, bool)
    for k in self.step_sizes:
      self.state, out = step(e.graphdef, e.state, self.state, idle, idle, layout=self.layout, k=k)
      out[0].block_until_ready()
    return count + len(self.step_sizes)
