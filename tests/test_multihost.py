"""Multi-host training: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) give the
same prompt as 1 process x 8 devices and as 1 device."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxprompt.prompts.io import load_trained_prompt
from tests.helpers import write_config

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(config, workdir, devices: int, extra=(), wait=True):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  p = subprocess.Popen(
    [sys.executable, "-m", "jaxprompt.cli", "train", str(config), "--workdir", str(workdir), "--no-progress", *extra],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  return p


def _ok(p):
  out, err = p.communicate(timeout=400)
  assert p.returncode == 0, err[-3000:]
  return out


@pytest.mark.slow
def test_two_processes_preempted_on_one_host_resume_and_equal_one_process_and_one_device(byte_t5, tmp_path):
  """2 processes x 4 devices: a SIGTERM reaching one host stops both at the same step (one checkpoint, exit 75);
  the resumed run ends with the prompt of 1 process x 8 devices and of 1 device."""
  steps = 60
  # SGD: Adafactor's first steps divide by a freshly estimated second moment and so amplify float32
  # reduction-order differences (all-reduce over gloo vs in-process vs none) to ~2e-6; SGD keeps them at
  # rounding level, so this checks the distributed machinery itself at 1e-6.
  config = write_config(
    byte_t5,
    tmp_path / "c.yaml",
    steps,
    **{
      "mesh.data": -1,
      "train.batch_size": 16,
      "train.log_every": 1,
      "checkpoint.every": 1000,
      "eval.at_end": True,
      "eval.max_examples": 24,
      "eval.batch_size": 8,
      "optimizer.name": "sgd",
      "optimizer.learning_rate": 30.0,
    },
  )
  work = tmp_path / "multi"

  def launch():
    port = _free_port()
    return [
      _run(config, work, 4, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)])
      for i in range(2)
    ]

  procs = launch()
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # training is under way
    assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [75, 75], [p.stderr.read()[-2000:] for p in procs]
  saved = sorted(int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < steps  # one checkpoint, written by both hosts at the agreed step
  stopped = load_trained_prompt(work / "checkpoints" / str(saved[0]))[0]
  outs = [_ok(p) for p in launch()]
  json_lines = [[line for line in o.splitlines() if line.startswith("{")] for o in outs]
  assert len(json_lines[0]) == 1 and json_lines[1] == []  # only process 0 reports
  _ok(_run(config, tmp_path / "eight", 8))
  _ok(_run(config, tmp_path / "one", 1))
  got = {k: load_trained_prompt(tmp_path / k / "checkpoints" / str(steps))[0] for k in ("multi", "eight", "one")}
  # Equal up to float32 summation order: the batch's gradient is a sum of 8 (or 2 x 4) partial sums instead of one,
  # and SGD at lr 30 carries ulp differences on (prompt values up to ~6, where an ulp is 4.8e-7). Measured
  # 2026-12-03: multi-eight 1.2e-6, multi-one 2.1e-6 and eight-one 3.3e-6 in one process; a real difference (a
  # wrong shard, a lost step, other dropout masks) is orders of magnitude larger (the resume check below: > 1e-3).
  np.testing.assert_allclose(got["multi"], got["eight"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["multi"], got["one"], atol=1e-5, rtol=0)
  assert np.abs(got["multi"] - stopped).max() > 1e-3  # the resumed run really trained on
  # evaluation saw every example once, whichever process held it
  preds = (work / "predictions" / f"step_{steps}.jsonl").read_text().splitlines()
  assert len(preds) == 24
