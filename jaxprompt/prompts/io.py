"""Prompts in: `.npy` [P, H] files (the original repo's format), `.safetensors`, HF PEFT adapter folders, and
jaxprompt workdirs or checkpoint steps; plus the checks that a prompt fits the base model it is applied to.

A PEFT prompt-tuning adapter is `adapter_config.json` + `adapter_model.safetensors` holding one float32 tensor
`prompt_embeddings` [P, H] (PEFT's seq2seq default stores [2P, H], of which PROMPT_TUNING reads the first P).
Every jaxprompt export carries `jaxprompt.json` (the base model's identity and architecture, the source).
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

from jaxprompt.errors import CheckpointError, MissingPathError, PromptError
from jaxprompt.models import hf
from jaxprompt.prompts.specs import from_spec
from jaxprompt.checkpoint import Checkpointer, find_checkpoint_dir

PEFT_TASK_TYPES = {"seq2seq": "SEQ_2_SEQ_LM", "causal": "CAUSAL_LM"}
PEFT_METHODS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
PROVENANCE = "jaxprompt.json"


def _json_object(file: Path) -> dict:
  try:
    out = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise PromptError(f"{file}: invalid JSON ({e})") from None
  if not isinstance(out, dict):
    raise PromptError(f"{file}: expected a JSON object, got {type(out).__name__}")
  return out


def _read_adapter_folder(path: Path) -> tuple[np.ndarray, dict]:
  cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
  if not cfg_file.exists() or not weights.exists():
    raise PromptError(f"{path}: a PEFT prompt folder needs adapter_config.json and adapter_model.safetensors")
  meta = {key: _json_object(file) for key, file in (("peft", cfg_file), ("jaxprompt", path / PROVENANCE))
          if file.exists()}
  f = hf.SafetensorsFile(weights)
  if "prompt_embeddings" not in f.keys():
    raise PromptError(f"{weights}: no 'prompt_embeddings' tensor (found {f.keys()})")
  return np.array(f.get("prompt_embeddings"), np.float32), meta


def read_prompt_file(path: str | Path) -> tuple[np.ndarray, dict]:
  """A prompt from a `.npy` file, a `.safetensors` file, or a PEFT adapter folder: (float32 array as stored,
  metadata: the PEFT adapter config and/or our provenance file, if any)."""
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
    key = "prompt_embeddings" if "prompt_embeddings" in f.keys() else (f.keys() or [None])[0]
    if key is None:
      raise PromptError(f"{path}: empty safetensors file")
    value = np.array(f.get(key), np.float32)
    meta["safetensors"] = f.metadata
  else:
    raise PromptError(f"{path}: unknown prompt format (expected .npy, .safetensors or a PEFT adapter folder)")
  return value, meta


def from_file(path: str | Path, length: int, hidden: int):
  """A prompt file's [P, H] input embeddings, checked against the expected shape."""
  value = load_prompt_source(path).embeddings(str(path))
  if value.shape != (length, hidden):
    raise PromptError(f"{path}: prompt has shape {value.shape}, expected [P, H] = ({length}, {hidden})")
  return jnp.asarray(value)


def _file_provenance(source: Path, meta: dict) -> dict:
  info = dict(meta.get("jaxprompt", {}))
  if not info and source.suffix == ".safetensors" and "jaxprompt" in meta.get("safetensors", {}):
    info = json.loads(meta["safetensors"]["jaxprompt"])
  if not info and source.suffix == ".npy" and source.with_suffix(".json").exists():
    info = json.loads(source.with_suffix(".json").read_text())
  return info


@dataclasses.dataclass
class TrainedPrompt:
  """What a prompt source holds. `value`: what the prompt is at inference (input embeddings [P, H] for
  prompt_tuning / p_tuning, a key/value table [P, Y, 2, K, D] for prefix_tuning); `spec`: its method and options;
  `params`: every trained parameter (a jaxprompt checkpoint: encoders included), None for exports and adapters;
  `info`: provenance (base model, source, step, PEFT config...)."""

  value: np.ndarray
  spec: dict
  params: dict | None
  info: dict

  @property
  def method(self) -> str:
    return self.spec.get("method", "prompt_tuning")

  def embeddings(self, where: str) -> np.ndarray:
    """The input embeddings [P, H] (refusing a key/value prefix, which has none)."""
    if self.method == "prefix_tuning":
      raise PromptError(f"{where}: a prefix_tuning prompt is keys and values for every layer, not input embeddings")
    return self.value

  def check(self, base, where: str, *, strict: bool = True) -> list[str]:
    """Fits `base`? (kind, hidden size or prefix shape, base identity); PromptError, or warnings (not strict)."""
    warnings = check_compatible(self.info, getattr(base, "identity", None), base.hidden_size, base.kind, where,
                                strict=strict)
    if self.method == "prefix_tuning":
      s = base.prefix_slots()
      want = (s.layers, 2, s.heads, s.head_dim)
      if self.value.shape[1:] != want:
        raise PromptError(f"{where}: prefix table is {self.value.shape}, this model's is [P, "
                          f"{', '.join(map(str, want))}]")
    elif self.value.shape[1] != base.hidden_size:
      raise PromptError(f"{where}: prompt is {self.value.shape}, this model's hidden size is {base.hidden_size}")
    return warnings


def task_slug(name: str) -> str:
  """A task's name as a file or prompt name ("super_glue/rte" -> "super_glue_rte", "quickstart:max" ->
  "quickstart_max")."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def split_task(source: str | Path) -> tuple[Path, str | None]:
  """"PATH@TASK" -> (PATH, TASK): one task's prompt of a per-task run or bank. A path that exists is taken whole."""
  text = str(source)
  if Path(text).exists() or "@" not in text:
    return Path(text), None
  path, task = text.rsplit("@", 1)
  return Path(path), task


def bank_tasks(info: dict) -> list[str] | None:
  """The task names of a per-task prompt bank, in prompt order (None: a single prompt)."""
  task = info.get("task") or {}
  return [m["name"] for m in task.get("mixture") or ()] if task.get("per_task") else None


def load_prompt_source(source: str | Path, step: str | int = "best") -> TrainedPrompt:
  """A prompt from a workdir, a checkpoint step folder, a PEFT adapter folder or a file export; "SOURCE@TASK"
  picks one task's prompt of a per-task run (`prompt.per_task`) or its exported bank."""
  source, task = split_task(source)
  tp = _load_whole(source, step)
  names = bank_tasks(tp.info)
  if names is None:
    if task is not None:
      raise PromptError(f"{source}: holds one prompt, not one per task: drop '@{task}'")
    return tp
  if task is None:
    raise PromptError(f"{source}: holds one prompt per task ({', '.join(names)}): choose one as {source}@TASK")
  return bank_member(tp, names, task, source)


def load_prompt_bank(source: str | Path, step: str | int = "best"
                     ) -> tuple[TrainedPrompt, dict[str, TrainedPrompt]] | None:
  """A per-task run's or bank's prompts: (the whole bank, values [tasks, ...]; each task's prompt by name). None
  when `source` holds a single prompt."""
  tp = _load_whole(Path(source), step)
  names = bank_tasks(tp.info)
  return None if names is None else (tp, {n: bank_member(tp, names, n, Path(source)) for n in names})


def prompt_task_names(source: str | Path, step: str | int = "best") -> list[str] | None:
  """The tasks of a per-task run or bank at `source`, in prompt order (None: it holds a single prompt)."""
  return bank_tasks(_load_whole(Path(source), step).info)


def bank_member(bank: TrainedPrompt, names: list[str], task: str, where: Path) -> TrainedPrompt:
  """Task `task`'s prompt (by name or `task_slug`) of a bank holding `names`' prompts in order."""
  matches = [k for k, n in enumerate(names) if task in (n, task_slug(n))]
  if not matches:
    raise PromptError(f"{where}: no prompt for task {task!r}; it has {', '.join(names)}")
  k = matches[0]
  if bank.value.shape[0] != len(names):
    raise PromptError(f"{where}: a bank of {len(names)} tasks holds {bank.value.shape[0]} prompts")
  member = bank.info["task"]["mixture"][k]
  info = dict(bank.info, task=dict(name=member["name"], labels=member.get("labels") or []), bank_index=k)
  params = None if bank.params is None else jax.tree.map(lambda a: a[k], bank.params)
  return TrainedPrompt(bank.value[k], bank.spec, params, info)


def _load_whole(source: Path, step: str | int) -> TrainedPrompt:
  """What a source holds, a per-task bank whole ([K, ...] values)."""
  if not source.exists():
    raise MissingPathError(f"{source} does not exist")
  if not (source.is_file() or (source / "adapter_config.json").exists()):
    return _checkpoint_prompt(source, step)
  value, meta = read_prompt_file(source)
  info = _file_provenance(source, meta)
  if "peft" in meta:
    info.setdefault("peft", meta["peft"])
    value, spec = peft_value(value, meta["peft"], source)
  else:
    spec = info.get("prompt_spec") or {"method": "prompt_tuning"}
  shape = "[P, Y, 2, K, D]" if spec.get("method") == "prefix_tuning" else "[P, H]"
  if bank_tasks(info) is not None:
    shape = "[tasks, " + shape[1:]
  if value.ndim != shape.count(",") + 1:
    raise PromptError(f"{source}: a {spec.get('method', 'prompt_tuning')} prompt is {shape}, got shape {value.shape}")
  return TrainedPrompt(value, spec, None, info)


def load_trained_prompt(source: str | Path, step: str | int = "best") -> tuple[np.ndarray, dict]:
  """(inference value, provenance incl. `prompt_spec`) of a workdir, a checkpoint step folder, or an export."""
  tp = load_prompt_source(source, step)
  return tp.value, dict(tp.info, prompt_spec=tp.spec)


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
  spec = meta.get("prompt_spec") or {"method": "prompt_tuning"}  # checkpoints before round 2: prompt tuning
  params = prompt["prompt"]
  value = np.asarray(from_spec(spec, params).inference_value(), np.float32)
  cfg = meta.get("config") or {}
  info = dict(base_model=meta.get("base_model"), base_architecture=meta.get("base_architecture"),
              source=str(ckdir / str(chosen)), step=chosen, metrics=meta.get("metrics"),
              tokenizer=cfg.get("model", {}).get("tokenizer"), prompt_config=cfg.get("prompt"), prompt_spec=spec,
              task=meta.get("task") or {"name": cfg.get("data", {}).get("task")})
  return TrainedPrompt(value, spec, params, info)


def peft_value(value: np.ndarray, peft: dict, where: Path) -> tuple[np.ndarray, dict]:
  """The inference value and spec of a PEFT adapter's `prompt_embeddings`, its adapter_config.json checked:
  PROMPT_TUNING / P_TUNING -> the [P, H] rows the input receives (a seq2seq [2P, H] tensor's second half is never
  read); PREFIX_TUNING -> the flat table [P, Y * 2 * K * D] as [P, Y, 2, K, D]."""
  kind = peft.get("peft_type")
  if kind not in PEFT_METHODS:
    raise PromptError(f"{where}: peft_type is {kind!r}; soft-prompt adapters are {', '.join(PEFT_METHODS)}")
  if not peft.get("task_type"):
    raise PromptError(f"{where}: adapter_config.json has no task_type (PEFT would silently ignore the prompt)")
  p = peft.get("num_virtual_tokens")
  if not isinstance(p, int) or p <= 0:
    raise PromptError(f"{where}: adapter_config.json num_virtual_tokens must be a positive integer, got {p!r}")
  if value.ndim != 2:
    raise PromptError(f"{where}: prompt_embeddings must be 2-D, got shape {value.shape}")
  if kind == "PREFIX_TUNING":
    return _peft_prefix(value, peft, where), {"method": "prefix_tuning", "prefix_projection": False}
  if peft.get("token_dim") not in (None, value.shape[1]):
    raise PromptError(f"{where}: token_dim {peft.get('token_dim')} does not match prompt_embeddings {value.shape}")
  if value.shape[0] < p or value.shape[0] % p:
    raise PromptError(f"{where}: prompt_embeddings has {value.shape[0]} rows for {p} virtual tokens")
  spec = {"method": PEFT_METHODS[kind]}
  if kind == "P_TUNING":
    spec.update({k: peft.get(k) for k in ("encoder_reparameterization_type", "encoder_hidden_size",
                                          "encoder_num_layers", "encoder_dropout")})
  return value[:p], spec


def _peft_prefix(value: np.ndarray, peft: dict, where: Path) -> np.ndarray:
  p, y, heads, t = (peft.get(k) for k in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"))
  if not all(isinstance(x, int) and x > 0 for x in (y, heads, t)) or t % heads:
    raise PromptError(f"{where}: a PREFIX_TUNING adapter_config.json needs positive num_layers, num_attention_heads "
                      f"and token_dim (a multiple of the heads), got {y}, {heads}, {t}")
  if value.shape != (p, y * 2 * t):
    raise PromptError(f"{where}: prompt_embeddings is {value.shape}, expected [num_virtual_tokens, num_layers * 2 * "
                      f"token_dim] = ({p}, {y * 2 * t})")
  # PEFT's get_prompt: view [P, 2Y, heads, head_dim], slot 2l + kv -> ours [P, Y, 2, heads, head_dim]
  return value.reshape(p, y, 2, heads, t // heads)


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
