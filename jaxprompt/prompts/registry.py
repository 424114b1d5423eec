"""The prompt methods, by name: one `spec.Method` entry each, defined next to its module. Adding a method is its
module (the NNX module, its `PromptSpec`, its `Method`) plus one line below; nothing else compares method names.

  method         trains                                        goes in                       PEFT type
  prompt_tuning  embeddings [P, H]                             the input embeddings          PROMPT_TUNING
  p_tuning       embeddings [P, H] + an MLP / LSTM encoder     the input embeddings          P_TUNING
  prefix_tuning  keys/values [P, Y, 2, K, D] (+ an MLP)        every attention layer         PREFIX_TUNING
  residual       embeddings [P, H] + a residual MLP            the input embeddings          PROMPT_TUNING
  dept           embeddings [m, H] + an offset A [s, r]·B [r, H]  the input; its first s tokens  none
  multitask      shared [P, H] ∘ a rank-r factor per task       the input embeddings          MULTITASK_PROMPT_TUNING
  adaption       prompts [L_a, A, H] + gates [L_a]              the top L_a attention layers  ADAPTION_PROMPT
"""

from __future__ import annotations

from jaxprompt.errors import PromptError
from jaxprompt.prompts.adaption import ADAPTION
from jaxprompt.prompts.dept import DEPT
from jaxprompt.prompts.encoders import P_TUNING
from jaxprompt.prompts.multitask import MULTITASK
from jaxprompt.prompts.prefix import PREFIX_TUNING
from jaxprompt.prompts.residual import RESIDUAL
from jaxprompt.prompts.soft import PROMPT_TUNING, PromptTuningSpec
from jaxprompt.prompts.spec import Method, PromptSpec

METHODS: dict[str, Method] = {
  m.name: m for m in (PROMPT_TUNING, P_TUNING, PREFIX_TUNING, RESIDUAL, DEPT, MULTITASK, ADAPTION)
}


def get(name: str) -> Method:
  """The entry of method `name`; PromptError naming the registered methods when there is none."""
  if name not in METHODS:
    raise PromptError(f"unknown prompt method {name!r}; registered: {', '.join(METHODS)}")
  return METHODS[name]


def of(spec: PromptSpec) -> Method:
  """The entry of a spec's method."""
  return get(spec.method)


def names(*, embeds: bool | None = None) -> list[str]:
  """The registered methods' names; `embeds`: only those that do (True) or do not (False) put embeddings before
  the input."""
  return [n for n, m in METHODS.items() if embeds is None or m.embeds == embeds]


def by_peft_type(peft_type) -> Method | None:
  """The method PEFT calls `peft_type` (None: not a soft-prompt method jaxprompt has); the first registered where
  several export it (a residual prompt's PROMPT_TUNING adapter is a plain prompt: prompt_tuning)."""
  return next((m for m in METHODS.values() if m.peft_type == peft_type), None)


def spec_from_json(d: dict | None) -> PromptSpec:
  """A spec from its JSON (`PromptSpec.to_json`). None or {}: prompt tuning — checkpoints from before the soft-prompt
  family, and bare prompt files, hold input embeddings and no spec."""
  if not d:
    return PromptTuningSpec()
  return get(d.get("method", PromptTuningSpec.method)).spec_type.from_json(d)
