"""HF checkpoints <-> NNX models: safetensors I/O, strict declarative weight maps, sharded loading.

A weight map is a list of `(our_path, hf_key, transform)`. `hf_key` may contain `{i}`: that entry fills
the stacked `layers` axis of our parameter, one HF tensor per layer. Loading is strict: every HF
tensor must be consumed by the map (or be a declared alias), every mapped tensor must exist with the
expected shape, and every parameter of the model must be filled; anything else is an error naming the
tensor. A name that safetensors metadata declares as an alias of a stored tensor (`{dropped: kept}`, how
safetensors saves a shared tensor once) reads that tensor.

Safetensors files are memory-mapped and every transform is a *view* (reshape/transpose), so with a
mesh each device's shard is read straight from disk: the host never holds an unsharded model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxprompt import sharding as shd
from jaxprompt.errors import MissingPathError, WeightError

# -- safetensors (memory-mapped) -----------------------------------------------------------------

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class SafetensorsFile:
  """One .safetensors file, memory-mapped; `get` returns a read-only view (nothing is copied)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    with open(self.path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightError(f"{self.path}: not a safetensors file (bad header: {e})") from None
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._offset = 8 + n
    self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if os.path.getsize(self.path) > self._offset else None

  def __iter__(self):
    """The tensor names (as `keys()`)."""
    return iter(self.keys())

  def __contains__(self, key: str) -> bool:
    return key in self.keys()

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._header[key]["shape"])

  def get(self, key: str) -> np.ndarray:
    info = self._header[key]
    if info["dtype"] not in _ST_DTYPES:
      raise WeightError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if math.prod(shape) == 0:
      return np.zeros(shape, dtype)
    raw = self._mm[self._offset + start : self._offset + end]
    return raw.view(dtype).reshape(shape)


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
  """Write a safetensors file (bfloat16 supported via ml_dtypes)."""
  rev = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header, offset, blobs = {}, 0, []
  for k in sorted(tensors):
    a = np.ascontiguousarray(tensors[k])
    if a.dtype not in rev:
      raise WeightError(f"tensor {k!r}: dtype {a.dtype} cannot be stored in safetensors")
    b = a.tobytes()
    header[k] = {"dtype": rev[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
    offset += len(b)
    blobs.append(b)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  h = json.dumps(header, separators=(",", ":")).encode()
  h += b" " * (-len(h) % 8)
  with open(path, "wb") as f:
    f.write(len(h).to_bytes(8, "little"))
    f.write(h)
    for b in blobs:
      f.write(b)


class CheckpointReader:
  """The tensors of a HF model folder: model.safetensors, a sharded index, or (opt-in) pytorch_model.bin."""

  def __init__(self, folder: str | os.PathLike, *, allow_pytorch_bin: bool = False):
    folder = Path(folder)
    self.folder = folder
    self._where: dict[str, SafetensorsFile] = {}
    self._torch: dict[str, np.ndarray] | None = None
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
      files: dict[str, SafetensorsFile] = {}
      for key, fname in json.loads(index.read_text())["weight_map"].items():
        if fname not in files:
          if not (folder / fname).exists():
            raise WeightError(f"{index}: shard {fname} (holding {key!r}) is missing")
          files[fname] = SafetensorsFile(folder / fname)
        self._where[key] = files[fname]
    elif single.exists():
      f = SafetensorsFile(single)
      self._where = {k: f for k in f}
    elif (folder / "pytorch_model.bin").exists():
      if not allow_pytorch_bin:
        raise WeightError(
          f"{folder} has only pytorch_model.bin (a pickle); convert it to safetensors, or opt in with "
          "allow_pytorch_bin=True (loaded with torch.load(weights_only=True))"
        )
      import torch  # only for this explicit opt-in

      sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
      self._torch = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}
    else:
      raise WeightError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    self._stored_as: dict[str, str] = self._metadata_aliases()  # a declared name -> the stored tensor it reads
    self._where.update({name: self._where[target] for name, target in self._stored_as.items()})

  def _metadata_aliases(self) -> dict[str, str]:
    """Safetensors stores a shared tensor once and records each dropped name in its metadata as
    `{dropped: kept}` (`safetensors.torch.save_model`): the dropped name reads the kept tensor. An entry whose
    value is shaped like a tensor name of this checkpoint but is not stored is a broken alias."""
    stored = set(self._where)
    suffixes = {k.rsplit(".", 1)[-1] for k in stored}
    out: dict[str, str] = {}
    for f in dict.fromkeys(self._where.values()):
      for name, target in f.metadata.items():
        if name in stored or not isinstance(target, str):
          continue
        if target in stored:
          out[name] = target
        elif "." in name and "." in target and target.rsplit(".", 1)[-1] in suffixes:
          raise WeightError(
            f"{f.path}: safetensors metadata aliases tensor {name!r} to {target!r}, which the checkpoint does not hold"
          )
    return out

  def keys(self) -> list[str]:
    return list(self._torch) if self._torch is not None else list(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    if self._torch is not None:
      return tuple(self._torch[key].shape)
    return self._where[key].shape(self._stored_as.get(key, key))

  def get(self, key: str) -> np.ndarray:
    return self._torch[key] if self._torch is not None else self._where[key].get(self._stored_as.get(key, key))


class TiedNames:
  """A reader in which each group of names is one tensor (a tied head stored as the embedding, as the head, or
  both): every name of a group reads the tensor stored under any of them. A group stored under two names must
  hold one value there, else loading stops naming both."""

  def __init__(self, reader, groups: Iterable[tuple[str, ...]], source: str):
    self._reader = reader
    self._to: dict[str, str] = {}
    available = set(reader.keys())
    for group in groups:
      stored = [n for n in group if n in available]
      if not stored:
        continue
      for other in stored[1:]:
        if not _same_tensor(reader, stored[0], other):
          raise WeightError(
            f"{source}: tied tensors {stored[0]!r} and {other!r} are both stored and hold "
            "different values (one tensor is expected under both names)"
          )
      self._to.update({n: stored[0] for n in group})

  def keys(self) -> list[str]:
    return list(dict.fromkeys([*self._reader.keys(), *self._to]))

  def shape(self, key: str) -> tuple[int, ...]:
    return self._reader.shape(self._to.get(key, key))

  def get(self, key: str) -> np.ndarray:
    return self._reader.get(self._to.get(key, key))


def _same_tensor(reader, a: str, b: str, rows: int = 4096) -> bool:
  """Do two stored tensors hold the same shape and values (compared a block of rows at a time)?"""
  if tuple(reader.shape(a)) != tuple(reader.shape(b)):
    return False
  x, y = reader.get(a), reader.get(b)
  if x.ndim == 0:
    return bool(np.array_equal(x, y))
  return all(np.array_equal(x[i : i + rows], y[i : i + rows]) for i in range(0, x.shape[0], rows))


# -- transforms: HF layout -> ours, as views ------------------------------------------------------
# Each: (hf_shape(our_shape), to_ours(hf_view, our_shape) -> view, to_hf(ours) -> array)


def _linear(k: int):
  """torch Linear weight [out, in] -> ours [in dims (k of them)..., out dims...]."""

  def hf_shape(s):
    return (math.prod(s[k:]), math.prod(s[:k]))

  def to_ours(w, s):
    n = len(s)
    return w.reshape(tuple(s[k:]) + tuple(s[:k])).transpose(tuple(range(n - k, n)) + tuple(range(n - k)))

  def to_hf(a):
    return np.ascontiguousarray(a.reshape(math.prod(a.shape[:k]), -1).T)

  return hf_shape, to_ours, to_hf


def _copy_hf_shape(s):
  return tuple(s)


TRANSFORMS: dict[str, tuple[Callable, Callable, Callable]] = {
  "copy": (_copy_hf_shape, lambda w, s: w.reshape(s), lambda a: np.asarray(a)),
  "flat": (lambda s: (math.prod(s),), lambda w, s: w.reshape(s), lambda a: np.asarray(a).reshape(-1)),
  "linear": _linear(1),
  "linear_out": _linear(2),
}


# Transforms that read one part of a fused HF tensor (GPT-2's c_attn holds q|k|v): several map entries share
# the HF key, and export concatenates their `to_hf` pieces, in map order, along this axis.
FUSE_AXES: dict[str, int] = {}


def register_transform(
  name: str, hf_shape: Callable, to_ours: Callable, to_hf: Callable, *, fuse_axis: int | None = None
) -> None:
  TRANSFORMS[name] = (hf_shape, to_ours, to_hf)
  if fuse_axis is not None:
    FUSE_AXES[name] = fuse_axis


# -- strict loading ----------------------------------------------------------------------------


def _path(p: str) -> tuple[str, ...]:
  return tuple(p.split("."))


def load_weights(
  abstract: nnx.Module,
  weight_map: list[tuple[str, str, str]],
  reader: CheckpointReader,
  *,
  mesh: Mesh | None = None,
  param_dtype=jnp.float32,
  aliases: Iterable[str] = (),
  source: str = "checkpoint",
) -> nnx.Module:
  """Fill an abstract model (from nnx.eval_shape) with tensors from `reader`, strictly."""
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  available = set(reader.keys())
  consumed: set[str] = set()
  filled: dict[tuple, jax.Array] = {}
  for ours, hf_key, tname in weight_map:
    path = _path(ours)
    if path not in flat:
      raise RuntimeError(f"internal: weight map names {ours!r}, which the model does not have")
    var = flat[path]
    shape = tuple(var.get_value().shape)
    hf_shape, to_ours, _ = TRANSFORMS[tname]
    stacked = "{i}" in hf_key
    layer_shape = shape[1:] if stacked else shape
    keys = [hf_key.format(i=i) for i in range(shape[0])] if stacked else [hf_key]
    views = []
    for key in keys:
      if key not in available:
        raise WeightError(f"{source}: missing tensor {key!r} (needed for {ours}, shape {hf_shape(layer_shape)})")
      got = reader.shape(key)
      want = hf_shape(layer_shape)
      if tuple(got) != tuple(want):
        raise WeightError(f"{source}: tensor {key!r} has shape {tuple(got)}, expected {tuple(want)}")
      views.append(to_ours(reader.get(key), layer_shape))
      consumed.add(key)
    if mesh is not None:
      sharding = NamedSharding(mesh, shd.logical_to_spec(shd.variable_axes(var), shape, mesh))
    else:
      sharding = SingleDeviceSharding(jax.local_devices()[0])

    def callback(index, views=views, stacked=stacked):
      if stacked:
        layers = range(*index[0].indices(len(views)))
        out = np.stack([np.asarray(views[i][index[1:]]) for i in layers])
      else:
        out = np.asarray(views[0][index])
      return out.astype(param_dtype, copy=False)

    filled[path] = jax.make_array_from_callback(shape, sharding, callback)
  unexpected = sorted(available - consumed - set(aliases))
  if unexpected:
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise WeightError(f"{source}: unexpected tensor {unexpected[0]!r}{more}: the model has no place for it")
  unfilled = sorted(".".join(map(str, p)) for p in flat if p not in filled)
  if unfilled:
    raise RuntimeError(f"internal: parameters not covered by the weight map: {unfilled}")
  for path, var in flat.items():
    var.set_value(filled[path])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def export_weights(
  model: nnx.Module, weight_map: list[tuple[str, str, str]], dtype=np.float32
) -> dict[str, np.ndarray]:
  """The inverse map: our parameters -> HF tensors (gathered to the host)."""
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  pieces: dict[str, list[tuple[str, np.ndarray]]] = {}
  for ours, hf_key, tname in weight_map:
    a = np.asarray(jax.device_get(flat[_path(ours)].get_value()), dtype=np.float32)
    to_hf = TRANSFORMS[tname][2]
    if "{i}" in hf_key:
      for i in range(a.shape[0]):
        pieces.setdefault(hf_key.format(i=i), []).append((tname, to_hf(a[i])))
    else:
      pieces.setdefault(hf_key, []).append((tname, to_hf(a)))
  out: dict[str, np.ndarray] = {}
  for key, parts in pieces.items():
    if len(parts) == 1 and parts[0][0] not in FUSE_AXES:
      out[key] = parts[0][1].astype(dtype)
      continue
    axes = {FUSE_AXES.get(t) for t, _ in parts}
    if None in axes or len(axes) != 1:
      raise RuntimeError(f"internal: HF tensor {key!r} is written by several map entries that are not one fused group")
    out[key] = np.concatenate([v for _, v in parts], axis=axes.pop()).astype(dtype)
  return out


# -- folders, identity --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
  """What a soft prompt was trained against; travels with checkpoints and exports."""

  path: str
  revision: str | None
  model_type: str
  fingerprint: str  # sha256 of the canonical architecture config (first 16 hex digits)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelIdentity":
    """As `to_dict` wrote it; a field a hand-written record leaves out is None (unknown)."""
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What an exported prompt says about its base's shape (`models.loading.architecture_summary`; PEFT's
  adapter_config fields among them). None: not recorded."""

  kind: str | None = None  # seq2seq | causal | encoder
  model_type: str | None = None
  hidden_size: int | None = None
  vocab_size: int | None = None
  num_layers: int | None = None
  num_attention_heads: int | None = None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Architecture":
    return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Everything needed to fill a model from a file: tensors, the architecture config, the strict weight map,
  tensors to consume unread, and what the model will say about where it came from."""

  reader: "CheckpointReader | Any"  # keys() / shape(key) / get(key)
  config: Any
  weight_map: list[tuple[str, str, str]]
  aliases: tuple[str, ...]
  identity: ModelIdentity
  source: str


def config_fingerprint(hf_config: dict) -> str:
  ignore = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "use_cache"}
  canon = json.dumps({k: v for k, v in sorted(hf_config.items()) if k not in ignore}, sort_keys=True)
  return hashlib.sha256(canon.encode()).hexdigest()[:16]


def resolve_model_dir(path_or_id: str, revision: str | None = None, *, allow_pytorch_bin: bool = False) -> Path:
  """A local folder as is; otherwise a hub id, downloaded (safetensors + config + tokenizer only).

  With `allow_pytorch_bin`, a hub repo without safetensors (e.g. google/t5-*-lm-adapt) also gets its
  pytorch_model.bin; it is downloaded only when the repo has no safetensors.
  """
  p = Path(path_or_id).expanduser()
  if p.exists():
    if not p.is_dir():
      raise MissingPathError(f"model path {path_or_id!r} is a file, expected a HF model folder (or a .gguf file)")
    if not (p / "config.json").exists():
      raise MissingPathError(f"model folder {path_or_id!r} has no config.json")
    return p
  if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or os.sep + os.sep in path_or_id:
    raise MissingPathError(f"model path {path_or_id!r} does not exist")
  patterns = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "spiece.model",
    "special_tokens_map.json",
    "generation_config.json",
    "*.model",
  ]
  try:
    from huggingface_hub import snapshot_download

    local = snapshot_download(path_or_id, revision=revision, allow_patterns=patterns)
    if allow_pytorch_bin and not any(Path(local).glob("*.safetensors")):
      local = snapshot_download(path_or_id, revision=revision, allow_patterns=patterns + ["pytorch_model.bin"])
  except Exception as e:  # offline, unknown id, gated repo ...
    raise MissingPathError(
      f"model {path_or_id!r} is neither a local folder nor downloadable from the hub "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    ) from None
  return Path(local)
