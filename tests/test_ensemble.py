"""Prompt ensembles: one mixed batch of K prompts equals K separate evals, combined by majority vote."""

import json

import jax
import numpy as np
import pytest

import jaxprompt
from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.cli import main
from jaxprompt.evaluation.ensemble import combine
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.run import build_run


def _cfg(folder, init_file=None):
  over = [
    f"model.path={folder}",
    "prompt.length=4",
    "data.task=quickstart",
    "data.taskless=true",
    "data.input_length=16",
    "data.target_length=2",
    "eval.max_examples=40",
    "eval.batch_size=16",
  ]
  over += ["prompt.init=file", f"prompt.init_file={init_file}"] if init_file else ["prompt.init=random_uniform"]
  return C.load(None, over)


def test_combine_votes_and_breaks_ties_by_summed_log_probability():
  s = np.log(
    np.array(
      [[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], [[0.1, 0.7, 0.2], [0.1, 0.2, 0.7]], [[0.5, 0.4, 0.1], [0.4, 0.35, 0.25]]]
    )
  )  # [K=3, N=2, C=3]
  # example 0: votes 0, 1, 0 -> 0; example 1: votes 1, 2, 0 -> a three-way tie, summed log-prob picks class 2
  assert combine(s, "vote").tolist() == [0, 2]
  assert combine(s, "mean").tolist() == np.argmax(s.mean(0), -1).tolist()
  with pytest.raises(jaxprompt.UserError):
    combine(s, "median")


def test_an_ensemble_of_three_equals_a_majority_vote_of_three_separate_evals(byte_t5, tmp_path, capsys):
  rng = np.random.default_rng(4)
  files = []
  for k in range(3):
    files.append(tmp_path / f"p{k}.npy")
    np.save(files[-1], rng.normal(size=(4, 32)).astype(np.float32) * 3)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  separate = []
  for f in files:
    run, _ = build_run(_cfg(byte_t5, f), mesh=mesh, with_train_data=False)
    metrics, records = evaluator_for(run)(run.prompt)
    separate.append((metrics, records))
  labels = list(run.labels)
  preds = np.array([[labels.index(r["prediction"]) for r in recs] for _, recs in separate])  # [K, N]
  scores = np.array([[r["scores"] for r in recs] for _, recs in separate])  # [K, N, C], rounded to 1e-5
  votes = np.stack([np.bincount(col, minlength=len(labels)) for col in preds.T])
  tied = votes == votes.max(1, keepdims=True)
  want = np.argmax(np.where(tied, scores.sum(0), -np.inf), -1)
  assert len(set(map(tuple, preds))) > 1  # the members disagree somewhere: the vote is not trivial
  result = jaxprompt.evaluate_ensemble(_cfg(byte_t5), files, mesh=mesh)
  assert result["predictions"] == [labels[i] for i in want]
  for member, (metrics, _) in zip(result["members"], separate, strict=True):
    assert member["accuracy"] == pytest.approx(metrics["accuracy"])
  gold = np.array([labels.index(r["targets"]) for r in separate[0][1]])
  assert result["ensemble"]["accuracy"] == pytest.approx(float(np.mean(want == gold)))
  # the CLI prints the same
  assert main(["eval", str(_yaml(tmp_path, byte_t5)), "--ensemble", *map(str, files)]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["ensemble"] == pytest.approx(result["ensemble"]) and len(printed["members"]) == 3


def _yaml(tmp_path, folder):
  import yaml

  path = tmp_path / "ens.yaml"
  path.write_text(yaml.safe_dump(_cfg(folder).to_dict()))
  return path
