"""The Python API: `train`, `evaluate` and `load_config`, what `jaxprompt train` / `eval` do, as functions.

The same validation and the same errors as the CLI (every bad input raises a `jaxprompt.UserError` subclass whose
first line is what the CLI prints); nothing here exits the process or configures logging. Overrides are the CLI's
`--set section.key=value`, given as keyword arguments: `train(cfg, wd, **{"train.steps": 100})` or, as plain
names, `train(cfg, wd, train__steps=100)`; values are Python values (not YAML text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from jaxprompt import config as C
from jaxprompt.errors import ConfigError
from jaxprompt.training.results import EvalResult, TrainResult

__all__ = ["EvalResult", "TrainResult", "evaluate", "evaluate_ensemble", "load_config", "train"]


def _dotted(key: str) -> str:
  return key.replace("__", ".") if "." not in key else key


def load_config(
  config: str | Path | Mapping | C.Config | None = None, overrides: Mapping[str, Any] | None = None
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
    C.override_type(_dotted(key), f"--set {_dotted(key)}: ")  # a key the config does not have: named as the CLI does
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


def train(
  config: str | Path | Mapping | C.Config,
  workdir: str | Path | None = None,
  *,
  progress: bool = False,
  mesh=None,
  **overrides,
) -> TrainResult:
  """Prompt-tune as `jaxprompt train` does (resuming from the workdir's latest checkpoint). `workdir` defaults to
  runs/<config file name>. -> TrainResult."""
  from jaxprompt.training import trainer

  cfg = load_config(config, overrides)
  if workdir is None:
    if not isinstance(config, (str, Path)):
      raise ConfigError("train(): give a workdir (the config is not a file to name it after)")
    workdir = Path("runs") / Path(config).stem
  return trainer.train(cfg, Path(workdir), progress=progress, mesh=mesh)


def evaluate(
  config: str | Path | Mapping | C.Config, workdir: str | Path, *, step: str | int = "best", mesh=None, **overrides
) -> EvalResult:
  """Evaluate a checkpoint of `workdir` ("best", "latest" or a step) as `jaxprompt eval` does. -> EvalResult."""
  from jaxprompt.training import trainer

  return trainer.evaluate(load_config(config, overrides), workdir, step=step, mesh=mesh)


def evaluate_ensemble(
  config: str | Path | Mapping | C.Config,
  prompts,
  *,
  combine: str = "vote",
  step: str | int = "best",
  mesh=None,
  **overrides,
) -> dict:
  """`jaxprompt eval CONFIG --ensemble PROMPT...`: each prompt's metrics and the ensemble's (see
  `evaluation.ensemble`). -> {"combine", "members": [{"source", metrics...}], "ensemble": {...}, "predictions"}."""
  from jaxprompt.evaluation.ensemble import evaluate_ensemble as run_ensemble

  return run_ensemble(load_config(config, overrides), [str(p) for p in prompts], how=combine, step=step, mesh=mesh)
