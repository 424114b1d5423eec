"""What a prompt method is to the rest of the package: a spec (its options: a frozen dataclass, JSON in checkpoints
and exports) and a registry entry (`Method`: how it is built, rebuilt, read back from PEFT and exported to it).

Each method's module defines its spec and its entry next to its NNX module (prompt_tuning in `soft`, p_tuning in
`encoders`, prefix_tuning in `prefix`); `prompts.registry` lists the entries. Nothing else names a method: a new
method is its own module plus one line in the registry.

Notation: P prompt length, H hidden, Y prefix table layers, K key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar


def _jsonable(value):
  """Tuples as lists (what JSON reads back), through dicts and lists."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """A method and its options, as a trained prompt records them (`PromptMethod.spec()`). `to_json` is the dict
  checkpoints and exports have always held: {"method": NAME, option: value, ...}, options that are None left out
  (they were never written). `template`: where a templated prompt's rows go in the input (`prompt.template`,
  `data.templates`; None: in front), for the methods whose entry says `templates`."""

  method: ClassVar[str]
  template: str | None = dataclasses.field(default=None, kw_only=True)

  def to_json(self) -> dict:
    out = {"method": self.method}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value is not None:
        out[f.name] = _jsonable(value.to_dict() if hasattr(value, "to_dict") else value)
    return out

  @classmethod
  def from_json(cls, d: dict) -> "PromptSpec":
    """The spec of a JSON dict (its "method" already resolved to this class; unknown keys ignored: a newer
    writer's options an older reader cannot use)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def describe(self) -> str:
    """The method and its options in a few words, for messages."""
    return self.method


@dataclasses.dataclass(frozen=True)
class Method:
  """A registry entry: everything the package needs to know about one prompt method.

  build(pcfg, base, tokenizer, labels, rng) -> PromptMethod: the configured module on `base` (`config.PromptConfig`;
    `prompt.init: file` is handled before it is called, by `methods.build`).
  rebuild(spec, params) -> PromptMethod: the trained module from its spec and a checkpoint's `prompt` tree.
  fixed(value, spec, slots) -> PromptMethod: the inference module of a trained value (what `inference_value()`
    returned, what PEFT saves); a key/value method checks the value against the base's `PrefixSlots`.
  check(value, base, where): raises PromptError when a trained value does not fit `base`.
  templates: whether its prompt may sit at a template's slots (`prompt.template`): input embeddings [P, H] the same
    whatever the input (no key/value prefix, no offset on the input's first tokens).
  bank_refusal(pcfg) -> str | None: what cannot be trained as a per-task bank (`prompt.per_task`), None if it can.
  learning_rates(pcfg) -> {parameter name: learning rate}: parameters trained with their own peak learning rate
    (DePT's offset), the rest with optimizer.learning_rate (`training.optim.build_optimizer`); {}: one rate.
  build_bank(pcfg, base, tokenizer, labels per task, rng) -> PromptMethod: the trainable module of a per-task run
    (`prompt.per_task`) where it is not K prompts built alone and stacked (multitask: one shared prompt, a factor
    per task); None: `methods.build_bank`'s stack.
  member_params(params, k) -> dict: task k's parameters of a per-task run's checkpoint (None: every leaf's row k).
  peft_tensors(value, record) -> {name: array}: what adapter_model.safetensors holds (None: `prompt_embeddings`,
    the value flattened to 2-D); with `peft_reads_tensors`, `peft_read` gets that dict instead of the one array.
  peft_bank: a per-task run also exports as one PEFT adapter of every task (`export.BANK_ADAPTER`).
  serves_embeddings: its inference module (`fixed`) is input embeddings [P, H] although its value is not (multitask:
    each task's product), so what reads embeddings (inspect, similarity, prompt.init file) gets those.
  init_source(pcfg) -> str | None: a trained prompt the method starts from (multitask's source stage); when it
    gives a path, `methods` loads it (every task of a per-task source) and checks it against the base, and calls
    build / build_bank with `source=(prompts, task names or None)`.
  peft_fields(value, spec, record, base_path) -> dict: the method's fields of PEFT's adapter_config.json (beside
    task_type, num_virtual_tokens, peft_type and the base model's name).
  peft_read(value, peft, where) -> (value, spec): a PEFT adapter's `prompt_embeddings` (already 2-D, with a
    positive num_virtual_tokens) as the inference value, and the spec its adapter_config.json describes.
  """

  name: str
  spec_type: type[PromptSpec]
  description: str  # one line for people
  embeds: bool  # puts input embeddings [P, H] before the input (packable rows; shares banks with its kind)
  value_shape: str  # the inference value's shape in the notation above, e.g. "[P, H]"
  saves: str  # what a checkpoint keeps (an export keeps the value)
  peft_type: str  # PEFT's peft_type
  build: Callable[..., Any]
  rebuild: Callable[[Any, dict], Any]
  fixed: Callable[..., Any]
  check: Callable[[Any, Any, str], None]
  peft_fields: Callable[..., dict]
  peft_read: Callable[..., tuple[Any, PromptSpec]]
  templates: bool = False
  bank_refusal: Callable[[Any], str | None] = lambda pcfg: None
  learning_rates: Callable[[Any], dict[str, float]] = lambda pcfg: {}
  build_bank: Callable[..., Any] | None = None
  member_params: Callable[[dict, int], dict] | None = None
  peft_tensors: Callable[..., dict] | None = None
  peft_reads_tensors: bool = False
  peft_bank: bool = False
  init_source: Callable[[Any], str | None] = lambda pcfg: None
  serves_embeddings: bool = False
  kv_table: bool = False  # its value is a key/value table [P, Y, 2, K, D] (`inspect` shows its slots' norms)
