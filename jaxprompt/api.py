"""The Python API: `train`, `evaluate` and `load_config`, what `jaxprompt train` / `eval` do, as functions.

The same validation and the same errors as the CLI (every bad input raises a `jaxprompt.UserError` subclass whose
first line is what the CLI prints); nothing here exits the process or configures logging. Overrides are the CLI's
`--set section.key=value`, given as keyword arguments: `train(cfg, wd, **{"train.steps": 100})` or, as plain
names, `train(cfg, wd, train__steps=100)`; values are Python values (not YAML text).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from jaxprompt import config as C
from jaxprompt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a training run ended with. `best_*` are None when it never evaluated."""

  workdir: Path
  final_step: int
  best_step: int | None
  best_value: float | None
  metric: str
  setup_seconds: float
  train_seconds: float
  config: C.Config

  @property
  def checkpoints(self) -> Path:
    return self.workdir / "checkpoints"

  @property
  def metrics_file(self) -> Path:
    """One JSON line per logged step and per evaluation."""
    return self.workdir / "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """One checkpoint evaluated on the eval split: its step, the metrics, and the per-example predictions file."""

  step: int
  metrics: dict[str, float]
  predictions: Path


def _dotted(key: str) -> str:
  return key.replace("__", ".") if "." not in key else key


def load_config(config: str | Path | Mapping | C.Config | None = None, overrides: Mapping[str, Any] | None = None,
                ) -> C.Config:
  """A checked `Config` from a YAML file, a dict (the YAML's structure) or a Config, with overrides
  ({"section.key": value} or {"section__key": value}) laid over it. Raises ConfigError naming the bad key."""
  if isinstance(config, C.Config):
    raw = config.to_dict()
  elif isinstance(config, Mapping):
    raw = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
  elif config is None:
    raw = {}
  else:
    raw = C.load(config).to_dict()  # a file's own errors name the file
  for key, value in (overrides or {}).items():
    parts = _dotted(key).split(".")
    node = raw
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value
  where = f"{config}: " if isinstance(config, (str, Path)) else ""
  try:
    return C.from_dict(raw)
  except ConfigError as e:
    raise ConfigError(f"{where}{e}") from None


def train(config: str | Path | Mapping | C.Config, workdir: str | Path | None = None, *, progress: bool = False,
          mesh=None, **overrides) -> TrainResult:
  """Prompt-tune as `jaxprompt train` does (resuming from the workdir's latest checkpoint). `workdir` defaults to
  runs/<config file name>. -> TrainResult."""
  from jaxprompt.training import trainer

  cfg = load_config(config, overrides)
  if workdir is None:
    if not isinstance(config, (str, Path)):
      raise ConfigError("train(): give a workdir (the config is not a file to name it after)")
    workdir = Path("runs") / Path(config).stem
  workdir = Path(workdir)
  s = trainer.train(cfg, workdir, progress=progress, mesh=mesh)
  return TrainResult(workdir=workdir, final_step=s["final_step"], best_step=s["best_step"], best_value=s["best_value"],
                     metric=s["metric"], setup_seconds=s["setup_seconds"], train_seconds=s["train_seconds"],
                     config=cfg)


def evaluate(config: str | Path | Mapping | C.Config, workdir: str | Path, *, step: str | int = "best", mesh=None,
             **overrides) -> EvalResult:
  """Evaluate a checkpoint of `workdir` ("best", "latest" or a step) as `jaxprompt eval` does. -> EvalResult."""
  from jaxprompt.training import trainer

  cfg = load_config(config, overrides)
  out = trainer.evaluate(cfg, workdir, step=step, mesh=mesh)
  chosen = out.pop("step")
  return EvalResult(step=chosen, metrics={k: float(v) for k, v in out.items()},
                    predictions=Path(workdir) / f"predictions_eval_step_{chosen}.jsonl")



def evaluate_ensemble(config: str | Path | Mapping | C.Config, prompts, *, combine: str = "vote",
                      step: str | int = "best", mesh=None, **overrides) -> dict:
  """`jaxprompt eval CONFIG --ensemble PROMPT...`: each prompt's metrics and the ensemble's (see
  `evaluation.ensemble`). -> {"combine", "members": [{"source", metrics...}], "ensemble": {...}, "predictions"}."""
  from jaxprompt.evaluation.ensemble import evaluate_ensemble as run_ensemble

  return run_ensemble(load_config(config, overrides), [str(p) for p in prompts], how=combine, step=step, mesh=mesh)
