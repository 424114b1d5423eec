"""KV-cache generation for every model kind: greedy, sampling (temperature / top-k / top-p), beam search.

Notation: B batch, W beams, L prefix length, T new tokens (max_new_tokens), S cache slots, V vocab.

Each call runs one jitted fixed-shape loop (`lax.while_loop`, stopping early once every row has finished),
compiled once per model structure, shapes and settings. The model does the kind-specific part through its
interface (`models.interface`): `prefill` runs the prefix once (T5: the encoder, cross-attention k/v projected
once; decoders: the prefix into a cache of L + T slots, positions counting real slots only, so a padded row
decodes as it would alone) and `decode_step` feeds one token per row; this module only chooses tokens.
The prefix is `input_ids` or `inputs_embeds` (+ `attention_mask`), with an optional `prefix` (a soft prompt's
`models.interface.Prefix`) in front; every row needs one real position.
A row that emits an EOS id is finished and emits `pad_id` afterwards. The result is a dict:
  tokens [B, T] int32; lengths [B] (tokens up to and including EOS); scores [B]:
    greedy / sample: the sum of the model's log-probabilities (before temperature and filtering) of the tokens;
    beam: the best beam's log-probability / ((5 + length) / 6) ** alpha (T5X's brevity penalty).
  beam also returns beams [B, W, T] and beam_scores [B, W], best first.
Beam search follows T5X's `beam_search` (2W candidates a step, live and finished sets, early stop once no live
beam can beat the finished ones; alpha >= 0), with one difference: beams that reach max_new_tokens without EOS
are finished candidates too (T5X drops them whenever some beam finished), so a length-capped search returns the
best-scoring sequence among all it considered.

Settings and their defaults are `config.GenerateConfig` (the `generate:` section); keyword options override it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.config import GenerateConfig
from jaxprompt.errors import ConfigError, UsageError

NEG_INF = -1.0e7  # T5X's "effective negative infinity" for beam scores (finite: sums stay finite)
TOP_LOGPROBS = 5  # alternatives kept per generated token when asked (OpenAI's completions limit): one static k


@dataclasses.dataclass(frozen=True)
class _Options:  # static: part of the compilation key
  method: str
  max_new_tokens: int
  top_k: int
  top_p: float
  num_beams: int
  alpha: float
  eos: tuple[int, ...]
  pad: int
  embeds: bool
  top_logprobs: int = 0  # step by step (`start` / `advance`): keep each token's TOP_LOGPROBS alternatives (0: off)


def generate(
  model,
  *,
  input_ids=None,
  attention_mask=None,
  inputs_embeds=None,
  prefix=None,
  config: GenerateConfig | None = None,
  eos_id: int | Sequence[int] | None = None,
  pad_id: int | None = None,
  rng: jax.Array | None = None,
  **options,
) -> dict:
  """Generate after a prefix (see the module docstring for the contract).

  Args:
    model: a frozen base (`models.interface.PromptableLM`); a soft prompt comes in as `prefix` (or already
      inside `inputs_embeds`).
    input_ids / inputs_embeds: the prefix [B, L] / [B, L, H] (exactly one), any padding.
    attention_mask: [B, L], 1 for real positions (default: all ones).
    config: the settings (default `GenerateConfig()`); `**options` (max_new_tokens, method, temperature,
      top_k, top_p, num_beams, alpha, seed) override its fields. "sample" draws from `rng` (default
      `jax.random.key(seed)`; a key per row [B] makes each row draw as it would alone, whatever the batch).
    eos_id: an id or ids that finish a row; None: the model config's eos_token_id; -1: never stop early.
    pad_id: emitted by finished rows; None: the config's pad_token_id (or 0).
  """
  try:
    gc = dataclasses.replace(config or GenerateConfig(), **options)
  except TypeError:
    known = [f.name for f in dataclasses.fields(GenerateConfig)]
    raise UsageError(f"unknown generation option in {sorted(options)}; known: {', '.join(known)}") from None
  except ConfigError as e:
    raise UsageError(str(e)) from None
  if (input_ids is None) == (inputs_embeds is None):
    raise UsageError("generate needs exactly one of input_ids and inputs_embeds")
  ids = input_ids if inputs_embeds is None else inputs_embeds
  b, length = ids.shape[:2]
  mask = jnp.ones((b, length), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if prefix is None or prefix.length == 0:
    _check_some_real_slot(mask)
  cfg = model.config
  if pad_id is None:
    pad_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
  opts = _Options(
    method=gc.method,
    max_new_tokens=gc.max_new_tokens,
    top_k=gc.top_k,
    top_p=gc.top_p,
    num_beams=gc.num_beams if gc.method == "beam" else 1,
    alpha=gc.alpha,
    eos=eos_ids(eos_id, cfg),
    pad=int(pad_id),
    embeds=inputs_embeds is not None,
  )
  graphdef, state = nnx.split(model)
  rng = jax.random.key(gc.seed) if rng is None else rng
  return _generate(graphdef, state, ids, mask, prefix, jnp.asarray(gc.temperature, jnp.float32), rng, opts=opts)


def eos_ids(eos_id, cfg) -> tuple[int, ...]:
  if eos_id is None:
    eos_id = getattr(cfg, "eos_token_id", None)
  if eos_id is None or (isinstance(eos_id, int) and eos_id < 0):
    return ()
  return (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(int(i) for i in eos_id)


def _check_some_real_slot(mask: jax.Array) -> None:
  if not getattr(mask, "is_fully_addressable", True):
    return  # spread over hosts: the caller vouches for it
  try:
    m = np.asarray(mask)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced: likewise
  empty = np.flatnonzero(~m.any(axis=1))
  if empty.size:
    raise UsageError(
      f"generation needs at least one real token (or soft-prompt vector) per row; row "
      f"{int(empty[0])} is all padding (a tokenizer without BOS gives an empty input no tokens)"
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _generate(graphdef, state, ids, mask, prefix, temperature, rng, *, opts: _Options):
  model = nnx.merge(graphdef, state)
  inputs = dict(inputs_embeds=ids) if opts.embeds else dict(input_ids=ids)
  logits0, cache = model.prefill(
    **inputs, attention_mask=mask, prefix=prefix, max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams
  )
  if opts.method == "beam":
    return _beam_search(model, logits0, cache, opts)
  return _sample_loop(model, logits0, cache, opts, temperature, rng)


# -- greedy / sampling ---------------------------------------------------------------------------


def _filter_and_sample(logits, temperature, top_k, top_p, rng):
  """Sample from logits [B, V] / temperature, keeping the top_k largest and the smallest set of
  tokens whose probability reaches top_p (the most likely token always stays). `rng`: one key, or a key per
  row [B] (each row then draws as it would alone)."""
  x = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    ordered = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before a token is still short of top_p
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, -jnp.inf, x)
  if rng.ndim == 1:
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(rng, x)
  return jax.random.categorical(rng, x, axis=-1)


def choose_rows(logits, rng, greedy, temperature, top_k, top_p):
  """Each row's next token under its own settings: logits [B, V], per-row keys [B] and greedy [B] bool,
  temperature [B] (> 0), top_k [B] (0: off), top_p [B] (1.0: off) -> (tokens [B] int32, the rows' next keys).
  A sampled row draws exactly what `sample_steps` draws for it alone with those settings and its key."""
  rng, sub = _split(rng)
  v = logits.shape[-1]

  def filtered(x):
    ordered = jnp.sort(x, axis=-1)[..., ::-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    x = jnp.where((top_k[:, None] > 0) & (x < kth), -jnp.inf, x)
    ordered = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((top_p[:, None] < 1.0) & (x < cutoff), -jnp.inf, x)

  def sampled(logits):
    x = logits / temperature[:, None]
    x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), filtered, lambda x: x, x)
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(sub, x).astype(jnp.int32)

  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  tok = jax.lax.cond(jnp.all(greedy), lambda x: best, lambda x: jnp.where(greedy, best, sampled(x)), logits)
  return tok, rng


def _split(rng):
  """(next key, this step's key), for one key or a key per row."""
  if rng.ndim == 1:
    both = jax.vmap(jax.random.split)(rng)
    return both[:, 0], both[:, 1]
  return tuple(jax.random.split(rng))


def _is_eos(tokens, eos):
  out = jnp.zeros(tokens.shape, bool)
  for e in eos:
    out = out | (tokens == e)
  return out


def chosen_logprobs(logits, tok):
  """The model's log-probability of each row's token — the log-softmax of the raw logits, before temperature,
  top-k and top-p (what OpenAI and vLLM report): logits [B, V], tok [B] -> [B] float32."""
  x = logits.astype(jnp.float32)
  return jnp.take_along_axis(x, tok[:, None].astype(jnp.int32), axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1)


def top_logprobs(logits, k: int = TOP_LOGPROBS):
  """The k most likely tokens of each row, best first, under the same distribution as `chosen_logprobs`:
  logits [B, V] -> (log-probabilities [B, k] float32, ids [B, k] int32)."""
  x = logits.astype(jnp.float32)
  values, ids = jax.lax.top_k(x, k)
  return values - jax.nn.logsumexp(x, axis=-1, keepdims=True), ids.astype(jnp.int32)


def sample_init(logits0, cache, opts: _Options, rng) -> dict:
  """The greedy / sampling loop's state after the prefill (`start`): per generated token also its log-probability
  (`chosen_logprobs`) and, with `opts.top_logprobs`, its alternatives (`top_logprobs`)."""
  b, t_new, k = logits0.shape[0], opts.max_new_tokens, opts.top_logprobs
  top = dict(top_values=jnp.zeros((b, t_new, k), jnp.float32), top_ids=jnp.zeros((b, t_new, k), jnp.int32))
  return dict(
    t=jnp.int32(0),
    logits=logits0,
    cache=cache,
    tokens=jnp.full((b, t_new), opts.pad, jnp.int32),
    finished=jnp.zeros((b,), bool),
    lengths=jnp.zeros((b,), jnp.int32),
    scores=jnp.zeros((b,), jnp.float32),
    logprobs=jnp.zeros((b, t_new), jnp.float32),
    rng=rng,
    **(top if k else {}),
  )


def sample_steps(model, s: dict, opts: _Options, temperature, until) -> dict:
  """Run greedy / sampling steps on state `s` until step `until` (at most max_new_tokens) or every row is done."""

  def cond(s):
    return (s["t"] < jnp.minimum(until, opts.max_new_tokens)) & ~jnp.all(s["finished"])

  def body(s):
    rng, sub = _split(s["rng"])
    logits = s["logits"]
    if opts.method == "greedy":
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok = _filter_and_sample(logits, temperature, opts.top_k, opts.top_p, sub).astype(jnp.int32)
    logp = chosen_logprobs(logits, tok)
    alive = ~s["finished"]
    tok = jnp.where(alive, tok, opts.pad)
    logp = jnp.where(alive, logp, 0.0)

    def at(a, x):  # x [B, ...] written at step t of a [B, T, ...]
      return jax.lax.dynamic_update_slice(a, x[:, None].astype(a.dtype), (0, s["t"]) + (0,) * (a.ndim - 2))

    top = {}
    if opts.top_logprobs:
      values, ids = top_logprobs(logits, opts.top_logprobs)
      top = dict(top_values=at(s["top_values"], values), top_ids=at(s["top_ids"], ids))
    logits, cache = model.decode_step(s["cache"], tok, s["t"])
    return dict(
      t=s["t"] + 1,
      logits=logits,
      cache=cache,
      tokens=at(s["tokens"], tok),
      finished=s["finished"] | (alive & _is_eos(tok, opts.eos)),
      lengths=s["lengths"] + alive.astype(jnp.int32),
      scores=s["scores"] + logp,
      logprobs=at(s["logprobs"], logp),
      rng=rng,
      **top,
    )

  return jax.lax.while_loop(cond, body, s)


def _sample_loop(model, logits0, cache, opts, temperature, rng):
  s = sample_steps(model, sample_init(logits0, cache, opts, rng), opts, temperature, opts.max_new_tokens)
  return dict(tokens=s["tokens"], lengths=s["lengths"], scores=s["scores"])


# -- step by step (streaming, the server) ----------------------------------------------------------


def options(
  model, config: GenerateConfig, *, eos_id=None, pad_id=None, embeds: bool = False, top_logprobs: int = 0
) -> _Options:
  """The static settings of a greedy / sampling run (`start` / `advance`); `top_logprobs` (0 or TOP_LOGPROBS):
  keep each token's alternatives too."""
  if config.method == "beam":
    raise UsageError("step-by-step decoding is greedy or sampling; beam search runs whole (`generate`)")
  cfg = model.config
  if pad_id is None:
    pad_id = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
  return _Options(
    method=config.method,
    max_new_tokens=config.max_new_tokens,
    top_k=config.top_k,
    top_p=config.top_p,
    num_beams=1,
    alpha=config.alpha,
    eos=eos_ids(eos_id, cfg),
    pad=int(pad_id),
    embeds=embeds,
    top_logprobs=top_logprobs,
  )


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def start(graphdef, state, ids, mask, prefix, rng, *, opts: _Options) -> dict:
  """Prefill (`nnx.split` of the base: graphdef, state) -> the loop state, no token chosen yet. With `advance`,
  the same tokens as `generate` in steps a caller can read (streaming)."""
  model = nnx.merge(graphdef, state)
  inputs = dict(inputs_embeds=ids) if opts.embeds else dict(input_ids=ids)
  logits0, cache = model.prefill(**inputs, attention_mask=mask, prefix=prefix, max_new_tokens=opts.max_new_tokens)
  return sample_init(logits0, cache, opts, rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"), donate_argnames=("s",))
def advance(graphdef, state, s: dict, temperature, until, *, opts: _Options) -> dict:
  """Steps of `start`'s loop up to step `until` (or until every row is done)."""
  return sample_steps(nnx.merge(graphdef, state), s, opts, temperature, until)


# -- beam search -----------------------------------------------------------------------------------


def _brevity_penalty(alpha: float, length):
  return ((5.0 + length) / 6.0) ** alpha


def _gather(x, idx):
  """x [B, M, ...], idx [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(model, logits0, cache, opts):
  w, t_new, pad = opts.num_beams, opts.max_new_tokens, opts.pad
  v = logits0.shape[-1]
  b = logits0.shape[0] // w
  init = dict(
    t=jnp.int32(0),
    logits=logits0,
    cache=cache,
    live_logp=jnp.tile(jnp.array([0.0] + [NEG_INF] * (w - 1), jnp.float32), (b, 1)),  # one live beam at first
    live_seqs=jnp.full((b, w, t_new), pad, jnp.int32),
    fin_seqs=jnp.full((b, w, t_new), pad, jnp.int32),
    fin_scores=jnp.full((b, w), NEG_INF, jnp.float32),
    fin_flags=jnp.zeros((b, w), bool),
  )

  def cond(s):
    # the best any live beam can still reach: its log-probability only falls, the penalty grows with length
    best_live = jnp.max(s["live_logp"], axis=1) / _brevity_penalty(opts.alpha, t_new)
    worst_finished = jnp.min(jnp.where(s["fin_flags"], s["fin_scores"], NEG_INF), axis=1)
    return (s["t"] < t_new) & ~jnp.all(worst_finished > best_live)

  def body(s):
    t = s["t"]
    logp = jax.nn.log_softmax(s["logits"], axis=-1).reshape(b, w, v) + s["live_logp"][..., None]
    # 2W candidates, so W stay live even if W of them end with EOS
    cand_logp, flat_idx = jax.lax.top_k(logp.reshape(b, w * v), 2 * w)  # [B, 2W]
    parent, tok = flat_idx // v, (flat_idx % v).astype(jnp.int32)
    cand_seqs = jax.lax.dynamic_update_slice(_gather(s["live_seqs"], parent), tok[..., None], (0, 0, t))
    ended = _is_eos(tok, opts.eos)
    live_rank = cand_logp + jnp.where(ended, NEG_INF, 0.0)
    _, keep = jax.lax.top_k(live_rank, w)  # [B, W]
    finished = ended | (t + 1 == t_new)  # at the length limit every candidate is complete
    new_scores = jnp.where(finished, cand_logp / _brevity_penalty(opts.alpha, t + 1), NEG_INF)
    all_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
    _, best = jax.lax.top_k(all_scores, w)
    origin = (jnp.arange(b)[:, None] * w + _gather(parent, keep)).reshape(-1)
    cache = model.reorder_cache(s["cache"], origin)
    next_tok = _gather(tok, keep).reshape(-1)
    logits, cache = model.decode_step(cache, next_tok, t)
    return dict(
      t=t + 1,
      logits=logits,
      cache=cache,
      live_logp=_gather(live_rank, keep),
      live_seqs=_gather(cand_seqs, keep),
      fin_seqs=_gather(jnp.concatenate([s["fin_seqs"], cand_seqs], axis=1), best),
      fin_scores=_gather(all_scores, best),
      fin_flags=_gather(jnp.concatenate([s["fin_flags"], finished], axis=1), best),
    )

  s = jax.lax.while_loop(cond, body, init)
  tokens = s["fin_seqs"][:, 0]
  ended = _is_eos(tokens, opts.eos)
  lengths = jnp.where(ended.any(axis=1), jnp.argmax(ended, axis=1) + 1, t_new).astype(jnp.int32)
  return dict(
    tokens=tokens, lengths=lengths, scores=s["fin_scores"][:, 0], beams=s["fin_seqs"], beam_scores=s["fin_scores"]
  )
