"""`jaxprompt sweep`: a 2 x 2 grid trains four variants on one loaded base model and writes its summary."""

import json

import pytest

from jaxprompt import run as R
from jaxprompt.cli import main
from jaxprompt.errors import ConfigError
from jaxprompt.tools.sweep import parse_grid, variant_name, variants
from tests.helpers import tiny_cfg


def test_grid_parsing_and_variant_names():
  grid = parse_grid(["optimizer.learning_rate=0.3,1e-2", "prompt.length=2,4"])
  assert grid == [("optimizer.learning_rate", [0.3, 0.01]), ("prompt.length", [2, 4])]
  names = [variant_name(v) for v in variants(grid)]
  assert names == [
    "optimizer.learning_rate=0.3,prompt.length=2",
    "optimizer.learning_rate=0.3,prompt.length=4",
    "optimizer.learning_rate=0.01,prompt.length=2",
    "optimizer.learning_rate=0.01,prompt.length=4",
  ]
  for bad in (["steps=3"], ["train.steps"], ["a.b=1", "a.b=2"]):
    with pytest.raises(ConfigError):
      parse_grid(bad)


def test_a_2x2_sweep_loads_the_base_once_and_writes_its_summary(byte_t5, tmp_path, monkeypatch, capsys):
  import yaml

  loads = []
  real = R.load_base
  monkeypatch.setattr(R, "load_base", lambda *a, **k: loads.append(a[0].path) or real(*a, **k))
  cfg = tmp_path / "c.yaml"
  raw = tiny_cfg(byte_t5).to_dict()
  raw["eval"].update(at_end=True, every=0, max_examples=8)
  raw["train"]["steps"] = 3
  cfg.write_text(yaml.safe_dump(raw))
  # data.seed x eval.batch_size: four variants whose train steps are one program (compiled once, then taken from
  # the persistent compilation cache) and whose eval programs are two
  code = main(
    [
      "sweep",
      str(cfg),
      "--workdir",
      str(tmp_path / "sw"),
      "--grid",
      "data.seed=0,1",
      "--grid",
      "eval.batch_size=4,8",
      "--no-progress",
    ]
  )
  assert code == 0
  assert loads == [str(byte_t5)]  # one load for four variants
  summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
  assert len(summary["variants"]) == 4 and summary["bases_loaded"] == 1
  for row in summary["variants"]:
    assert row["final_step"] == 3 and 0.0 <= row["best_value"] <= 1.0
    assert (tmp_path / "sw" / row["variant"] / "checkpoints" / "3").is_dir()
  assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
  table = (tmp_path / "sw" / "sweep.md").read_text()
  assert table.count("\n") == 6 and "data.seed=1,eval.batch_size=8" in table and table in capsys.readouterr().out
  # a bad value fails before anything trains
  assert main(["sweep", str(cfg), "--workdir", str(tmp_path / "bad"), "--grid", "prompt.length=2,x"]) == 2
  assert not (tmp_path / "bad").exists()
