"""Preemption and crash safety: SIGTERM checkpoints and exits 75; SIGKILL at random moments (also in the
middle of checkpoint writes) never loses the run; non-finite steps stop with an error naming the step."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxprompt.checkpoint import Checkpointer
from jaxprompt.prompts.io import load_trained_prompt
from jaxprompt.training.trainer import EXIT_PREEMPTED
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parent.parent

# A training process whose Checkpointer.save can be told to SIGKILL the process right after it hands a
# checkpoint to Orbax's background writer — i.e. while that checkpoint is being written.
DRIVER = r"""
import os, signal, sys
import jaxprompt.checkpoint as ck
kill_at = int(os.environ.get("KILL_DURING_SAVE", "-1"))
orig = ck.Checkpointer.save
def save(self, step, *a, **k):
    orig(self, step, *a, **k)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
ck.Checkpointer.save = save
from jaxprompt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **extra)
  return env


def _start(config: Path, workdir: Path, *extra: str, **env) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-c", DRIVER, "train", str(config), "--workdir", str(workdir), "--no-progress", *extra],
    cwd=ROOT,
    env=_env(**env),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _final_prompt(workdir: Path, step: int) -> np.ndarray:
  value, info = load_trained_prompt(workdir / "checkpoints" / str(step))
  assert info["step"] == step
  return value


@pytest.mark.slow
def test_sigkill_at_random_points_and_during_checkpoint_writes(byte_t5, tmp_path):
  steps = 40
  config = write_config(byte_t5, tmp_path / "c.yaml", steps)
  ref = _start(config, tmp_path / "ref")
  assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
  want = _final_prompt(tmp_path / "ref", steps)

  work = tmp_path / "killed"
  rng = random.Random(0)
  plan = [
    ("save", 10),
    ("time", rng.uniform(1, 6)),
    ("save", 25),
    ("time", rng.uniform(1, 6)),
    ("time", rng.uniform(2, 8)),
    ("save", 35),
  ]
  kills = 0
  for kind, when in plan:
    if kind == "save":
      p = _start(config, work, KILL_DURING_SAVE=str(when))
      rc = p.wait(timeout=300)
    else:
      p = _start(config, work)
      try:
        rc = p.wait(timeout=when)
      except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
    p.stdout.close(), p.stderr.close()
    if rc == -signal.SIGKILL:
      kills += 1
      # whatever the kill interrupted, every step directory Orbax reports is complete and restorable
      ck = Checkpointer.reader(work / "checkpoints")
      for s in ck.steps():
        _final_prompt(work, s) if s == steps else load_trained_prompt(work / "checkpoints" / str(s))
      ck.close()
    else:
      assert rc == 0
  assert kills >= 5
  last = _start(config, work)
  assert last.wait(timeout=300) == 0, last.stderr.read()[-2000:]
  np.testing.assert_array_equal(_final_prompt(work, steps), want)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes_exactly(byte_t5, tmp_path):
  steps = 200
  config = write_config(byte_t5, tmp_path / "c.yaml", steps)
  p = _start(config, tmp_path / "run")
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline and p.poll() is None:
    time.sleep(0.2)
  p.send_signal(signal.SIGTERM)
  assert p.wait(timeout=120) == EXIT_PREEMPTED == 75
  err = p.stderr.read()
  assert "SIGTERM" in err
  ck = Checkpointer.reader(tmp_path / "run" / "checkpoints")
  stopped = ck.latest_step()
  ck.close()
  assert 0 < stopped < steps, "the SIGTERM arrived after the run had finished; make the run longer"
  again = _start(config, tmp_path / "run")
  assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
  ref = _start(config, tmp_path / "ref", "--set", "checkpoint.every=1000")  # the cadence does not change the maths
  assert ref.wait(timeout=300) == 0
  np.testing.assert_array_equal(_final_prompt(tmp_path / "run", steps), _final_prompt(tmp_path / "ref", steps))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(byte_t5, tmp_path):
  config = write_config(byte_t5, tmp_path / "c.yaml", 30)
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxprompt.cli",
      "train",
      str(config),
      "--workdir",
      str(tmp_path / "r"),
      "--no-progress",
      "--set",
      "optimizer.learning_rate=.nan",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxprompt: error: non-finite loss, gradient or update at step 1;"), last
  skip = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxprompt.cli",
      "train",
      str(config),
      "--workdir",
      str(tmp_path / "s"),
      "--no-progress",
      "--set",
      "optimizer.learning_rate=.nan",
      "--set",
      "train.nan_policy=skip",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert skip.returncode == 0, skip.stderr[-2000:]
  recs = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
  assert sum(r["skipped_steps"] for r in recs) == 30  # every update was non-finite and none was applied
  value, _ = load_trained_prompt(tmp_path / "s" / "checkpoints" / "30")
  assert np.isfinite(value).all()
