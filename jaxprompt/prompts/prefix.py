"""Prefix tuning (Li & Liang 2021) and deep prompts (P-tuning v2, Liu et al. 2022): P learned key/value slots in
front of every attention layer of the frozen model.

Notation: P prefix length, Y table layers, K key/value heads, D head dim, B batch, E reparameterisation width.

The trainable state is PEFT's table [P, Y, 2, K, D] (keys, then values; `models.interface.PrefixSlots` gives
its shape and which table layer each attention layer reads), either directly (`projection=False`: deep prompts,
what P-tuning v2 optimises) or through Li & Liang's reparameterisation (`projection=True`): an embedding [P, T]
(T = PEFT's token_dim = K * D) mapped by Linear(T, E) -> tanh -> Linear(E, Y * 2 * T), as PEFT's PrefixEncoder
does. The reparameterisation is a training device: what a trained prefix is, and what PEFT saves, is the table.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix, PrefixSlots
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptMethod


def torch_linear_init(rng: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
  """torch.nn.Linear's default initialisation (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


class PrefixTuning(PromptMethod):
  """A key/value prefix: `table` [P, Y, 2, K, D] (or a bank [N, P, Y, 2, K, D] for mixed batches), or with a
  projection `embedding` [P, T] + `w1` [T, E], `b1` [E], `w2` [E, Y * 2 * T], `b2` [Y * 2 * T]."""

  method = "prefix_tuning"

  def __init__(self, slots: PrefixSlots, *, table: jax.Array | None = None, embedding: jax.Array | None = None,
               hidden_size: int | None = None, rng: jax.Array | None = None):
    self.slots = slots
    self.projection = embedding is not None
    if self.projection:
      t, e, out = slots.token_dim, hidden_size, slots.layers * 2 * slots.token_dim
      if embedding.shape[-1] != t:
        raise PromptError(f"a prefix projection's embedding is [P, {t}] (heads x head_dim), got {embedding.shape}")
      r = jax.random.split(rng, 4)
      self.embedding = L.param(jnp.asarray(embedding, jnp.float32), ("prompt", None), kind=PromptParam)
      self.w1 = L.param(torch_linear_init(r[0], t, (t, e)), (None, None), kind=PromptParam)
      self.b1 = L.param(torch_linear_init(r[1], t, (e,)), (None,), kind=PromptParam)
      self.w2 = L.param(torch_linear_init(r[2], e, (e, out)), (None, None), kind=PromptParam)
      self.b2 = L.param(torch_linear_init(r[3], e, (out,)), (None,), kind=PromptParam)
    else:
      table = jnp.asarray(table, jnp.float32)
      want = (slots.layers, 2, slots.heads, slots.head_dim)
      if table.ndim not in (5, 6) or table.shape[-4:] != want:
        raise PromptError(f"a prefix table is [P, {', '.join(map(str, want))}] (or a bank of them), got "
                          f"{table.shape}")
      self.table = L.param(table, (None,) * table.ndim, kind=PromptParam)

  @property
  def length(self) -> int:
    return self.embedding.shape[-2] if self.projection else self.table.shape[-5]

  def inference_value(self) -> jax.Array:
    """The table [P, Y, 2, K, D] (a bank: [N, P, ...]): what a trained prefix is, and what PEFT saves (flat)."""
    if not self.projection:
      return self.table[...]
    s = self.slots
    h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
    flat = h @ self.w2[...] + self.b2[...]
    return flat.reshape(flat.shape[:-1] + (s.layers, 2, s.heads, s.head_dim))

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    t = self.inference_value()
    if t.ndim == 6:
      if prompt_ids is None:
        raise PromptError("a prefix bank needs prompt_ids for each example")
      t = t[prompt_ids]  # [B, P, Y, 2, K, D]
    else:
      t = t[None]  # [1, P, Y, 2, K, D]: the same for every row
    t = t[:, :, jnp.asarray(self.slots.layer_of)]  # the table layer each attention layer reads
    kv = jnp.transpose(t, (3, 2, 0, 1, 4, 5))  # [2, Y', B|1, P, K, D]
    return Prefix(keys=kv[0], values=kv[1])

  def spec(self) -> dict:
    s = dict(method=self.method, prefix_projection=self.projection, slots=self.slots.to_dict())
    if self.projection:
      s["encoder_hidden_size"] = int(self.w1.shape[1])
    return s
