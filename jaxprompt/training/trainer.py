"""`train` and `evaluate`: a config and a workdir in, a trained prompt (checkpoints, logs, plots) out.

    build_run ─► TrainState (fresh, or the latest checkpoint) ─► for each step:
        batch ─► train_step ─► hooks (preemption, log, eval, early stop, checkpoint)
    ─► summary.json, curves.png

Running the same command again resumes exactly from the latest checkpoint (data position, RNG, optimizer state).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.batches import concat_rows
from jaxprompt.checkpoint import Checkpointer, abstract_like, selection_mode
from jaxprompt.data.pipeline import BatchStream, MixtureStream, Packing, Recorded, mixing_rates
from jaxprompt.errors import CheckpointError, ConfigError, WorkdirError
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.prompts import registry
from jaxprompt.prompts.record import PromptRecord
from jaxprompt.run import Run, TaskData, build_run
from jaxprompt.training import hooks as H
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.results import EvalResult, TrainResult
from jaxprompt.training.state import TrainState
from jaxprompt.training.step import make_packing, make_train_step
from jaxprompt.training.tracking import MetricsLog, plot_curves, read_metrics

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # documented exit code after a SIGTERM/SIGINT checkpoint (EX_TEMPFAIL: run again to resume)


class Preempted(SystemExit):
  """Raised after the checkpoint that a SIGTERM/SIGINT asked for has been written."""

  def __init__(self, step: int):
    super().__init__(EXIT_PREEMPTED)
    self.step = step


def checked_workdir(workdir: str | Path) -> Path:
  """The workdir, created; a clear error when it is a file or cannot be written."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {str(workdir)!r} is a file, not a directory")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {str(workdir)!r}: {e.strerror or e}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {str(workdir)!r} is not writable")
  return workdir


def check_identity(record: PromptRecord, run: Run, where: Path) -> None:
  """A checkpoint (its `PromptRecord`) must come from the base model the config loads."""
  saved = record.base
  if saved is not None and saved.fingerprint != run.identity.fingerprint:
    raise CheckpointError(
      f"{where}: checkpoint was trained on base model {saved.path!r} (fingerprint {saved.fingerprint}), "
      f"but the config loads {run.identity.path!r} (fingerprint {run.identity.fingerprint}); use another --workdir"
    )


def check_tasks(record: PromptRecord, run: Run, where: Path) -> None:
  """A mixture's checkpoint (its `PromptRecord`) resumes only with the same tasks in the same order (its data
  positions and any per-task prompts are kept per task)."""
  saved = [m.name for m in record.task.mixture] if record.task is not None else []
  now = [m.name for m in run.task_record().mixture]
  if (saved or now) and saved != now:
    raise CheckpointError(
      f"{where}: checkpoint was trained on the tasks {saved or 'of one task'}, but the config has "
      f"{now or 'one task'}; use another --workdir"
    )


# What a checkpoint's state is shaped by, besides the base model and the tasks (checked apart): the prompt section
# but for how a fresh prompt is initialised, and the optimizer's kind and the transforms it chains. A key outside
# these (train.steps, eval.every, optimizer.learning_rate...) may change between runs of one workdir.
_INIT_ONLY = (
  "init",
  "init_range",
  "vocab_sample_size",
  "init_text",
  "init_file",
  "allow_other_base",
  "multitask_source",
  "multitask_init",
  "multitask_source_task",
)
_SHAPELESS = ("encoder_dropout", "mlp_dropout", "dept_alpha")  # rates and scales: no state of their own
# keys whose value only scales updates, but whose being set (non-zero) or not adds a transform and its state
_SET_OR_NOT = (
  "prompt.dept_offset_learning_rate",
  "optimizer.momentum",
  "optimizer.grad_clip_norm",
  "optimizer.clipping_threshold",
  "optimizer.weight_decay",
)


def _state_keys(raw: dict) -> dict:
  """{dotted key: value} of a (raw, possibly older) config's keys that shape the prompt and optimizer state."""
  defaults = C.Config().to_dict()
  prompt, opt = raw.get("prompt") or {}, raw.get("optimizer") or {}
  out = {f"prompt.{k}": prompt.get(k, v) for k, v in defaults["prompt"].items() if k not in _INIT_ONLY + _SHAPELESS}
  out["head.type"] = (raw.get("head") or {}).get("type", defaults["head"]["type"])  # a head has its own state
  name = opt.get("name", defaults["optimizer"]["name"])
  for k in ("name", "grad_clip_norm") + (
    ("momentum", "clipping_threshold", "weight_decay") if name == "adafactor" else ()
  ):
    out[f"optimizer.{k}"] = opt.get(k, defaults["optimizer"][k])
  return out


def recorded_config(workdir: Path) -> dict | None:
  """The config (raw) the latest checkpoint of `workdir` was trained with: its record's, else WORKDIR/config.yaml;
  None without a checkpoint (nothing to resume)."""
  import yaml

  directory = workdir / "checkpoints"
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    return None
  ckpt = Checkpointer(directory, C.CheckpointConfig(async_save=False))
  try:
    latest = ckpt.latest_step()
    saved = PromptRecord.from_json(ckpt.read_meta(latest)).config if latest is not None else None
  finally:
    ckpt.close()
  if latest is None:
    return None
  if saved is None and (workdir / "config.yaml").is_file():
    saved = yaml.safe_load((workdir / "config.yaml").read_text())
  return saved if isinstance(saved, dict) else None


def check_resumable(cfg: C.Config, workdir: Path) -> None:
  """Refuse, before any work, to resume a workdir whose checkpoints hold a prompt or optimizer state of other
  shapes than `cfg` builds (another prompt.length, method or method option, optimizer...)."""
  saved = recorded_config(workdir)
  if saved is None:
    return
  before, now = _state_keys(saved), _state_keys(cfg.to_dict())

  def same(k: str) -> bool:
    return bool(before[k]) == bool(now[k]) if k in _SET_OR_NOT else before[k] == now[k]

  diff = [k for k in now if k in before and not same(k)]
  if diff:
    changes = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in diff)
    raise CheckpointError(
      f"{workdir}: its checkpoints were trained with another prompt or optimizer state ({changes}); to start fresh "
      "use another --workdir or delete this one (keys such as train.steps or optimizer.learning_rate may change)"
    )


def check_trainable(cfg: C.Config) -> None:
  """What training needs beyond a valid config (evaluation may run without it)."""
  if cfg.prompt.length < 1:
    raise ConfigError(
      f"prompt.length {cfg.prompt.length}: training needs a prompt of at least 1 token (0 is the base model "
      "alone, for evaluation only)"
    )


class Trainer:
  """One training run in one workdir: the jitted step, the data stream, the hooks and where they write."""

  def __init__(self, run: Run, workdir: Path, train: Sequence[TaskData], *, progress: bool = True):
    """`train`: the training split of each of the run's tasks (`build_run`)."""
    from tqdm.auto import tqdm

    cfg, tc = run.cfg, run.cfg.train
    self.run, self.workdir, self.cfg = run, workdir, cfg
    self.tx = build_optimizer(cfg.optimizer, tc.steps, registry.get(cfg.prompt.method).learning_rates(cfg.prompt))
    metric = cfg.eval.metric
    self.ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint, metric=metric, mode=selection_mode(metric))
    each = [
      run.encode(d.examples, f"{m.name}/{cfg.data.train_split}") for m, d in zip(run.members, train, strict=False)
    ]
    if run.per_task:
      each = [rows.with_task_ids(k) for k, rows in enumerate(each)]
    self.sizes = [len(d.examples) for d in train]
    self.rows = concat_rows(each)
    self.mlog = MetricsLog(workdir)
    self.bar = tqdm(
      total=tc.steps,
      desc=run.prompt_spec.describe().replace("_", " "),  # the method trained: prompt tuning, prefix tuning, dept...
      disable=not (progress and jax.process_index() == 0),
      dynamic_ncols=True,
      unit="step",
    )
    self.stream: BatchStream | None = None
    self.hooks = H.default_hooks(
      cfg,
      ckpt=self.ckpt,
      mlog=self.mlog,
      bar=self.bar,
      meta=self.checkpoint_meta(),
      evaluator=evaluator_for(run) if (cfg.eval.every or cfg.eval.at_end) else None,
      epoch=lambda: self.stream.epoch,
      report_dir=workdir / "predictions",
      say=self.say,
    )

  def say(self, text: str) -> None:
    H.print_line(text, self.bar)

  def checkpoint_meta(self) -> dict:
    """The run's `PromptRecord` as every checkpoint's metadata holds it (JSON, beside the training counters)."""
    return PromptRecord(
      spec=self.run.prompt_spec,
      base=self.run.identity,
      architecture=self.run.architecture(),
      task=self.run.task_record(),
      config=self.cfg.to_dict(),
      head=self.run.head_spec,
    ).to_json()

  def initial_state(self) -> TrainState:
    """A fresh state, or the latest checkpoint's (checked against the base model)."""
    rep = shd.replicated(self.run.mesh)
    state = TrainState(
      prompt=self.run.prompt,
      opt_state=jax.jit(self.tx.init, out_shardings=rep)(self.run.prompt),
      seed=self.cfg.train.seed,
    )
    latest = self.ckpt.latest_step()
    if latest is None:
      return state
    record = PromptRecord.from_json(self.ckpt.read_meta(latest))
    check_tasks(record, self.run, self.ckpt.directory)
    check_identity(record, self.run, self.ckpt.directory)  # before restoring: another base may shape it otherwise
    state, meta = self.ckpt.restore_state(latest, state)
    check_identity(PromptRecord.from_json(meta), self.run, self.ckpt.directory)
    log.info("resumed from %s at step %d", self.ckpt.directory / str(latest), state.step)
    return state

  def _step_fn(self, state: TrainState):
    tc, run = self.cfg.train, self.run
    rep = shd.replicated(run.mesh)
    p_sh, o_sh = run.prompt_shardings(), jax.tree.map(lambda _: rep, state.opt_state)
    step = make_train_step(
      run.graphdef,
      self.tx,
      z_loss=tc.z_loss,
      microbatches=tc.microbatches,
      seed=state.seed,
      data_parallel=run.mesh.shape["data"] * run.mesh.shape["fsdp"],
    )
    return jax.jit(
      step,
      in_shardings=(p_sh, o_sh, run.frozen_shardings(), None, None),
      out_shardings=(p_sh, o_sh, rep),
      donate_argnums=(0, 1),
    )

  def _stream(self, state: TrainState) -> BatchStream:
    """The training batches from where `state` left off: one task's, or a mixture's."""
    d = self.cfg.data
    kw = dict(
      seed=d.seed,
      position=state.position,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      buckets=d.buckets(),
      packing=self._packing(),
    )
    if not d.mixture:
      return BatchStream(self.rows, self.cfg.train.batch_size, group_by_length=d.group_by_length, **kw)
    rates = mixing_rates(self.sizes, [m.rate for m in self.run.members], d.mixture_cap)
    return MixtureStream(
      self.rows, self.sizes, rates, self.cfg.train.batch_size, member_positions=state.member_positions, **kw
    )

  def _packing(self) -> Packing | None:
    """How the stream packs rows (`data.pack`), or None."""
    run, tc = self.run, self.cfg.train
    if not run.packs:
      return None
    return make_packing(
      self.cfg.prompt.length,
      run.base.config.decoder_start_token_id,
      microbatches=tc.microbatches,
      data_parallel=run.mesh.shape["data"] * run.mesh.shape["fsdp"],
      processes=jax.process_count(),
    )

  def fit(self, state: TrainState) -> TrainState:
    """Train from `state` to train.steps (or an early stop); raises `Preempted` after a signal's checkpoint."""
    tc = self.cfg.train
    self.stream = self._stream(state)
    step_fn, frozen = self._step_fn(state), self.run.frozen
    self.bar.update(state.step)
    while state.step < tc.steps:
      local = next(self.stream)
      slots = jax.process_count() * local.size * local.tokens_per_row(self.cfg.prompt.length)
      batch = self.run.device_batch(local)
      prompt, opt_state, metrics = step_fn(
        state.prompt, state.opt_state, frozen, batch, jnp.asarray(state.step, jnp.int32)
      )
      state = state.replace(
        prompt=prompt,
        opt_state=opt_state,
        step=state.step + 1,
        position=self.stream.position,
        member_positions=tuple(self.stream.member_positions),
      )
      self.bar.update(1)
      metrics = dict(
        metrics,
        input_length=self.stream.last_length,
        pad_fraction=self.stream.last_pad_fraction,
        slots=slots,
        rows=local.size * jax.process_count(),
      )
      info = H.StepInfo(step=state.step, last=state.step == tc.steps, metrics=metrics)
      state, info = self._after_step(state, info)
      if info.stop == "preempted":
        self.ckpt.wait()
        raise Preempted(state.step)
      if info.stop:
        break
    return state

  def _after_step(self, state: TrainState, info: H.StepInfo) -> tuple[TrainState, H.StepInfo]:
    """Every hook in order; a `Stop` is seen by the hooks after it (`StepInfo.stop`)."""
    for hook in self.hooks:
      out = hook(state, info)
      if isinstance(out, H.Stop):
        info = dataclasses.replace(info, stop=info.stop or out.reason)
      elif out is not None:
        state = out
    return state, info

  def close(self) -> None:
    self.bar.close()
    for hook in self.hooks:
      hook.close()
    self.ckpt.close()
    self.mlog.close()


@dataclasses.dataclass(frozen=True)
class RecordedFit:
  """A run from scratch as a parity check replays it through another framework."""

  initial: dict  # the prompt's parameters before the first step (numpy)
  state: TrainState  # after the last step
  losses: list[float]  # per logged step, as metrics.jsonl holds them
  batches: list  # the host batches the stream fed, in order


def fit_recorded(run: Run, workdir: Path, data: TaskData) -> RecordedFit:
  """Train `run` in `workdir` from its initial state, recording every batch fed and the initial prompt
  (tests/test_trajectory.py and launch/heads_seq_parity.py replay them through PyTorch)."""
  trainer = Trainer(run, workdir, data, progress=False)
  fed: list = []
  stream = trainer._stream
  trainer._stream = lambda state: Recorded(stream(state), fed)
  try:
    state = trainer.initial_state()
    initial = jax.tree.map(np.asarray, state.prompt)
    state = trainer.fit(state)
  finally:
    trainer.close()
  losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl") if r.get("kind") == "train"]
  return RecordedFit(initial, state, losses, fed)


def train(
  cfg: C.Config, workdir: str | Path, *, progress: bool = True, mesh=None, bases: dict | None = None
) -> TrainResult:
  """Prompt-tune as `cfg` says, in `workdir` (resuming from its latest checkpoint). `bases`: loaded base models to
  share between runs (`run.build_run`)."""
  check_trainable(cfg)
  workdir = checked_workdir(workdir)
  check_resumable(cfg, workdir)
  t_setup = time.time()
  run, train_data = build_run(cfg, mesh=mesh, bases=bases)
  if jax.process_index() == 0:
    (workdir / "config.yaml").write_text(C.dump(cfg))
    (workdir / "base_model.json").write_text(json.dumps(run.identity.to_dict(), indent=2))
  trainer = Trainer(run, workdir, train_data, progress=progress)
  try:
    state = trainer.initial_state()
    start = state.step
    if start >= cfg.train.steps and jax.process_index() == 0:
      log.warning(
        "%s is already trained to step %d (train.steps %d): nothing to train; raise train.steps to go on "
        "(--set train.steps=N), or use another --workdir",
        workdir,
        start,
        cfg.train.steps,
      )
    setup_seconds = round(time.time() - t_setup, 2)
    t_train = time.time()
    state = trainer.fit(state)
  finally:
    trainer.close()
  result = TrainResult(
    workdir=workdir,
    final_step=state.step if cfg.train.steps > start else start,
    best_step=state.best.step,
    best_value=state.best.value,
    metric=cfg.eval.metric,
    setup_seconds=setup_seconds,
    train_seconds=round(time.time() - t_train, 2),
    config=cfg,
  )
  if jax.process_index() == 0:
    if cfg.train.plot:
      plot_curves(workdir, metric=cfg.eval.metric)
    (workdir / "summary.json").write_text(json.dumps(result.summary(), indent=2))
  return result


def evaluate(cfg: C.Config, workdir: str | Path, *, step: str | int = "best", mesh=None) -> EvalResult:
  """Evaluate a checkpoint of `workdir` ("best", "latest" or a step number) on the eval split."""
  workdir = Path(workdir)
  if not (workdir / "checkpoints").is_dir():  # before loading anything
    raise CheckpointError(f"{workdir}: no checkpoints to evaluate")
  run, _ = build_run(cfg, mesh=mesh, with_train_data=False)
  ckpt = Checkpointer(
    workdir / "checkpoints", cfg.checkpoint, metric=cfg.eval.metric, mode=selection_mode(cfg.eval.metric)
  )
  if not ckpt.steps():
    raise CheckpointError(f"{workdir}: no checkpoints to evaluate")
  chosen = ckpt.choose(step)
  prompt, _, meta = ckpt.restore(chosen, abstract_like(run.prompt), None)
  check_identity(PromptRecord.from_json(meta), run, ckpt.directory)
  ckpt.close()
  evaluator = evaluator_for(run)
  metrics, records = evaluator(prompt)
  # beside training's predictions/step_N.jsonl, under a name of its own (a later eval never overwrites training's)
  name = f"eval_step_{chosen}"
  evaluator.write_report(workdir / "predictions", name, records)
  metrics = {k: float(v) for k, v in metrics.items()}
  return EvalResult(step=chosen, metrics=metrics, predictions=workdir / "predictions" / f"{name}.jsonl")
