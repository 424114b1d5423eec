"""`jaxprompt bench --configs A.yaml B.yaml ...`: the train steps of several configs (prompt methods, lengths,
options) side by side in one process, each on its own config's base model, data and optimizer: the trainer's own
jitted step (`Trainer._step_fn`) on the first batch of its own stream (real rows, its length bucket), compiled
once, then timed in turns (one step of each config per round, so a busy machine slows them alike): the median of
`iters` rounds after warm-up. Reported per config: step time, XLA's memory analysis of the compiled step (its
arguments, outputs and temporaries; the temporaries are what a method's activations cost), trained parameters and
token slots per row; and every figure as a ratio to the first config's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import sharding as shd
from jaxprompt.api import load_config
from jaxprompt.run import build_run
from jaxprompt.training.trainer import Trainer

_OFF = {"eval.every": 0, "eval.at_end": False, "checkpoint.async_save": False, "train.plot": False}


class _Step:
  """One config's compiled train step on its first batch, ready to run again and again (`__call__`)."""

  def __init__(self, path: str | Path, bases: dict):
    cfg = load_config(path, _OFF)
    run, train = build_run(cfg, mesh=shd.make_mesh(devices=jax.devices()[:1]), bases=bases)
    with tempfile.TemporaryDirectory() as tmp:
      trainer = Trainer(run, Path(tmp), train, progress=False)
      try:
        state = trainer.initial_state()
        local = next(trainer._stream(state))
        self.batch, self.step = run.device_batch(local), jnp.asarray(0, jnp.int32)
        args = (state.prompt, state.opt_state, run.frozen, self.batch, self.step)
        self.compiled = trainer._step_fn(state).lower(*args).compile()
      finally:
        trainer.close()
    self.held, self.frozen = (state.prompt, state.opt_state), run.frozen
    mem = self.compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    self.info = dict(
      config=str(path),
      prompt_method=cfg.prompt.method,
      trained_parameters=int(sum(np.size(x) for x in jax.tree.leaves(state.prompt))),
      slots_per_row=int(local.tokens_per_row(cfg.prompt.length)),
      batch_size=int(local.size),
      memory_bytes=int(total),
      temp_bytes=int(mem.temp_size_in_bytes),
    )

  def __call__(self) -> float:
    """One step, its seconds (the result awaited)."""
    t = time.perf_counter()
    prompt, opt, metrics = self.compiled(*self.held, self.frozen, self.batch, self.step)
    jax.block_until_ready(metrics["loss"])
    self.held = (prompt, opt)
    return time.perf_counter() - t


def run_methods_bench(paths: Sequence[str | Path], *, iters: int = 20, warmup: int = 2, log=print) -> dict:
  """Every config's step compiled, then timed in turns (one step of each, `iters` rounds after `warmup`, so a
  busy machine slows them alike); medians, and each figure over the first config's; logged as a table."""
  bases: dict = {}
  steps = [_Step(p, bases) for p in paths]
  times: list[list[float]] = [[] for _ in steps]
  for i in range(warmup + iters):
    for s, t in zip(steps, times, strict=True):
      seconds = s()
      if i >= warmup:
        t.append(seconds)
  rows = [dict(s.info, step_seconds=statistics.median(t), step_times=t) for s, t in zip(steps, times, strict=True)]
  first = rows[0]
  for r in rows:
    for key in ("step_seconds", "memory_bytes", "temp_bytes", "slots_per_row"):
      r[f"{key}_ratio"] = r[key] / first[key] if first[key] else float("nan")
  device = jax.devices()[0]
  out = dict(device=getattr(device, "device_kind", device.platform), iters=iters, configs=rows)
  log(report(out))
  return out


def report(result: dict) -> str:
  """The configs as a Markdown table, ratios against the first."""
  lines = [
    f"train step, median of {result['iters']} rounds in turns after warm-up, on {result['device']} "
    "(ratios: against the first row)",
    "",
    "| config | method | trained params | slots/row | step ms | step ratio | memory MiB | ratio | temporaries MiB "
    "| ratio |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["configs"]:
    lines.append(
      f"| {Path(r['config']).name} | {r['prompt_method']} | {r['trained_parameters']:,} | {r['slots_per_row']} "
      f"| {r['step_seconds'] * 1e3:.1f} | {r['step_seconds_ratio']:.2f} | {r['memory_bytes'] / 2**20:.2f} "
      f"| {r['memory_bytes_ratio']:.2f} | {r['temp_bytes'] / 2**20:.2f} | {r['temp_bytes_ratio']:.2f} |"
    )
  return "\n".join(lines)
