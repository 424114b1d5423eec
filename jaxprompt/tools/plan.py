"""`jaxprompt plan`: compile the train step ahead of time on abstract shapes — no weights loaded, simulated
devices — and report per-device memory (arguments, temporaries, total) and FLOPs per step for candidate
meshes, so a user knows before renting a pod whether a model fits."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprompt import sharding as shd
from jaxprompt.errors import UsageError
from jaxprompt.models.hf import resolve_model_dir
from jaxprompt.models.known import KNOWN_CONFIGS
from jaxprompt.models.loading import SOURCES, abstract_model, build_model, config_from_dict
from jaxprompt.prompts import PromptedModel, PromptParam, methods, registry
from jaxprompt.tools import costs
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.step import make_train_step

# Per-device memory of common accelerators (GiB) and their device counts by slice name.
TOPOLOGIES: dict[str, tuple[int, float]] = {
  "v2-8": (8, 8),
  "v3-8": (8, 16),
  "v3-32": (32, 16),
  "v4-8": (4, 32),
  "v4-32": (16, 32),
  "v5e-8": (8, 16),
  "v5litepod-8": (8, 16),
  "v5p-8": (4, 95),
  "v6e-8": (8, 32),
  "a100-40gb-8": (8, 40),
  "a100-80gb-8": (8, 80),
  "h100-8": (8, 80),
  "h200-8": (8, 141),
}
GiB = 1024**3


@dataclasses.dataclass
class PlanRow:
  mesh: dict
  remat: str
  argument_gib: float
  temp_gib: float
  output_gib: float
  total_gib: float
  flops_per_device: float
  compile_seconds: float
  fits: bool | None = None

  def line(self) -> str:
    m = f"data={self.mesh['data']},fsdp={self.mesh['fsdp']},model={self.mesh['model']}"
    fits = "" if self.fits is None else ("  fits" if self.fits else "  too big")
    return (
      f"{m:<26} remat={self.remat:<5} args {_bytes(self.argument_gib)}  temp {_bytes(self.temp_gib)}  "
      f"total {_bytes(self.total_gib)}  {_flops(self.flops_per_device)}/device/step{fits}"
    )


def _bytes(gib: float) -> str:
  """A size in the unit that shows it (a small model's megabytes are not 0.00 GiB)."""
  scale, unit = next(((k, u) for k, u in ((1, "GiB"), (1024, "MiB")) if gib * k >= 1), (1024**2, "KiB"))
  return f"{gib * scale:7.2f} {unit}"


def _flops(flops: float) -> str:
  scale, unit = next(((k, u) for k, u in ((1e12, "TFLOP"), (1e9, "GFLOP")) if flops >= k), (1e6, "MFLOP"))
  return f"{flops / scale:8.2f} {unit}"


def hf_config_for(path: str) -> dict:
  """config.json of a local folder / GGUF-free hub id, a registered source, or a known checkpoint's published
  config (offline)."""
  if path in SOURCES:
    return SOURCES[path].hf_config()
  p = Path(path).expanduser()
  if p.is_dir() and (p / "config.json").exists():
    return json.loads((p / "config.json").read_text())
  if p.suffix == ".json" and p.exists():
    return json.loads(p.read_text())
  if path in KNOWN_CONFIGS:
    return dict(KNOWN_CONFIGS[path])
  return json.loads((resolve_model_dir(path) / "config.json").read_text())


def candidate_meshes(n: int) -> list[dict]:
  """Factorisations of n devices, most data-parallel first."""
  out = []
  for model in (1, 2, 4, 8, 16):
    for fsdp in (1, 2, 4, 8, 16, 32, 64, 128, 256):
      if n % (model * fsdp) == 0:
        out.append(dict(data=n // (model * fsdp), fsdp=fsdp, model=model))
  return sorted(out, key=lambda m: (m["model"], m["fsdp"]))


def compile_step(cfg, hf_cfg: dict, mesh, remat: str):
  """Lower + compile the real train step for `cfg` on `mesh` with abstract (shape-only) arguments."""
  pdt, cdt = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.compute_dtype)
  config = config_from_dict(hf_cfg)

  def build():
    # a scan: what the accelerators the plan is for run (compile time flat in depth)
    base = build_model(
      config, param_dtype=pdt, dtype=cdt, remat=remat, layer_loop="scan", attention=cfg.model.attention
    )
    # the configured method's structure (its initial values do not matter to a plan)
    return PromptedModel(base, methods.build(methods.with_random_init(cfg.prompt), base, None, None, jax.random.key(0)))

  abstract = nnx.eval_shape(build)
  graphdef, prompt_state, frozen_state = nnx.split(abstract, PromptParam, ...)
  f_sh = shd.state_shardings(frozen_state, mesh).to_pure_dict()

  def sds(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  frozen = jax.tree.map(sds, frozen_state.to_pure_dict(), f_sh)
  rep = shd.replicated(mesh)
  prompt = jax.tree.map(lambda x: sds(x, rep), prompt_state.to_pure_dict())
  tx = build_optimizer(cfg.optimizer, cfg.train.steps, registry.get(cfg.prompt.method).learning_rates(cfg.prompt))
  opt = jax.tree.map(lambda x: sds(x, rep), jax.eval_shape(tx.init, prompt))
  bs = shd.batch_sharding(mesh)
  batch = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bs),
    abstract.base.dummy_batch(cfg.train.batch_size, cfg.data.input_length, cfg.data.target_length),
  )
  # "auto" is one piece on the accelerators a plan is for (chunking is the CPU's)
  microbatches = 1 if cfg.train.microbatches == "auto" else cfg.train.microbatches
  step_fn = make_train_step(graphdef, tx, z_loss=cfg.train.z_loss, microbatches=microbatches)
  step = jax.jit(
    step_fn,
    out_shardings=(jax.tree.map(lambda _: rep, prompt), jax.tree.map(lambda _: rep, opt), rep),
    donate_argnums=(0, 1),
  )
  start = time.time()
  args = (prompt, opt, frozen, batch, jax.ShapeDtypeStruct((), jnp.int32))
  compiled = step.lower(*args).compile()
  secs = time.time() - start

  def strip(t):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)

  # a step's FLOPs do not depend on the mesh: counted once per remat policy (`flops_of`)
  return compiled, secs, lambda: costs.flops(step_fn, *[strip(a) for a in args])


def detected_budget_gib() -> tuple[float | None, str]:
  """(memory per device in GiB as the backend reports it — None where it reports none, as on CPU —, the device
  kind). The budget `plan` uses when neither --budget-gib nor --topology is given."""
  dev = jax.devices()[0]
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # noqa: BLE001 — backends without memory statistics raise rather than return None
    stats = {}
  limit = stats.get("bytes_limit")
  return (limit / GiB if limit else None), getattr(dev, "device_kind", dev.platform)


def plan(
  cfg,
  *,
  devices: int | None = None,
  meshes: list[dict] | None = None,
  budget_gib: float | None = None,
  remats: tuple[str, ...] = ("none", "full"),
  log=print,
) -> tuple[list[PlanRow], PlanRow | None]:
  hf_cfg = hf_config_for(cfg.model.path)
  n = devices or jax.device_count()
  devs = jax.devices()[:n]
  if len(devs) < n:
    raise UsageError(f"{n} devices requested but only {len(devs)} exist (start with --devices before JAX initialises)")
  rows: list[PlanRow] = []
  best = None
  weights = _param_bytes(cfg, hf_cfg)
  if budget_gib is None and len(remats) > 1:
    # without a budget nothing is chosen, so a heavier remat policy would only double the compiles
    log(f"(no memory budget: remat={remats[0]} only; --budget-gib or --topology also tries remat={remats[1]})")
    remats = remats[:1]
  flops: dict[str, float] = {}
  for m in [_resolve_mesh(m, n) for m in meshes] if meshes else candidate_meshes(n):
    if budget_gib is not None and not meshes and weights / (m["fsdp"] * m["model"]) > budget_gib * GiB:
      log(
        f"skip data={m['data']},fsdp={m['fsdp']},model={m['model']}: frozen weights alone need "
        f"{weights / (m['fsdp'] * m['model']) / GiB:.1f} GiB per device"
      )
      continue
    mesh = shd.make_mesh(m["data"], m["fsdp"], m["model"], devices=devs)
    dp = m["data"] * m["fsdp"]
    if cfg.train.batch_size % (dp * (1 if cfg.train.microbatches == "auto" else cfg.train.microbatches)):
      log(f"skip data={m['data']},fsdp={m['fsdp']},model={m['model']}: batch {cfg.train.batch_size} does not split")
      continue
    for row in _mesh_rows(cfg, hf_cfg, mesh, m, remats, budget_gib, flops):
      rows.append(row)
      log(row.line())
      if (row.fits or (budget_gib is None)) and (best is None or _better(row, best)):
        best = row
    if best is not None and budget_gib is not None and not meshes:
      break  # candidates come in order of preference: the first that fits is the recommendation
  return rows, best


def _mesh_rows(cfg, hf_cfg: dict, mesh, m: dict, remats, budget_gib: float | None, flops: dict):
  """One mesh's rows, lightest remat policy first, until one fits (FLOPs counted once per policy, in `flops`)."""
  n = math.prod(m.values())
  for remat in remats:
    compiled, secs, count_flops = compile_step(cfg, hf_cfg, mesh, remat)
    if remat not in flops:
      flops[remat] = count_flops()
    mem = compiled.memory_analysis()
    args, temp, out, alias = (
      mem.argument_size_in_bytes,
      mem.temp_size_in_bytes,
      mem.output_size_in_bytes,
      mem.alias_size_in_bytes,
    )
    total = args + temp + out - alias
    # model-parallel devices split the work; data-parallel ones each do their share of the batch
    fits = None if budget_gib is None else total / GiB <= budget_gib
    yield PlanRow(m, remat, args / GiB, temp / GiB, out / GiB, total / GiB, flops[remat] / n, secs, fits)
    if fits:
      return  # a lighter remat policy already fits; no need to recompute more


def _resolve_mesh(m: dict, n: int) -> dict:
  """A mesh dict with its -1 axis (if any) given the remaining devices."""
  rest = n // math.prod(v for v in m.values() if v != -1)
  return {k: (rest if v == -1 else v) for k, v in m.items()}


def _param_bytes(cfg, hf_cfg: dict) -> float:
  abstract = abstract_model(config_from_dict(hf_cfg), param_dtype=jnp.dtype(cfg.model.dtype))
  return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract))))


def _better(a: PlanRow, b: PlanRow) -> bool:
  """Prefer no remat, then most data parallelism, then least memory."""

  def key(r):
    return (r.remat != "none", r.mesh["model"], r.mesh["fsdp"], r.total_gib)

  return key(a) < key(b)
