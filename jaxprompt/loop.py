"""The training loop: progress, logging, periodic evaluation, best-checkpoint selection, exact resumption."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.checkpoint import CheckpointError, Checkpointer, abstract_like
from jaxprompt.data.pipeline import BatchStream
from jaxprompt.evaluate import Evaluator
from jaxprompt.optim import build_optimizer
from jaxprompt.tracking import MetricsLog, plot_curves
from jaxprompt.train import (EXIT_PREEMPTED, NonFiniteError, Run, _device_batch, architecture, build_run,
                             encode_split, frozen_shardings, make_train_step, prompt_shardings)

log = logging.getLogger(__name__)


class Preempted(SystemExit):
  """Raised after the checkpoint that a SIGTERM/SIGINT asked for has been written."""

  def __init__(self, step: int):
    super().__init__(EXIT_PREEMPTED)
    self.step = step


def _lower_is_better(metric: str) -> bool:
  return "loss" in metric


def _check_identity(meta: dict, run: Run, where: Path) -> None:
  saved = meta.get("base_model", {})
  if saved and saved.get("fingerprint") != run.identity.fingerprint:
    raise CheckpointError(
        f"{where}: checkpoint was trained on base model {saved.get('path')!r} (fingerprint {saved.get('fingerprint')}), "
        f"but the config loads {run.identity.path!r} (fingerprint {run.identity.fingerprint}); use another --workdir")


def restore_into(run: Run, ckpt: Checkpointer, step: int, opt_state=None):
  prompt, opt_state, meta = ckpt.restore(step, abstract_like(run.prompt),
                                         abstract_like(opt_state) if opt_state is not None else None)
  _check_identity(meta, run, ckpt.directory)
  return prompt, opt_state, meta


def train(cfg: C.Config, workdir: str | Path, *, progress: bool = True, mesh=None) -> dict:
  """Prompt-tune as `cfg` says, in `workdir` (resuming from its latest checkpoint). Returns a summary."""
  from tqdm.auto import tqdm

  workdir = _checked_workdir(workdir)
  is_main = jax.process_index() == 0
  t_setup = time.time()
  run, train_data = build_run(cfg, mesh=mesh)
  tc, ec = cfg.train, cfg.eval
  dp = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
  if tc.batch_size % (tc.microbatches * dp):
    raise C.ConfigError(f"train.batch_size {tc.batch_size} must be divisible by train.microbatches "
                        f"({tc.microbatches}) x data-parallel devices ({dp})")
  arrays = encode_split(run, train_data.examples, f"{cfg.data.task}/{cfg.data.train_split}")
  if is_main:
    (workdir / "config.yaml").write_text(C.dump(cfg))
    (workdir / "base_model.json").write_text(json.dumps(run.identity.to_dict(), indent=2))

  tx = build_optimizer(cfg.optimizer, tc.steps)
  p_sh, f_sh = prompt_shardings(run), frozen_shardings(run)
  rep = shd.replicated(run.mesh)
  opt_state = jax.jit(tx.init, out_shardings=rep)(run.prompt)
  o_sh = jax.tree.map(lambda _: rep, opt_state)
  metric = ec.metric
  ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                      metric=metric, mode="min" if _lower_is_better(metric) else "max",
                      async_save=cfg.checkpoint.async_save)
  prompt, start, position = run.prompt, 0, 0
  best: dict = {"step": None, "value": None}
  stale = 0
  latest = ckpt.latest_step()
  if latest is not None:
    prompt, opt_state, meta = restore_into(run, ckpt, latest, opt_state)
    start, position = int(meta["step"]), int(meta["position"])
    best, stale = meta.get("best", best), int(meta.get("stale_evals", 0))
    log.info("resumed from %s at step %d", ckpt.directory / str(latest), start)

  stream = BatchStream(arrays, tc.batch_size, seed=cfg.data.seed, position=position,
                       process_index=jax.process_index(), process_count=jax.process_count())
  step_fn = jax.jit(make_train_step(run.graphdef, tx, z_loss=tc.z_loss, microbatches=tc.microbatches, seed=tc.seed),
                    in_shardings=(p_sh, o_sh, f_sh, None, None), out_shardings=(p_sh, o_sh, rep),
                    donate_argnums=(0, 1))
  evaluator = Evaluator(run) if (ec.every or ec.at_end) else None
  mlog = MetricsLog(workdir)
  tokens_per_step = tc.batch_size * (cfg.data.input_length + cfg.data.target_length + cfg.prompt.length)

  stop = {"signal": None}
  # Several processes must stop at the same step (a checkpoint is a collective). JAX's preemption service
  # (started by jax.distributed.initialize) catches SIGTERM on any host and agrees on a step at which all
  # stop; Orbax's reached_preemption asks it. Single-process runs handle the signals themselves.
  synced = jax.process_count() > 1 and _preemption_service()

  def on_signal(signum, frame):
    log.warning("received %s: finishing the current step and checkpointing", signal.Signals(signum).name)
    if synced:
      os.kill(os.getpid(), signal.SIGTERM)  # hand SIGINT to the preemption service too
    else:
      stop["signal"] = signum

  old_handlers = {s: signal.signal(s, on_signal) for s in ((signal.SIGINT,) if synced else
                                                           (signal.SIGTERM, signal.SIGINT))}

  def meta_for(step: int) -> dict:
    return dict(position=stream.position, seed=tc.seed, base_model=run.identity.to_dict(),
                base_architecture=architecture(run.base), best=best,
                stale_evals=stale, config=json.loads(json.dumps(C._plain(cfg.to_dict()))))

  pending: list[tuple[int, dict]] = []
  last_flush = time.time()
  summary: dict = {"setup_seconds": None}
  frozen = run.frozen
  bar = tqdm(total=tc.steps, initial=start, desc="prompt tuning", disable=not (progress and is_main),
             dynamic_ncols=True, unit="step")
  step = start
  try:
    summary["setup_seconds"] = round(time.time() - t_setup, 2)
    for step in range(start, tc.steps):
      batch = _device_batch(run, next(stream))
      prompt, opt_state, m = step_fn(prompt, opt_state, frozen, batch, jnp.asarray(step, jnp.int32))
      pending.append((step + 1, m))
      s = step + 1
      if synced and ckpt.manager.reached_preemption(s):
        stop["signal"] = signal.SIGTERM
      bar.update(1)
      if s % tc.log_every == 0 or s == tc.steps or stop["signal"]:
        host = jax.device_get([mm for _, mm in pending])
        bad = [k for (k, _), mm in zip(pending, host) if not mm["finite"]]
        if bad and tc.nan_policy == "error":
          last = ckpt.latest_step()
          kept = f"the last checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
          raise NonFiniteError(f"non-finite loss, gradient or update at step {bad[0]}; {kept}; "
                               "set train.nan_policy=skip to skip such steps")
        dt = (time.time() - last_flush) / len(pending)
        last_flush = time.time()
        avg = {k: float(np.mean([mm[k] for mm in host])) for k in host[0] if k != "finite"}
        avg.update(step_time=dt, tokens_per_second=tokens_per_step / dt, skipped_steps=len(bad),
                   epoch=stream.epoch)
        mlog.write(s, avg)
        bar.set_postfix(loss=f"{avg['loss']:.4f}", acc=f"{avg['token_accuracy']:.3f}",
                        tok_s=f"{avg['tokens_per_second']:.0f}")
        pending = []
      metrics = None
      if evaluator is not None and ((ec.every and s % ec.every == 0) or (s == tc.steps and ec.at_end)):
        metrics, records = evaluator(prompt)
        mlog.write(s, metrics, kind="eval")
        if is_main:
          pdir = workdir / "predictions"
          pdir.mkdir(exist_ok=True)
          with open(pdir / f"step_{s}.jsonl", "w") as f:
            for r in records:
              f.write(json.dumps(r) + "\n")
          if evaluator.confusion is not None:
            (pdir / f"confusion_step_{s}.json").write_text(json.dumps(
                {"labels": list(run.labels), "rows": "gold", "columns": list(run.labels) + ["<invalid>"],
                 "counts": evaluator.confusion}))
        v = metrics.get(metric)
        if v is None:
          raise C.ConfigError(f"eval.metric {metric!r} is not computed; available: {sorted(metrics)}")
        better = best["value"] is None or (v < best["value"] if _lower_is_better(metric) else v > best["value"])
        if better:
          best, stale = {"step": s, "value": v}, 0
        else:
          stale += 1
        if is_main:
          bar.write(f"step {s}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                    + f" (best {metric} {best['value']:.4f} at step {best['step']})", file=sys.stderr)
      early = ec.patience is not None and stale >= ec.patience
      if (s % cfg.checkpoint.every == 0 or s == tc.steps or stop["signal"] or early or metrics is not None):
        ckpt.save(s, prompt, opt_state, meta_for(s), metrics=metrics and {k: v for k, v in metrics.items()
                                                                           if isinstance(v, float)})
      if stop["signal"]:
        ckpt.wait()
        raise Preempted(s)
      if early:
        if is_main:
          bar.write(f"early stopping at step {s}: no {metric} improvement in {ec.patience} evaluations",
                    file=sys.stderr)
        break
  finally:
    bar.close()
    for sig, h in old_handlers.items():
      signal.signal(sig, h)
    ckpt.close()
    mlog.close()
  summary.update(final_step=step + 1 if tc.steps > start else start, best_step=best["step"], best_value=best["value"],
                 metric=metric, train_seconds=round(time.time() - t_setup, 2))
  if is_main:
    if tc.plot:
      plot_curves(workdir, metric=metric)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def _checked_workdir(workdir: str | Path) -> Path:
  """The workdir, created; a clear error when it is a file or cannot be written."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"workdir {str(workdir)!r} is a file, not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create workdir {str(workdir)!r}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise PermissionError(f"workdir {str(workdir)!r} is not writable")
  return workdir


def _preemption_service() -> bool:
  from jax._src import distributed

  return distributed.global_state.preemption_sync_manager is not None


def evaluate(cfg: C.Config, workdir: str | Path, *, step: str | int = "best", mesh=None) -> dict:
  """Evaluate a checkpoint of `workdir` ("best", "latest" or a step number) on the eval split."""
  workdir = Path(workdir)
  run, _ = build_run(cfg, mesh=mesh, with_train_data=False)
  ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.checkpoint.keep, metric=cfg.eval.metric,
                      mode="min" if _lower_is_better(cfg.eval.metric) else "max")
  if not ckpt.steps():
    raise CheckpointError(f"{workdir}: no checkpoints to evaluate")
  chosen = {"best": ckpt.best_step() or ckpt.latest_step(), "latest": ckpt.latest_step()}.get(str(step))
  chosen = int(step) if chosen is None else chosen
  if chosen not in ckpt.steps():
    raise CheckpointError(f"{workdir}: no checkpoint at step {chosen} (have {ckpt.steps()})")
  prompt, _, _ = restore_into(run, ckpt, chosen)
  ckpt.close()
  metrics, records = Evaluator(run)(prompt)
  if jax.process_index() == 0:
    with open(workdir / f"predictions_eval_step_{chosen}.jsonl", "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  return {"step": chosen, **metrics}
