"""`load_model` / `save_pretrained` / `load_tokenizer`: the architecture registry and the public loaders."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxprompt.models import decoder
from jaxprompt.models import hf
from jaxprompt.models import t5


@dataclasses.dataclass(frozen=True)
class Architecture:
  config_from_hf: Callable[..., Any]  # (hf_config_dict, reader_keys) -> config
  model_cls: type
  weight_map: Callable[[Any], list[tuple[str, str, str]]]
  aliases: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()  # or config -> names

  def aliases_for(self, config) -> tuple[str, ...]:
    return tuple(self.aliases(config)) if callable(self.aliases) else tuple(self.aliases)


def _t5_config(hf_cfg: dict, keys: set[str]) -> t5.T5Config:
  return t5.T5Config.from_hf(hf_cfg, has_lm_head="lm_head.weight" in keys)


ARCHITECTURES: dict[str, Architecture] = {
    "t5": Architecture(_t5_config, t5.T5, t5.hf_weight_map, t5.HF_ALIASES),
    "mt5": Architecture(_t5_config, t5.T5, t5.hf_weight_map, t5.HF_ALIASES),
    **{name: Architecture(decoder.DecoderConfig.from_hf, decoder.Decoder, decoder.hf_weight_map, decoder.hf_aliases)
       for name in decoder.FAMILIES},
}


def _architecture(model_type: str | None, where: str) -> Architecture:
  if model_type not in ARCHITECTURES:
    raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
  return ARCHITECTURES[model_type]


def build_model(config, *, seed: int = 0, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "none"):
  """A randomly initialised model for `config` (a T5Config, ...)."""
  cls = next(a.model_cls for a in ARCHITECTURES.values() if a.model_cls.__name__ == _model_name(config))
  return cls(config, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, remat=remat)


def _model_name(config) -> str:
  return {"T5Config": "T5"}.get(type(config).__name__, type(config).__name__.replace("Config", ""))


BUILTIN = "builtin:quickstart"


def _builtin_folder() -> Path:
  from jaxprompt import quickstart

  return quickstart.ensure_base_model()


def load_model(path_or_hub_id: str | os.PathLike, dtype=None, mesh: Mesh | None = None, *, compute_dtype=None,
               remat: str = "none", revision: str | None = None, allow_pytorch_bin: bool = False):
  """Load a frozen base model.

  Args:
    path_or_hub_id: a local HF folder (config.json + safetensors), a llama.cpp `.gguf` file, a hub id
      when the hub is reachable, or "builtin:quickstart" (the tiny offline T5, built and cached on first use).
    dtype: parameter dtype (default float32; bfloat16 halves memory for frozen weights).
    mesh: place each parameter straight into its shards as `jaxprompt.sharding.RULES` says.
    compute_dtype: activation dtype (default: float32).
    remat: rematerialisation policy for the layer scan ("none", "full", "dots", "dots_no_batch").
    allow_pytorch_bin: accept a pickle-based pytorch_model.bin (loaded with weights_only=True).
  Returns the model; `model.identity` records where it came from (`hf.ModelIdentity`).
  """
  if str(path_or_hub_id) == BUILTIN:
    model = load_model(_builtin_folder(), dtype, mesh, compute_dtype=compute_dtype, remat=remat)
    model.identity = dataclasses.replace(model.identity, path=BUILTIN)
    return model
  if str(path_or_hub_id).endswith(".gguf"):
    from jaxprompt.models import gguf

    return gguf.load_gguf(path_or_hub_id, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype, remat=remat)
  folder = hf.resolve_model_dir(str(path_or_hub_id), revision, allow_pytorch_bin=allow_pytorch_bin)
  hf_cfg = json.loads((folder / "config.json").read_text())
  reader = hf.CheckpointReader(folder, allow_pytorch_bin=allow_pytorch_bin)
  arch = _architecture(hf_cfg.get("model_type"), str(folder / "config.json"))
  config = arch.config_from_hf(hf_cfg, set(reader.keys()))
  param_dtype = jnp.dtype(dtype or jnp.float32)
  compute = jnp.dtype(compute_dtype or jnp.float32)
  abstract = nnx.eval_shape(lambda: arch.model_cls(config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                                   dtype=compute, remat=remat))
  model = hf.load_weights(abstract, arch.weight_map(config), reader, mesh=mesh, param_dtype=param_dtype,
                          aliases=arch.aliases_for(config), source=str(folder))
  model.identity = hf.ModelIdentity(path=str(path_or_hub_id), revision=revision,
                                    model_type=hf_cfg.get("model_type"), fingerprint=hf.config_fingerprint(hf_cfg))
  return model


def save_pretrained(model, folder: str | os.PathLike, *, tokenizer=None, overwrite: bool = False, dtype=None) -> Path:
  """Write `model` as a HF folder (config.json + model.safetensors [+ tokenizer]) that transformers loads."""
  config = model.config
  arch = _architecture(config.model_type, "save_pretrained")
  tensors = hf.export_weights(model, arch.weight_map(config), dtype=dtype or jnp.float32)

  def write(tmp: Path):
    hf.save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))

  return hf.write_folder_atomically(folder, write, overwrite=overwrite)


def load_tokenizer(path_or_hub_id: str | os.PathLike):
  """A transformers tokenizer from a local folder / tokenizer file / `.gguf` file, "builtin:quickstart", or a hub
  id when reachable."""
  from transformers import AutoTokenizer

  if str(path_or_hub_id) == BUILTIN:
    path_or_hub_id = _builtin_folder()
  p = Path(path_or_hub_id).expanduser()
  if p.suffix == ".gguf":
    from jaxprompt.models import gguf

    return gguf.load_gguf_tokenizer(p)
  try:
    return AutoTokenizer.from_pretrained(str(p) if p.exists() else str(path_or_hub_id))
  except OSError as e:
    raise FileNotFoundError(f"cannot load a tokenizer from {str(path_or_hub_id)!r}: {str(e).splitlines()[0]}") from None
