"""Initial values of a soft prompt, as `prompt.init` says. Each initialiser returns float32 [P, H]; `table` is
the frozen input embedding table [V, H]. The settings (ranges, vocabulary population) come from the config
(`config.PromptConfig`), where their defaults live. `prompt.init: file` is any method's business, not an
initialiser's: `methods.build` reads the file (so the method modules need not read prompt files)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxprompt.errors import PromptError


def random_uniform(rng: jax.Array, length: int, hidden: int, low: float, high: float) -> jax.Array:
  """Uniform in [low, high). The paper uses [-0.5, 0.5]; the original code drew from [0, 0.5)."""
  return jax.random.uniform(rng, (length, hidden), jnp.float32, low, high)


def sampled_vocab(rng: jax.Array, table: jax.Array, length: int, population: int) -> jax.Array:
  """Rows of the embedding table drawn (without replacement while possible) from its first `population` rows."""
  n = min(population, table.shape[0])
  idx = jax.random.choice(rng, n, (length,), replace=length > n)
  return jnp.asarray(table, jnp.float32)[idx]


def class_labels(
  rng: jax.Array, table: jax.Array, length: int, label_token_ids: Sequence[Sequence[int]], population: int
) -> jax.Array:
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


def initial_prompt(pcfg, base, tokenizer, labels: Sequence[str] | None, rng: jax.Array) -> jax.Array:
  """The [P, H] start of training for `pcfg` (a `config.PromptConfig`) on `base`."""
  table = base.embedding_table()
  hidden = table.shape[1]
  if pcfg.init == "random_uniform":
    return random_uniform(rng, pcfg.length, hidden, *pcfg.init_range)
  if pcfg.init == "random_normal":
    return jax.random.normal(rng, (pcfg.length, hidden), jnp.float32)
  if pcfg.init == "sampled_vocab":
    return sampled_vocab(rng, table, pcfg.length, pcfg.vocab_sample_size)
  if pcfg.init == "class_labels":
    if not labels:
      raise PromptError("prompt.init class_labels needs a task with label strings")
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    return class_labels(rng, table, pcfg.length, ids, pcfg.vocab_sample_size)
  if pcfg.init == "text":
    if not pcfg.init_text:
      raise PromptError("prompt.init text needs prompt.init_text")
    return from_text(table, pcfg.length, tokenizer(pcfg.init_text, add_special_tokens=False)["input_ids"])
  raise PromptError(f"unknown prompt.init {pcfg.init!r}")
