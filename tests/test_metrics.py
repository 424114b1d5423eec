"""Metrics equal scikit-learn / scipy (and T5's definitions) on fixed predictions, -1 counting as wrong."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from jaxprompt import metrics as M
from jaxprompt.data.t5_formats import STSB_LABELS


@pytest.fixture(scope="module")
def preds():
  rng = np.random.default_rng(0)
  gold3 = rng.integers(0, 3, 200)
  pred3 = np.where(rng.random(200) < 0.6, gold3, rng.integers(-1, 3, 200))  # ~10% invalid (-1)
  gold2 = rng.integers(0, 2, 150)
  pred2 = np.where(rng.random(150) < 0.7, gold2, rng.integers(-1, 2, 150))
  return gold3, pred3, gold2, pred2


def test_accuracy_and_confusion(preds):
  g, p, _, _ = preds
  assert (p == -1).sum() > 5
  assert M.accuracy(g, p) == pytest.approx(skm.accuracy_score(g, p))
  cm = M.confusion_matrix(g, p, 3)
  np.testing.assert_array_equal(cm[:, :3], skm.confusion_matrix(g, p, labels=[0, 1, 2]))
  np.testing.assert_array_equal(cm[:, 3], [np.sum((g == k) & (p == -1)) for k in range(3)])
  assert cm.sum() == len(g)


def test_binary_f1_counts_invalid_as_wrong(preds):
  _, _, g, p = preds
  flipped = np.where(p < 0, 1 - g, p)  # T5's f1_score_with_invalid
  assert M.f1(g, p) == pytest.approx(skm.f1_score(g, flipped))
  valid = p >= 0
  assert M.f1(g[valid], p[valid]) == pytest.approx(skm.f1_score(g[valid], p[valid]))
  assert M.f1([0, 0], [0, -1]) == 0.0  # no true positives: defined as 0


def test_macro_f1_and_per_class(preds):
  g, p, _, _ = preds
  assert M.macro_f1(g, p, 3) == pytest.approx(skm.f1_score(g, p, labels=[0, 1, 2], average="macro"))
  np.testing.assert_allclose(M.per_class_f1(g, p, 3), skm.f1_score(g, p, labels=[0, 1, 2], average=None))


def test_matthews(preds):
  g, p, g2, p2 = preds
  assert M.matthews(g, p) == pytest.approx(skm.matthews_corrcoef(g, p))
  assert M.matthews(g2, p2) == pytest.approx(skm.matthews_corrcoef(g2, p2))
  assert M.matthews([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0 == skm.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1])


def test_pearson_spearman():
  rng = np.random.default_rng(1)
  x = np.round(rng.random(100) * 5 * 5) / 5  # STS-B-like values: many ties
  y = np.clip(x + rng.normal(0, 0.8, 100), 0, 5).round(1)
  assert M.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
  np.testing.assert_allclose(M._ranks(x), scipy.stats.rankdata(x))
  assert M.pearson([1, 2, 3], [2, 2, 2]) == 0.0  # constant predictions: 0, not NaN


def test_classification_metrics_by_name(preds):
  g, p, g2, p2 = preds
  got = M.classification_metrics(["accuracy", "macro_f1", "matthews"], g, p, ["a", "b", "c"])
  assert got == pytest.approx(
    {
      "accuracy": skm.accuracy_score(g, p),
      "matthews": skm.matthews_corrcoef(g, p),
      "macro_f1": skm.f1_score(g, p, labels=[0, 1, 2], average="macro"),
    }
  )
  # STS-B: correlations of the label strings' values; an invalid prediction is -1.0 (T5's string_to_float)
  gs, ps = np.array([0, 5, 10, 25, 13]), np.array([1, 5, -1, 24, 12])

  def vals(idx):
    return np.array([float(STSB_LABELS[i]) if i >= 0 else -1.0 for i in idx])

  got = M.classification_metrics(["pearson", "spearman"], gs, ps, STSB_LABELS)
  assert got["pearson"] == pytest.approx(scipy.stats.pearsonr(vals(gs), vals(ps))[0])
  assert got["spearman"] == pytest.approx(scipy.stats.spearmanr(vals(gs), vals(ps))[0])
  assert M.classification_metrics(
    ["group_exact_match"], [1, 0, 1, 1], [1, 0, 0, 1], ["F", "T"], groups=["q1", "q1", "q2", "q3"]
  ) == {"group_exact_match": pytest.approx(2 / 3)}
  with pytest.raises(ValueError, match=r"unknown classification metric 'acc'"):
    M.classification_metrics(["acc"], g, p, ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"metric f1 is binary"):
    M.classification_metrics(["f1"], g, p, ["a", "b", "c"])


def test_postprocess():
  labels = ("entailment", "not_entailment")
  assert M.postprocess(labels, "not_entailment") == 1
  assert M.postprocess(labels, " entailment") == 0
  assert M.postprocess(labels, "Entailment") == -1
  assert M.postprocess(labels, "") == -1


def test_squad_normalisation_em_f1():
  assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert M.normalize_answer("A cat, an owl and THE dog.") == "cat owl and dog"
  assert M.exact_match("the Eiffel Tower", ["Eiffel Tower", "Paris"]) == 1.0
  assert M.exact_match("Tower", ["Eiffel Tower"]) == 0.0
  assert M.token_f1("Eiffel Tower in Paris", ["the Eiffel Tower"]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
  assert M.token_f1("London", ["Paris", "Paris France"]) == 0.0
  # ReCoRD repeats an input once per answer: only the first example of a group counts.
  got = M.qa_metrics(["Bo", "Bo", "x"], [["Bo", "Al"], ["Bo", "Al"], ["y"]], groups=["g1", "g1", "g2"])
  assert got == {"exact_match": 0.5, "token_f1": 0.5}


def test_wsc_referent_matching():
  assert M.wsc_referent_match("the dog", "The dog")
  assert M.wsc_referent_match("fuzzy bunny", "bunny")
  assert not M.wsc_referent_match("Bob", "Bob's hat")
  assert not M.wsc_referent_match("Tom", "Mitchell")
  # correct referent named -> right; wrong candidate named -> wrong; wrong candidate not named -> right
  assert M.wsc_accuracy(
    ["Tom", "Mitchell", "Tom"], ["Tom", "Mitchell", "Mitchell"], [True, False, False]
  ) == pytest.approx(2 / 3)


def test_generation_metrics_from_examples():
  record = [
    {"targets": "Bo", "answers": ["Bo", "Al"], "group": "0-1"},
    {"targets": "Al", "answers": ["Bo", "Al"], "group": "0-1"},
    {"targets": "Cy", "answers": ["Cy"], "group": "0-2"},
  ]
  assert M.generation_metrics(["exact_match", "token_f1"], ["Al", "Al", "Dee"], record) == {
    "exact_match": 0.5,
    "token_f1": 0.5,
  }
  wsc = [{"targets": "Tom", "referent_correct": True}, {"targets": "Mitchell", "referent_correct": False}]
  assert M.generation_metrics(["wsc_accuracy"], ["Tom", "Tom"], wsc) == {"wsc_accuracy": 1.0}
  plain = [{"targets": "4"}, {"targets": "five"}]
  assert M.generation_metrics(["exact_match"], ["4", "5"], plain) == {"exact_match": 0.5}
