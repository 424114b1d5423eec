"""Prompts out to PyTorch and back: HF PEFT adapter folders, the original `.npy` format, safetensors.

A PEFT prompt-tuning adapter is `adapter_config.json` + `adapter_model.safetensors` holding one float32
tensor `prompt_embeddings` [P, H]. PEFT (>= 0.4) prepends it to the *encoder* input only for seq2seq
models and to all tokens for causal LMs, which is exactly how jaxprompt trains, so logits agree. We write
`num_transformer_submodules: 1` (PEFT's own seq2seq default, 2, stores an extra decoder half that
PROMPT_TUNING never reads); on import the first P rows of such a [2P, H] tensor are the prompt.

Every export also carries `jaxprompt.json` (provenance: the base model's identity and architecture, the
source checkpoint) so a prompt is never silently applied to the wrong base. Everything is written to a
temporary path and renamed into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import jaxprompt
from jaxprompt.checkpoint import CheckpointError, Checkpointer, find_checkpoint_dir
from jaxprompt.models import hf
from jaxprompt.prompts import PromptError, read_prompt_file

PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}
PROVENANCE = "jaxprompt.json"


class ExportError(ValueError):
  pass


def load_trained_prompt(source: str | Path, step: str | int = "best") -> tuple[np.ndarray, dict]:
  """The prompt [P, H] and its provenance from a workdir, a checkpoint step folder, or an export."""
  source = Path(source)
  if not source.exists():
    raise FileNotFoundError(f"{source} does not exist")
  if source.is_file() or (source / "adapter_config.json").exists():
    value, meta = read_prompt_file(source)
    info = dict(meta.get("jaxprompt", {}))
    if not info and source.suffix == ".safetensors" and "jaxprompt" in meta.get("safetensors", {}):
      info = json.loads(meta["safetensors"]["jaxprompt"])
    if not info and source.suffix == ".npy" and (source.with_suffix(".json")).exists():
      info = json.loads(source.with_suffix(".json").read_text())
    if "peft" in meta:
      info.setdefault("peft", meta["peft"])
      value = _peft_rows(value, meta["peft"], source)
    return value, info
  if source.name.isdigit() and (source / "prompt").exists():
    ckdir, chosen = source.parent, int(source.name)
  else:
    ckdir, chosen = find_checkpoint_dir(source), None
  ck = Checkpointer(ckdir)
  steps = ck.steps()
  if not steps:
    raise CheckpointError(f"{ckdir}: no complete checkpoints")
  if chosen is None:
    chosen = {"best": ck.best_step() or ck.latest_step(), "latest": ck.latest_step()}.get(str(step))
    chosen = int(step) if chosen is None else chosen
  if chosen not in steps:
    raise CheckpointError(f"{ckdir}: no checkpoint at step {chosen} (have {steps})")
  prompt, meta = ck.restore_prompt(chosen)
  ck.close()
  value = np.asarray(prompt["prompt"]["embeddings"], np.float32)
  info = dict(base_model=meta.get("base_model"), base_architecture=meta.get("base_architecture"),
              source=str(ckdir / str(chosen)), step=chosen, metrics=meta.get("metrics"),
              tokenizer=(meta.get("config") or {}).get("model", {}).get("tokenizer"))
  return value, info


def _peft_rows(value: np.ndarray, peft: dict, where: Path) -> np.ndarray:
  if peft.get("peft_type") != "PROMPT_TUNING":
    raise PromptError(f"{where}: peft_type is {peft.get('peft_type')!r}, only PROMPT_TUNING adapters hold soft prompts")
  if not peft.get("task_type"):
    raise PromptError(f"{where}: adapter_config.json has no task_type (PEFT would silently ignore the prompt)")
  p = peft.get("num_virtual_tokens")
  if not isinstance(p, int) or p <= 0:
    raise PromptError(f"{where}: adapter_config.json num_virtual_tokens must be a positive integer, got {p!r}")
  if peft.get("token_dim") not in (None, value.shape[1]):
    raise PromptError(f"{where}: token_dim {peft.get('token_dim')} does not match prompt_embeddings {value.shape}")
  if value.shape[0] < p or value.shape[0] % p:
    raise PromptError(f"{where}: prompt_embeddings has {value.shape[0]} rows for {p} virtual tokens")
  return value[:p]  # the encoder / input prompt; a seq2seq [2P, H] tensor's second half is never read


def _provenance(value: np.ndarray, info: dict, fmt: str) -> dict:
  return dict(format="jaxprompt-prompt/1", export_format=fmt, prompt_length=int(value.shape[0]),
              hidden_size=int(value.shape[1]), base_model=info.get("base_model"),
              base_architecture=info.get("base_architecture"), source=info.get("source"), step=info.get("step"),
              metrics=info.get("metrics"), tokenizer=info.get("tokenizer"),
              exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              jaxprompt_version=jaxprompt.__version__)


def peft_config(value: np.ndarray, info: dict, base_path: str | None) -> dict:
  arch = info.get("base_architecture") or {}
  kind = arch.get("kind")
  if kind not in PEFT_TASK_TYPES:
    raise ExportError("the prompt's base model kind is unknown (no provenance); cannot choose a PEFT task_type")
  base = info.get("base_model") or {}
  return {
      "peft_type": "PROMPT_TUNING",
      "task_type": PEFT_TASK_TYPES[kind],
      "num_virtual_tokens": int(value.shape[0]),
      "token_dim": int(value.shape[1]),
      "num_transformer_submodules": 1,
      "num_layers": arch.get("num_layers"),
      "num_attention_heads": arch.get("num_attention_heads"),
      "prompt_tuning_init": "RANDOM",
      "prompt_tuning_init_text": None,
      "tokenizer_name_or_path": None,
      "base_model_name_or_path": base_path if base_path is not None else base.get("path"),
      "revision": base.get("revision"),
      "inference_mode": True,
      "auto_mapping": None,
      "modules_to_save": None,
  }


def _atomic_file(out: Path, write, overwrite: bool) -> Path:
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
  os.close(fd)
  try:
    write(Path(tmp))
    hf.apply_umask(Path(tmp))
    os.replace(tmp, out)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return out


def export_prompt(source: str | Path, fmt: str, out: str | Path, *, step: str | int = "best",
                  with_base: bool = False, overwrite: bool = False) -> Path:
  """Export a trained prompt. fmt: "peft" (a folder), "numpy" (.npy [P, H] float32) or "safetensors"."""
  value, info = load_trained_prompt(source, step)
  value = np.ascontiguousarray(value, np.float32)
  out = Path(out)
  prov = _provenance(value, info, fmt)
  if fmt == "peft":
    def write(tmp: Path):
      base_path = None
      if with_base:
        write_base(info, tmp / "base")
        base_path = str((out / "base").absolute())
      (tmp / "adapter_config.json").write_text(json.dumps(peft_config(value, info, base_path), indent=2))
      hf.save_safetensors({"prompt_embeddings": value}, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
      (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2))

    return hf.write_folder_atomically(out, write, overwrite=overwrite)
  if with_base:
    raise ExportError("--with-base needs --format peft (it writes DIR/base beside the adapter)")
  if fmt == "numpy":
    if out.suffix != ".npy":
      raise ExportError(f"--format numpy writes a .npy file, got {out}")
    _atomic_file(out.with_suffix(".json"), lambda t: t.write_text(json.dumps(prov, indent=2)), overwrite)
    def save_npy(t: Path):
      with open(t, "wb") as f:
        np.save(f, value, allow_pickle=False)

    return _atomic_file(out, save_npy, overwrite)
  if fmt == "safetensors":
    return _atomic_file(out, lambda t: hf.save_safetensors({"prompt_embeddings": value}, t, metadata={
        "format": "pt", "jaxprompt": json.dumps(prov)}), overwrite)
  raise ExportError(f"unknown export format {fmt!r} (peft, numpy, safetensors)")


def write_base(info: dict, folder: Path) -> None:
  """The frozen base model (and tokenizer) as a HF folder PyTorch can load."""
  from jaxprompt.models import load_tokenizer, save_pretrained

  base = info.get("base_model") or {}
  if not base.get("path"):
    raise ExportError("the prompt has no recorded base model; cannot write --with-base")
  path = base["path"]
  model = jaxprompt.load_model(path, revision=base.get("revision"))
  if model.identity.fingerprint != base.get("fingerprint"):
    raise ExportError(f"base model at {path} no longer matches the one the prompt was trained on "
                      f"(fingerprint {model.identity.fingerprint} != {base.get('fingerprint')})")
  tokenizer = load_tokenizer(info.get("tokenizer") or path)
  save_pretrained(model, folder, tokenizer=tokenizer)


def check_compatible(info: dict, identity: Any, hidden: int, kind: str, where: str, *, strict: bool = True) -> list[str]:
  """Check an imported prompt against a base model. Raises PromptError (strict) or returns warnings."""
  problems = []
  prov_hidden = (info.get("base_architecture") or {}).get("hidden_size") or info.get("hidden_size")
  peft = info.get("peft") or {}
  if peft:
    want = PEFT_TASK_TYPES.get(kind)
    if peft.get("task_type") != want:
      raise PromptError(f"{where}: adapter task_type {peft.get('task_type')!r} does not fit a {kind} model ({want})")
  if prov_hidden not in (None, hidden):
    raise PromptError(f"{where}: prompt was made for hidden size {prov_hidden}, the model has {hidden}")
  base = info.get("base_model") or {}
  if base.get("fingerprint") and identity is not None and base["fingerprint"] != identity.fingerprint:
    msg = (f"{where}: prompt was trained on base {base.get('path')!r} (fingerprint {base['fingerprint']}), "
           f"not on {identity.path!r} ({identity.fingerprint})")
    if strict:
      raise PromptError(msg + "; pass --allow-other-base to use it anyway")
    problems.append(msg)
  return problems
