"""`PromptRecord`: what a trained prompt says about itself, one typed record wherever it is written — a checkpoint's
metadata (the "meta" item, `training.trainer.Trainer.checkpoint_meta`), an export's `jaxprompt.json`, the `.json`
beside a `.npy`, and a `.safetensors` file's "jaxprompt" metadata string — and read back (`prompts.io`).

`to_json()` writes the keys those files have always held (records without a field simply leave it out), and
`from_json()` reads every record jaxprompt has written: checkpoints from before the task was recorded (it is then
the config's data.task) and before the soft-prompt family (no prompt_spec: prompt tuning), hand-written side files,
and the training counters a checkpoint keeps beside the record (ignored here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxprompt.data.input_format import InputFormat
from jaxprompt.models.hf import Architecture, ModelIdentity
from jaxprompt.prompts import registry
from jaxprompt.prompts.heads import HeadSpec
from jaxprompt.prompts.soft import PromptTuningSpec
from jaxprompt.prompts.spec import PromptSpec

EXPORT_FORMAT = "jaxprompt-prompt/1"


def _at(d: dict | None, *keys: str) -> Any:
  """d[k1][k2]..., None where a level is missing (JSON written by older versions)."""
  for k in keys:
    if not isinstance(d, dict):
      return None
    d = d.get(k)
  return d


@dataclasses.dataclass(frozen=True)
class TaskMember:
  """One task of a mixture: its name and label strings."""

  name: str
  labels: tuple[str, ...] = ()
  input: InputFormat | None = None  # its input format (None: records written before it was kept)


def _input(d: dict) -> InputFormat | None:
  return InputFormat.from_json(d["input_format"]) if d.get("input_format") else None


@dataclasses.dataclass(frozen=True)
class TaskRecord:
  """The task(s) a prompt was trained on: a name ("+"-joined for a mixture) and every label; a mixture's members in
  order, and `per_task` when each has its own prompt (the record of a bank [tasks, ...] of prompts)."""

  name: str | None
  labels: tuple[str, ...] = ()
  mixture: tuple[TaskMember, ...] = ()
  per_task: bool = False
  input: InputFormat | None = None  # how requests become input text (`data.input_format`); None: raw text

  def to_json(self) -> dict:
    out: dict = dict(name=self.name, labels=list(self.labels))
    if self.input is not None:
      out["input_format"] = self.input.to_json()
    if self.mixture:
      out["mixture"] = [_member_json(m) for m in self.mixture]
    if self.per_task:
      out["per_task"] = True
    return out

  @classmethod
  def from_json(cls, d: dict) -> "TaskRecord":
    mixture = tuple(TaskMember(m["name"], tuple(m.get("labels") or ()), _input(m)) for m in d.get("mixture") or ())
    return cls(
      name=d.get("name"),
      labels=tuple(d.get("labels") or ()),
      mixture=mixture,
      per_task=bool(d.get("per_task")),
      input=_input(d),
    )

  @property
  def bank_tasks(self) -> list[str] | None:
    """The task of each prompt of a per-task bank, in prompt order (None: a single prompt)."""
    return [m.name for m in self.mixture] if self.per_task else None

  def member(self, k: int) -> "TaskRecord":
    m = self.mixture[k]
    return TaskRecord(name=m.name, labels=m.labels, input=m.input)


def _member_json(m: TaskMember) -> dict:
  out: dict = dict(name=m.name, labels=list(m.labels))
  if m.input is not None:
    out["input_format"] = m.input.to_json()
  return out


@dataclasses.dataclass(frozen=True)
class ExportStamp:
  """What an export adds about itself."""

  export_format: str | None = None  # peft | numpy | safetensors
  prompt_length: int | None = None
  hidden_size: int | None = None  # the base's (for input embeddings: the prompt's H)
  exported_at: str | None = None  # ISO 8601, UTC
  jaxprompt_version: str | None = None
  format: str = EXPORT_FORMAT


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """A trained prompt's record. `spec`: its method and options; `base` / `architecture`: the base model it was
    trained on; `task`; `step` and `metrics` of its checkpoint; `source`: where it was read from (or exported from);
    `tokenizer` and `prompt_config` (the config's model.tokenizer and prompt section); `config`: the whole run config
    (checkpoints only); `peft`: an imported PEFT adapter's adapter_config.json; `bank_index`: its position in the
    per-task bank it was taken from; `export`: what an export adds; `head`: the classification head trained with the
  prompt (`prompts.heads`; None: the language model's own head)."""

  spec: PromptSpec = PromptTuningSpec()
  base: ModelIdentity | None = None
  architecture: Architecture | None = None
  task: TaskRecord | None = None
  step: int | None = None
  metrics: dict | None = None
  source: str | None = None
  tokenizer: str | None = None
  prompt_config: dict | None = None
  config: dict | None = None
  peft: dict | None = None
  bank_index: int | None = None
  export: ExportStamp | None = None
  head: HeadSpec | None = None

  @property
  def method(self) -> str:
    return self.spec.method

  @property
  def hidden_size(self) -> int | None:
    """The base's hidden size, as far as the record says."""
    if self.architecture is not None and self.architecture.hidden_size is not None:
      return self.architecture.hidden_size
    return self.export.hidden_size if self.export is not None else None

  def bank_member(self, k: int) -> "PromptRecord":
    """The record of prompt `k` of the per-task bank this record describes."""
    return dataclasses.replace(self, task=self.task.member(k), bank_index=k)

  def to_json(self) -> dict:
    ex = dataclasses.asdict(self.export) if self.export is not None else {}
    out = dict(
      format=ex.get("format"),
      export_format=ex.get("export_format"),
      prompt_length=ex.get("prompt_length"),
      hidden_size=ex.get("hidden_size"),
      prompt_spec=self.spec.to_json(),
      base_model=self.base and self.base.to_dict(),
      base_architecture=self.architecture and self.architecture.to_dict(),
      source=self.source,
      step=self.step,
      metrics=self.metrics,
      tokenizer=self.tokenizer,
      prompt_config=self.prompt_config,
      config=self.config,
      task=self.task and self.task.to_json(),
      peft=self.peft,
      bank_index=self.bank_index,
      head=self.head and self.head.to_json(),
      exported_at=ex.get("exported_at"),
      jaxprompt_version=ex.get("jaxprompt_version"),
    )
    return {k: v for k, v in out.items() if v is not None}

  @classmethod
  def from_json(cls, d: dict) -> "PromptRecord":
    config = d.get("config")
    task = d.get("task") or (dict(name=_at(config, "data", "task")) if config else None)
    stamp = {f.name: d[f.name] for f in dataclasses.fields(ExportStamp) if d.get(f.name) is not None}
    export = ExportStamp(**stamp) if stamp else None
    return cls(
      spec=registry.spec_from_json(d.get("prompt_spec")),
      base=ModelIdentity.from_dict(d["base_model"]) if d.get("base_model") else None,
      architecture=Architecture.from_dict(d["base_architecture"]) if d.get("base_architecture") else None,
      task=TaskRecord.from_json(task) if task else None,
      step=d.get("step"),
      metrics=d.get("metrics"),
      source=d.get("source"),
      tokenizer=d.get("tokenizer", _at(config, "model", "tokenizer")),
      prompt_config=d.get("prompt_config", _at(config, "prompt")),
      config=config,
      peft=d.get("peft"),
      bank_index=d.get("bank_index"),
      export=export,
      head=HeadSpec.from_json(d["head"]) if d.get("head") else None,
    )
