"""CPU-only numerics: code that exists because XLA's CPU backend compiles or runs the obvious version badly.

Nothing here changes a result; each piece is bitwise (Threefry) or formula-equal (attention, chunks) to what GPU/TPU
run, and is tested so. What is CPU-specific, and why (numbers: docs/performance-cpu.md):

- **Threefry written out** (`threefry2x32`, `split_keys`, `bernoulli`). On CPU, JAX lowers each Threefry call as a
  5-trip while loop; a train step with dropout holds dozens of them, and they were most of its compile time.
  GPU/TPU already lower Threefry to these unrolled rounds, so `layers.split_keys` / `layers.bernoulli` use this
  only on the CPU and `jax.random` elsewhere (the bits are the same).
- **An attention kernel with its own backward pass** (`attention`). Heads-major batched matmuls (XLA's CPU runs
  them much faster than 5-D einsums, with no K/V copies for GQA), and the softmax gradient's row sums taken over D
  as rowsum(dO * O) instead of another pass over the memory-bound [B, N, L, S] scores.
- **Layers unrolled** (`unrolls`). A layer scan copies every layer's weights and saved activations in and out of
  its stacked buffers, which costs the CPU more than the longer compile of an unrolled stack for all but tiny
  models; accelerators keep the scan (compile time flat in depth).
- **Big batches in row chunks** (`auto_microbatches`). The CPU's step slows down once a batch's activations
  outgrow its caches; chunks of at most CPU_CHUNK_TOKENS tokens stay inside them.

Notation: B batch, L query length, S key length, N query heads, K key/value heads, G = N // K, D head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.errors import ModelError

# -- Threefry-2x32, unrolled ------------------------------------------------------------------------------------
# JAX's own bits: the default Threefry-2x32 key and its partitionable counters, so every mask, split and sharded
# layout is bitwise what `jax.random.split` / `jax.random.bernoulli` give (tested). Other key types (a user's
# `jax_default_prng_impl`), and arrays of 2^32 elements or more, go to `jax.random` itself.
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
  return sum(
    (jax.lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides)),
    jnp.zeros(shape, jnp.uint32),
  )


def split_keys(rng: jax.Array, n: int) -> jax.Array:
  """`jax.random.split(rng, n)` bit for bit: n keys [n]."""
  kd = _threefry_key(rng, n)
  if kd is None:
    return jax.random.split(rng, n)
  b1, b2 = threefry2x32(kd[0], kd[1], jnp.zeros((n,), jnp.uint32), _counters((n,)))
  return jax.random.wrap_key_data(jnp.stack([b1, b2], axis=1), impl=jax.random.key_impl(rng))


def bernoulli(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(rng, p, shape)` bit for bit: True with probability p (float32 uniforms, as JAX)."""
  kd = _threefry_key(rng, math.prod(shape))
  if kd is None:
    return jax.random.bernoulli(rng, p, shape)
  b1, b2 = threefry2x32(kd[0], kd[1], jnp.zeros(shape, jnp.uint32), _counters(shape))
  bits = (b1 ^ b2) >> np.uint32(32 - 23) | np.array(1.0, np.float32).view(np.uint32)
  uniform = jnp.maximum(jnp.float32(0.0), jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0))
  return uniform < jnp.float32(p)


# -- attention with its own backward pass -----------------------------------------------------------------------


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array,
  *,
  scale: float,
  dropout_rate: float = 0.0,
  keep: jax.Array | None = None,
) -> jax.Array:
  """q [B, L, N, D], k/v [B, S, K, D], bias float32 broadcastable to [B, N, L, S], keep (dropout's keep mask)
  [B, N, L, S] bool or None -> [B, L, N, D] in q's dtype; scores and softmax in float32.

  Differentiated by its own backward pass (the standard attention gradient): autodiff of the softmax takes an extra
  pass over the [B, N, L, S] scores (the row sums of dP * P) where rowsum(dO * O), over D, gives the same numbers,
  and the scores are the memory-bound part of a CPU step."""
  return _attention(float(scale), float(dropout_rate) if keep is not None else 0.0, q, k, v, bias, keep)


def _heads_major(x: jax.Array, kh: int) -> jax.Array:
  """[B, L, N, D] -> [B, K, G * L, D]: the G query heads of each K/V head merged into the rows — plain batched
  matmuls, which XLA runs much faster on CPU than 5-D einsums, and no K/V copies for GQA."""
  b, lq, n, d = x.shape
  return x.reshape(b, lq, kh, n // kh, d).transpose(0, 2, 3, 1, 4).reshape(b, kh, (n // kh) * lq, d)


def _rows_major(x: jax.Array, lq: int, n: int) -> jax.Array:
  """The inverse of `_heads_major`: [B, K, G * L, D] -> [B, L, N, D]."""
  b, kh, _, d = x.shape
  return x.reshape(b, kh, n // kh, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(scale, rate, q, k, v, bias, keep):
  return _attention_fwd(scale, rate, q, k, v, bias, keep)[0]


def _attention_fwd(scale, rate, q, k, v, bias, keep):
  b, lq, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  qh = _heads_major(q, kh)
  scores = jnp.matmul(qh, k.transpose(0, 2, 3, 1), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores.reshape(b, n, lq, s) * scale + bias, axis=-1)
  used = probs if keep is None else jnp.where(keep, probs / (1.0 - rate), 0.0)
  out = jnp.matmul(used.astype(v.dtype).reshape(b, kh, -1, s), v.transpose(0, 2, 1, 3))  # [B, K, G*L, D]
  return _rows_major(out, lq, n), (qh, k, v, probs, keep, out, bias)


def _attention_bwd(scale, rate, res, d_out):
  qh, k, v, probs, keep, out, bias = res
  b, lq, n, _ = d_out.shape
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
  dq = _rows_major(jnp.matmul(dsq, k.transpose(0, 2, 1, 3)), lq, n)
  dk = jnp.matmul(dsq.transpose(0, 1, 3, 2), qh).transpose(0, 2, 1, 3)  # [B, S, K, D]
  return (
    dq.astype(qh.dtype),
    dk.astype(k.dtype),
    dv.transpose(0, 2, 1, 3).astype(v.dtype),
    unbroadcast(ds.reshape(b, n, lq, s), bias.shape),
    None,
  )


def unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The cotangent of an array of `shape` broadcast to x's shape: x summed over the broadcast axes."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape)))) if x.ndim > len(shape) else x
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- layers unrolled --------------------------------------------------------------------------------------------

LAYER_LOOPS = ("auto", "scan", "unroll")

AUTO_UNROLL_MIN_WIDTH = 256


def unrolls(loop: str, width: int | None = None) -> bool:
  """Whether layers of hidden size `width` run unrolled: "unroll", or "auto" on the CPU for models of hidden size
  AUTO_UNROLL_MIN_WIDTH or more. A scan keeps compile time flat in depth (what accelerators need); on the CPU an
  unrolled stack runs faster because a scan copies every layer's weights and saved activations in and out of its
  stacked buffers, at the price of a longer compile. A tiny model gains less than that compile costs it."""
  if loop not in LAYER_LOOPS:
    raise ModelError(f"unknown layer loop {loop!r}; choose one of {', '.join(LAYER_LOOPS)}")
  big = width is None or width >= AUTO_UNROLL_MIN_WIDTH
  return loop == "unroll" or (loop == "auto" and big and jax.default_backend() == "cpu")


# -- big batches in row chunks ----------------------------------------------------------------------------------

CPU_CHUNK_TOKENS = 4096


def auto_microbatches(rows: int, tokens_per_row: int, data_parallel: int = 1) -> int:
  """`train.microbatches: auto`: 1 on GPU/TPU; on the CPU the fewest equal chunks of at most CPU_CHUNK_TOKENS
  tokens, each a whole number of rows on every data-parallel device. The CPU's step slows down once a batch's
  activations outgrow its caches, so a big batch runs faster in chunks (gradients and eval sums add up exactly).
  The chunk depends on the global batch, not on the device count, so results do not either."""
  if jax.default_backend() != "cpu":
    return 1
  per_device = max(rows // data_parallel, 1)
  return next(
    m
    for m in range(1, per_device + 1)
    if per_device % m == 0 and (rows // m) * tokens_per_row <= CPU_CHUNK_TOKENS or m == per_device
  )
