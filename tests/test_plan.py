"""`jaxprompt plan`: ahead-of-time memory and FLOPs on simulated devices, without loading weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _plan(*args, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["HF_HUB_OFFLINE"] = "1"
  out = tmp_path / "plan.json"
  p = subprocess.run(
    [sys.executable, "-m", "jaxprompt.cli", "plan", *args, "--json", str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  return p, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
def test_the_shipped_t5_xxl_config_fits_16_gib_per_device_on_8_devices(tmp_path):
  """As shipped: the config's own mesh (fsdp 4 x model 2) and remat (full), no overrides."""
  p, table = _plan(
    "configs/paper/t5-xxl-lm-adapt.yaml", "--devices", "8", "--mesh", "config", "--budget-gib", "16", tmp_path=tmp_path
  )
  assert p.returncode == 0, p.stderr[-3000:]
  best = table["recommended"]
  print(p.stdout)
  assert best["mesh"] == {"data": 1, "fsdp": 4, "model": 2} and best["remat"] == "full"
  assert best["fits"] and best["total_gib"] <= 16
  # an 11B-parameter model stored in bfloat16 (the shipped config) is ~22 GiB: 8-way sharded, ~2.6 GiB of arguments
  assert 2 < best["argument_gib"] < 3.5
  # ~630 TFLOP per step in all (forward ~215, backward ~215, full-remat recompute ~215): ~79 per device
  assert 60e12 < best["flops_per_device"] < 100e12


def test_plan_recommends_the_most_data_parallel_mesh_that_fits(tmp_path):
  p, table = _plan("configs/quickstart.yaml", "--devices", "4", "--budget-gib", "1", tmp_path=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  assert table["recommended"]["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
  assert table["recommended"]["remat"] == "none" and table["recommended"]["total_gib"] < 0.1
  assert "recommended: --set mesh.data=4 --set mesh.fsdp=1 --set mesh.model=1" in p.stdout


def test_plan_rejects_an_unknown_topology(tmp_path):
  p, _ = _plan("configs/quickstart.yaml", "--topology", "v9-1024", tmp_path=tmp_path)
  assert p.returncode == 2 and "unknown topology 'v9-1024'" in p.stderr


def test_plan_without_a_budget_recommends_nothing_on_devices_that_report_no_memory(tmp_path):
  """CPU (simulated devices) reports no memory: no budget, so no mesh is recommended as if it fitted."""
  from jaxprompt.tools.plan import detected_budget_gib

  assert detected_budget_gib()[0] is None  # this CPU backend reports no memory limit
  p, table = _plan("configs/quickstart.yaml", "--devices", "2", "--mesh", "config", tmp_path=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "no memory budget: none was given" in p.stdout and "recommended:" not in p.stdout
  assert table["recommended"] is None and table["budget_gib"] is None and len(table["rows"]) == 1
