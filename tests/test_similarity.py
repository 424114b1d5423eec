"""Prompt similarity for transfer (SPoT): a prompt is most similar to itself, and the ranking is stable."""

import json

import numpy as np
import pytest

from jaxprompt.cli import main
from jaxprompt.errors import PromptError
from jaxprompt.prompts.similarity import METRICS, rank, similarity


def test_similarity_is_one_for_itself_and_ranks_a_near_copy_first(tmp_path, capsys):
  rng = np.random.default_rng(0)
  target = rng.normal(size=(6, 16))
  near = target[::-1] + 0.05 * rng.normal(size=(6, 16))  # the same tokens in another order, a little noise
  sources = {"random": rng.normal(size=(8, 16)), "near": near, "opposite": -target, "other": rng.normal(size=(3, 16))}
  for metric in METRICS:
    assert similarity(target, target, metric) == pytest.approx(
      1.0 if metric != "per_token" else float((_unit(target) @ _unit(target).T).mean())
    )
    ranked = rank(target, sources, metric)
    assert ranked[0][0] == "near"
    assert ranked == rank(target, dict(reversed(list(sources.items()))), metric)  # independent of input order
  assert rank(target, sources, "average")[-1] == ("opposite", pytest.approx(-1.0))
  assert similarity(target, target, "max") == pytest.approx(1.0)
  with pytest.raises(PromptError, match="one hidden size"):
    similarity(target, rng.normal(size=(6, 8)))
  for name, value in [("t", target), *sources.items()]:
    np.save(tmp_path / f"{name}.npy", value.astype(np.float32))
  paths = [str(tmp_path / f"{n}.npy") for n in sources]
  assert main(["similarity", str(tmp_path / "t.npy"), *paths, "--metric", "max", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert [r["source"] for r in out["ranking"]] == [str(tmp_path / f"{n}.npy") for n, _ in rank(target, sources, "max")]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_the_two_stage_transfer_recipe_runs_end_to_end(tmp_path, monkeypatch):
  """configs/transfer: a source prompt (one prompt on a mixture of quickstart `min`, `first`, `last`), then the target
  (`max`) initialised from it."""
  import os
  from pathlib import Path

  import jaxprompt
  from jaxprompt.prompts.io import load_prompt_source
  from jaxprompt.run import build_run

  monkeypatch.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )
  root = Path(__file__).resolve().parent.parent
  monkeypatch.chdir(tmp_path)  # the target config names runs/transfer_source, relative to where it runs
  short = {"train.steps": 20, "eval.every": 0, "eval.max_examples": 50, "checkpoint.every": 20, "train.plot": False}
  source = jaxprompt.train(root / "configs/transfer/source.yaml", "runs/transfer_source", **short)
  assert source.final_step == 20 and source.config.data.member_names() == (
    "quickstart:min",
    "quickstart:first",
    "quickstart:last",
  )
  target_cfg = jaxprompt.load_config(root / "configs/transfer/target.yaml", short)
  run, _ = build_run(target_cfg, with_train_data=False)
  np.testing.assert_array_equal(
    np.asarray(run.prompt["prompt"]["embeddings"]), load_prompt_source("runs/transfer_source").value
  )  # starts from the source
  target = jaxprompt.train(target_cfg, "runs/transfer_target")
  assert target.final_step == 20 and (tmp_path / "runs/transfer_target/checkpoints/20").is_dir()
