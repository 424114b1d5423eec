"""The soft-prompt family, built from a config or from what a trained prompt left behind — for every registered
method alike (`prompts.registry`: what each method is, what it trains, where it goes, its PEFT type).

A trained prompt's *spec* (`PromptMethod.spec()`: method and options) travels with checkpoints and exports in its
record (`record.PromptRecord`); with its parameters it rebuilds the module (`Method.rebuild`), and its inference
value (what PEFT saves) rebuilds the fixed module that inference uses (`fixed`, `bank`).
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
from jaxprompt.prompts import heads, registry
from jaxprompt.prompts.io import load_prompt_bank, load_prompt_source, split_task
from jaxprompt.prompts.soft import PromptMethod
from jaxprompt.prompts.spec import PromptSpec

log = logging.getLogger(__name__)


def build(pcfg, base, tokenizer, labels, rng: jax.Array) -> PromptMethod:
  """The configured method's module on `base`, initialised as `pcfg.init` says (`config.PromptConfig`)."""
  entry = registry.get(pcfg.method)
  if pcfg.init == "file":
    return _from_file(pcfg, base, tokenizer, labels, rng)
  source = _init_source(entry, pcfg, base)
  if source is not None:
    return entry.build(pcfg, base, tokenizer, labels, rng, source=source)
  return entry.build(pcfg, base, tokenizer, labels, rng)


def _init_source(entry, pcfg, base):
  """(the prompts, their task names or None) of the trained prompt a method starts from (`Method.init_source`),
  each checked against `base`; None when it starts from nothing."""
  path = entry.init_source(pcfg)
  if path is None:
    return None
  whole = load_prompt_bank(path) if split_task(path)[1] is None else None
  tps = list(whole[1].values()) if whole is not None else [load_prompt_source(path)]
  for tp in tps:
    for warning in tp.check(base, path, strict=not pcfg.allow_other_base):
      log.warning(warning)
  return tps, (list(whole[1]) if whole is not None else None)


def build_bank(pcfg, base, tokenizer, labels: Sequence[Sequence[str] | None], rng: jax.Array) -> PromptMethod:
  """`prompt.per_task`: one prompt per task as one bank (row b uses prompt `task_ids[b]`), prompt k initialised as
  a run on task k alone would start (the same key, its own labels) — or the method's own bank (`Method.build_bank`:
  multitask's shared prompt and one factor per task)."""
  entry = registry.get(pcfg.method)
  if entry.build_bank is not None:
    source = _init_source(entry, pcfg, base)
    kw = {} if source is None else dict(source=source)
    return entry.build_bank(pcfg, base, tokenizer, labels, rng, **kw)
  modules = [build(pcfg, base, tokenizer, lab, rng) for lab in labels]
  return bank([m.inference_value() for m in modules], [m.spec() for m in modules], base.prefix_slots())


def bank_refusal(pcfg) -> str | None:
  """Why `pcfg`'s method cannot train as a per-task bank (`prompt.per_task`), or None."""
  return registry.get(pcfg.method).bank_refusal(pcfg)


def _from_file(pcfg, base, tokenizer, labels, rng) -> PromptMethod:
  """`prompt.init: file`, any method: the source's parameters when it is the same method with the same options
  (a jaxprompt workdir keeps encoders), else its trained value when that is what a fresh module of the method is
  made of (input embeddings for prompt tuning, a bare table for prefix tuning without projection)."""
  if not pcfg.init_file:
    raise PromptError("prompt.init file needs prompt.init_file")
  fresh = registry.get(pcfg.method).build(with_random_init(pcfg), base, tokenizer, labels, rng)
  src = load_prompt_source(pcfg.init_file)
  for warning in src.check(base, pcfg.init_file, strict=not pcfg.allow_other_base):
    log.warning(warning)
  spec = dataclasses.replace(src.spec, template=pcfg.template)  # where its rows go is this run's (prompt.template)
  if src.params is not None and spec == fresh.spec():
    nnx.update(fresh, jax.tree.map(jnp.asarray, src.params))
    return fresh
  module = fixed(src.value, spec, base.prefix_slots(), where=pcfg.init_file)
  if module.spec() == fresh.spec():
    if module.length != pcfg.length:  # (a DePT value holds more rows than its prompt's positions)
      check_length(src.value, src.spec, pcfg.length, pcfg.init_file)
    return module
  output = "" if src.params else " (its output only)"
  raise PromptError(
    f"{pcfg.init_file}: holds a {src.spec.describe()} prompt{output}; prompt.init file for "
    f"{fresh.spec().describe()} needs a jaxprompt workdir of the same method and options (or train "
    f"it as {module.spec().describe()} from this file)"
  )


def with_random_init(pcfg):
  """`pcfg` with a random initialisation: the method's structure without reading files or labels (plan, bench)."""
  return dataclasses.replace(pcfg, init="random_uniform", init_file=None)


def fixed(
  value, spec: PromptSpec, slots: PrefixSlots | None = None, *, length: int | None = None, where: str = "prompt"
) -> PromptMethod:
  """The inference module of a trained prompt's value (`Method.fixed`): input embeddings, or a key/value table
  checked against the base's `slots`."""
  value = np.asarray(value, np.float32)
  if length is not None:
    check_length(value, spec, length, where)
  return registry.of(spec).fixed(value, spec, slots, where)


def check_length(value, spec: PromptSpec, length: int, where: str) -> None:
  """A trained value has `length` (prompt.length) positions."""
  if value.shape[0] != length:
    raise PromptError(
      f"{where}: prompt has shape {value.shape}, expected {registry.of(spec).value_shape} = "
      f"{(length, *value.shape[1:])}"
    )


def bank(values: Sequence, specs: Sequence[PromptSpec], slots: PrefixSlots | None = None) -> PromptMethod:
  """K trained prompts of one kind as one module for mixed batches (row b uses prompt_ids[b])."""
  modules = [fixed(v, s, slots) for v, s in zip(values, specs, strict=True)]
  if len({type(m) for m in modules}) > 1:
    raise PromptError(
      f"a mixed batch needs prompts of one kind: input-embedding prompts "
      f"({', '.join(registry.names(embeds=True))}) and key/value prefixes "
      f"({', '.join(registry.names(embeds=False))}) cannot share a batch"
    )
  return type(modules[0]).stack(modules)


def load_prompted(base, adapter, *, dtype=None, mesh=None, step: str | int = "best", allow_other_base: bool = False):
  """A frozen base model with a trained prompt, ready to call.

  Args:
    base: anything `load_model` takes (a HF folder, a hub id, a .gguf file, builtin:quickstart), or a loaded model.
    adapter: a PEFT adapter folder (PROMPT_TUNING, P_TUNING, PREFIX_TUNING, MULTITASK_PROMPT_TUNING), a jaxprompt
      workdir, checkpoint step or export, or a `.npy` / `.safetensors` file; "SOURCE@TASK": one task's prompt of a
      per-task run or bank. A source of several tasks' prompts (a per-task run, its bank, a multitask adapter of
      several tasks) gives a bank: call the model with `prompt_ids=` (each row's task, in the source's order).
    dtype: the frozen weights' dtype when `base` is loaded here; mesh: shard them over it.
    step: a workdir's checkpoint ("best", "latest" or a number).
  Returns a `PromptedModel`: `m(input_ids=, attention_mask=, decoder_input_ids=, decoder_attention_mask=)` gives
  float32 logits for the real positions only (seq2seq [B, T, V], causal [B, L, V]); with a classification head
  (a SEQ_CLS / TOKEN_CLS adapter, or a run with head.type sequence / token) `m(input_ids, attention_mask)` gives
  the head's: [B, C], or [B, L, C] for the real tokens. `m.input_text(text_or_fields)`
  is the text to tokenise, in the input format the prompt was trained with (its task's prefix and fields, a custom
  template; raw text for prompts that do not record one).
  """
  from jaxprompt.models.loading import load_model
  from jaxprompt.prompts.soft import PromptedModel

  if isinstance(base, (str, os.PathLike)):
    base = load_model(base, dtype=dtype, mesh=mesh)
  whole = load_prompt_bank(adapter, step) if split_task(adapter)[1] is None else None
  srcs = list(whole[1].values()) if whole is not None else [load_prompt_source(adapter, step)]
  for src in srcs:
    for warning in src.check(base, str(adapter), strict=not allow_other_base):
      log.warning(warning)
  if whole is not None:  # a bank of every task's prompt: no one input format (raw text)
    return PromptedModel(base, bank([s.value for s in srcs], [s.spec for s in srcs], base.prefix_slots()))
  src, head = srcs[0], None
  if src.record.head is not None:  # a classification head trained with the prompt: the model returns its logits
    head = heads.from_hf(src.record.head, base, src.head, str(adapter))
  fmt = src.record.task.input if src.record.task is not None else None
  return PromptedModel(base, fixed(src.value, src.spec, base.prefix_slots(), where=str(adapter)), head, fmt)
