"""`load_model` / `save_pretrained` / `load_tokenizer`: the architecture registry, the registry of named model
sources, and the public loaders.

A named source ("builtin:quickstart") is a folder that some other module knows how to make; it registers itself
here (`register_source`), so the loaders never import what provides them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxprompt.errors import MissingPathError, ModelError
from jaxprompt.fileio import write_folder_atomically
from jaxprompt.models import deberta, decoder, encoder, hf, t5
from jaxprompt.models.interface import ModelOptions


@dataclasses.dataclass(frozen=True)
class Architecture:
  config_from_hf: Callable[..., Any]  # (hf_config_dict, reader_keys) -> config
  model_cls: type
  weight_map: Callable[[Any], list[tuple[str, str, str]]]
  aliases: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()  # or config -> names
  tied: Callable[[Any], tuple[tuple[str, ...], ...]] | None = None  # config -> groups of names of one tensor

  def aliases_for(self, config) -> tuple[str, ...]:
    return tuple(self.aliases(config)) if callable(self.aliases) else tuple(self.aliases)

  def tied_for(self, config) -> tuple[tuple[str, ...], ...]:
    return tuple(self.tied(config)) if self.tied is not None else ()


def _t5_config(hf_cfg: dict, keys: set[str]) -> t5.T5Config:
  return t5.T5Config.from_hf(hf_cfg, has_lm_head="lm_head.weight" in keys)


ARCHITECTURES: dict[str, Architecture] = {
  "t5": Architecture(_t5_config, t5.T5, t5.hf_weight_map, t5.HF_ALIASES),
  "mt5": Architecture(_t5_config, t5.T5, t5.hf_weight_map, t5.HF_ALIASES),
  **{
    name: Architecture(
      decoder.DecoderConfig.from_hf, decoder.Decoder, decoder.hf_weight_map, decoder.hf_aliases, decoder.hf_tied
    )
    for name in decoder.FAMILIES
  },
  **{
    name: Architecture(
      encoder.EncoderConfig.from_hf, encoder.Encoder, encoder.hf_weight_map, encoder.hf_aliases, encoder.hf_tied
    )
    for name in encoder.FAMILIES
  },
  "deberta-v2": Architecture(
    deberta.DebertaV2Config.from_hf, deberta.DebertaV2, deberta.hf_weight_map, deberta.hf_aliases
  ),
}


def architecture_for(model_type: str | None, where: str) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ModelError(f"{where}: model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[model_type]


def build_model(
  config,
  *,
  seed: int = 0,
  param_dtype=jnp.float32,
  dtype=jnp.float32,
  options: ModelOptions | None = None,
  identity: hf.ModelIdentity | None = None,
  **option_fields,
):
  """A randomly initialised model for `config` (a T5Config, a DecoderConfig, an EncoderConfig). `options`
  (`ModelOptions`), or its fields as keywords (layer_loop=, attention=, remat=, share_prompt=), say how it runs."""
  cls = architecture_for(config.model_type, type(config).__name__).model_cls
  options = dataclasses.replace(options or ModelOptions(), **option_fields)
  return cls(config, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, options=options, identity=identity)


def config_from_dict(hf_cfg: dict):
  """The architecture config of a HF config.json dict alone, with no checkpoint to look at: the head is untied
  exactly when the config says so."""
  arch = architecture_for(hf_cfg.get("model_type"), "config.json")
  return arch.config_from_hf(hf_cfg, set() if hf_cfg.get("tie_word_embeddings", True) else {"lm_head.weight"})


def abstract_model(
  config,
  *,
  param_dtype=jnp.float32,
  dtype=jnp.float32,
  options: ModelOptions | None = None,
  identity: hf.ModelIdentity | None = None,
  **option_fields,
):
  """The model for `config` as shapes only (nnx.eval_shape): nothing is allocated."""
  return nnx.eval_shape(
    lambda: build_model(
      config, param_dtype=param_dtype, dtype=dtype, options=options, identity=identity, **option_fields
    )
  )


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A named model that jaxprompt itself provides: `folder()` makes (or finds) it as a HF folder, `hf_config()`
  gives its config.json without making it (for `plan`)."""

  folder: Callable[[], Path]
  hf_config: Callable[[], dict]


SOURCES: dict[str, ModelSource] = {}


def register_source(name: str, source: ModelSource) -> None:
  SOURCES[name] = source


def loadable_path(path: str) -> str:
  """Where PyTorch / transformers can load the model `path` names: a registered source's folder, a local folder made
  absolute (a relative one means nothing from elsewhere); anything else (a hub id) as it is."""
  if path in SOURCES:
    return str(Path(SOURCES[path].folder()).absolute())
  local = Path(path).expanduser()
  return str(local.absolute()) if local.exists() else path


def load_model(
  path_or_hub_id: str | os.PathLike,
  dtype=None,
  mesh: Mesh | None = None,
  *,
  compute_dtype=None,
  remat: str = "none",
  layer_loop: str = "auto",
  attention: str = "auto",
  share_prompt: bool = True,
  dropout: float | None = None,
  revision: str | None = None,
  allow_pytorch_bin: bool = False,
):
  """Load a frozen base model.

  Args:
    path_or_hub_id: a local HF folder (config.json + safetensors), a llama.cpp `.gguf` file, a hub id
      when the hub is reachable, or a registered source such as "builtin:quickstart" (the tiny offline T5,
      built and cached on first use).
    dtype: parameter dtype (default float32; bfloat16 halves memory for frozen weights).
    mesh: place each parameter straight into its shards as `jaxprompt.sharding.RULES` says.
    compute_dtype: activation dtype (default: float32).
    remat, layer_loop, attention, share_prompt: how the model runs (`models.interface.ModelOptions`).
    dropout: the model's dropout rate in training (None: its config's).
    allow_pytorch_bin: accept a pickle-based pytorch_model.bin (loaded with weights_only=True).
  Returns the model; `model.identity` records where it came from (`hf.ModelIdentity`).
  """
  options = ModelOptions(layer_loop=layer_loop, attention=attention, remat=remat, share_prompt=share_prompt)
  name = str(path_or_hub_id)
  if name in SOURCES:
    path_or_hub_id = SOURCES[name].folder()
  if str(path_or_hub_id).endswith(".gguf"):
    from jaxprompt.models import gguf

    ckpt = gguf.open_checkpoint(path_or_hub_id)
  else:
    ckpt = _hf_checkpoint(str(path_or_hub_id), revision, allow_pytorch_bin)
  identity = dataclasses.replace(ckpt.identity, path=name) if name in SOURCES else ckpt.identity
  config = ckpt.config if dropout is None else dataclasses.replace(ckpt.config, dropout_rate=dropout)
  param_dtype = jnp.dtype(dtype or jnp.float32)
  abstract = abstract_model(
    config, param_dtype=param_dtype, dtype=jnp.dtype(compute_dtype or jnp.float32), options=options, identity=identity
  )
  return hf.load_weights(
    abstract, ckpt.weight_map, ckpt.reader, mesh=mesh, param_dtype=param_dtype, aliases=ckpt.aliases, source=ckpt.source
  )


def _hf_checkpoint(path_or_hub_id: str, revision: str | None, allow_pytorch_bin: bool) -> hf.Checkpoint:
  folder = hf.resolve_model_dir(path_or_hub_id, revision, allow_pytorch_bin=allow_pytorch_bin)
  hf_cfg = json.loads((folder / "config.json").read_text())
  reader = hf.CheckpointReader(folder, allow_pytorch_bin=allow_pytorch_bin)
  arch = architecture_for(hf_cfg.get("model_type"), str(folder / "config.json"))
  config = arch.config_from_hf(hf_cfg, set(reader.keys()))
  reader = hf.TiedNames(reader, arch.tied_for(config), str(folder))  # a tied head stored under either name
  identity = hf.ModelIdentity(
    path=path_or_hub_id,
    revision=revision,
    model_type=hf_cfg.get("model_type"),
    fingerprint=hf.config_fingerprint(hf_cfg),
  )
  return hf.Checkpoint(reader, config, arch.weight_map(config), arch.aliases_for(config), identity, str(folder))


def architecture_summary(base) -> hf.Architecture:
  """What an exported prompt must say about its base (PEFT's adapter_config fields among them)."""
  c = base.config

  def first(*names):
    return next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)

  return hf.Architecture(
    kind=base.kind,
    model_type=c.model_type,
    hidden_size=base.hidden_size,
    vocab_size=c.vocab_size,
    num_layers=first("num_layers", "num_hidden_layers", "n_layer"),
    num_attention_heads=first("num_heads", "num_attention_heads", "n_head"),
  )


def save_pretrained(model, folder: str | os.PathLike, *, tokenizer=None, overwrite: bool = False, dtype=None) -> Path:
  """Write `model` as a HF folder (config.json + model.safetensors [+ tokenizer]) that transformers loads."""
  config = model.config
  arch = architecture_for(config.model_type, "save_pretrained")
  tensors = hf.export_weights(model, arch.weight_map(config), dtype=dtype or jnp.float32)

  def write(tmp: Path):
    hf.save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))

  return write_folder_atomically(folder, write, overwrite=overwrite)


def load_tokenizer(path_or_hub_id: str | os.PathLike):
  """A transformers tokenizer from a local folder / tokenizer file / `.gguf` file, "builtin:quickstart", or a hub
  id when reachable."""
  from transformers import AutoTokenizer

  if str(path_or_hub_id) in SOURCES:
    path_or_hub_id = SOURCES[str(path_or_hub_id)].folder()
  p = Path(path_or_hub_id).expanduser()
  if p.suffix == ".gguf":
    from jaxprompt.models import gguf

    return gguf.load_gguf_tokenizer(p)
  if p.is_dir() and _wordpiece_only(p):
    return _wordpiece_tokenizer(p)
  try:
    return AutoTokenizer.from_pretrained(str(p) if p.exists() else str(path_or_hub_id))
  except OSError as e:
    raise MissingPathError(f"cannot load a tokenizer from {str(path_or_hub_id)!r}: {str(e).splitlines()[0]}") from None


def _wordpiece_only(folder: Path) -> bool:
  """A folder holding a WordPiece `vocab.txt` (BERT's format) and no tokenizer config: AutoTokenizer cannot tell
  what it is."""
  return (folder / "vocab.txt").exists() and not any(
    (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "config.json")
  )


def _wordpiece_tokenizer(folder: Path):
  """BERT's tokenizer over a bare vocab.txt, lower-casing exactly when no word starts with a capital A-Z (uncased
  BERT vocabularies have none; cased ones have thousands)."""
  from transformers import BertTokenizer

  words = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
  cased = any("A" <= w[:1] <= "Z" for w in words)
  return BertTokenizer.from_pretrained(str(folder), do_lower_case=not cased)
