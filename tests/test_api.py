"""The Python API: the documented example (docs/getting-started.md) runs as written and returns the documented
fields; bad input raises the error type whose first line the CLI prints."""

import json
import os
import re
from pathlib import Path

import pytest

import jaxprompt
from jaxprompt.cli import main
from jaxprompt.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def user_cache(monkeypatch):
  # the user's cache, as a user's own script would see it: the quickstart base is pre-trained at most once
  monkeypatch.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )


DOC_PAGE = ROOT / "docs" / "getting-started.md"  # the Python API example lives there (tests/test_docs.py skips it)


def _docs_example() -> str:
  text = DOC_PAGE.read_text()
  section = text[text.index("## Python API") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_runs_and_returns_the_documented_fields(tmp_path, monkeypatch, user_cache, capsys):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  scope: dict = {}
  exec(compile(_docs_example(), str(DOC_PAGE), "exec"), scope)
  result, scores, cfg = scope["result"], scope["scores"], scope["cfg"]
  assert isinstance(result, jaxprompt.TrainResult) and isinstance(scores, jaxprompt.EvalResult)
  assert result.final_step == 100 and result.best_step in (50, 100) and result.metric == "accuracy"
  assert result.best_value >= 0.9 and result.workdir == Path("runs/api")
  assert (tmp_path / result.checkpoints / str(result.best_step)).is_dir() and result.metrics_file.exists()
  assert result.train_seconds >= result.setup_seconds > 0 and result.config.train.steps == 100
  assert scores.step == result.best_step and scores.metrics["accuracy"] == pytest.approx(result.best_value)
  lines = scores.predictions.read_text().splitlines()
  assert len(lines) == 500 and {"inputs", "prediction", "correct"} <= set(json.loads(lines[0]))
  assert cfg.prompt.length == 20 and isinstance(cfg, type(result.config))
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2 and printed[0].split()[2] == "100"


def test_bad_input_through_the_api_raises_the_error_the_cli_prints(tmp_path, capsys):
  config = str(ROOT / "configs" / "quickstart.yaml")
  with pytest.raises(ConfigError) as api:
    jaxprompt.train(config, tmp_path / "w", **{"train.stepz": 3})
  assert main(["train", config, "--workdir", str(tmp_path / "w2"), "--set", "train.stepz=3"]) == 2
  cli = capsys.readouterr().err.strip().splitlines()
  assert cli == [f"jaxprompt: error: {str(api.value).splitlines()[0]}"]
  assert "did you mean 'steps'" in cli[0]
  with pytest.raises(ConfigError, match="eval.metric"):
    jaxprompt.train(config, tmp_path / "w3", eval__metric="bleu")  # plain-name overrides, checked up front
  with pytest.raises(UserError):
    jaxprompt.evaluate(config, tmp_path / "no-such-run")
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
