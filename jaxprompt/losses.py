"""Token cross-entropy with target masking and z-loss.

Notation: B batch, T target length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TokenSums:
  """Per-batch sums (not yet normalised); adding two gives the sums of both batches (microbatches)."""

  loss: jax.Array  # CE + z_loss * log_z^2 over masked tokens
  ce: jax.Array
  z_loss: jax.Array
  correct: jax.Array  # masked tokens whose argmax is the target
  tokens: jax.Array  # masked tokens
  seq_correct: jax.Array  # rows whose every masked token is the argmax

  @classmethod
  def zeros(cls) -> "TokenSums":
    return cls(*[jnp.zeros((), jnp.float32) for _ in range(6)])


def cross_entropy(
  logits: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  z_loss: float = 0.0,
  weights: jax.Array | None = None,
  segments: jax.Array | None = None,
) -> TokenSums:
  """logits [B, T, V] (any float dtype, computed in float32), targets / mask [B, T] -> `TokenSums`.
  `weights` [B] (0 for padding rows of an eval batch) drops whole rows. `segments` [B, T] (packed rows: the
  example of each target token, 0 for none): sequence accuracy counts examples, not rows."""
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  if weights is not None:
    mask = mask * weights[:, None].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - gold) * mask
  zl = z_loss * jnp.square(log_z) * mask
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
  if segments is not None:  # per (row, example): one-hot over the at most T examples of a row
    of = (segments[..., None] == jnp.arange(1, segments.shape[-1] + 1)).astype(jnp.float32)  # [B, T, T]
    present = jnp.einsum("bt,bts->bs", mask, of) > 0
    missed = jnp.einsum("bt,bts->bs", mask - hit, of) > 0
    seq_correct = (present & ~missed).astype(jnp.float32)
  else:
    seq_correct = (jnp.sum(hit, -1) == jnp.sum(mask, -1)).astype(jnp.float32)
  if weights is not None:
    seq_correct = seq_correct * weights.reshape(weights.shape + (1,) * (seq_correct.ndim - 1)).astype(jnp.float32)
  return TokenSums(
    loss=jnp.sum(ce + zl),
    ce=jnp.sum(ce),
    z_loss=jnp.sum(zl),
    correct=jnp.sum(hit),
    tokens=jnp.sum(mask),
    seq_correct=jnp.sum(seq_correct),
  )
