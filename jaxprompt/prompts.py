"""Soft prompts: the one trainable variable type, initialisers, and how a prompt joins the input.

Notation: B batch, L input length, P prompt length, H hidden, V vocab, K prompts in a bank.

`PromptParam` is *the* trainable type: gradients, optimizer state, checkpoints and exports all select
state with `nnx.split(model, PromptParam, ...)`, never with regexes over parameter paths.

Combination follows HF PEFT (>= 0.4) so exported prompts give the same logits in PyTorch:
  * seq2seq (T5): the prompt goes before the *encoder* input only; the encoder mask is extended with ones.
  * causal LM: the prompt goes before all tokens, the mask is extended with ones, positions are
    0..P+L-1, and the prompt positions carry no loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.models import layers as L


class PromptParam(nnx.Param):
  """A trainable soft-prompt parameter. Everything else in a prompted model is frozen."""


class PromptError(ValueError):
  """A prompt file or initialiser does not fit the model."""


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


def prompt_bank(prompts: Sequence[jax.Array | np.ndarray]) -> SoftPrompt:
  """Stack K prompts of equal shape [P, H] into one bank [K, P, H] (shorter ones are not padded: P must match)."""
  shapes = {tuple(np.shape(p)) for p in prompts}
  if len(shapes) != 1:
    raise PromptError(f"prompts in a bank must share one shape [P, H], got {sorted(shapes)}")
  return SoftPrompt(jnp.stack([jnp.asarray(p, jnp.float32) for p in prompts]))


# -- initialisers ----------------------------------------------------------------------------------
# Each returns a float32 [P, H] array. `table` is the frozen input embedding table [V, H].


def random_uniform(rng: jax.Array, length: int, hidden: int, low: float = -0.5, high: float = 0.5) -> jax.Array:
  """Uniform in [low, high). The paper uses [-0.5, 0.5]; the original code drew from [0, 0.5)."""
  return jax.random.uniform(rng, (length, hidden), jnp.float32, low, high)


def sampled_vocab(rng: jax.Array, table: jax.Array, length: int, population: int = 5000) -> jax.Array:
  """Rows of the embedding table drawn (without replacement while possible) from its first `population` rows."""
  n = min(population, table.shape[0])
  idx = jax.random.choice(rng, n, (length,), replace=length > n)
  return jnp.asarray(table, jnp.float32)[idx]


def class_labels(rng: jax.Array, table: jax.Array, length: int, label_token_ids: Sequence[Sequence[int]],
                 population: int = 5000) -> jax.Array:
  """Sampled vocabulary, then row i overwritten with the mean embedding of label i's sub-tokens."""
  if len(label_token_ids) > length:
    raise PromptError(f"{len(label_token_ids)} class labels do not fit in a prompt of length {length}")
  out = sampled_vocab(rng, table, length, population)
  t = jnp.asarray(table, jnp.float32)
  for i, ids in enumerate(label_token_ids):
    if not len(ids):
      raise PromptError(f"class label {i} has no tokens")
    out = out.at[i].set(t[jnp.asarray(list(ids))].mean(axis=0))
  return out


def from_text(table: jax.Array, length: int, token_ids: Sequence[int]) -> jax.Array:
  """Embeddings of an initialisation text's tokens, repeated (or cut) to `length` rows."""
  if not len(token_ids):
    raise PromptError("prompt.init text has no tokens")
  reps = -(-length // len(token_ids))
  ids = (list(token_ids) * reps)[:length]
  return jnp.asarray(table, jnp.float32)[jnp.asarray(ids)]


def read_prompt_file(path: str | Path) -> tuple[np.ndarray, dict]:
  """A prompt from a `.npy` [P, H] file, a `.safetensors` file, or a PEFT adapter folder.

  Returns (float32 [P, H], metadata: the PEFT adapter config and/or our provenance file, if any).
  """
  from jaxprompt.models import hf

  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
  meta: dict = {}
  if path.is_dir():
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not weights.exists():
      raise PromptError(f"{path}: a PEFT prompt folder needs adapter_config.json and adapter_model.safetensors")
    for key, file in (("peft", cfg_file), ("jaxprompt", path / "jaxprompt.json")):
      if file.exists():
        try:
          meta[key] = json.loads(file.read_text())
        except json.JSONDecodeError as e:
          raise PromptError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(meta[key], dict):
          raise PromptError(f"{file}: expected a JSON object, got {type(meta[key]).__name__}")
    f = hf.SafetensorsFile(weights)
    if "prompt_embeddings" not in f.keys():
      raise PromptError(f"{weights}: no 'prompt_embeddings' tensor (found {f.keys()})")
    value = np.array(f.get("prompt_embeddings"), np.float32)
  elif path.suffix == ".npy":
    try:
      value = np.load(path, allow_pickle=False).astype(np.float32)
    except ValueError as e:  # object arrays need pickle: refused
      raise PromptError(f"{path}: not a numeric .npy array ({e})") from None
  elif path.suffix == ".safetensors":
    f = hf.SafetensorsFile(path)
    key = "prompt_embeddings" if "prompt_embeddings" in f.keys() else (f.keys() or [None])[0]
    if key is None:
      raise PromptError(f"{path}: empty safetensors file")
    value = np.array(f.get(key), np.float32)
    meta["safetensors"] = f.metadata
  else:
    raise PromptError(f"{path}: unknown prompt format (expected .npy, .safetensors or a PEFT adapter folder)")
  if value.ndim != 2:
    raise PromptError(f"{path}: prompt must be 2-D [P, H], got shape {value.shape}")
  return value, meta


def from_file(path: str | Path, length: int, hidden: int) -> jax.Array:
  value, _ = read_prompt_file(path)
  if value.shape != (length, hidden):
    raise PromptError(f"{path}: prompt has shape {value.shape}, expected [P, H] = ({length}, {hidden})")
  return jnp.asarray(value)


# -- combining -------------------------------------------------------------------------------------


def prepend(prompt: jax.Array, embeds: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """prompt [P, H] or [B, P, H], embeds [B, L, H], mask [B, L] -> [B, P + L, H], [B, P + L]."""
  b = embeds.shape[0]
  if prompt.ndim == 2:
    prompt = jnp.broadcast_to(prompt[None], (b,) + prompt.shape)
  p = prompt.shape[1]
  if mask is None:
    mask = jnp.ones(embeds.shape[:2], jnp.int32)
  x = jnp.concatenate([prompt.astype(embeds.dtype), embeds], axis=1)
  m = jnp.concatenate([jnp.ones((b, p), mask.dtype), mask], axis=1)
  return x, m


class PromptedModel(nnx.Module):
  """A frozen base model plus a soft prompt (or a prompt bank [K, P, H] for mixed-prompt batches)."""

  def __init__(self, base: nnx.Module, prompt: SoftPrompt):
    self.base = base
    self.prompt = prompt

  @property
  def kind(self) -> str:
    return self.base.kind

  def prompt_for(self, batch_size: int, prompt_ids: jax.Array | None = None) -> jax.Array:
    """[B, P, H]: one prompt for all, or row `prompt_ids[b]` of a [K, P, H] bank."""
    value = self.prompt.embeddings[...]
    if value.ndim == 3:
      if prompt_ids is None:
        raise PromptError("a prompt bank needs prompt_ids for each example")
      return value[prompt_ids]
    return jnp.broadcast_to(value[None], (batch_size,) + value.shape)

  def embed_inputs(self, input_ids, attention_mask=None, prompt_ids=None):
    """input_ids [B, L] -> (inputs_embeds [B, P + L, H], mask [B, P + L])."""
    embeds = self.base.embed(input_ids)
    return prepend(self.prompt_for(input_ids.shape[0], prompt_ids), embeds, attention_mask)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None, *,
               prompt_ids=None, dropout_rng=None) -> jax.Array:
    """seq2seq: logits [B, T, V]; causal: logits [B, P + L, V] (prompt positions included)."""
    x, m = self.embed_inputs(input_ids, attention_mask, prompt_ids)
    if self.kind == "seq2seq":
      return self.base(inputs_embeds=x, attention_mask=m, decoder_input_ids=decoder_input_ids,
                       decoder_attention_mask=decoder_attention_mask, dropout_rng=dropout_rng)
    return self.base(inputs_embeds=x, attention_mask=m, dropout_rng=dropout_rng)

  def hidden(self, input_ids, attention_mask=None, *, prompt_ids=None, dropout_rng=None) -> jax.Array:
    """causal only: final hidden states [B, P + L, H] (the loss then needs logits at target positions only)."""
    x, m = self.embed_inputs(input_ids, attention_mask, prompt_ids)
    return self.base.hidden(inputs_embeds=x, attention_mask=m, dropout_rng=dropout_rng)


def input_embedding_table(base: nnx.Module) -> jax.Array:
  """The frozen input embedding table [V, H] of a base model."""
  for name in ("shared", "embed_tokens", "wte"):
    if hasattr(base, name):
      return getattr(base, name)[...]
  return base.embed(jnp.arange(base.config.vocab_size)[None])[0]
