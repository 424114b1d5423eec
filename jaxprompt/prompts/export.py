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

import datetime
import json
from pathlib import Path

import numpy as np

from jaxprompt.errors import ExportError
from jaxprompt.fileio import write_file_atomically, write_folder_atomically
from jaxprompt.models import hf
from jaxprompt.models.loading import load_model, load_tokenizer, save_pretrained
from jaxprompt.prompts.io import (PEFT_TASK_TYPES, PROVENANCE, load_prompt_bank, load_trained_prompt, split_task,
                                 task_slug)
from jaxprompt.version import __version__

# prompt.init -> PEFT's PromptTuningInit. class_labels is "sampled vocabulary, then the labels' embeddings" and
# file continues whatever init made that prompt: PEFT has no closer names. PEFT only reads this field when a
# prompt is created for training, never when an adapter is loaded.
PEFT_INIT = {"random_uniform": "RANDOM", "sampled_vocab": "SAMPLE_VOCAB", "class_labels": "SAMPLE_VOCAB",
             "text": "TEXT"}


# seq2seq: PEFT's EncoderDecoderCache path (2 submodules), the one that gives the decoder's self-attention the prefix
PEFT_PREFIX_SUBMODULES = {"seq2seq": 2, "causal": 1}


def _provenance(value: np.ndarray, info: dict, fmt: str) -> dict:
  spec = info.get("prompt_spec") or {"method": "prompt_tuning"}
  hidden = (info.get("base_architecture") or {}).get("hidden_size")
  if spec.get("method", "prompt_tuning") != "prefix_tuning":
    hidden = int(value.shape[1])
  return dict(format="jaxprompt-prompt/1", export_format=fmt, prompt_length=int(value.shape[0]), hidden_size=hidden,
              prompt_spec=spec, base_model=info.get("base_model"), base_architecture=info.get("base_architecture"),
              source=info.get("source"), step=info.get("step"), metrics=info.get("metrics"),
              tokenizer=info.get("tokenizer"), prompt_config=info.get("prompt_config"), task=info.get("task"),
              exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              jaxprompt_version=__version__)


def _peft_init(info: dict, base_path: str | None) -> dict:
  """PEFT's prompt_tuning_init fields for the init that actually made the prompt (RANDOM when unknown)."""
  pc = info.get("prompt_config") or {}
  init = PEFT_INIT.get(pc.get("init"), "RANDOM")
  if init == "TEXT" and pc.get("init_text"):
    tokenizer = info.get("tokenizer") or base_path
    return dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=pc["init_text"], tokenizer_name_or_path=tokenizer)
  return dict(prompt_tuning_init="SAMPLE_VOCAB" if init == "TEXT" else init, prompt_tuning_init_text=None,
              tokenizer_name_or_path=None)


def _method_fields(value: np.ndarray, spec: dict, arch: dict, kind: str, info: dict, base_path) -> dict:
  """PEFT's fields for each method: what its PromptEmbedding / PromptEncoder / PrefixEncoder is built from."""
  method = spec.get("method", "prompt_tuning")
  layers = dict(num_layers=arch.get("num_layers"), num_attention_heads=arch.get("num_attention_heads"))
  if method == "prompt_tuning":
    return dict(peft_type="PROMPT_TUNING", token_dim=int(value.shape[1]), num_transformer_submodules=1, **layers,
                **_peft_init(info, base_path))
  if method == "p_tuning":
    return dict(peft_type="P_TUNING", token_dim=int(value.shape[1]), num_transformer_submodules=1, **layers,
                **{k: spec.get(k) for k in ("encoder_reparameterization_type", "encoder_hidden_size",
                                            "encoder_num_layers", "encoder_dropout")})
  problem = (spec.get("slots") or {}).get("peft_problem")
  if problem:
    raise ExportError(f"PEFT cannot run this prefix: {problem} (jaxprompt trains and serves it; export it "
                      "--format numpy or safetensors instead)")
  p, y, _, heads, d = value.shape
  return dict(peft_type="PREFIX_TUNING", token_dim=heads * d, num_attention_heads=heads, num_layers=y,
              num_transformer_submodules=PEFT_PREFIX_SUBMODULES[kind],
              prefix_projection=bool(spec.get("prefix_projection")),
              encoder_hidden_size=spec.get("encoder_hidden_size") or heads * d, init_weights=None)


def peft_config(value: np.ndarray, info: dict, base_path: str | None) -> dict:
  arch = info.get("base_architecture") or {}
  kind = arch.get("kind")
  if kind not in PEFT_TASK_TYPES:
    raise ExportError("the prompt's base model kind is unknown (no provenance); cannot choose a PEFT task_type")
  base = info.get("base_model") or {}
  base_path = base_path if base_path is not None else base.get("path")
  spec = info.get("prompt_spec") or {"method": "prompt_tuning"}
  return {"task_type": PEFT_TASK_TYPES[kind], "num_virtual_tokens": int(value.shape[0]),
          **_method_fields(value, spec, arch, kind, info, base_path), "base_model_name_or_path": base_path,
          "revision": base.get("revision"), "inference_mode": True, "auto_mapping": None, "modules_to_save": None}


def peft_tensor(value: np.ndarray) -> np.ndarray:
  """`prompt_embeddings` as PEFT stores it: [P, H] input embeddings, or a prefix table flattened to
  [P, Y * 2 * K * D] (PEFT's view [P, 2Y, K, D], slot 2l + kv)."""
  return np.ascontiguousarray(value.reshape(value.shape[0], -1), np.float32)


EXTENSIONS = {"peft": "", "numpy": ".npy", "safetensors": ".safetensors"}  # a bank member's entry in OUT/
BANK_FILE = "bank.safetensors"


def export_prompt(source: str | Path, fmt: str, out: str | Path, *, step: str | int = "best",
                  with_base: bool = False, overwrite: bool = False) -> Path:
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
  value, info = load_trained_prompt(source, step)
  value = np.ascontiguousarray(value, np.float32)
  if with_base and fmt != "peft":
    raise ExportError("--with-base needs --format peft (it writes DIR/base beside the adapter)")
  if fmt == "numpy" and out.suffix != ".npy":
    raise ExportError(f"--format numpy writes a .npy file, got {out}")
  if fmt == "peft":
    peft_config(value, info, None)  # refuse before writing anything
    def write(tmp: Path):
      if with_base:
        write_base(info, tmp / "base")
      _write(value, info, fmt, tmp, str((out / "base").absolute()) if with_base else None)

    return write_folder_atomically(out, write, overwrite=overwrite)
  if fmt == "numpy":  # the provenance beside it first: a .npy is never left without its record
    write_file_atomically(out.with_suffix(".json"), lambda t: _write_json(t, _provenance(value, info, fmt)),
                          overwrite=overwrite)
  return write_file_atomically(out, lambda t: _write(value, info, fmt, t), overwrite=overwrite)


def _write(value: np.ndarray, info: dict, fmt: str, path: Path, base_path: str | None = None) -> None:
  """One prompt in format `fmt` at `path` (a folder for peft, a file otherwise; `base_path`: the base model a peft
  adapter names, when written beside it). A numpy export's provenance is the caller's."""
  prov = _provenance(value, info, fmt)
  if fmt == "peft":
    path.mkdir(exist_ok=True)
    _write_json(path / "adapter_config.json", peft_config(value, info, base_path))
    hf.save_safetensors({"prompt_embeddings": peft_tensor(value)}, path / "adapter_model.safetensors",
                        metadata={"format": "pt"})
    _write_json(path / PROVENANCE, prov)
  elif fmt == "numpy":
    with open(path, "wb") as f:
      np.save(f, value, allow_pickle=False)
  else:
    hf.save_safetensors({"prompt_embeddings": value}, path, metadata={"format": "pt", "jaxprompt": json.dumps(prov)})


def _write_json(path: Path, obj: dict) -> None:
  path.write_text(json.dumps(obj, indent=2))


def _export_bank(whole, bank: dict, fmt: str, out: Path, *, with_base: bool, overwrite: bool) -> Path:
  """A per-task run: OUT/<task> per task in `fmt`, plus OUT/bank.safetensors (and OUT/base with --with-base), one
  folder written atomically."""
  members = [(task_slug(name), np.ascontiguousarray(tp.value, np.float32), tp.info) for name, tp in bank.items()]
  if with_base and fmt != "peft":
    raise ExportError("--with-base needs --format peft (it writes DIR/base beside the adapters)")
  if fmt == "peft":
    for _, value, info in members:
      peft_config(value, info, None)  # refuse before writing anything

  def write(tmp: Path):
    if with_base:  # one copy of the base, named by every adapter
      write_base(whole.info, tmp / "base")
    for slug, value, info in members:
      _write(value, info, fmt, tmp / (slug + EXTENSIONS[fmt]), str((out / "base").absolute()) if with_base else None)
      if fmt == "numpy":
        _write_json(tmp / f"{slug}.json", _provenance(value, info, fmt))
    value, info = np.ascontiguousarray(whole.value, np.float32), dict(whole.info, prompt_spec=whole.spec)
    hf.save_safetensors({"prompt_embeddings": value}, tmp / BANK_FILE, metadata={
        "format": "pt", "jaxprompt": json.dumps(_provenance(value[0], info, "safetensors"))})

  return write_folder_atomically(out, write, overwrite=overwrite)


def write_base(info: dict, folder: Path) -> None:
  """The frozen base model (and tokenizer) as a HF folder PyTorch can load."""
  base = info.get("base_model") or {}
  if not base.get("path"):
    raise ExportError("the prompt has no recorded base model; cannot write --with-base")
  path = base["path"]
  model = load_model(path, revision=base.get("revision"))
  if model.identity.fingerprint != base.get("fingerprint"):
    raise ExportError(f"base model at {path} no longer matches the one the prompt was trained on "
                      f"(fingerprint {model.identity.fingerprint} != {base.get('fingerprint')})")
  tokenizer = load_tokenizer(info.get("tokenizer") or path)
  save_pretrained(model, folder, tokenizer=tokenizer)
