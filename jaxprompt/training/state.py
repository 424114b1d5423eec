"""`TrainState`: everything a run changes as it trains, and all that resuming it exactly needs.

The device arrays (prompt, optimizer state) go through the jitted step; the host counters (step, data position,
best eval, evaluations without improvement) move with the loop. The dropout RNG of step s is
`fold_in(key(seed), s)`, so the seed and the step are the whole RNG state.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Best:
  """The best value of the selection metric so far, and its step (None before the first eval)."""

  step: int | None = None
  value: float | None = None

  def improved_by(self, value: float, lower_is_better: bool) -> bool:
    return self.value is None or (value < self.value if lower_is_better else value > self.value)


@dataclasses.dataclass(frozen=True)
class EvalPoint:
  """An evaluation of the run: its step and metrics (the floats)."""

  step: int
  metrics: dict


@dataclasses.dataclass(frozen=True)
class TrainState:
  prompt: Any  # pure dict of PromptParam values, replicated
  opt_state: Any  # optimizer state: prompt-shaped leaves only
  step: int = 0
  position: int = 0  # global batches consumed: the data stream's resume point
  member_positions: tuple[int, ...] = ()  # a mixture: examples each task has given (its stream's resume point)
  best: Best = Best()
  stale_evals: int = 0  # evaluations since `best` last improved (early stopping)
  seed: int = 0  # dropout RNG seed
  last_eval: EvalPoint | None = None  # the latest evaluation of this process (checkpoints record its metrics)

  def replace(self, **changes) -> "TrainState":
    return dataclasses.replace(self, **changes)

  def counters(self) -> dict:
    """The host part, as checkpoint metadata."""
    return dict(
      step=self.step,
      position=self.position,
      member_positions=list(self.member_positions),
      seed=self.seed,
      stale_evals=self.stale_evals,
      best=dataclasses.asdict(self.best),
    )

  def with_counters(self, meta: dict) -> "TrainState":
    """This state with the host counters a checkpoint's metadata recorded."""
    best = meta.get("best") or {}
    return self.replace(
      step=int(meta["step"]),
      position=int(meta["position"]),
      member_positions=tuple(int(p) for p in meta.get("member_positions") or ()),
      stale_evals=int(meta.get("stale_evals", 0)),
      best=Best(best.get("step"), best.get("value")),
    )
