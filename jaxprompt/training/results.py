"""What training and evaluation return: typed results (the Python API's `jaxprompt.train` / `jaxprompt.evaluate`
give these as they are)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a training run ended with. `best_*` are None when it never evaluated; `train_seconds` counts the steps,
  evaluations and checkpoints after `setup_seconds` (loading, compiling the first step's inputs)."""

  workdir: Path
  final_step: int
  best_step: int | None
  best_value: float | None
  metric: str
  setup_seconds: float
  train_seconds: float
  config: Any  # the `config.Config` it ran

  @property
  def checkpoints(self) -> Path:
    return self.workdir / "checkpoints"

  @property
  def metrics_file(self) -> Path:
    """One JSON line per logged step and per evaluation."""
    return self.workdir / "metrics.jsonl"

  def summary(self) -> dict:
    """The JSON summary written to WORKDIR/summary.json (and printed by `jaxprompt train`)."""
    return dict(
      final_step=self.final_step,
      best_step=self.best_step,
      best_value=self.best_value,
      metric=self.metric,
      setup_seconds=self.setup_seconds,
      train_seconds=self.train_seconds,
    )


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """One checkpoint evaluated on the eval split: its step, the metrics, and the per-example predictions file."""

  step: int
  metrics: dict[str, float]
  predictions: Path
