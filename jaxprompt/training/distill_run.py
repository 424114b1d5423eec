"""`jaxprompt distill CONFIG`: a cartridge distilled from a context file into a workdir, as training writes one
(config.yaml, base_model.json, checkpoints with the prompt's record, metrics.jsonl, summary.json), so `export`,
`inspect`, `generate` and `serve` read it as they read a training run's.

    context file ─► tokens ─► queries (its chunks + teacher-sampled continuations) ─► teacher log-probs (once)
        ─► for each step: KL(teacher ‖ model with the cartridge) ─► the cartridge's step ─► log / checkpoint

Running the command again resumes from the latest checkpoint (the queries and the teacher's log-probs are computed
again from the same file and seed: the same arrays).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.errors import ConfigError, DataError, MissingPathError
from jaxprompt.fileio import write_file_atomically
from jaxprompt.prompts import registry
from jaxprompt.prompts.cartridge import CartridgeSpec
from jaxprompt.prompts.record import PromptRecord, TaskRecord
from jaxprompt.run import Run, build_run
from jaxprompt.training import hooks as H
from jaxprompt.training import trainer as T
from jaxprompt.training.distill import (
  check_distillable,
  context_chunks,
  make_distill_step,
  teacher_logprobs,
  teacher_samples,
)
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.state import TrainState
from jaxprompt.training.tracking import MetricsLog


@dataclasses.dataclass(frozen=True)
class DistillResult:
  """What a distillation run ended with: the KL at its first and last step (this invocation's), the context's and
  the cartridge's lengths in tokens, the number of queries [C + samples, chunk]."""

  workdir: Path
  final_step: int
  kl_start: float
  kl_final: float
  context_tokens: int
  cartridge_length: int
  queries: int
  train_seconds: float

  def summary(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "workdir"}


def read_context(dc: C.DistillConfig) -> str:
  """The context file's text; a one-line error when it is not given, missing or empty."""
  if not dc.context_file:
    raise ConfigError("distill.context_file: give the text file to distil into the cartridge")
  path = Path(dc.context_file)
  if not path.is_file():
    raise MissingPathError(f"distill.context_file {path} does not exist")
  text = path.read_text()
  if not text.strip():
    raise DataError(f"distill.context_file {path} is empty")
  return text


def _build(cfg: C.Config, text: str, mesh) -> Run:
  """The run (base, tokenizer, cartridge); `prompt.init: text` without `init_text` starts from the context."""
  pc = cfg.prompt
  if pc.init == "text" and pc.init_text is None:
    cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(pc, init_text=text))
  run, _ = build_run(cfg, mesh=mesh, with_train_data=False)
  if not isinstance(run.prompt_spec, CartridgeSpec):
    raise ConfigError(f"jaxprompt distill trains a cartridge: set prompt.method cartridge (not {pc.method})")
  check_distillable(run.base)
  return run


def _queries(run: Run, context_ids: list[int], dc: C.DistillConfig) -> np.ndarray:
  """[C + samples, chunk]: the context's chunks, then the continuations the teacher samples after it."""
  chunks = context_chunks(context_ids, dc.chunk)
  if not dc.samples:
    return chunks
  sampled = teacher_samples(
    run.base, context_ids, dc.samples, dc.chunk, seed=run.cfg.train.seed, temperature=dc.temperature
  )
  return np.concatenate([chunks, sampled])


def _meta(run: Run, cfg: C.Config) -> dict:
  """Every checkpoint's record: a cartridge on this base, its task the context file (inputs as raw text)."""
  task = TaskRecord(name=f"distill:{Path(cfg.distill.context_file).name}")
  return PromptRecord(
    spec=run.prompt_spec, base=run.identity, architecture=run.architecture(), task=task, config=cfg.to_dict()
  ).to_json()


def _initial_state(run: Run, tx, ckpt: Checkpointer) -> TrainState:
  rep = shd.replicated(run.mesh)
  state = TrainState(
    prompt=run.prompt, opt_state=jax.jit(tx.init, out_shardings=rep)(run.prompt), seed=run.cfg.train.seed
  )
  latest = ckpt.latest_step()
  if latest is None:
    return state
  T.check_identity(PromptRecord.from_json(ckpt.read_meta(latest)), run, ckpt.directory)
  return ckpt.restore_state(latest, state)[0]


def _loop(run: Run, state: TrainState, tx, data, *, ckpt, mlog, bar, meta) -> tuple[TrainState, list[float]]:
  """Full-batch steps to train.steps: KL logged every train.log_every steps, checkpoints every checkpoint.every
  and at the end; returns the state and the KL before each step run (and after the last)."""
  cfg = run.cfg
  step_fn, loss_fn = make_distill_step(run.graphdef, tx)
  log_at = H.Cadence(cfg.train.log_every)
  save_at = H.Cadence(cfg.checkpoint.every)
  kls, t0 = [], time.time()
  while state.step < cfg.train.steps:
    prompt, opt_state, kl = step_fn(state.prompt, state.opt_state, run.frozen, *data)
    state = state.replace(prompt=prompt, opt_state=opt_state, step=state.step + 1)
    kls.append(float(kl))
    bar.update(1)
    last = state.step == cfg.train.steps
    if log_at.due(state.step, last=last):
      bar.set_postfix(kl=f"{kls[-1]:.4f}")
      mlog.write(state.step, {"loss": kls[-1], "kl": kls[-1], "step_time": (time.time() - t0) / len(kls)})
    if save_at.due(state.step, last=last):
      ckpt.save_state(state, meta)
  kls.append(float(loss_fn(state.prompt, run.frozen, *data)))
  return state, kls


def distill(cfg: C.Config, workdir: str | Path, *, progress: bool = True, mesh=None) -> DistillResult:
  """Distil `cfg.distill.context_file` into the cartridge `cfg.prompt` describes, in `workdir` (resuming from its
  latest checkpoint)."""
  from tqdm.auto import tqdm

  text = read_context(cfg.distill)
  T.check_trainable(cfg)
  workdir = T.checked_workdir(workdir)
  T.check_resumable(cfg, workdir)
  run = _build(cfg, text, mesh)
  context_ids = run.tokenizer(text)["input_ids"]
  queries = _queries(run, context_ids, cfg.distill)
  data = (jnp.asarray(queries), teacher_logprobs(run.base, context_ids, queries))
  if jax.process_index() == 0:
    write_file_atomically(workdir / "config.yaml", lambda t: t.write_text(C.dump(cfg)), overwrite=True)
    ident = json.dumps(run.identity.to_dict(), indent=2)
    write_file_atomically(workdir / "base_model.json", lambda t: t.write_text(ident), overwrite=True)
  tx = build_optimizer(cfg.optimizer, cfg.train.steps, registry.get(cfg.prompt.method).learning_rates(cfg.prompt))
  ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
  mlog = MetricsLog(workdir)
  bar = tqdm(total=cfg.train.steps, desc="cartridge distillation", disable=not (progress and jax.process_index() == 0))
  t0 = time.time()
  try:
    state = _initial_state(run, tx, ckpt)
    bar.update(state.step)
    state, kls = _loop(run, state, tx, data, ckpt=ckpt, mlog=mlog, bar=bar, meta=_meta(run, cfg))
    ckpt.wait()
  finally:
    bar.close()
    ckpt.close()
    mlog.close()
  result = DistillResult(
    workdir, state.step, kls[0], kls[-1], len(context_ids), cfg.prompt.length, len(queries), round(time.time() - t0, 2)
  )
  if jax.process_index() == 0:
    summary = json.dumps(result.summary(), indent=2)
    write_file_atomically(workdir / "summary.json", lambda t: t.write_text(summary), overwrite=True)
  return result
