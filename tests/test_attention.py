"""Every attention implementation (`models.attention`) against the plain formula softmax(q k^T * scale + bias) v
written out in float32: values and the gradients of q, k, v and bias, on the biases the models build (T5's
relative positions plus padding, causal masks, sliding windows, a key/value prefix), with GQA, lengths that are not
a multiple of the Pallas blocks, bfloat16 inputs and dropout.

"cpu", "xla" and "pallas" (interpreted on the CPU, with 4 x 4 blocks so that every case spans several) run
everywhere; "cudnn" only on an NVIDIA GPU (skipped elsewhere: there is nothing to run it on).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt.errors import ModelError
from jaxprompt.models import attention as A
from jaxprompt.models import layers as L

SCALE = 0.35
HEADS, KV_HEADS = 4, 2  # GQA: query heads 0, 1 read key/value head 0; 2, 3 read 1
MASK = L.MASK_VALUE
ON_GPU = jax.default_backend() == "gpu"


def plain(q, k, v, bias, keep=None, rate=0.0):
  """The formula in float32, key/value heads repeated for GQA; dropout as an explicit keep mask [B, N, L, S]."""
  g = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
  p = jax.nn.softmax(jnp.einsum("blnd,bsnd->bnls", q.astype(jnp.float32), k) * SCALE + bias, axis=-1)
  if keep is not None:
    p = jnp.where(keep, p / (1 - rate), 0.0)
  return jnp.einsum("bnls,bsnd->blnd", p, v)


def implementation(name):
  if name == "pallas":  # small blocks: several query and key blocks, padded at the ends
    return lambda q, k, v, bias: A.flash_attention(q, k, v, bias, scale=SCALE, block_q=4, block_k=4)
  return lambda q, k, v, bias: A.attend(q, k, v, bias, scale=SCALE, implementation=name)


def window(lq, s, *, prefix=0, causal=True, size=None):
  """[1, 1, L, S] additive bias: query i (at position prefix + i) sees every prefix slot and the keys at positions
  <= its own (causal), within the last `size` of them (a sliding window)."""
  qpos, kpos = np.arange(lq)[:, None] + prefix, np.arange(s)[None, :]
  seen = np.ones((lq, s), bool)
  if causal:
    seen &= kpos <= qpos
  if size:
    seen &= kpos > qpos - size
  seen |= kpos < prefix
  return jnp.asarray(np.where(seen, 0.0, MASK), jnp.float32)[None, None]


def relative_and_padding(r, b, lq, s):
  """T5's encoder: a relative-position bias [1, N, L, S] plus a padding mask [B, 1, 1, S]; the last row has no real
  key at all (every entry masked: the output must stay finite and equal the formula's)."""
  rel = jnp.asarray(r.standard_normal((1, HEADS, lq, s)), jnp.float32)
  real = np.ones((b, s), bool)
  real[0, s - 2 :] = False
  real[-1] = False
  return rel + jnp.asarray(np.where(real, 0.0, MASK), jnp.float32)[:, None, None, :]


CASES = {
  # name: (batch, query length, key length, bias builder)
  "relative+padding": (3, 5, 7, relative_and_padding),
  "causal": (2, 6, 6, lambda r, b, lq, s: window(lq, s)),
  "sliding window": (2, 9, 9, lambda r, b, lq, s: window(lq, s, size=3)),
  "prefix": (2, 5, 8, lambda r, b, lq, s: window(lq, s, prefix=3)),
  "no bias": (1, 3, 10, lambda r, b, lq, s: None),
}


def inputs(case, dtype=jnp.float32, seed=0):
  b, lq, s, make_bias = CASES[case]
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, lq, HEADS, 8)), dtype)
  k, v = (jnp.asarray(r.standard_normal((b, s, KV_HEADS, 8)), dtype) for _ in range(2))
  return q, k, v, make_bias(r, b, lq, s)


def values_and_grads(f, q, k, v, bias):
  """f's output and the gradients of sum(sin(output)) w.r.t. q, k, v and bias (a zero bias where there is none)."""
  bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias

  @jax.jit
  def run(q, k, v, bias):
    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(jnp.cos(out.astype(jnp.float32)).astype(out.dtype))

  return run(q, k, v, bias)


@functools.cache
def reference(case, dtype=jnp.float32):
  q, k, v, bias = inputs(case, dtype)
  return values_and_grads(lambda q, k, v, bias: plain(q, k, v, bias), q, k, v, bias)


def check(name, case, dtype, tol):
  q, k, v, bias = inputs(case, dtype)
  out, grads = values_and_grads(implementation(name), q, k, v, bias)
  want_out, want_grads = reference(case, dtype)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert np.isfinite(np.asarray(out, np.float32)).all()
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out, rtol=tol, atol=tol)
  for what, got, want in zip(["q", "k", "v", "bias"], grads, want_grads, strict=True):
    assert got.shape == want.shape, what
    np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol, err_msg=f"d{what}"
    )


needs_gpu = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention runs only on an NVIDIA GPU; none here")
NAMES = ["cpu", "xla", "pallas"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_float32_equals_the_plain_formula(name, case):
  check(name, case, jnp.float32, 1e-5)


# bfloat16 keeps 8 significant bits (relative rounding 2^-9): the output and gradients are rounded to it, and the
# kernels multiply the probabilities by V in bfloat16 as well, so a few roundings of ~0.4% add up (measured: at most
# 0.5% here); 3e-2 is well above that and far below what a wrong mask, head mapping or block boundary gives (O(1)).
@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_inputs_within_bfloat16_rounding(name):
  check(name, "relative+padding", jnp.bfloat16, 3e-2)


@needs_gpu
@pytest.mark.parametrize("case", ["relative+padding", "causal", "prefix"])
def test_cudnn_equals_the_plain_formula(case):  # cuDNN takes 16-bit inputs only (float32 falls back to "xla")
  check("cudnn", case, jnp.bfloat16, 3e-2)


@pytest.mark.parametrize("name", ["cpu", "pallas"])
def test_dropout_runs_the_cpu_kernel_with_layers_bernoulli_masks(name, caplog):
  """Dropout: the keep mask is `layers.bernoulli` over [B, N, L, S] (bitwise what the CPU kernel always drew);
  implementations without dropout ("pallas" here) run the CPU kernel and say so in the log, once."""
  q, k, v, bias = inputs("relative+padding")
  rate, rng = 0.3, jax.random.key(5)
  keep = L.bernoulli(rng, 1 - rate, (q.shape[0], HEADS, q.shape[1], k.shape[1]))
  A._logged.clear()
  with caplog.at_level(logging.WARNING, logger="jaxprompt.models.attention"):
    out, grads = values_and_grads(
      lambda q, k, v, bias: A.attend(
        q, k, v, bias, scale=SCALE, dropout_rate=rate, dropout_rng=rng, implementation=name
      ),
      q,
      k,
      v,
      bias,
    )
    A.attend(q, k, v, bias, scale=SCALE, dropout_rate=rate, dropout_rng=rng, implementation=name)
  want_out, want_grads = values_and_grads(lambda q, k, v, bias: plain(q, k, v, bias, keep, rate), q, k, v, bias)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  lines = [r.getMessage() for r in caplog.records if "dropout" in r.getMessage()]
  assert len(lines) == (name == "pallas")


def test_layers_dot_product_attention_is_attend_and_auto_is_the_cpu_kernel_here():
  q, k, v, bias = inputs("prefix")
  want = A.attend(q, k, v, bias, scale=SCALE, implementation="cpu")
  assert np.array_equal(L.dot_product_attention(q, k, v, bias, scale=SCALE), want)
  if jax.default_backend() == "cpu":
    assert A.resolve("auto") == "cpu"
    assert np.array_equal(A.attend(q, k, v, bias, scale=SCALE), want)


def test_resolve_names_the_choices_and_cudnn_falls_back_to_xla_once(caplog):
  with pytest.raises(ModelError, match="auto, xla, cudnn, pallas, cpu"):
    A.resolve("flash")
  with pytest.raises(ModelError, match="choose one of"):
    A.attend(*inputs("causal"), scale=SCALE, implementation="triton")
  assert [A.resolve(n) for n in ("xla", "cudnn", "pallas", "cpu")] == ["xla", "cudnn", "pallas", "cpu"]
  if ON_GPU:
    return
  q, k, v, bias = inputs("causal")
  A._logged.clear()
  with caplog.at_level(logging.WARNING, logger="jaxprompt.models.attention"):
    got = [A.attend(q, k, v, bias, scale=SCALE, implementation="cudnn") for _ in range(2)]
  want = A.attend(q, k, v, bias, scale=SCALE, implementation="xla")
  assert all(np.array_equal(g, want) for g in got)
  assert [r.getMessage() for r in caplog.records] == [
    f"attention: 'cudnn' falls back to 'xla': cuDNN needs an NVIDIA GPU (the backend is {jax.default_backend()})"
  ]
