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
    assert similarity(target, target, metric) == pytest.approx(1.0 if metric != "per_token" else
                                                               float((_unit(target) @ _unit(target).T).mean()))
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
