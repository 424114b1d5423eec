"""Text in, text out: a frozen base model with one or several soft prompts, generating in one jitted call.

With several prompts the inputs are run under every prompt as one mixed-prompt batch: a prompt bank
[K, P, H] and a prompt id per row (`prompts.PromptedModel`), so many tasks share one frozen model and one
compiled program.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxprompt.config import GenerateConfig
from jaxprompt.data import encoding, input_format
from jaxprompt.data.templates import Template
from jaxprompt.inference.decoding import generate
from jaxprompt.prompts import PromptedModel, methods
from jaxprompt.prompts.io import TrainedPrompt, load_prompt_source
from jaxprompt.prompts.record import PromptRecord

log = logging.getLogger(__name__)


def load_prompts(sources: Sequence[str], *, step: str | int = "best") -> list[TrainedPrompt]:
  return [load_prompt_source(s, step) for s in sources]


def recorded_base(records: Sequence[PromptRecord]) -> tuple[str | None, str | None]:
  """(model path, tokenizer) recorded with the first prompt that has them (its record, or its PEFT config)."""
  for record in records:
    if record.base is not None and record.base.path:
      return record.base.path, record.tokenizer
    if record.peft and record.peft.get("base_model_name_or_path"):
      return record.peft["base_model_name_or_path"], None
  return None, None


def model_input(record: PromptRecord, value: str | Mapping, *, raw: bool = False) -> str:
  """The text a prompt is given for a request's `value`, in the input format its record keeps (unless `raw`)."""
  return input_format.apply(record.task.input if record.task is not None else None, value, raw=raw)


def _input_ids(base, tokenizer, texts, tps: Sequence[TrainedPrompt], raw: bool) -> tuple[np.ndarray, np.ndarray, list]:
  """The inputs under every prompt, prompt-major [K * N, longest], and what each prompt was given: a templated
  prompt's template lays them out (a plain string: its single field); another prompt gets them in the input format
  its record keeps (unless `raw`)."""
  rows, fed = [], []
  for tp in tps or [None]:
    template = None if tp is None or tp.spec.template is None else Template.parse(tp.spec.template)
    given = list(texts) if tp is None or template is not None else [model_input(tp.record, t, raw=raw) for t in texts]
    fed += given
    rows += encoding.input_rows(base.batch_type, tokenizer, given, template)
  ids, mask = base.batch_type.layout_inputs(rows, max(len(r) for r in rows), encoding.pad_id(tokenizer))
  return ids, mask, fed


def generate_text(
  base,
  tokenizer,
  texts: Sequence[str | Mapping[str, str]],
  prompts: Sequence[TrainedPrompt | np.ndarray] = (),
  config: GenerateConfig | None = None,
  *,
  raw: bool = False,
  **options,
) -> list[dict]:
  """Generate for every (prompt, input) pair; one record per pair, in prompt-major order. A prompt is a
  `TrainedPrompt` (any method) or an array of input embeddings [P, H]; an input goes to a prompt in the input format
  its record keeps (`data.input_format`: a task's prefix and fields, a custom template) unless `raw`, or, for a
  templated prompt (`prompt.template`), as its fields by name (a string is its single field); `config` and
  `**options` as `inference.decoding.generate`."""
  tps = [p if isinstance(p, TrainedPrompt) else TrainedPrompt.from_embeddings(p) for p in prompts]
  ids, mask, fed = _input_ids(base, tokenizer, texts, tps, raw)
  n, k = len(texts), max(len(prompts), 1)
  which = np.repeat(np.arange(k), n)
  prefix = None
  if prompts:
    module = methods.bank([p.value for p in tps], [p.spec for p in tps], base.prefix_slots())
    prefix = PromptedModel(base, module).prefix(k * n, jnp.asarray(which))
  out = generate(
    base, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), prefix=prefix, config=config, **options
  )
  tokens, lengths, scores = (np.asarray(out[k_]) for k_ in ("tokens", "lengths", "scores"))
  records = []
  for row in range(k * n):
    toks = tokens[row, : lengths[row]].tolist()
    records.append(
      dict(
        prompt=int(which[row]) if prompts else None,
        input=texts[row % n],
        model_input=fed[row],
        output=tokenizer.decode(toks, skip_special_tokens=True),
        tokens=toks,
        score=float(scores[row]),
      )
    )
  return records
