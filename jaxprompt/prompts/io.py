"""Prompts in: `.npy` [P, H] files (the original repo's format), `.safetensors`, HF PEFT adapter folders, and
jaxprompt workdirs or checkpoint steps; plus the checks that a prompt fits the base model it is applied to.

A PEFT prompt-tuning adapter is `adapter_config.json` + `adapter_model.safetensors` holding one float32 tensor
`prompt_embeddings` [P, H] (PEFT's seq2seq default stores [2P, H], of which PROMPT_TUNING reads the first P).
Every jaxprompt export carries its `record.PromptRecord` (`jaxprompt.json`: the base model's identity and
architecture, the source, the method's spec).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.checkpoint import Checkpointer, find_checkpoint_dir
from jaxprompt.data.templates import Template
from jaxprompt.errors import CheckpointError, MissingPathError, PromptError
from jaxprompt.models import hf
from jaxprompt.prompts import heads, registry
from jaxprompt.prompts.record import PromptRecord, TaskMember, TaskRecord
from jaxprompt.prompts.spec import PromptSpec

PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}
PROVENANCE = "jaxprompt.json"
HEAD_PREFIX = "base_model."  # a head's tensors in PEFT's adapter (modules_to_save) and in our safetensors exports


def _json_object(file: Path) -> dict:
  try:
    out = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise PromptError(f"{file}: invalid JSON ({e})") from None
  if not isinstance(out, dict):
    raise PromptError(f"{file}: expected a JSON object, got {type(out).__name__}")
  return out


def head_tensors(f: hf.SafetensorsFile) -> dict[str, np.ndarray]:
  """A file's classification-head tensors (`base_model.score.weight` ... -> `score.weight` ...)."""
  names = f.keys()  # a list: a SafetensorsFile is no mapping
  return {k[len(HEAD_PREFIX) :]: np.array(f.get(k), np.float32) for k in names if k.startswith(HEAD_PREFIX)}


def _read_adapter_folder(path: Path) -> tuple[np.ndarray, dict]:
  cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
  if not cfg_file.exists() or not weights.exists():
    raise PromptError(f"{path}: a PEFT prompt folder needs adapter_config.json and adapter_model.safetensors")
  meta = {
    key: _json_object(file) for key, file in (("peft", cfg_file), ("jaxprompt", path / PROVENANCE)) if file.exists()
  }
  f = hf.SafetensorsFile(weights)
  names = f.keys()  # a list (a SafetensorsFile is no mapping)
  entry = registry.by_peft_type(meta.get("peft", {}).get("peft_type"))
  if entry is not None and entry.peft_reads_tensors:  # multitask's factors, adaption prompts' per-layer tensors
    meta["tensors"] = {k: np.array(f.get(k), np.float32) for k in names}
    return meta["tensors"].get("prompt_embeddings"), meta
  if "prompt_embeddings" not in f:
    raise PromptError(f"{weights}: no 'prompt_embeddings' tensor (found {names})")
  meta["head"] = head_tensors(f)
  return np.array(f.get("prompt_embeddings"), np.float32), meta


def read_prompt_file(path: str | Path) -> tuple[np.ndarray, dict]:
  """A prompt from a `.npy` file, a `.safetensors` file, or a PEFT adapter folder: (float32 array as stored,
  metadata as the files hold it: "peft" (adapter_config.json), "jaxprompt" (jaxprompt.json), "safetensors" (the
  file's metadata strings), where present)."""
  path = Path(path)
  if not path.exists():
    raise MissingPathError(f"prompt file {str(path)!r} does not exist")
  meta: dict = {}
  if path.is_dir():
    value, meta = _read_adapter_folder(path)
  elif path.suffix == ".npy":
    try:
      value = np.load(path, allow_pickle=False).astype(np.float32)
    except ValueError as e:  # object arrays need pickle: refused
      raise PromptError(f"{path}: not a numeric .npy array ({e})") from None
  elif path.suffix == ".safetensors":
    f = hf.SafetensorsFile(path)
    key = "prompt_embeddings" if "prompt_embeddings" in f else (f.keys() or [None])[0]
    if key is None:
      raise PromptError(f"{path}: empty safetensors file")
    value = np.array(f.get(key), np.float32)
    meta["safetensors"] = f.metadata
    meta["head"] = head_tensors(f)
  else:
    raise PromptError(f"{path}: unknown prompt format (expected .npy, .safetensors or a PEFT adapter folder)")
  return value, meta


def from_file(path: str | Path, length: int, hidden: int):
  """A prompt file's [P, H] input embeddings, checked against the expected shape."""
  value = load_prompt_source(path).embeddings(str(path))
  if value.shape != (length, hidden):
    raise PromptError(f"{path}: prompt has shape {value.shape}, expected [P, H] = ({length}, {hidden})")
  return jnp.asarray(value)


def _file_record(source: Path, meta: dict) -> PromptRecord:
  """The record a file export carries: its folder's jaxprompt.json, its safetensors "jaxprompt" metadata, or the
  .json beside a .npy (none: a bare prompt-tuning record)."""
  d = meta.get("jaxprompt", {})
  st = meta.get("safetensors", {})
  if not d and source.suffix == ".safetensors" and "jaxprompt" in st:
    d = json.loads(st["jaxprompt"])
  if not d and source.suffix == ".npy" and source.with_suffix(".json").exists():
    d = _json_object(source.with_suffix(".json"))
  return PromptRecord.from_json(d)


@dataclasses.dataclass
class TrainedPrompt:
  """What a prompt source holds. `value`: what the prompt is at inference (input embeddings [P, H] for
  prompt_tuning / p_tuning, a key/value table [P, Y, 2, K, D] for prefix_tuning: its method's `value_shape`);
  `params`: every trained parameter (a jaxprompt checkpoint: encoders included), None for exports and adapters;
  `record`: its method's spec and provenance (base model, source, step, PEFT config...); `head`: the tensors of a
  classification head trained with it (`record.head` says what it is), in transformers' names and layout
  (`score.weight` [C, H], ...), None without one."""

  value: np.ndarray
  params: dict | None
  record: PromptRecord
  head: dict[str, np.ndarray] | None = None

  @classmethod
  def from_embeddings(cls, value) -> "TrainedPrompt":
    """Bare input embeddings [P, H] as a prompt-tuning prompt with no record."""
    return cls(np.asarray(value, np.float32), None, PromptRecord())

  @property
  def spec(self) -> PromptSpec:
    return self.record.spec

  @property
  def method(self) -> str:
    return self.record.spec.method

  @property
  def kv_table(self) -> bool:
    """Is the value a key/value table [P, Y, 2, K, D] (prefix tuning, a cartridge)?"""
    return registry.of(self.spec).kv_table

  def embeddings(self, where: str) -> np.ndarray:
    """The input embeddings [P, H] (refusing a method that has none, e.g. a key/value prefix)."""
    entry = registry.of(self.spec)
    if entry.serves_embeddings:
      return np.asarray(entry.fixed(self.value, self.spec, None, where).inference_value(), np.float32)
    if not entry.embeds:
      raise PromptError(
        f"{where}: a {self.method} prompt is {entry.value_shape} ({entry.description}), not input embeddings"
      )
    return self.value

  def check(self, base, where: str, *, strict: bool = True) -> list[str]:
    """Fits `base`? (kind, hidden size or prefix shape, base identity); PromptError, or warnings (not strict)."""
    warnings = check_compatible(self.record, base.identity, base.hidden_size, base.kind, where, strict=strict)
    registry.of(self.spec).check(self.value, base, where)
    return warnings


def task_slug(name: str) -> str:
  """A task's name as a file or prompt name ("super_glue/rte" -> "super_glue_rte", "quickstart:max" ->
  "quickstart_max")."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def split_task(source: str | Path) -> tuple[Path, str | None]:
  """ "PATH@TASK" -> (PATH, TASK): one task's prompt of a per-task run or bank. A path that exists is taken whole."""
  text = str(source)
  if Path(text).exists() or "@" not in text:
    return Path(text), None
  path, task = text.rsplit("@", 1)
  return Path(path), task


def bank_tasks(record: PromptRecord) -> list[str] | None:
  """The task names of a per-task prompt bank, in prompt order (None: a single prompt)."""
  return record.task.bank_tasks if record.task is not None else None


def is_prompt_source(folder: str | Path) -> bool:
  """Is `folder` itself one prompt source (a workdir, its checkpoints folder or one step, an export or PEFT adapter
  folder) rather than a folder holding prompts?"""
  folder = Path(folder)
  marks = ("checkpoints", "adapter_config.json", "jaxprompt.json", "prompt")
  return folder.is_dir() and any((folder / m).exists() for m in marks)


def load_prompt_source(source: str | Path, step: str | int = "best") -> TrainedPrompt:
  """A prompt from a workdir, a checkpoint step folder, a PEFT adapter folder or a file export; "SOURCE@TASK"
  picks one task's prompt of a per-task run (`prompt.per_task`) or its exported bank."""
  source, task = split_task(source)
  tp = _load_whole(source, step)
  names = bank_tasks(tp.record)
  if names is None:
    if task is not None:
      raise PromptError(f"{source}: holds one prompt, not one per task: drop '@{task}'")
    return tp
  if task is None:
    raise PromptError(f"{source}: holds one prompt per task ({', '.join(names)}): choose one as {source}@TASK")
  return bank_member(tp, names, task, source)


def load_prompt_bank(
  source: str | Path, step: str | int = "best"
) -> tuple[TrainedPrompt, dict[str, TrainedPrompt]] | None:
  """A per-task run's or bank's prompts: (the whole bank, values [tasks, ...]; each task's prompt by name). None
  when `source` holds a single prompt."""
  tp = _load_whole(Path(source), step)
  names = bank_tasks(tp.record)
  return None if names is None else (tp, {n: bank_member(tp, names, n, Path(source)) for n in names})


def prompt_task_names(source: str | Path, step: str | int = "best") -> list[str] | None:
  """The tasks of a per-task run or bank at `source`, in prompt order (None: it holds a single prompt)."""
  return bank_tasks(_load_whole(Path(source), step).record)


def bank_member(bank: TrainedPrompt, names: list[str], task: str, where: Path) -> TrainedPrompt:
  """Task `task`'s prompt (by name or `task_slug`) of a bank holding `names`' prompts in order."""
  matches = [k for k, n in enumerate(names) if task in (n, task_slug(n))]
  if not matches:
    raise PromptError(f"{where}: no prompt for task {task!r}; it has {', '.join(names)}")
  k = matches[0]
  if bank.value.shape[0] != len(names):
    raise PromptError(f"{where}: a bank of {len(names)} tasks holds {bank.value.shape[0]} prompts")
  member_params = registry.of(bank.spec).member_params or (lambda params, k: jax.tree.map(lambda a: a[k], params))
  params = None if bank.params is None else member_params(bank.params, k)
  return TrainedPrompt(bank.value[k], params, bank.record.bank_member(k))


def _load_whole(source: Path, step: str | int) -> TrainedPrompt:
  """What a source holds, a per-task bank whole ([K, ...] values)."""
  if not source.exists():
    raise MissingPathError(f"{source} does not exist")
  if not (source.is_file() or (source / "adapter_config.json").exists()):
    return _checkpoint_prompt(source, step)
  value, meta = read_prompt_file(source)
  record = _file_record(source, meta)
  entry = registry.of(record.spec)
  if "peft" in meta:  # the adapter says what it is: its spec, not the export's
    value, spec = peft_value(value, meta["peft"], source, meta.get("tensors"))
    record = dataclasses.replace(record, spec=spec, peft=record.peft or meta["peft"], head=peft_head(record, meta))
    entry = registry.of(spec)
    if value.ndim == entry.value_shape.count(",") + 2 and bank_tasks(record) is None:
      record = dataclasses.replace(record, task=_numbered_tasks(value.shape[0]))
  shape = entry.value_shape
  if bank_tasks(record) is not None:
    shape = "[tasks, " + shape[1:]
  if value.ndim != shape.count(",") + 1:
    raise PromptError(f"{source}: a {entry.name} prompt is {shape}, got shape {value.shape}")
  if record.head is not None and not meta.get("head"):
    raise PromptError(f"{source}: records a {record.head.type} head but holds no head tensors")
  _check_template_rows(value, record, source)
  return TrainedPrompt(value, None, record, meta.get("head") or None)


def _check_template_rows(value: np.ndarray, record: PromptRecord, source: Path) -> None:
  """A templated prompt's rows fill its template's virtual tokens, one each (`data.templates`): a file holding
  another number is refused here, not by a shape error later or rows silently placed wrong."""
  if record.spec.template is None:
    return
  template = Template.parse(record.spec.template, where=f"{source}: its template")
  rows = value.shape[1] if bank_tasks(record) is not None else value.shape[0]
  if rows != template.length:
    raise PromptError(
      f"{source}: holds {rows} prompt rows, but its template {template.source!r} has {template.length} virtual "
      "token slots (one row each); make them equal"
    )


def peft_head(record: PromptRecord, meta: dict) -> heads.HeadSpec | None:
  """The head a PEFT adapter trains: its task_type's (SEQ_CLS, TOKEN_CLS), classes counted from its tensors (label
  strings from our export's record, else "0".."C-1"); None for a language-model adapter."""
  kind = heads.by_task_type(meta["peft"].get("task_type"))
  if kind is None:
    return None
  if record.head is not None:
    return record.head
  bias = [v for k, v in (meta.get("head") or {}).items() if k.endswith("bias") and "dense" not in k]
  weights = [v for k, v in (meta.get("head") or {}).items() if v.ndim == 2 and "dense" not in k]
  counts = {a.shape[0] for a in bias + weights}
  if len(counts) != 1:
    raise PromptError(
      f"a {meta['peft']['task_type']} adapter needs its head's tensors (modules_to_save), found "
      f"{sorted(meta.get('head') or {})}"
    )
  return heads.HeadSpec(kind.name, tuple(str(i) for i in range(counts.pop())))


def _numbered_tasks(count: int) -> TaskRecord:
  """The tasks of a PEFT adapter holding several (MULTITASK_PROMPT_TUNING's num_tasks) without a record naming
  them: "0" .. "T-1", its task ids."""
  names = [str(k) for k in range(count)]
  return TaskRecord(name="+".join(names), mixture=tuple(TaskMember(n) for n in names), per_task=True)


def load_trained_prompt(source: str | Path, step: str | int = "best") -> tuple[np.ndarray, dict]:
  """(inference value, its record as JSON: `PromptRecord.to_json`) of a workdir, a checkpoint step folder, or an
  export."""
  tp = load_prompt_source(source, step)
  return tp.value, tp.record.to_json()


def _checkpoint_prompt(source: Path, step: str | int) -> TrainedPrompt:
  if source.name.isdigit() and (source / "prompt").exists():
    ckdir, chosen = source.parent, int(source.name)
  else:
    ckdir, chosen = find_checkpoint_dir(source), None
  ck = Checkpointer.reader(ckdir)
  if chosen is None:
    chosen = ck.choose(step)
  elif chosen not in ck.steps():
    raise CheckpointError(f"{ckdir}: no checkpoint at step {chosen} (have {ck.steps()})")
  prompt, meta = ck.restore_prompt(chosen)
  ck.close()
  record = dataclasses.replace(PromptRecord.from_json(meta), source=str(ckdir / str(chosen)), step=chosen)
  params = prompt["prompt"]
  value = np.asarray(registry.of(record.spec).rebuild(record.spec, params).inference_value(), np.float32)
  head = heads.hf_tensors(record.head.layout, prompt["head"]) if record.head is not None else None
  return TrainedPrompt(value, params, record, head)


def peft_value(
  value: np.ndarray, peft: dict, where: Path, tensors: dict | None = None
) -> tuple[np.ndarray, PromptSpec]:
  """The inference value and spec of a PEFT adapter's `prompt_embeddings` (and, for a method that reads them, all
  its `tensors`), its adapter_config.json checked (the method's own reading: `Method.peft_read`)."""
  kind = peft.get("peft_type")
  entry = registry.by_peft_type(kind)
  if entry is None:
    raise PromptError(
      f"{where}: peft_type is {kind!r}; soft-prompt adapters are "
      f"{', '.join(registry.METHODS[n].peft_type for n in registry.names())}"
    )
  if not peft.get("task_type"):
    raise PromptError(f"{where}: adapter_config.json has no task_type (PEFT would silently ignore the prompt)")
  if entry.peft_reads_tensors:  # the method checks its own tensors and fields
    return entry.peft_read(tensors or {"prompt_embeddings": value}, peft, where)
  p = peft.get("num_virtual_tokens")
  if not isinstance(p, int) or p <= 0:
    raise PromptError(f"{where}: adapter_config.json num_virtual_tokens must be a positive integer, got {p!r}")
  if value.ndim != 2:
    raise PromptError(f"{where}: prompt_embeddings must be 2-D, got shape {value.shape}")
  return entry.peft_read(value, peft, where)


def check_compatible(
  record: PromptRecord, identity: Any, hidden: int, kind: str, where: str, *, strict: bool = True
) -> list[str]:
  """Check an imported prompt's record against a base model. Raises PromptError (strict) or returns warnings."""
  problems = []
  if record.peft:
    want, got = PEFT_TASK_TYPES.get(kind), record.peft.get("task_type")
    if record.head is not None:
      want = record.head.kind.peft_task_type
    if got != want:
      raise PromptError(f"{where}: adapter task_type {got!r} does not fit a {kind} model ({want})")
  if record.hidden_size not in (None, hidden):
    raise PromptError(f"{where}: prompt was made for hidden size {record.hidden_size}, the model has {hidden}")
  base = record.base
  if base is not None and base.fingerprint and identity is not None and base.fingerprint != identity.fingerprint:
    msg = (
      f"{where}: prompt was trained on base {base.path!r} (fingerprint {base.fingerprint}), "
      f"not on {identity.path!r} ({identity.fingerprint})"
    )
    if strict:
      raise PromptError(msg + "; pass --allow-other-base to use it anyway")
    problems.append(msg)
  return problems
