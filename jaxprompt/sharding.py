"""Meshes and THE logical-axis rules table.

Models name logical axes only (`out_sharding` metadata on every `nnx.Param`); this table is the one
place that says how those names map onto the mesh axes `data`, `fsdp` and `model`. A dimension that
the mapped mesh axes do not divide is replicated instead (logged once), so odd vocabularies or
few key/value heads never make a mesh unusable.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axis (or axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv_heads", "model"),
  ("kv", None),
  ("vocab", "model"),
  ("layers", None),
  ("relpos", None),
  ("positions", None),
  ("prompts", None),
  ("prompt", None),
  ("prompt_embed", None),
)
_RULES = dict(RULES)


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, model) mesh with Auto axis types (JAX 0.10 defaults to Explicit).

  Use -1 for at most one axis to take all remaining devices.
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} model={model}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if len(devices) % rest:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of size {rest}")
    sizes[sizes.index(-1)] = len(devices) // rest
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x model={sizes[2]} needs {math.prod(sizes)} devices, "
      f"but {len(devices)} are available"
    )
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_sizes(spec: str) -> dict[str, int] | None:
  """A --mesh flag's `data=N,fsdp=N,model=N` (the config's `mesh` section; axes left out are 1, at most one -1)
  as a dict of sizes; None when it is not of that form. `jaxprompt plan` and `jaxprompt serve` take it."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in spec.split(","):
    k, _, v = part.strip().partition("=")
    if k not in sizes or not v.strip().lstrip("-").isdigit():
      return None
    sizes[k] = int(v)
  return sizes


def _mesh_axes_for(logical: str | None) -> tuple[str, ...]:
  if logical is None:
    return ()
  if logical not in _RULES:
    raise KeyError(f"logical axis {logical!r} is not in jaxprompt.sharding.RULES")
  target = _RULES[logical]
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec for `shape` on `mesh`, following RULES."""
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape, strict=True):
    chosen = [a for a in _mesh_axes_for(name) if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
    size = math.prod(mesh.shape[a] for a in chosen)
    if chosen and dim % size:
      log.info("dimension %s=%d is not divisible by mesh axes %s (size %d): replicated", name, dim, chosen, size)
      chosen = []
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*out)


def variable_axes(var: nnx.Variable) -> tuple[str | None, ...]:
  axes = var.get_metadata().get("out_sharding")
  shape = np.shape(var.get_value()) if not hasattr(var.get_value(), "shape") else var.get_value().shape
  if axes is None:
    return (None,) * len(shape)
  return tuple(axes)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A tree like `state` with a NamedSharding per variable (from its logical axes)."""

  def one(var):
    value = var.get_value()
    return NamedSharding(mesh, logical_to_spec(variable_axes(var), value.shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh) -> None:
  """Place every variable of `module` on `mesh` as the rules table says (in place)."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh)
  placed = jax.tree.map(
    lambda v, s: jax.device_put(v.get_value(), s), state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  nnx.update(module, placed)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch-major arrays: batch over (data, fsdp), other dims replicated."""
  return NamedSharding(
    mesh, PartitionSpec(tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None, *([None] * (ndim - 1)))
  )


def device_batch(mesh: Mesh, local):
  """This host's rows of a global batch (a pytree of numpy arrays) -> arrays sharded over (data, fsdp) across
  all hosts."""
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v), local)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def per_device_bytes(tree: Any) -> int:
  """The largest number of bytes any one device holds of the arrays in `tree` (as they are sharded)."""
  held: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      held[s.device] = held.get(s.device, 0) + s.data.nbytes
  return max(held.values(), default=0)


def device_memory_bytes() -> int | None:
  """A local device's memory (bytes_limit); None where the backend does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def check_weights_fit(tree: Any, mesh: Mesh, *, limit: int | None = None, fraction: float = 0.5) -> str | None:
  """A warning (also logged) when the frozen weights alone take more than `fraction` of a device's memory:
  activations, the optimizer and XLA's temporaries need the rest. None when they fit or the limit is unknown."""
  limit = device_memory_bytes() if limit is None else limit
  if not limit:
    return None
  held = per_device_bytes(tree)
  if held <= fraction * limit:
    return None
  msg = (
    f"the frozen weights take {held / 2**30:.2f} GiB per device, {held / limit:.0%} of its "
    f"{limit / 2**30:.1f} GiB (mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} "
    f"model={mesh.shape['model']}): shard them more (raise mesh.fsdp or mesh.model), use "
    "model.dtype=bfloat16, or check the fit first with `jaxprompt plan`"
  )
  log.warning(msg)
  return msg
