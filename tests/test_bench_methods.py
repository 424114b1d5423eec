"""`jaxprompt bench --configs`: several configs' train steps side by side, as ratios to the first."""

import json

from jaxprompt import config as C
from tests.helpers import run_cli, tiny_cfg


def test_configs_side_by_side_as_ratios(byte_llama, tmp_path, capsys):
  """Prompt tuning at P = 4 and 12 and DePT (m = 4): the trainer's step for each, in turns; the longer prompt runs
  more slots per row and needs more temporaries, DePT trains its offset too, every ratio is over the first row."""
  paths = []
  for name, over in [
    ("p4", {"prompt.length": 4}),
    ("p12", {"prompt.length": 12}),
    ("dept", {"prompt.method": "dept", "prompt.dept_rank": 2, "prompt.dept_max_length": 12}),
  ]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(C.dump(tiny_cfg(byte_llama, **{"mesh.data": 1, **over})))
    paths.append(path)
  lines = run_cli(capsys, "bench", "--configs", *paths, "--iters", 2, "--json", tmp_path / "out.json")
  assert any(line.startswith("| p12.yaml | prompt_tuning |") for line in lines)
  rows = json.loads((tmp_path / "out.json").read_text())["configs"]
  p4, p12, dept = rows
  assert [r["prompt_method"] for r in rows] == ["prompt_tuning", "prompt_tuning", "dept"]
  hidden = p4["trained_parameters"] // 4
  assert p12["trained_parameters"] == 12 * hidden and dept["trained_parameters"] == 4 * hidden + 12 * 2 + 2 * hidden
  assert p12["slots_per_row"] - p4["slots_per_row"] == 8 and dept["slots_per_row"] == p4["slots_per_row"]
  assert p4["step_seconds_ratio"] == p4["memory_bytes_ratio"] == 1.0 and len(p4["step_times"]) == 2
  assert p12["temp_bytes"] > p4["temp_bytes"] and p12["temp_bytes_ratio"] == p12["temp_bytes"] / p4["temp_bytes"]
  assert all(r["step_seconds"] > 0 for r in rows)
