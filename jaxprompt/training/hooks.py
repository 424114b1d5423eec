"""What happens between train steps, each on its own cadence: stop on a signal, log, evaluate, stop early,
checkpoint. A hook is built with what it works with (the checkpointer, the evaluator, the metrics log) and called
with the state and a frozen `StepInfo`; it may return a new `TrainState` (the evaluation, best value, stale count)
or a `Stop`. The trainer runs them in the order of `default_hooks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxprompt.checkpoint import selection_mode
from jaxprompt.errors import NonFiniteError
from jaxprompt.training.state import Best, EvalPoint, TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Every `every` steps (0: never), at the last step (`at_end`), and on the step the run stops (`on_stop`)."""

  every: int = 0
  at_end: bool = True
  on_stop: bool = False

  def due(self, step: int, *, last: bool, stopping: bool = False) -> bool:
    return bool((self.every and step % self.every == 0) or (last and self.at_end) or (stopping and self.on_stop))


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """One finished step, as the hooks see it (a frozen record: a hook that wants the loop to stop returns `Stop`;
  the trainer hands the hooks after it a copy with `stop` set)."""

  step: int  # steps done
  last: bool  # the configured number of steps is reached
  metrics: Any  # the step's metrics (device arrays; fetched in batches by `LogMetrics`)
  stop: str | None = None  # "preempted" / "early stopping": the loop ends after this step


@dataclasses.dataclass(frozen=True)
class Stop:
  """What a hook returns to end the loop after this step (the hooks after it still run, with `StepInfo.stop`)."""

  reason: str


class Hook:
  """Gets its collaborators when built; called after every step with the state and the step's `StepInfo`;
  returns a new `TrainState`, a `Stop`, or None (nothing to change)."""

  def __call__(self, state: TrainState, info: StepInfo) -> TrainState | Stop | None:
    raise NotImplementedError

  def close(self) -> None:
    """The run is over (normally or not)."""


class Preemption(Hook):
  """SIGTERM / SIGINT: finish the step, checkpoint, exit 75. Several processes must stop at the same step (a
  checkpoint is a collective): JAX's preemption service (started by jax.distributed.initialize) catches SIGTERM
  on any host and agrees on a step at which all stop; Orbax's `reached_preemption` asks it. Single-process runs
  handle the signals themselves."""

  def __init__(self, manager):
    self.manager = manager
    self.synced = (
      jax.process_count() > 1 and jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    )
    self.signalled: int | None = None
    signals = (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)
    self.old = {s: signal.signal(s, self._on_signal) for s in signals}

  def _on_signal(self, signum, frame):
    log.warning("received %s: finishing the current step and checkpointing", signal.Signals(signum).name)
    if self.synced:
      os.kill(os.getpid(), signal.SIGTERM)  # hand SIGINT to the preemption service too
    else:
      self.signalled = signum

  def __call__(self, state, info):
    if self.signalled is not None or (self.synced and self.manager.reached_preemption(info.step)):
      return Stop("preempted")
    return None

  def close(self):
    for sig, handler in self.old.items():
      signal.signal(sig, handler)


class LogMetrics(Hook):
  """Every `train.log_every` steps (and at the end or a stop): fetch the steps' metrics in one transfer, apply
  the NaN policy, write metrics.jsonl / TensorBoard, update the progress bar. Throughput is the step metric
  `slots` (token slots the step ran: prompts, inputs with their padding, targets) per second."""

  def __init__(
    self,
    cadence: Cadence,
    nan_policy: str,
    *,
    mlog,
    bar,
    epoch: Callable[[], int],
    latest_checkpoint: Callable[[], int | None],
  ):
    self.cadence, self.nan_policy = cadence, nan_policy
    self.mlog, self.bar, self.epoch, self.latest_checkpoint = mlog, bar, epoch, latest_checkpoint
    self.pending: list[tuple[int, Any]] = []
    self.last_flush = time.time()

  def __call__(self, state, info):
    self.pending.append((info.step, info.metrics))
    if not self.cadence.due(info.step, last=info.last, stopping=info.stop is not None):
      return None
    host = jax.device_get([m for _, m in self.pending])
    bad = [k for (k, _), m in zip(self.pending, host, strict=True) if not m["finite"]]
    if bad and self.nan_policy == "error":
      last = self.latest_checkpoint()
      kept = f"the last checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
      raise NonFiniteError(
        f"non-finite loss, gradient or update at step {bad[0]}; {kept}; set train.nan_policy=skip to skip such steps"
      )
    dt = (time.time() - self.last_flush) / len(self.pending)
    self.last_flush = time.time()
    avg = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
    avg.update(step_time=dt, tokens_per_second=avg["slots"] / dt, skipped_steps=len(bad), epoch=self.epoch())
    self.mlog.write(info.step, avg)
    self.bar.set_postfix(
      loss=f"{avg['loss']:.4f}", acc=f"{avg['token_accuracy']:.3f}", tok_s=f"{avg['tokens_per_second']:.0f}"
    )
    self.pending = []
    return None


class Evaluate(Hook):
  """Every `eval.every` steps and at the end: evaluate, write predictions/step_N.jsonl (+ confusion), keep the
  evaluation in the state (`TrainState.last_eval`) and track the best value of `eval.metric`."""

  def __init__(self, cadence: Cadence, metric: str, *, evaluator, mlog, report_dir: Path, say: Callable[[str], None]):
    self.cadence, self.metric = cadence, metric
    self.evaluator, self.mlog, self.report_dir, self.say = evaluator, mlog, report_dir, say
    self.lower_is_better = selection_mode(metric) == "min"

  def __call__(self, state, info):
    if self.evaluator is None or not self.cadence.due(info.step, last=info.last):
      return None
    metrics, records = self.evaluator(state.prompt)
    self.mlog.write(info.step, metrics, kind="eval")
    self.evaluator.write_report(self.report_dir, f"step_{info.step}", records)
    v = metrics[self.metric]
    state = state.replace(last_eval=EvalPoint(info.step, {k: x for k, x in metrics.items() if isinstance(x, float)}))
    if state.best.improved_by(v, self.lower_is_better):
      state = state.replace(best=Best(info.step, v), stale_evals=0)
    else:
      state = state.replace(stale_evals=state.stale_evals + 1)
    self.say(
      f"step {info.step}: "
      + ", ".join(f"{k}={x:.4f}" for k, x in metrics.items() if isinstance(x, float))
      + f" (best {self.metric} {state.best.value:.4f} at step {state.best.step})"
    )
    return state


class EarlyStop(Hook):
  """Stop after `eval.patience` evaluations without improvement."""

  def __init__(self, patience: int | None, metric: str, *, say: Callable[[str], None]):
    self.patience, self.metric, self.say = patience, metric, say

  def __call__(self, state, info):
    if self.patience is not None and info.stop is None and state.stale_evals >= self.patience:
      self.say(f"early stopping at step {info.step}: no {self.metric} improvement in {self.patience} evaluations")
      return Stop("early stopping")
    return None


class Checkpoint(Hook):
  """Every `checkpoint.every` steps, after every evaluation (for best-checkpoint selection), at the end and on a
  stop. `meta`: what every checkpoint records beside the state's counters (the run's `PromptRecord`, JSON)."""

  def __init__(self, cadence: Cadence, *, ckpt, meta: dict):
    self.cadence, self.ckpt, self.meta = cadence, ckpt, meta

  def __call__(self, state, info):
    evaluated = state.last_eval is not None and state.last_eval.step == info.step
    if self.cadence.due(info.step, last=info.last, stopping=info.stop is not None) or evaluated:
      self.ckpt.save_state(state, self.meta, metrics=state.last_eval.metrics if evaluated else None)
    return None


def default_hooks(
  cfg, *, ckpt, evaluator, mlog, bar, epoch: Callable[[], int], report_dir: Path, meta: dict, say: Callable[[str], None]
) -> list[Hook]:
  """The hooks a config asks for, in the order they run after each step (a stop asked for by one is seen by the
  ones after it: the log flushes, the checkpoint is written)."""
  tc, ec = cfg.train, cfg.eval
  return [
    Preemption(ckpt.manager),
    LogMetrics(
      Cadence(tc.log_every, at_end=True, on_stop=True),
      tc.nan_policy,
      mlog=mlog,
      bar=bar,
      epoch=epoch,
      latest_checkpoint=ckpt.latest_step,
    ),
    Evaluate(
      Cadence(ec.every, at_end=ec.at_end), ec.metric, evaluator=evaluator, mlog=mlog, report_dir=report_dir, say=say
    ),
    EarlyStop(ec.patience, ec.metric, say=say),
    Checkpoint(Cadence(cfg.checkpoint.every, at_end=True, on_stop=True), ckpt=ckpt, meta=meta),
  ]


def print_line(text: str, bar) -> None:
  """A line above the progress bar (process 0)."""
  if jax.process_index() == 0:
    bar.write(text, file=sys.stderr)
