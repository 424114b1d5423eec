"""Shared model layers, written as pure functions over parameter arrays.

Notation (used in shapes and einsum strings across the package):
  B batch, L query length, S key length, P prompt length, H hidden (d_model),
  N query heads, K key/value heads, G = N // K, D head dim, F mlp dim, V vocab, Y layers.

Modules (T5, decoders) hold their weights as `nnx.Param`s whose metadata names *logical* axes
(`out_sharding`); the per-layer weights are stacked on a leading `layers` axis and run with
`jax.lax.scan`, so compile time does not grow with depth. The functions here take one layer's
arrays, so T5 and the decoder-only models share the same maths.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import ModelError

# Added to attention scores at masked keys. The most negative float32, as transformers does, so
# that masked keys get exactly zero weight and fully-masked rows stay finite.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def param(value: jax.Array, axes: tuple[str | None, ...], kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
  """A parameter annotated with logical axis names (see `jaxprompt.sharding.RULES`)."""
  if len(axes) != value.ndim:
    raise ValueError(f"logical axes {axes} do not match the parameter's shape {value.shape}")
  # Sharding is applied by our loader from the one rules table, not eagerly by Flax.
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# Dropout's random bits. They are JAX's own: the default Threefry-2x32 key and its partitionable counters, so
# every mask, split and sharded layout is bitwise what `jax.random.split` / `jax.random.bernoulli` give (tested).
# The hash is written out here because on CPU JAX lowers each Threefry call as a 5-trip while loop: a train step of
# a model with dropout holds dozens of them, and they took two thirds of the step's compile time (the quickstart
# step: 15 s, 8 s with this; no change at run time). GPU/TPU lower Threefry to these same unrolled rounds. Other key
# types (a user's `jax_default_prng_impl`), and arrays of 2^32 elements or more, go to `jax.random` itself.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block cipher (20 rounds, as `jax.random`) on uint32 counters (x1, x2) under key (k1, k2)."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r)))
    x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _threefry_key(rng: jax.Array, size: int) -> jax.Array | None:
  """The key's two uint32 words, or None where `jax.random` must do it (another key type, 2^32 counters)."""
  if size >= 2**32 or str(jax.random.key_impl(rng)) != "threefry2x32" or not jax.config.jax_threefry_partitionable:
    return None
  return jax.random.key_data(rng)


def _counters(shape: tuple[int, ...]) -> jax.Array:
  """The flat index of every element as uint32 (JAX's partitionable counters: a sum of per-axis iotas)."""
  strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
  return sum((jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides)),
             jnp.zeros(shape, jnp.uint32))


def split_keys(rng: jax.Array, n: int) -> jax.Array:
  """`jax.random.split(rng, n)`: n keys [n]."""
  kd = _threefry_key(rng, n)
  if kd is None:
    return jax.random.split(rng, n)
  b1, b2 = threefry2x32(kd[0], kd[1], jnp.zeros((n,), jnp.uint32), _counters((n,)))
  return jax.random.wrap_key_data(jnp.stack([b1, b2], axis=1), impl=jax.random.key_impl(rng))


def bernoulli(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(rng, p, shape)`: True with probability p (float32 uniforms, as JAX draws them)."""
  kd = _threefry_key(rng, math.prod(shape))
  if kd is None:
    return jax.random.bernoulli(rng, p, shape)
  b1, b2 = threefry2x32(kd[0], kd[1], jnp.zeros(shape, jnp.uint32), _counters(shape))
  bits = (b1 ^ b2) >> np.uint32(32 - 23) | np.array(1.0, np.float32).view(np.uint32)
  uniform = jnp.maximum(jnp.float32(0.0), jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0))
  return uniform < jnp.float32(p)


def split_rng(rng: jax.Array | None, n: int) -> list:
  """n dropout keys, or n Nones when there is no dropout (evaluation)."""
  return [None] * n if rng is None else list(split_keys(rng, n))


def prepend(prefix: jax.Array, embeds: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """prefix [P, H], [1, P, H] or [B, P, H], embeds [B, L, H], mask [B, L] (None: all real) ->
  [B, P + L, H] in embeds' dtype, and the mask with P ones in front."""
  b = embeds.shape[0]
  if prefix.ndim == 2:
    prefix = prefix[None]
  prefix = jnp.broadcast_to(prefix, (b,) + prefix.shape[1:])
  if mask is None:
    mask = jnp.ones(embeds.shape[:2], jnp.int32)
  x = jnp.concatenate([prefix.astype(embeds.dtype), embeds], axis=1)
  m = jnp.concatenate([jnp.ones((b, prefix.shape[1]), mask.dtype), mask], axis=1)
  return x, m


def lm_logits(x: jax.Array, *, tied_table: jax.Array | None = None, head: jax.Array | None = None) -> jax.Array:
  """Hidden states [B, L, H] -> logits [B, L, V] float32, through the embedding table [V, H] (tied) or a
  separate head [H, V]."""
  if tied_table is not None:
    return jnp.einsum("BLH,VH->BLV", x, tied_table.astype(x.dtype), preferred_element_type=jnp.float32)
  return jnp.einsum("BLH,HV->BLV", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def sequence_logprob(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """logits [B, T, V], targets / mask [B, T] -> sum of the masked targets' log-probabilities [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(gold * mask, axis=-1)


def repeat_rows(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
  """Each row repeated n times in place (beams of one example stay together)."""
  return x if n == 1 else jnp.repeat(x, n, axis=axis)



# -- stacked parameter containers shared by T5 and the decoders ---------------------------------

class StackedAttention(nnx.Module):
  """q/k/v/o projections for `num_layers` layers, stacked on a leading axis."""

  def __init__(self, num_layers, d_model, num_heads, num_kv_heads, head_dim, *, rngs, param_dtype, std_in, std_out,
               qkv_bias=False, out_bias=False):
    y, h, n, k, d = num_layers, d_model, num_heads, num_kv_heads, head_dim
    self.q = param(normal_init(rngs, (y, h, n, d), std_in, param_dtype), ("layers", "embed", "heads", "kv"))
    self.k = param(normal_init(rngs, (y, h, k, d), std_in, param_dtype), ("layers", "embed", "kv_heads", "kv"))
    self.v = param(normal_init(rngs, (y, h, k, d), std_in, param_dtype), ("layers", "embed", "kv_heads", "kv"))
    self.o = param(normal_init(rngs, (y, n, d, h), std_out, param_dtype), ("layers", "heads", "kv", "embed"))
    if qkv_bias:
      self.q_bias = param(jnp.zeros((y, n, d), param_dtype), ("layers", "heads", "kv"))
      self.k_bias = param(jnp.zeros((y, k, d), param_dtype), ("layers", "kv_heads", "kv"))
      self.v_bias = param(jnp.zeros((y, k, d), param_dtype), ("layers", "kv_heads", "kv"))
    if out_bias:
      self.o_bias = param(jnp.zeros((y, h), param_dtype), ("layers", "embed"))


class StackedMLP(nnx.Module):
  """wi (or gated wi_0/wi_1) [Y, H, F] and wo [Y, F, H], optionally with biases (GPT-2: bi/bo; Llama
  mlp_bias: bi_0/bi_1/bo)."""

  def __init__(self, num_layers, d_model, d_ff, gated, *, rngs, param_dtype, std_in, std_out, bias=False):
    y, h, f = num_layers, d_model, d_ff
    if gated:
      self.wi_0 = param(normal_init(rngs, (y, h, f), std_in, param_dtype), ("layers", "embed", "mlp"))
      self.wi_1 = param(normal_init(rngs, (y, h, f), std_in, param_dtype), ("layers", "embed", "mlp"))
    else:
      self.wi = param(normal_init(rngs, (y, h, f), std_in, param_dtype), ("layers", "embed", "mlp"))
    self.wo = param(normal_init(rngs, (y, f, h), std_out, param_dtype), ("layers", "mlp", "embed"))
    if bias:
      for name in ("bi_0", "bi_1") if gated else ("bi",):
        setattr(self, name, param(jnp.zeros((y, f), param_dtype), ("layers", "mlp")))
      self.bo = param(jnp.zeros((y, h), param_dtype), ("layers", "embed"))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm without mean subtraction or bias, statistics in float32. x [..., H], scale [H]."""
  xf = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  return (scale.astype(jnp.float32) * y).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm with mean and bias (GPT-2), statistics in float32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


# Names as in transformers' ACT2FN, so HF configs map by name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ModelError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; a no-op when `rng` is None (evaluation) or the rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """[B, S] (1 = attend) -> additive bias [B, 1, 1, S] in float32."""
  return jnp.where(mask[:, None, None, :].astype(bool), 0.0, MASK_VALUE).astype(jnp.float32)


def causal_bias(length_q: int, length_k: int, offset: jax.Array | int = 0) -> jax.Array:
  """[1, 1, L, S] additive causal bias; query i (at absolute position offset+i) sees keys <= it."""
  q = jnp.arange(length_q)[:, None] + offset
  k = jnp.arange(length_k)[None, :]
  return jnp.where(k <= q, 0.0, MASK_VALUE).astype(jnp.float32)[None, None]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    *,
    scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Grouped-query attention. q [B, L, N, D], k/v [B, S, K, D], bias broadcastable to [B, N, L, S].

  Scores and softmax in float32; returns [B, L, N, D] in q's dtype. Differentiated by `_attention`'s own backward
  pass (the standard attention gradient): autodiff of the softmax takes an extra pass over the [B, N, L, S]
  scores (the row sums of dP * P) where rowsum(dO * O), over D, gives the same numbers — the scores are the
  memory-bound part of a CPU step (T5-small, 7 rows of 512: attention forward + backward 143 -> 116 ms).
  """
  keep = None
  if dropout_rng is not None and dropout_rate > 0.0:
    b, l, n, _ = q.shape
    keep = bernoulli(dropout_rng, 1.0 - dropout_rate, (b, n, l, k.shape[1]))
  bias = jnp.zeros((), jnp.float32) if bias is None else bias.astype(jnp.float32)
  return _attention(float(scale), float(dropout_rate) if keep is not None else 0.0, q, k, v, bias, keep)


def _heads_major(x: jax.Array, kh: int) -> jax.Array:
  """[B, L, N, D] -> [B, K, G * L, D]: the G query heads of each K/V head merged into the rows — plain batched
  matmuls, which XLA runs ~2-3x faster on CPU than 5-D einsums (measured), and no K/V copies for GQA."""
  b, l, n, d = x.shape
  return x.reshape(b, l, kh, n // kh, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, (n // kh) * l, d)


def _rows_major(x: jax.Array, l: int, n: int) -> jax.Array:
  """The inverse of `_heads_major`: [B, K, G * L, D] -> [B, L, N, D]."""
  b, kh, _, d = x.shape
  return x.reshape(b, kh, n // kh, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(scale, rate, q, k, v, bias, keep):
  return _attention_fwd(scale, rate, q, k, v, bias, keep)[0]


def _attention_fwd(scale, rate, q, k, v, bias, keep):
  b, l, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  qh = _heads_major(q, kh)
  scores = jnp.matmul(qh, k.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores.reshape(b, n, l, s) * scale + bias, axis=-1)
  used = probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)
  out = jnp.matmul(used.astype(v.dtype).reshape(b, kh, -1, s), v.transpose(0, 2, 1, 3))  # [B, K, G*L, D]
  return _rows_major(out, l, n), (qh, k, v, probs, keep, out, bias)


def _attention_bwd(scale, rate, res, d_out):
  qh, k, v, probs, keep, out, bias = res
  b, l, n, _ = d_out.shape
  s, kh = k.shape[1], k.shape[2]
  do = _heads_major(d_out, kh)
  p = probs.reshape(b, kh, -1, s)
  used = p if keep is None else jnp.where(keep.reshape(p.shape), p / (1.0 - rate), 0.0)
  dv = jnp.matmul(used.transpose(0, 1, 3, 2).astype(do.dtype), do)  # [B, K, S, D]
  d_used = jnp.matmul(do, v.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)  # [B, K, G*L, S]
  dp = d_used if keep is None else jnp.where(keep.reshape(p.shape), d_used / (1.0 - rate), 0.0)
  # softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O) over D, not S
  row = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p * (dp - row)  # d(scores * scale + bias)
  dsq = (ds * scale).astype(qh.dtype)
  dq = _rows_major(jnp.matmul(dsq, k.transpose(0, 2, 1, 3)), l, n)
  dk = jnp.matmul(dsq.transpose(0, 1, 3, 2), qh).transpose(0, 2, 1, 3)  # [B, S, K, D]
  return (dq.astype(qh.dtype), dk.astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype),
          _unbroadcast(ds.reshape(b, n, l, s), bias.shape), None)


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The cotangent of an array of `shape` broadcast to x's shape: x summed over the broadcast axes."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)


def project_qkv(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """x [B, L, H] @ w [H, N, D] (+ b [N, D]) -> [B, L, N, D]."""
  y = jnp.einsum("BLH,HND->BLND", x, w.astype(x.dtype))
  if b is not None:
    y = y + b.astype(x.dtype)
  return y


def project_out(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """x [B, L, N, D] @ w [N, D, H] (+ b [H]) -> [B, L, H]."""
  y = jnp.einsum("BLND,NDH->BLH", x, w.astype(x.dtype))
  if b is not None:
    y = y + b.astype(x.dtype)
  return y


def _dense(x: jax.Array, p: dict, w: str, b: str) -> jax.Array:
  y = x @ p[w].astype(x.dtype)
  return y + p[b].astype(x.dtype) if b in p else y


def rope_inv_freq(head_dim: int, theta: float, *, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max_positions: int = 8192,
                  freq_factors: tuple[float, ...] | None = None) -> np.ndarray:
  """Rotary inverse frequencies [D // 2] float32, computed as transformers does (float32 throughout).

  rope_type "default"; "linear" (positions / factor); "llama3" (Llama 3.1 frequency-dependent scaling:
  long wavelengths divided by `factor`, short ones kept, a smooth ramp between). `freq_factors` [D // 2]
  divides the frequencies as llama.cpp's `rope_freqs` tensor does (how GGUF files carry llama3 scaling).
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = np.float32(1.0) / np.power(np.float32(theta), exponent)
  if rope_type == "linear":
    inv = inv / np.float32(factor)
  elif rope_type == "llama3":
    low_wavelen = original_max_positions / low_freq_factor
    high_wavelen = original_max_positions / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv)
    smooth = (np.float32(original_max_positions) / wavelen - np.float32(low_freq_factor)) / np.float32(
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  elif rope_type != "default":
    raise ModelError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
  if freq_factors is not None:
    inv = inv / np.asarray(freq_factors, np.float32)
  return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """positions [B, L] int -> (cos, sin) [B, L, D] float32, frequencies repeated over both halves."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding in the half-split layout (HF): x [B, L, N, D], cos/sin [B, L, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  c, s = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * c + rotated * s


def mlp(x: jax.Array, p: dict, act: Callable, dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Dense or gated MLP. p has `wi` [H, F] (dense) or `wi_0`/`wi_1` [H, F] (gated: act(x wi_0) * x wi_1),
  `wo` [F, H], and optional biases `bi` (or `bi_0`/`bi_1`) [F], `bo` [H]."""
  if "wi_0" in p:
    h = act(_dense(x, p, "wi_0", "bi_0")) * _dense(x, p, "wi_1", "bi_1")
  else:
    h = act(_dense(x, p, "wi", "bi"))
  h = dropout(h, dropout_rate, rng)
  y = h @ p["wo"].astype(x.dtype)
  if "bo" in p:
    y = y + p["bo"].astype(x.dtype)
  return y


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's log-spaced relative position buckets (memory_position - query_position -> bucket id)."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 log, truncated toward zero like torch's .to(long); n >= max_exact >= 1 where used.
  safe_n = jnp.maximum(n, 1).astype(jnp.float32)
  large = max_exact + (
      jnp.log(safe_n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, n, large)


def remat_policy(name: str):
  """Named rematerialisation policies for the layer scan."""
  policies = {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.dots_saveable,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(policies)}")
  return policies[name]


LAYER_LOOPS = ("auto", "scan", "unroll")


AUTO_UNROLL_MIN_WIDTH = 256


def unrolls(loop: str, width: int | None = None) -> bool:
  """Whether layers of hidden size `width` run unrolled: "unroll", or "auto" on the CPU for models of hidden size
  AUTO_UNROLL_MIN_WIDTH or more. A scan keeps compile time flat in depth (what accelerators need); on the CPU an
  unrolled stack runs ~10% faster (T5-small train step, measured: 1110 vs 1243 ms) because a scan copies every
  layer's weights and saved activations in and out of its stacked buffers, for a longer compile (3.6 vs 2.6 s for
  8+8 layers). A tiny model gains nothing worth its compile time (the quickstart's, width 64: 16.4 s unrolled,
  14.8 s as a scan, for 300 steps)."""
  if loop not in LAYER_LOOPS:
    raise ModelError(f"unknown layer loop {loop!r}; choose one of {', '.join(LAYER_LOOPS)}")
  big = width is None or width >= AUTO_UNROLL_MIN_WIDTH
  return loop == "unroll" or (loop == "auto" and big and jax.default_backend() == "cpu")


def scan_layers(layer_fn: Callable, x: jax.Array, stacked: dict, rng: jax.Array | None, remat: str = "none",
                per_layer=None, loop: str = "auto"):
  """Run `layer_fn(params_of_one_layer, x, rng) -> x` over params stacked on axis 0 with lax.scan, unrolled as
  `loop` says (`unrolls`).

  With `per_layer` (a pytree stacked on axis 0 like the params: a KV cache, per-layer settings),
  `layer_fn(p, x, rng, per_layer_i) -> (x, out_i)` and the result is `(x, outs stacked on axis 0)`.
  """
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  rngs = None if rng is None else split_keys(rng, num_layers)

  def body(carry, xs):
    p, r, extra = xs
    if per_layer is None:
      return layer_fn(p, carry, r), None
    return layer_fn(p, carry, r, extra)

  if remat != "none":
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
  unroll = _UNROLL.get() or unrolls(loop, x.shape[-1])
  x, outs = jax.lax.scan(body, x, (stacked, rngs, per_layer), unroll=True if unroll else 1)
  return x if per_layer is None else (x, outs)


# XLA's cost analysis counts a loop body once, so FLOP counts are taken from an unrolled trace.
_UNROLL: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxprompt_unroll_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
  """Trace layer scans fully unrolled (for FLOP counting; compile time then grows with depth)."""
  token = _UNROLL.set(True)
  try:
    yield
  finally:
    _UNROLL.reset(token)


def arrays(module: nnx.Module) -> dict:
  """A module's parameters as a nested dict of arrays (the form the pure layer functions take)."""
  return nnx.state(module, nnx.Param).to_pure_dict()
