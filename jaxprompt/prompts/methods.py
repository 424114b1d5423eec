"""The soft-prompt family, built from a config or from what a trained prompt left behind.

  method         trains                                        goes in                       PEFT type
  prompt_tuning  embeddings [P, H]                             the input embeddings          PROMPT_TUNING
  p_tuning       embeddings [P, H] + an MLP / LSTM encoder     the input embeddings          P_TUNING
  prefix_tuning  keys/values [P, Y, 2, K, D] (+ an MLP)        every attention layer         PREFIX_TUNING

A trained prompt's *spec* (`PromptMethod.spec()`: method and options, JSON) travels with checkpoints and exports;
with its parameters it rebuilds the module (`from_spec`), and its inference value (what PEFT saves) rebuilds the
fixed module that inference uses (`fixed`, `bank`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import PromptError
from jaxprompt.models.interface import PrefixSlots
from jaxprompt.prompts.encoders import PTuning
from jaxprompt.prompts.init import initial_prompt, random_uniform
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.prefix import PrefixTuning
from jaxprompt.prompts.soft import PromptMethod, SoftPrompt, prompt_bank

log = logging.getLogger(__name__)

EMBEDDING_METHODS = ("prompt_tuning", "p_tuning")  # what they leave behind is input embeddings [P, H]


def build(pcfg, base, tokenizer, labels, rng: jax.Array) -> PromptMethod:
  """The configured method's module on `base`, initialised as `pcfg.init` says (`config.PromptConfig`)."""
  if pcfg.init == "file" and pcfg.method != "prompt_tuning":
    return _resume_from_file(pcfg, base, tokenizer, labels, rng)
  if pcfg.method == "prompt_tuning":
    return SoftPrompt(initial_prompt(pcfg, base, tokenizer, labels, rng))
  if pcfg.method == "p_tuning":
    h = base.hidden_size
    return PTuning(initial_prompt(pcfg, base, tokenizer, labels, rng), encoder=pcfg.option("encoder_reparameterization_type"),
                   hidden_size=pcfg.option("encoder_hidden_size") or h, num_layers=pcfg.option("encoder_num_layers"),
                   dropout=pcfg.option("encoder_dropout"), rng=jax.random.fold_in(rng, 2))
  slots = base.prefix_slots()
  if pcfg.option("prefix_projection"):
    t = slots.token_dim
    return PrefixTuning(slots, embedding=random_uniform(rng, pcfg.length, t, *pcfg.init_range),
                        hidden_size=pcfg.option("encoder_hidden_size") or t, rng=jax.random.fold_in(rng, 2))
  shape = (pcfg.length, slots.layers, 2, slots.heads, slots.head_dim)
  return PrefixTuning(slots, table=jax.random.uniform(rng, shape, jnp.float32, *pcfg.init_range))


def build_bank(pcfg, base, tokenizer, labels: Sequence[Sequence[str] | None], rng: jax.Array) -> PromptMethod:
  """`prompt.per_task`: one prompt per task as one bank (row b uses prompt `task_ids[b]`), prompt k initialised as
  a run on task k alone would start (the same key, its own labels)."""
  modules = [build(pcfg, base, tokenizer, lab, rng) for lab in labels]
  return bank([m.inference_value() for m in modules], [m.spec() for m in modules], base.prefix_slots())


def _resume_from_file(pcfg, base, tokenizer, labels, rng) -> PromptMethod:
  """p_tuning / prefix_tuning from a file: the source's parameters when it is the same method with the same
  options (a jaxprompt workdir keeps encoders); a bare prefix table for prefix tuning without projection."""
  if not pcfg.init_file:
    raise PromptError("prompt.init file needs prompt.init_file")
  fresh = build(with_random_init(pcfg), base, tokenizer, labels, rng)
  src = load_prompt_source(pcfg.init_file)
  for warning in src.check(base, pcfg.init_file, strict=not pcfg.allow_other_base):
    log.warning(warning)
  if src.params is not None and src.spec == fresh.spec():
    nnx.update(fresh, jax.tree.map(jnp.asarray, src.params))
    return fresh
  if src.method == "prefix_tuning" and fresh.spec() == dict(method="prefix_tuning", prefix_projection=False,
                                                           slots=base.prefix_slots().to_dict()):
    return fixed(src.value, src.spec, base.prefix_slots(), length=pcfg.length, where=pcfg.init_file)
  raise PromptError(f"{pcfg.init_file}: holds a {_describe(src.spec)} prompt{'' if src.params else ' (its output only)'}"
                    f"; prompt.init file for {_describe(fresh.spec())} needs a jaxprompt workdir of the same method "
                    "and options (or train it as prompt_tuning from this file)")


def with_random_init(pcfg):
  """`pcfg` with a random initialisation: the method's structure without reading files or labels (plan, bench)."""
  return dataclasses.replace(pcfg, init="random_uniform", init_file=None)


def _describe(spec: dict) -> str:
  m = spec.get("method", "prompt_tuning")
  if m == "p_tuning":
    return f"p_tuning ({spec.get('encoder_reparameterization_type')})"
  if m == "prefix_tuning":
    return f"prefix_tuning ({'with' if spec.get('prefix_projection') else 'without'} projection)"
  return m


def fixed(value, spec: dict, slots: PrefixSlots | None = None, *, length: int | None = None,
          where: str = "prompt") -> PromptMethod:
  """The inference module of a trained prompt's value: input embeddings (prompt_tuning, p_tuning) or a key/value
  table (prefix_tuning) checked against the base's `slots`."""
  value = np.asarray(value, np.float32)
  if length is not None and value.shape[0] != length:
    raise PromptError(f"{where}: prompt has {value.shape[0]} positions, prompt.length is {length}")
  if spec.get("method", "prompt_tuning") in EMBEDDING_METHODS:
    return SoftPrompt(value)
  want = (slots.layers, 2, slots.heads, slots.head_dim)
  if value.shape[1:] != want:
    raise PromptError(f"{where}: prefix table is {value.shape}, this model's is [P, {', '.join(map(str, want))}]")
  return PrefixTuning(slots, table=value)


def bank(values: Sequence, specs: Sequence[dict], slots: PrefixSlots | None = None) -> PromptMethod:
  """K trained prompts of one kind as one module for mixed batches (row b uses prompt_ids[b])."""
  kinds = {s.get("method", "prompt_tuning") in EMBEDDING_METHODS for s in specs}
  if len(kinds) > 1:
    raise PromptError("a mixed batch needs prompts of one kind: input-embedding prompts (prompt_tuning, p_tuning) "
                      "and key/value prefixes (prefix_tuning) cannot share a batch")
  if kinds.pop():
    return prompt_bank(list(values))
  tables = [fixed(v, s, slots).table[...] for v, s in zip(values, specs)]
  if len({t.shape for t in tables}) != 1:
    raise PromptError(f"prefixes in a bank must share one shape, got {sorted({t.shape for t in tables})}")
  return PrefixTuning(slots, table=jnp.stack(tables))


def load_prompted(base, adapter, *, dtype=None, mesh=None, step: str | int = "best",
                  allow_other_base: bool = False):
  """A frozen base model with a trained prompt, ready to call.

  Args:
    base: anything `load_model` takes (a HF folder, a hub id, a .gguf file, builtin:quickstart), or a loaded model.
    adapter: a PEFT adapter folder (PROMPT_TUNING, P_TUNING, PREFIX_TUNING), a jaxprompt workdir, checkpoint step
      or export, or a `.npy` / `.safetensors` file.
    dtype: the frozen weights' dtype when `base` is loaded here; mesh: shard them over it.
    step: a workdir's checkpoint ("best", "latest" or a number).
  Returns a `PromptedModel`: `m(input_ids=, attention_mask=, decoder_input_ids=, decoder_attention_mask=)` gives
  float32 logits for the real positions only (seq2seq [B, T, V], causal [B, L, V]).
  """
  from jaxprompt.models.loading import load_model
  from jaxprompt.prompts.soft import PromptedModel

  if isinstance(base, (str, os.PathLike)):
    base = load_model(base, dtype=dtype, mesh=mesh)
  src = load_prompt_source(adapter, step)
  for warning in src.check(base, str(adapter), strict=not allow_other_base):
    log.warning(warning)
  return PromptedModel(base, fixed(src.value, src.spec, base.prefix_slots(), where=str(adapter)))
