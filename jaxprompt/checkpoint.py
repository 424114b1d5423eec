"""Orbax checkpoints of the trainable state only: prompt + optimizer state + what exact resumption needs.

Each checkpoint step holds three items:
  prompt     the PromptParam values (pure dict of float32 arrays)
  opt_state  the optimizer state (prompt-shaped leaves only)
  meta       JSON: step, data position, seed, base-model identity, metrics, config
The base model is never written. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-write never leaves a step that looks finished. We keep the last K steps plus the
best by the chosen eval metric.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxprompt.config import CheckpointConfig
from jaxprompt.errors import CheckpointError

log = logging.getLogger(__name__)


def selection_mode(metric: str) -> str:
  """ "min" for losses, "max" for everything else (accuracy, F1, correlations...)."""
  return "min" if "loss" in metric else "max"


def _metric_fn(name: str, mode: str):
  """Orbax's BestN key: the metric (negated when lower is better), ties going to the earlier step, as
  `best_step` and the training loop decide."""

  def get(metrics: dict) -> float:
    v = metrics.get(name)
    if v is None:
      return -math.inf
    v = float(v) if mode == "max" else -float(v)
    return v - 1e-12 * float(metrics.get("_step", 0))

  return get


class Checkpointer:
  """The checkpoints of one workdir. `metric` / `mode` name the eval metric that picks the best step (kept
  beside the last `config.keep`); without a metric only the latest are kept."""

  def __init__(
    self, directory: str | Path, config: CheckpointConfig | None = None, *, metric: str | None = None, mode: str = "max"
  ):
    config = config or CheckpointConfig()
    self.directory = Path(directory).absolute()
    self.metric, self.mode = metric, mode
    policies: list = [pp.LatestN(n=config.keep)]
    if config.keep_best and metric is not None:
      policies.append(pp.BestN(get_metric_fn=_metric_fn(metric, mode), n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
      preservation_policy=pp.AnyPreservationPolicy(policies),
      enable_async_checkpointing=config.async_save,
      create=True,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        "prompt": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
      },
    )

  @classmethod
  def reader(cls, directory: str | Path) -> "Checkpointer":
    """For reading a workdir's checkpoints; "best" means best by the eval metric the run selected by."""
    ck = cls(directory, CheckpointConfig(async_save=False))
    latest = ck.latest_step()
    metric = ((ck.read_meta(latest).get("config") or {}).get("eval") or {}).get("metric") if latest else None
    if metric:
      ck.metric, ck.mode = metric, selection_mode(metric)
    return ck

  def save_state(self, state, meta: dict, metrics: dict | None = None) -> None:
    """Checkpoint `state` (a `training.state.TrainState`: any record with step, prompt, opt_state and counters())
    at its step, with `meta` (base identity, config) beside its counters."""
    self.save(state.step, state.prompt, state.opt_state, {**meta, **state.counters()}, metrics)

  def restore_state(self, step: int, like):
    """(the state saved at `step`, restored into the shardings and type of `like`; its metadata)."""
    prompt, opt_state, meta = self.restore(step, abstract_like(like.prompt), abstract_like(like.opt_state))
    return like.replace(prompt=prompt, opt_state=opt_state).with_counters(meta), meta

  def choose(self, step: str | int) -> int:
    """A step number from "best" (the latest when nothing was evaluated), "latest" or a number."""
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"{self.directory}: no complete checkpoints")
    chosen = {"best": self.best_step() or self.latest_step(), "latest": self.latest_step()}.get(str(step))
    if chosen is None:
      if not str(step).isdigit():
        raise CheckpointError(f"checkpoint step {step!r}: expected best, latest or a step number")
      chosen = int(step)
    if chosen not in steps:
      raise CheckpointError(f"{self.directory}: no checkpoint at step {chosen} (have {steps})")
    return chosen

  def save(self, step: int, prompt: Any, opt_state: Any, meta: dict, metrics: dict | None = None) -> None:
    meta = dict(meta, step=step, metrics=metrics or {})
    self.manager.save(
      step,
      args=ocp.args.Composite(
        prompt=ocp.args.StandardSave(prompt), opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)
      ),
      metrics=dict(metrics, _step=step) if metrics else None,
      force=True,
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    if self.metric is None:
      return None
    best, best_v = None, None
    for s in self.steps():
      v = self.read_meta(s).get("metrics", {}).get(self.metric)
      if v is None:
        continue
      if best_v is None or (v > best_v if self.mode == "max" else v < best_v):
        best, best_v = s, v
    return best

  def read_meta(self, step: int) -> dict:
    path = self.directory / str(step) / "meta" / "metadata"
    if path.exists():
      return json.loads(path.read_text())
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_prompt: Any, abstract_opt_state: Any | None) -> tuple[Any, Any, dict]:
    """Restore into the given abstract trees (ShapeDtypeStructs with shardings)."""
    args = dict(prompt=ocp.args.StandardRestore(abstract_prompt), meta=ocp.args.JsonRestore())
    if abstract_opt_state is not None:
      args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["prompt"], out.get("opt_state") if abstract_opt_state is not None else None, out["meta"]

  def restore_prompt(self, step: int) -> tuple[Any, dict]:
    """The prompt (as host numpy arrays, whatever topology saved it) and the metadata of one step."""
    tree = self.manager.item_metadata(step)["prompt"].tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      tree,
      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
    out = self.manager.restore(
      step, args=ocp.args.Composite(prompt=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    return jax.tree.map(np.asarray, out["prompt"]), out["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring into the layout of `tree`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def find_checkpoint_dir(path: str | Path) -> Path:
  """A workdir (holding checkpoints/) or a checkpoints directory itself."""
  p = Path(path)
  if (p / "checkpoints").is_dir():
    return p / "checkpoints"
  if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()):
    return p
  raise CheckpointError(f"{p}: no checkpoints found (expected WORKDIR/checkpoints/<step>)")
