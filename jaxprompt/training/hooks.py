"""What happens between train steps, each on its own cadence: stop on a signal, log, evaluate, stop early,
checkpoint. A hook sees the trainer and the step's `StepEnd`, may return a new `TrainState` (best eval, stale
count), and may ask the loop to stop (`StepEnd.stop`). The trainer runs them in the order of `default_hooks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from jaxprompt.errors import NonFiniteError
from jaxprompt.checkpoint import selection_mode
from jaxprompt.training.state import Best, TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Every `every` steps (0: never), at the last step (`at_end`), and on the step the run stops (`on_stop`)."""

  every: int = 0
  at_end: bool = True
  on_stop: bool = False

  def due(self, step: int, *, last: bool, stopping: bool = False) -> bool:
    return bool((self.every and step % self.every == 0) or (last and self.at_end) or (stopping and self.on_stop))


@dataclasses.dataclass
class StepEnd:
  """One finished step, as the hooks see it."""

  step: int  # steps done
  last: bool  # the configured number of steps is reached
  metrics: Any  # the step's metrics (device arrays; fetched in batches by `LogMetrics`)
  eval_metrics: dict | None = None  # set by `Evaluate` on the steps it runs
  stop: str | None = None  # "preempted" / "early stopping": the loop ends after this step


class Hook:
  def __call__(self, trainer, state: TrainState, end: StepEnd) -> TrainState | None:
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
    self.synced = jax.process_count() > 1 and jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    self.signalled: int | None = None
    signals = (signal.SIGINT,) if self.synced else (signal.SIGTERM, signal.SIGINT)
    self.old = {s: signal.signal(s, self._on_signal) for s in signals}

  def _on_signal(self, signum, frame):
    log.warning("received %s: finishing the current step and checkpointing", signal.Signals(signum).name)
    if self.synced:
      os.kill(os.getpid(), signal.SIGTERM)  # hand SIGINT to the preemption service too
    else:
      self.signalled = signum

  def __call__(self, trainer, state, end):
    if self.signalled is not None or (self.synced and self.manager.reached_preemption(end.step)):
      end.stop = "preempted"

  def close(self):
    for sig, handler in self.old.items():
      signal.signal(sig, handler)


class LogMetrics(Hook):
  """Every `train.log_every` steps (and at the end or a stop): fetch the steps' metrics in one transfer, apply
  the NaN policy, write metrics.jsonl / TensorBoard, update the progress bar."""

  def __init__(self, cadence: Cadence, nan_policy: str):
    """Throughput is the step metric `slots` (token slots the step ran: prompts, inputs with their padding,
    targets) per second."""
    self.cadence, self.nan_policy = cadence, nan_policy
    self.pending: list[tuple[int, Any]] = []
    self.last_flush = time.time()

  def __call__(self, trainer, state, end):
    self.pending.append((end.step, end.metrics))
    if not self.cadence.due(end.step, last=end.last, stopping=end.stop is not None):
      return
    host = jax.device_get([m for _, m in self.pending])
    bad = [k for (k, _), m in zip(self.pending, host) if not m["finite"]]
    if bad and self.nan_policy == "error":
      last = trainer.ckpt.latest_step()
      kept = f"the last checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
      raise NonFiniteError(f"non-finite loss, gradient or update at step {bad[0]}; {kept}; "
                           "set train.nan_policy=skip to skip such steps")
    dt = (time.time() - self.last_flush) / len(self.pending)
    self.last_flush = time.time()
    avg = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
    avg.update(step_time=dt, tokens_per_second=avg["slots"] / dt, skipped_steps=len(bad),
               epoch=trainer.stream.epoch)
    trainer.mlog.write(end.step, avg)
    trainer.bar.set_postfix(loss=f"{avg['loss']:.4f}", acc=f"{avg['token_accuracy']:.3f}",
                            tok_s=f"{avg['tokens_per_second']:.0f}")
    self.pending = []


class Evaluate(Hook):
  """Every `eval.every` steps and at the end: evaluate, write predictions/step_N.jsonl (+ confusion), track the
  best value of `eval.metric`."""

  def __init__(self, cadence: Cadence, metric: str):
    self.cadence, self.metric = cadence, metric
    self.lower_is_better = selection_mode(metric) == "min"

  def __call__(self, trainer, state, end):
    if trainer.evaluator is None or not self.cadence.due(end.step, last=end.last):
      return None
    metrics, records = trainer.evaluator(state.prompt)
    trainer.mlog.write(end.step, metrics, kind="eval")
    trainer.evaluator.write_report(trainer.workdir / "predictions", f"step_{end.step}", records)
    end.eval_metrics = metrics
    v = metrics[self.metric]
    if state.best.improved_by(v, self.lower_is_better):
      state = state.replace(best=Best(end.step, v), stale_evals=0)
    else:
      state = state.replace(stale_evals=state.stale_evals + 1)
    trainer.say(f"step {end.step}: " + ", ".join(f"{k}={x:.4f}" for k, x in metrics.items() if isinstance(x, float))
                + f" (best {self.metric} {state.best.value:.4f} at step {state.best.step})")
    return state


class EarlyStop(Hook):
  """Stop after `eval.patience` evaluations without improvement."""

  def __init__(self, patience: int | None, metric: str):
    self.patience, self.metric = patience, metric

  def __call__(self, trainer, state, end):
    if self.patience is not None and end.stop is None and state.stale_evals >= self.patience:
      end.stop = "early stopping"
      trainer.say(f"early stopping at step {end.step}: no {self.metric} improvement in {self.patience} evaluations")


class Checkpoint(Hook):
  """Every `checkpoint.every` steps, after every eval (for best-checkpoint selection), at the end and on a stop."""

  def __init__(self, cadence: Cadence):
    self.cadence = cadence

  def __call__(self, trainer, state, end):
    if not (self.cadence.due(end.step, last=end.last, stopping=end.stop is not None) or end.eval_metrics is not None):
      return
    metrics = end.eval_metrics and {k: v for k, v in end.eval_metrics.items() if isinstance(v, float)}
    trainer.ckpt.save_state(state, trainer.checkpoint_meta(), metrics=metrics)


def default_hooks(cfg, manager) -> list[Hook]:
  """The hooks a config asks for, in the order they run after each step."""
  tc, ec = cfg.train, cfg.eval
  return [Preemption(manager),
          LogMetrics(Cadence(tc.log_every, at_end=True, on_stop=True), tc.nan_policy),
          Evaluate(Cadence(ec.every, at_end=ec.at_end), ec.metric),
          EarlyStop(ec.patience, ec.metric),
          Checkpoint(Cadence(cfg.checkpoint.every, at_end=True, on_stop=True))]


def print_line(text: str, bar) -> None:
  """A line above the progress bar (process 0)."""
  if jax.process_index() == 0:
    bar.write(text, file=sys.stderr)
