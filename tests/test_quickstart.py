"""The main job: `jaxprompt train configs/quickstart.yaml` offline on a fresh install, to its accuracy."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("quickstart")
  drop = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_DISABLE_MOST_OPTIMIZATIONS")  # a user's plain machine
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(JAXPROMPT_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1")
  start = time.time()
  proc = subprocess.run(
    [sys.executable, "-m", "jaxprompt.cli", "train", "configs/quickstart.yaml", "--workdir", str(tmp / "run")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  return proc, time.time() - start, tmp


@pytest.mark.slow
def test_quickstart_meets_its_numbers(quickstart_run):
  proc, seconds, tmp = quickstart_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  print(
    f"quickstart: {seconds:.1f} s wall-clock (incl. pre-training the base), best dev accuracy "
    f"{summary['best_value']:.4f} at step {summary['best_step']}"
  )
  # Wall-clock time is reported, not asserted: this machine's speed varies ~3x from day to day (the README gives
  # measured times); speed is the benchmarks' job.
  assert summary["best_value"] >= 0.90
  run = tmp / "run"
  assert any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
  assert (run / "curves.png").exists() and (run / "metrics.jsonl").exists()
  assert "prompt tuning" in proc.stderr and "pre-training the quickstart base model" in proc.stderr  # progress bars
  # the base model was cached as an ordinary HF folder, loadable on its own
  cached = list((tmp / "cache").glob("quickstart-t5-*"))
  assert len(cached) == 1 and (cached[0] / "model.safetensors").exists() and (cached[0] / "config.json").exists()


@pytest.mark.slow
def test_the_prompt_is_what_solves_the_taskless_task(quickstart_run, monkeypatch):
  proc, _, tmp = quickstart_run
  assert proc.returncode == 0
  monkeypatch.setenv("JAXPROMPT_CACHE", str(tmp / "cache"))
  from jaxprompt import config as C
  from jaxprompt import quickstart
  from jaxprompt import sharding as shd
  from jaxprompt.evaluation.evaluator import evaluator_for
  from jaxprompt.run import build_run
  from jaxprompt.training.trainer import evaluate

  monkeypatch.setattr(quickstart, "pretrain", lambda **_: pytest.fail("the cached base model was not reused"))
  cfg = C.load(ROOT / "configs/quickstart.yaml")
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  tuned = evaluate(cfg, tmp / "run", mesh=mesh)
  # the same frozen model, no prompt: inputs without their task prefix are ambiguous
  bare = C.load(ROOT / "configs/quickstart.yaml", ["prompt.length=0"])
  run, _ = build_run(bare, mesh=mesh, with_train_data=False)
  no_prompt, _ = evaluator_for(run)(run.prompt)
  # with the prefix the base model itself solves the task (it was pre-trained on it)
  prefixed = C.load(ROOT / "configs/quickstart.yaml", ["prompt.length=0", "data.taskless=false"])
  run_p, _ = build_run(prefixed, mesh=mesh, with_train_data=False)
  with_prefix, _ = evaluator_for(run_p)(run_p.prompt)
  print(
    f"quickstart dev accuracy: tuned prompt {tuned.metrics['accuracy']:.3f}, "
    f"no prompt {no_prompt['accuracy']:.3f}, text prefix {with_prefix['accuracy']:.3f}"
  )
  assert tuned.metrics["accuracy"] >= 0.9 and with_prefix["accuracy"] >= 0.9
  assert no_prompt["accuracy"] < 0.6
