"""Attention per platform: one function, `attend`, and the kernels it chooses between.

    attend(q, k, v, bias, *, scale, dropout_rate=0.0, dropout_rng=None, implementation="auto") -> [B, L, N, D]

Every implementation computes softmax(q k^T * scale + bias) v with the scores and softmax in float32, and is
tested against that formula written out (values and gradients of q, k, v and bias):

- "cpu": `models.cpu.attention`, the CPU kernel (heads-major matmuls, its own backward pass).
- "xla": `jax.nn.dot_product_attention(..., implementation="xla")`.
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` (NVIDIA GPUs). Shapes, dtypes or a platform
  cuDNN does not take fall back to "xla", with one log line per reason. The bias gradient is not cuDNN's (it is
  only right for a batch of one, jax-ml/jax#30593): it is recomputed by the formula, which XLA drops as dead code
  where nothing differentiates the bias (a frozen relative-position table, a mask).
- "pallas": `flash_attention`, a Pallas kernel written here: an online softmax over key blocks, bias blocks added,
  never a [L, S] score matrix per head in memory; its backward recomputes the probabilities from the saved
  row maxima and sums, key block by key block. It runs compiled on TPU (and GPU), interpreted (slowly) elsewhere.
- "auto": "cudnn" on GPU, "pallas" on TPU, "cpu" on the CPU (`resolve`).

The bias carries every mask: T5's relative positions, padding, causal masks, sliding windows and prefix slots all
arrive added into it, masked entries holding `layers.MASK_VALUE` (the most negative float32). Attention dropout
(`dropout_rate` > 0 with a key) runs the "cpu" kernel (the formula, on any platform) with the keep mask drawn by
`layers.bernoulli` over [B, N, L, S]; "cudnn" and "pallas" say so once in the log.

Notation: B batch, L query length, S key length, N query heads, K key/value heads (K divides N; query head n reads
key/value head n // (N // K)), G = N // K, D head dim.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxprompt.errors import ModelError
from jaxprompt.models import cpu

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "cpu")

# cuDNN's bias is in the inputs' 16-bit dtype, where MASK_VALUE would round to -inf, and its kernels mishandle the
# difference of two huge negatives: masked entries are clamped to what JAX's own cuDNN masks use (-2^41).
_CUDNN_MASK_VALUE = -float(2 << 40)

_logged: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    log.warning(message)


def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def resolve(implementation: str = "auto") -> str:
  """The implementation `attend` runs for this name on this platform: "auto" is "cudnn" on GPU, "pallas" on TPU,
  "cpu" on the CPU; the others are themselves (a "cudnn" that cannot run still falls back to "xla" in `attend`)."""
  if implementation not in IMPLEMENTATIONS:
    raise ModelError(f"unknown attention implementation {implementation!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
  if implementation != "auto":
    return implementation
  if _on_gpu():
    return "cudnn"
  return "pallas" if jax.default_backend() == "tpu" else "cpu"


def attend(
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
  """Grouped-query attention. q [B, L, N, D], k/v [B, S, K, D], bias (additive, None: none) broadcastable to
  [B, N, L, S] -> [B, L, N, D] in q's dtype; scores and softmax in float32. `implementation`: one of
  IMPLEMENTATIONS (see the module docstring)."""
  impl = resolve(implementation)
  b, lq, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or n % kh:
    raise ModelError(
      f"attention needs q [B, L, N, D] and k/v [B, S, K, D] with K dividing N; got q {q.shape}, "
      f"k {k.shape}, v {v.shape}"
    )
  bias = jnp.zeros((), jnp.float32) if bias is None else bias.astype(jnp.float32)
  if dropout_rng is not None and dropout_rate > 0.0:
    if impl not in ("cpu", "xla"):
      _log_once(f"attention: {impl!r} has no attention dropout; the 'cpu' kernel runs where dropout is on")
    keep = _bernoulli(dropout_rng, 1.0 - dropout_rate, (b, n, lq, s))
    return cpu.attention(q, k, v, bias, scale=scale, dropout_rate=dropout_rate, keep=keep)
  if impl == "cpu":
    return cpu.attention(q, k, v, bias, scale=scale)
  if impl == "cudnn":
    reason = _cudnn_unsupported(q, k, v, bias)
    if reason is None:
      return _cudnn(q, k, v, _bias4(bias, lq, s), float(scale))
    _log_once(f"attention: 'cudnn' falls back to 'xla': {reason}")
    impl = "xla"
  if impl == "xla":
    v = v.astype(q.dtype)
    return jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v, _bias4(bias, lq, s), scale=float(scale), implementation="xla"
    )
  return flash_attention(q, k, v, bias, scale=scale)


def _bernoulli(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
  """`layers.bernoulli`, bit for bit (layers imports this module, so not the other way round)."""
  return cpu.bernoulli(rng, p, shape) if jax.default_backend() == "cpu" else jax.random.bernoulli(rng, p, shape)


def _bias4(bias: jax.Array, lq: int, s: int) -> jax.Array:
  """A bias broadcastable to [B, N, L, S] as [B or 1, N or 1, L, S] (batch and heads stay broadcast)."""
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  return jnp.broadcast_to(bias, bias.shape[:2] + (lq, s))


# -- cuDNN ------------------------------------------------------------------------------------------------------


def _cudnn_unsupported(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> str | None:
  """Why cuDNN's flash attention cannot take these inputs here (None: it can), checked before tracing it."""
  if not _on_gpu():
    return f"cuDNN needs an NVIDIA GPU (the backend is {jax.default_backend()})"
  platform = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
  if "rocm" in platform:
    return "cuDNN needs an NVIDIA GPU (this is ROCm)"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or not q.dtype == k.dtype == v.dtype:
    return f"cuDNN takes bfloat16/float16 queries, keys and values of one dtype, not {q.dtype}/{k.dtype}/{v.dtype}"
  d = q.shape[-1]
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  d_max = 256 if tuple(int(x) for x in str(cc).split(".")[:2] if x.isdigit()) >= (9,) else 128
  if d % 8 or d > d_max:
    return f"cuDNN needs a head dim that is a multiple of 8 and at most {d_max}, not {d}"
  lq, s = q.shape[1], k.shape[1]
  if bias.ndim and (lq % 2 or s % 2):
    return f"cuDNN's biased attention gradient needs even lengths, not L={lq}, S={s}"
  return None


def _plain(q, k, v, bias, scale):
  """The formula in float32, heads grouped: q [B, L, N, D], k/v [B, S, K, D], bias [., ., L, S] -> [B, L, N, D]."""
  b, lq, n, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, lq, kh, n // kh, d)
  scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * scale
  scores = scores + _grouped(bias, kh)
  p = jax.nn.softmax(scores, axis=-1)
  return p, jnp.einsum("bkgls,bskd->blkgd", p, v.astype(jnp.float32)).reshape(b, lq, n, d)


def _grouped(x: jax.Array, kh: int) -> jax.Array:
  """[B or 1, N or 1, L, S] -> [B or 1, K or 1, G or 1, L, S] (query head n = k * G + g)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], kh, x.shape[1] // kh, *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cudnn(q, k, v, bias, scale):
  return _cudnn_fwd(q, k, v, bias, scale)[0]


def _cudnn_call(q, k, v, bias, scale):
  bias = jnp.maximum(bias, _CUDNN_MASK_VALUE).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, implementation="cudnn")


def _cudnn_fwd(q, k, v, bias, scale):
  out, vjp = jax.vjp(lambda q, k, v: _cudnn_call(q, k, v, jax.lax.stop_gradient(bias), scale), q, k, v)
  return out, (vjp, q, k, v, bias, out)


def _cudnn_bwd(scale, res, d_out):
  vjp, q, k, v, bias, out = res
  dq, dk, dv = vjp(d_out)
  # the bias gradient by the formula (dS = P * (dP - rowsum(dO * O))); dead code unless the bias is differentiated
  b, lq, n, d = q.shape
  kh = k.shape[2]
  p, _ = _plain(q, k, v, bias, scale)
  dog = d_out.astype(jnp.float32).reshape(b, lq, kh, n // kh, d)
  dp = jnp.einsum("blkgd,bskd->bkgls", dog, v.astype(jnp.float32))
  row = jnp.einsum("blkgd,blkgd->bkgl", dog, out.astype(jnp.float32).reshape(dog.shape))[..., None]
  ds = (p * (dp - row)).reshape(b, n, lq, -1)
  return dq, dk, dv, cpu.unbroadcast(ds, bias.shape)


_cudnn.defvjp(_cudnn_fwd, _cudnn_bwd)


# -- Pallas flash attention -------------------------------------------------------------------------------------


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None,
  *,
  scale: float,
  block_q: int = 128,
  block_k: int = 128,
  interpret: bool | None = None,
) -> jax.Array:
  """The Pallas kernel: q [B, L, N, D], k/v [B, S, K, D], bias broadcastable to [B, N, L, S] -> [B, L, N, D] in
  q's dtype. One program per (row, head, block of `block_q` queries) runs an online softmax over blocks of
  `block_k` keys; lengths are padded to the blocks (padded keys masked, padded queries dropped). `interpret`: None
  runs the kernel compiled on TPU/GPU and interpreted elsewhere. Blocks shrink to the (8-rounded) lengths."""
  if interpret is None:
    interpret = jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")
  b, lq, n, d = q.shape
  s = k.shape[1]
  bq = min(block_q, -(-lq // 8) * 8)
  bk = min(block_k, -(-s // 8) * 8)
  lp, sp = -(-lq // bq) * bq, -(-s // bk) * bk
  bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias.astype(jnp.float32)
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  rows = lq if bias.shape[2] != 1 else 1  # a bias the same for every query (a padding mask) stays one row
  bias = jnp.broadcast_to(bias, bias.shape[:2] + (rows, s))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, lp - lq if rows > 1 else 0), (0, sp - s)))
  qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, lp - lq), (0, 0)))  # [B, N, Lp, D]
  kt, vt = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))  # [B, K, Sp, D]
  out = _flash(float(scale), bq, bk, s, bool(interpret), qt, kt, vt, bias)
  return out[:, :, :lq].transpose(0, 2, 1, 3)


def _flash_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, max_ref, sum_ref, *, scale, block_k, kv_len):
  """One (row, head, query block): q_ref [bq, D], k_ref/v_ref [Sp, D], bias_ref [bq or 1, Sp] -> o_ref [bq, D],
  max_ref / sum_ref [bq, 1]: each row's largest score and sum of exp(score - largest), for the backward pass (kept
  apart, not as one log-sum-exp: a row whose scores are all near MASK_VALUE would lose the sum's logarithm)."""
  q = q_ref[...]
  bq, d = q.shape

  def body(j, carry):
    acc, m, total = carry
    start = pl.multiple_of(j * block_k, block_k)
    kb = k_ref[pl.ds(start, block_k), :]
    vb = v_ref[pl.ds(start, block_k), :]
    scores = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    scores = scores + bias_ref[:, pl.ds(start, block_k)]
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
    scores = jnp.where(cols < kv_len, scores, -jnp.inf)  # padded keys; every block holds a real one
    m_new = jnp.maximum(m, scores.max(axis=-1))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(scores - m_new[:, None])
    total = correction * total + p.sum(axis=-1)
    pv = jax.lax.dot_general(p.astype(vb.dtype), vb, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return correction[:, None] * acc + pv, m_new, total

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, total = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  max_ref[...] = m[:, None]
  sum_ref[...] = total[:, None]


def _flash_forward(scale, bq, bk, kv_len, interpret, q, k, v, bias):
  """q [B, N, Lp, D], k/v [B, K, Sp, D], bias [B or 1, N or 1, Lp or 1, Sp] -> o [B, N, Lp, D] and the rows'
  largest score and exp-sum [B, N, Lp, 1] each."""
  b, n, lp, d = q.shape
  kh, sp = k.shape[1], k.shape[2]
  g = n // kh
  bb, bn, bl = bias.shape[:3]
  kernel = functools.partial(_flash_kernel, scale=scale, block_k=bk, kv_len=kv_len)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda i, h, j: (i, h, j, 0))
  kv_spec = pl.BlockSpec((None, None, sp, d), lambda i, h, j: (i, h // g, 0, 0))
  bias_spec = pl.BlockSpec(
    (None, None, bq if bl > 1 else 1, sp),
    lambda i, h, j: (i if bb > 1 else 0, h if bn > 1 else 0, j if bl > 1 else 0, 0),
  )
  return pl.pallas_call(
    kernel,
    grid=(b, n, lp // bq),
    in_specs=[q_spec, kv_spec, kv_spec, bias_spec],
    out_specs=[q_spec] + [pl.BlockSpec((None, None, bq, 1), lambda i, h, j: (i, h, j, 0))] * 2,
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct((b, n, lp, 1), jnp.float32)] * 2,
    interpret=interpret,
    name="jaxprompt_flash_attention",
  )(q, k, v, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _flash(scale, bq, bk, kv_len, interpret, q, k, v, bias):
  return _flash_forward(scale, bq, bk, kv_len, interpret, q, k, v, bias)[0]


def _flash_fwd(scale, bq, bk, kv_len, interpret, q, k, v, bias):
  out, m, total = _flash_forward(scale, bq, bk, kv_len, interpret, q, k, v, bias)
  return out, (q, k, v, bias, out, m, total)


def _flash_bwd(scale, bq, bk, kv_len, interpret, res, d_out):
  """The standard attention gradient, one key block at a time (a scan): P = exp(scores - max) / sum recomputed from
  the saved row statistics, dS = P * (dP - rowsum(dO * O)); dQ accumulates over the blocks, dK/dV/dbias are per
  block."""
  q, k, v, bias, out, m, total = res
  b, n, lp, d = q.shape
  kh, sp = k.shape[1], k.shape[2]
  nb = sp // bk
  qg = q.reshape(b, kh, n // kh, lp, d)
  dog = d_out.reshape(qg.shape).astype(jnp.float32)
  row = jnp.sum(dog * out.reshape(qg.shape).astype(jnp.float32), axis=-1, keepdims=True)  # [B, K, G, Lp, 1]
  m, total = (x.reshape(b, kh, n // kh, lp, 1) for x in (m, total))
  blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[:2] + (nb, bk) + x.shape[3:]), 2, 0)  # noqa: E731
  bias_blocks = jnp.moveaxis(bias.reshape(bias.shape[:3] + (nb, bk)), 3, 0)  # [nb, B|1, N|1, Lp|1, bk]

  def step(dq, xs):
    j, kb, vb, bias_b = xs  # kb/vb [B, K, bk, D]
    scores = jnp.einsum("bkgld,bksd->bkgls", qg, kb, preferred_element_type=jnp.float32) * scale
    scores = scores + _grouped(bias_b, kh)
    cols = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    p = jnp.where(cols < kv_len, jnp.exp(scores - m) / total, 0.0)
    dv = jnp.einsum("bkgls,bkgld->bksd", p, dog)
    dp = jnp.einsum("bkgld,bksd->bkgls", dog, vb.astype(jnp.float32))
    ds = p * (dp - row)
    dq = dq + jnp.einsum("bkgls,bksd->bkgld", ds, kb.astype(jnp.float32)) * scale
    dk = jnp.einsum("bkgls,bkgld->bksd", ds, qg.astype(jnp.float32)) * scale
    return dq, (dk, dv, cpu.unbroadcast(ds.reshape(b, n, lp, bk), bias_b.shape))

  dq, (dk, dv, dbias) = jax.lax.scan(
    step, jnp.zeros(qg.shape, jnp.float32), (jnp.arange(nb), blocks(k), blocks(v), bias_blocks)
  )
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(x.shape[1:3] + (sp,) + x.shape[4:])  # noqa: E731
  dbias = jnp.moveaxis(dbias, 0, 3).reshape(bias.shape)
  return (dq.reshape(q.shape).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), dbias)


_flash.defvjp(_flash_fwd, _flash_bwd)
