"""Input-layer soft prompts (Lester et al. 2021) and the prompted model.

Notation: B batch, L input length, P prompt length, H hidden, V vocab, K prompts in a bank.

A prompt reaches the frozen model as a `models.interface.Prefix`; where it goes is the model's business (PEFT's
semantics: T5's encoder input only; a decoder's whole sequence, positions 0..P+L-1, no loss on the prompt).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts.params import PromptParam


class SoftPrompt(nnx.Module):
  """`embeddings` [P, H] float32, replicated (logical axes prompt / prompt_embed) — or a bank [K, P, H] of
  K prompts for mixed-prompt batches, where each example picks its prompt by id."""

  def __init__(self, value: jax.Array | np.ndarray):
    value = jnp.asarray(value, jnp.float32)
    if value.ndim not in (2, 3):
      raise PromptError(f"a soft prompt is [P, H] (or a bank [K, P, H]), got shape {value.shape}")
    axes = ("prompt", "prompt_embed") if value.ndim == 2 else ("prompts", "prompt", "prompt_embed")
    self.embeddings = L.param(value, axes, kind=PromptParam)

  @property
  def length(self) -> int:
    return self.embeddings.shape[-2]

  def rows(self, batch_size: int, prompt_ids: jax.Array | None = None) -> jax.Array:
    """[B, P, H]: one prompt for all, or row `prompt_ids[b]` of a [K, P, H] bank."""
    value = self.embeddings[...]
    if value.ndim == 3:
      if prompt_ids is None:
        raise PromptError("a prompt bank needs prompt_ids for each example")
      return value[prompt_ids]
    return jnp.broadcast_to(value[None], (batch_size,) + value.shape)


def prompt_bank(prompts: Sequence[jax.Array | np.ndarray]) -> SoftPrompt:
  """Stack K prompts of equal shape [P, H] into one bank [K, P, H] (shorter ones are not padded: P must match)."""
  shapes = {tuple(np.shape(p)) for p in prompts}
  if len(shapes) != 1:
    raise PromptError(f"prompts in a bank must share one shape [P, H], got {sorted(shapes)}")
  return SoftPrompt(jnp.stack([jnp.asarray(p, jnp.float32) for p in prompts]))


class PromptedModel(nnx.Module):
  """A frozen base model (any `models.interface.PromptableLM`) plus a soft prompt or a prompt bank."""

  def __init__(self, base: nnx.Module, prompt: SoftPrompt):
    self.base = base
    self.prompt = prompt

  @property
  def kind(self) -> str:
    return self.base.kind

  def prefix(self, batch_size: int, prompt_ids: jax.Array | None = None) -> Prefix:
    return Prefix(embeds=self.prompt.rows(batch_size, prompt_ids))

  def embed_inputs(self, input_ids, attention_mask=None, prompt_ids=None):
    """input_ids [B, L] -> (inputs_embeds [B, P + L, H], mask [B, P + L]): the prompt before the tokens."""
    return L.prepend(self.prompt.rows(input_ids.shape[0], prompt_ids), self.base.embed(input_ids), attention_mask)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
               prompt_ids=None, dropout_rng=None) -> jax.Array:
    """seq2seq: logits [B, T, V]; causal: logits [B, P + L, V] (prompt positions included)."""
    return self.base.forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                             prefix=self.prefix(input_ids.shape[0], prompt_ids), dropout_rng=dropout_rng)

  def score_targets(self, batch, *, prompt_ids=None, dropout_rng=None):
    """(logits [B, T, V], targets [B, T], loss mask [B, T]) of a training batch (`models.interface`)."""
    return self.base.score_targets(batch, self.prefix(batch.size, prompt_ids), dropout_rng=dropout_rng)

  def label_logprobs(self, batch, label_ids, label_mask, *, prompt_ids=None) -> jax.Array:
    """[B, C] rank-classification scores under the prompt."""
    return self.base.label_logprobs(batch, label_ids, label_mask, self.prefix(batch.size, prompt_ids))
