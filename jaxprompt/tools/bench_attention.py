"""`jaxprompt bench --attention`: the attention implementations side by side, in one run, on one device.

For each implementation that can run on this platform (`models.attention.IMPLEMENTATIONS`; "cudnn" only on a GPU,
"pallas" compiled only on a TPU or GPU — interpreted elsewhere, which measures nothing useful, so it is skipped
there) it times the forward pass and the forward + backward pass of `attention.attend` at a model-like shape with
a padding mask in the bias, and reports each against "xla" (a ratio measured in the same run) and the largest
difference from "xla"'s output. Notation: B batch, L length, N query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models import attention
from jaxprompt.models.layers import MASK_VALUE


def runnable(implementation: str) -> bool:
  """Whether timing `implementation` here measures the implementation itself (not a fallback or an interpreter)."""
  platform = jax.default_backend()
  if implementation == "cudnn":
    return platform in ("gpu", "cuda")
  if implementation == "pallas":
    return platform in ("tpu", "gpu", "cuda")
  return implementation in ("xla", "cpu")


def _inputs(b: int, length: int, n: int, k: int, d: int, dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, length, n, d), dtype)
  kk = jax.random.normal(keys[1], (b, length, k, d), dtype)
  v = jax.random.normal(keys[2], (b, length, k, d), dtype)
  real = np.arange(length)[None, :] < np.linspace(length // 2, length, b).astype(int)[:, None]  # padded rows
  bias = jnp.where(jnp.asarray(real)[:, None, None, :], 0.0, MASK_VALUE).astype(jnp.float32)  # [B, 1, 1, S]
  return q, kk, v, bias


def _median_seconds(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench_attention(
  *,
  batch: int = 8,
  length: int = 1024,
  heads: int = 16,
  kv_heads: int = 16,
  head_dim: int = 64,
  dtype: str = "bfloat16",
  iters: int = 10,
) -> dict:
  """Median seconds of forward and forward + backward per implementation, ratios to "xla", max |diff| to "xla"."""
  dt = jnp.dtype(dtype)
  q, k, v, bias = _inputs(batch, length, heads, kv_heads, head_dim, dt)
  scale = head_dim**-0.5
  out = dict(
    shape=dict(batch=batch, length=length, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype),
    platform=jax.default_backend(),
    device=str(jax.devices()[0]),
    implementations={},
  )
  reference = None
  for impl in ("xla", "cpu", "cudnn", "pallas"):
    if not runnable(impl):
      out["implementations"][impl] = dict(skipped=f"not measurable on {jax.default_backend()}")
      continue

    def fwd(q, k, v, bias, impl=impl):
      return attention.attend(q, k, v, bias, scale=scale, implementation=impl)

    def loss(q, k, v, bias, impl=impl):
      return jnp.sum(attention.attend(q, k, v, bias, scale=scale, implementation=impl).astype(jnp.float32))

    f, g = jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    y = np.asarray(f(q, k, v, bias), np.float32)
    reference = y if reference is None else reference
    out["implementations"][impl] = dict(
      forward_s=_median_seconds(f, (q, k, v, bias), iters),
      forward_backward_s=_median_seconds(g, (q, k, v, bias), iters),
      max_abs_diff_vs_xla=float(np.max(np.abs(y - reference))),
    )
  base = out["implementations"]["xla"]
  for r in out["implementations"].values():
    if "forward_s" in r:
      r["forward_vs_xla"] = r["forward_s"] / base["forward_s"]
      r["forward_backward_vs_xla"] = r["forward_backward_s"] / base["forward_backward_s"]
  return out


def report(result: dict) -> str:
  """`bench_attention`'s result as one line per implementation."""
  lines = []
  for name, r in result["implementations"].items():
    if "skipped" in r:
      lines.append(f"attention {name:7s} {r['skipped']}")
      continue
    lines.append(
      f"attention {name:7s} fwd {r['forward_s'] * 1e3:8.2f} ms ({r['forward_vs_xla']:.2f}x xla)  fwd+bwd "
      f"{r['forward_backward_s'] * 1e3:8.2f} ms ({r['forward_backward_vs_xla']:.2f}x xla)  "
      f"max |diff| {r['max_abs_diff_vs_xla']:.2e}"
    )
  return "\n".join(lines)
