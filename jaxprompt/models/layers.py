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
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import ModelError
from jaxprompt.models import attention, cpu
from jaxprompt.models.cpu import AUTO_UNROLL_MIN_WIDTH, LAYER_LOOPS, unrolls  # noqa: F401 (the layer loop's API)

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


# Dropout's random bits: JAX's default Threefry-2x32 key and partitionable counters. On the CPU they come from
# `cpu.threefry2x32` (written out: far cheaper to compile there than JAX's loop), elsewhere from `jax.random`, whose
# lowering is already those unrolled rounds; the bits are the same (tested, also sharded).


def split_keys(rng: jax.Array, n: int) -> jax.Array:
  """`jax.random.split(rng, n)`: n keys [n]."""
  return cpu.split_keys(rng, n) if jax.default_backend() == "cpu" else jax.random.split(rng, n)


def bernoulli(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(rng, p, shape)`: True with probability p (float32 uniforms, as JAX draws them)."""
  return cpu.bernoulli(rng, p, shape) if jax.default_backend() == "cpu" else jax.random.bernoulli(rng, p, shape)


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

  def __init__(
    self,
    num_layers,
    d_model,
    num_heads,
    num_kv_heads,
    head_dim,
    *,
    rngs,
    param_dtype,
    std_in,
    std_out,
    qkv_bias=False,
    out_bias=False,
  ):
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


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None,
  *,
  scale: float,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array:
  """Grouped-query attention. q [B, L, N, D], k/v [B, S, K, D], bias broadcastable to [B, N, L, S] -> [B, L, N, D]
  in q's dtype, scores and softmax in float32: `attention.attend` with this `implementation` ("auto": the cuDNN
  kernel on GPU, the Pallas kernel on TPU, the CPU kernel on the CPU; see `attention.IMPLEMENTATIONS`)."""
  return attention.attend(
    q, k, v, bias, scale=scale, dropout_rate=dropout_rate, dropout_rng=dropout_rng, implementation=implementation
  )


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


def rope_inv_freq(
  head_dim: int,
  theta: float,
  *,
  rope_type: str = "default",
  factor: float = 1.0,
  low_freq_factor: float = 1.0,
  high_freq_factor: float = 4.0,
  original_max_positions: int = 8192,
  freq_factors: tuple[float, ...] | None = None,
) -> np.ndarray:
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
      high_freq_factor - low_freq_factor
    )
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
  h = act(_dense(x, p, "wi_0", "bi_0")) * _dense(x, p, "wi_1", "bi_1") if "wi_0" in p else act(_dense(x, p, "wi", "bi"))
  h = dropout(h, dropout_rate, rng)
  y = h @ p["wo"].astype(x.dtype)
  if "bo" in p:
    y = y + p["bo"].astype(x.dtype)
  return y


def relative_position_bucket(
  relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
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


def scan_layers(
  layer_fn: Callable,
  x: jax.Array,
  stacked: dict,
  rng: jax.Array | None,
  remat: str = "none",
  per_layer=None,
  loop: str = "auto",
):
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
