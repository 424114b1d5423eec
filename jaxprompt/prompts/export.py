"""Prompts out to PyTorch and beyond: HF PEFT adapter folders, the original `.npy` format, safetensors.

A PEFT prompt-tuning adapter is `adapter_config.json` + `adapter_model.safetensors` holding one float32
tensor `prompt_embeddings` [P, H]. PEFT (>= 0.4) prepends it to the *encoder* input only for seq2seq
models and to all tokens for causal LMs, which is exactly how jaxprompt trains, so logits agree. We write
`num_transformer_submodules: 1` (PEFT's own seq2seq default, 2, stores an extra decoder half that
PROMPT_TUNING never reads).

Every export also carries `jaxprompt.json` (provenance: the base model's identity and architecture, the
source checkpoint, how the prompt was initialised) so a prompt is never silently applied to the wrong base.
Everything is written to a temporary path and renamed into place, so an interrupted export leaves nothing
half-written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np

from jaxprompt.errors import ExportError, ExportWriteError
from jaxprompt.fileio import write_file_atomically, write_folder_atomically
from jaxprompt.models import hf
from jaxprompt.models.loading import load_model, load_tokenizer, loadable_path, save_pretrained
from jaxprompt.prompts import registry
from jaxprompt.prompts.io import (
  HEAD_PREFIX,
  PEFT_TASK_TYPES,
  PROVENANCE,
  TrainedPrompt,
  load_prompt_bank,
  load_prompt_source,
  split_task,
  task_slug,
)
from jaxprompt.prompts.record import ExportStamp, PromptRecord
from jaxprompt.version import __version__


def _stamped(value: np.ndarray, record: PromptRecord, fmt: str) -> dict:
  """The record an export writes (JSON): the prompt's, stamped — without the run's whole config (an export keeps
  its tokenizer and prompt section) or an imported adapter's config (a PEFT export writes its own)."""
  hidden = int(value.shape[1]) if registry.of(record.spec).embeds else record.hidden_size
  stamp = ExportStamp(
    export_format=fmt,
    prompt_length=int(value.shape[0]),
    hidden_size=hidden,
    exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    jaxprompt_version=__version__,
  )
  return dataclasses.replace(record, config=None, peft=None, export=stamp).to_json()


def peft_config(value: np.ndarray, record: PromptRecord, base_path: str | None) -> dict:
  """adapter_config.json of a prompt: PEFT's common fields and its method's (`Method.peft_fields`)."""
  if record.spec.template is not None:
    raise ExportError(
      f"PEFT only prepends prompts; this one sits at the slots of its template {record.spec.template!r} "
      "(export it with --format numpy or safetensors)"
    )
  kind = record.architecture.kind if record.architecture is not None else None
  if kind not in PEFT_TASK_TYPES:
    raise ExportError("the prompt's base model kind is unknown (no provenance); cannot choose a PEFT task_type")
  base = record.base
  if base_path is None and base is not None and base.path:
    # PEFT's from_pretrained loads this: never a jaxprompt-only name (builtin:...) or a relative path
    base_path = loadable_path(base.path)
  entry = registry.of(record.spec)
  head = record.head
  out = {
    "task_type": head.kind.peft_task_type if head is not None else PEFT_TASK_TYPES[kind],
    "num_virtual_tokens": int(value.shape[0]),
    "peft_type": entry.peft_type,
    **entry.peft_fields(value, record, base_path),
    "base_model_name_or_path": base_path,
    "revision": base.revision if base is not None else None,
    "inference_mode": True,
    "auto_mapping": None,
    # a head: the module PEFT trains and saves beside the prompt (`base_model.<name>...`)
    "modules_to_save": [head.layout.name] if head is not None else None,
  }
  if out["num_virtual_tokens"] is None:  # a method whose PEFT config has no such field (ADAPTION_PROMPT)
    del out["num_virtual_tokens"]
  return out


def peft_tensor(value: np.ndarray) -> np.ndarray:
  """`prompt_embeddings` as PEFT stores it: [P, H] input embeddings, or a prefix table flattened to
  [P, Y * 2 * K * D] (PEFT's view [P, 2Y, K, D], slot 2l + kv)."""
  return np.ascontiguousarray(value.reshape(value.shape[0], -1), np.float32)


EXTENSIONS = {"peft": "", "numpy": ".npy", "safetensors": ".safetensors"}  # a bank member's entry in OUT/
BANK_FILE = "bank.safetensors"
BANK_ADAPTER = "bank"  # a method with `peft_bank` (multitask): every task in one PEFT adapter, task id = its order


def export_prompt(
  source: str | Path,
  fmt: str,
  out: str | Path,
  *,
  step: str | int = "best",
  with_base: bool = False,
  overwrite: bool = False,
) -> Path:
  """Export a trained prompt's inference value. fmt: "peft" (a folder), "numpy" (.npy float32: [P, H] input
  embeddings, or a prefix table [P, Y, 2, K, D]) or "safetensors" (the same array, `prompt_embeddings`).

  A per-task run (`prompt.per_task`) exports every task: OUT/ gets one export per task, named after it
  (`task_slug`: OUT/quickstart_max/ for peft, OUT/quickstart_max.npy ...), and OUT/bank.safetensors holding the
  bank [tasks, P, ...] (`prompt_embeddings`, the task names in its provenance); "SOURCE@TASK" exports one task."""
  if fmt not in EXTENSIONS:
    raise ExportError(f"unknown export format {fmt!r} ({', '.join(EXTENSIONS)})")
  out = Path(out)
  bank = load_prompt_bank(source, step) if split_task(source)[1] is None else None
  if bank is not None:
    return _export_bank(*bank, fmt, out, with_base=with_base, overwrite=overwrite)
  tp = load_prompt_source(source, step)
  value, record = np.ascontiguousarray(tp.value, np.float32), tp.record
  if fmt == "numpy" and tp.head is not None:
    raise ExportError(
      f"{source}: a .npy holds the prompt alone; this prompt has a {record.head.type} head: use "
      "--format safetensors or peft"
    )
  if with_base and fmt != "peft":
    raise ExportError("--with-base needs --format peft (it writes DIR/base beside the adapter)")
  if fmt == "numpy" and out.suffix != ".npy":
    raise ExportError(f"--format numpy writes a .npy file, got {out}")
  if fmt == "peft":
    peft_config(value, record, None)  # refuse before writing anything

    def write(tmp: Path):
      if with_base:
        write_base(record, tmp / "base")
      _write(value, record, fmt, tmp, str((out / "base").absolute()) if with_base else None, head=tp.head or {})

    return write_folder_atomically(out, write, overwrite=overwrite, error=ExportWriteError)
  head = tp.head or {}
  if fmt == "numpy":  # the provenance beside it first: a .npy is never left without its record
    write_file_atomically(
      out.with_suffix(".json"),
      lambda t: _write_json(t, _stamped(value, record, fmt)),
      overwrite=overwrite,
      error=ExportWriteError,
    )
  return write_file_atomically(
    out, lambda t: _write(value, record, fmt, t, head=head), overwrite=overwrite, error=ExportWriteError
  )


def _write(
  value: np.ndarray, record: PromptRecord, fmt: str, path: Path, base_path: str | None = None, *, head=None
) -> None:
  """One prompt in format `fmt` at `path` (a folder for peft, a file otherwise; `base_path`: the base model a peft
  adapter names, when written beside it; `head`: a classification head's HF tensors, written as PEFT saves
  modules_to_save). A numpy export's provenance is the caller's."""
  prov = _stamped(value, record, fmt)
  extra = {HEAD_PREFIX + k: v for k, v in (head or {}).items()}
  if fmt == "peft":
    path.mkdir(exist_ok=True)
    _write_json(path / "adapter_config.json", peft_config(value, record, base_path))
    entry = registry.of(record.spec)
    tensors = entry.peft_tensors(value, record) if entry.peft_tensors else {"prompt_embeddings": peft_tensor(value)}
    hf.save_safetensors(
      {**{k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, **extra},
      path / "adapter_model.safetensors",
      metadata={"format": "pt"},
    )
    _write_json(path / PROVENANCE, prov)
  elif fmt == "numpy":
    with open(path, "wb") as f:
      np.save(f, value, allow_pickle=False)
  else:
    hf.save_safetensors(
      {"prompt_embeddings": value, **extra}, path, metadata={"format": "pt", "jaxprompt": json.dumps(prov)}
    )


def _write_json(path: Path, obj: dict) -> None:
  path.write_text(json.dumps(obj, indent=2))


def _export_bank(
  whole: TrainedPrompt, bank: dict[str, TrainedPrompt], fmt: str, out: Path, *, with_base: bool, overwrite: bool
) -> Path:
  """A per-task run: OUT/<task> per task in `fmt`, plus OUT/bank.safetensors (and OUT/base with --with-base; and
  OUT/bank/, one PEFT adapter of every task, for a method with `peft_bank`), one folder written atomically."""
  members = [(task_slug(name), np.ascontiguousarray(tp.value, np.float32), tp.record) for name, tp in bank.items()]
  if with_base and fmt != "peft":
    raise ExportError("--with-base needs --format peft (it writes DIR/base beside the adapters)")
  one_adapter = fmt == "peft" and registry.of(whole.spec).peft_bank
  if fmt == "peft":
    for _, value, record in members:
      peft_config(value, record, None)  # refuse before writing anything

  def write(tmp: Path):
    if with_base:  # one copy of the base, named by every adapter
      write_base(whole.record, tmp / "base")
    for slug, value, record in members:
      _write(value, record, fmt, tmp / (slug + EXTENSIONS[fmt]), str((out / "base").absolute()) if with_base else None)
      if fmt == "numpy":
        _write_json(tmp / f"{slug}.json", _stamped(value, record, fmt))
    value = np.ascontiguousarray(whole.value, np.float32)
    if one_adapter:
      _write(value, whole.record, fmt, tmp / BANK_ADAPTER, str((out / "base").absolute()) if with_base else None)
    hf.save_safetensors(
      {"prompt_embeddings": value},
      tmp / BANK_FILE,
      metadata={"format": "pt", "jaxprompt": json.dumps(_stamped(value[0], whole.record, "safetensors"))},
    )

  return write_folder_atomically(out, write, overwrite=overwrite, error=ExportWriteError)


def write_base(record: PromptRecord, folder: Path) -> None:
  """The frozen base model (and tokenizer) as a HF folder PyTorch can load."""
  base = record.base
  if base is None or not base.path:
    raise ExportError("the prompt has no recorded base model; cannot write --with-base")
  path = base.path
  model = load_model(path, revision=base.revision)
  if model.identity.fingerprint != base.fingerprint:
    raise ExportError(
      f"base model at {path} no longer matches the one the prompt was trained on "
      f"(fingerprint {model.identity.fingerprint} != {base.fingerprint})"
    )
  tokenizer = load_tokenizer(record.tokenizer or path)
  save_pretrained(model, folder, tokenizer=tokenizer)
