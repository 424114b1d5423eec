"""Evaluation metrics, in plain numpy, matching T5's definitions (t5/evaluation/metrics.py, qa_utils.py).

Classification predictions are class indices; -1 means "not a label" (a generated string that is no
label's text, see `postprocess`) and always counts as wrong. Scores are fractions in [0, 1]
(correlations in [-1, 1]); T5 reports the same numbers times 100. Undefined values (a correlation of a
constant, an F1 with no positives) are 0.0 rather than NaN, so best-checkpoint selection always has a
number to compare.

Task metric names (`classification_metrics` / `generation_metrics`):
  accuracy, f1 (binary, class 1 positive), macro_f1, matthews, pearson, spearman (on the label strings'
  numeric values, e.g. STS-B), group_exact_match (MultiRC: every answer of a question right);
  exact_match, token_f1 (SQuAD-normalised, max over reference answers, one per group: ReCoRD),
  wsc_accuracy (T5's wsc_simple referent matching).
Token classification (`entity_metrics`, tag strings per word): entity_f1 / entity_precision / entity_recall
(micro over entity types, entities as seqeval's default mode reads IOB / IOBES tags: CoNLL's conlleval), and
tag_accuracy (per word).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

import numpy as np

CLASSIFICATION = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman", "group_exact_match")
GENERATION = ("exact_match", "token_f1", "wsc_accuracy")
SEQUENCE_HEAD = ("accuracy", "macro_f1", "matthews")  # what a sequence head reports beside its task's metrics
ENTITY = ("entity_f1", "entity_precision", "entity_recall", "tag_accuracy")  # token classification (IOB tags)


def _arrays(gold, pred) -> tuple[np.ndarray, np.ndarray]:
  g, p = np.asarray(gold, np.int64), np.asarray(pred, np.int64)
  if g.shape != p.shape or g.ndim != 1:
    raise ValueError(f"gold {g.shape} and predictions {p.shape} must be equal-length vectors")
  return g, p


def postprocess(label_strings: Sequence[str], text: str) -> int:
  """The class index of a generated string, -1 if it is no label (T5's string_label_to_class_id).

  Surrounding whitespace is ignored: some tokenizers decode a leading space."""
  try:
    return list(label_strings).index(text.strip())
  except ValueError:
    return -1


def accuracy(gold, pred) -> float:
  g, p = _arrays(gold, pred)
  return float(np.mean(g == p)) if len(g) else 0.0


def _f1(tp, fp, fn) -> np.ndarray:
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def f1(gold, pred, positive: int = 1) -> float:
  """Binary F1 of class `positive`. A prediction that is not 0/1 counts as the wrong class (T5's
  f1_score_with_invalid), so -1 for a negative example is a false positive."""
  g, p = _arrays(gold, pred)
  p = np.where((p == 0) | (p == 1), p, 1 - g)
  tp = np.sum((p == positive) & (g == positive))
  fp = np.sum((p == positive) & (g != positive))
  fn = np.sum((p != positive) & (g == positive))
  return float(_f1(tp, fp, fn))


def confusion_matrix(gold, pred, num_classes: int) -> np.ndarray:
  """[K, K + 1] int64 counts: row = gold class, column = predicted class; the last column counts -1."""
  g, p = _arrays(gold, pred)
  if np.any((g < 0) | (g >= num_classes)):
    raise ValueError(f"gold labels must be in 0..{num_classes - 1}")
  p = np.where((p >= 0) & (p < num_classes), p, num_classes)
  out = np.zeros((num_classes, num_classes + 1), np.int64)
  np.add.at(out, (g, p), 1)
  return out


def per_class_f1(gold, pred, num_classes: int) -> np.ndarray:
  cm = confusion_matrix(gold, pred, num_classes)
  tp = np.diag(cm[:, :num_classes])
  return _f1(tp, cm[:, :num_classes].sum(0) - tp, cm.sum(1) - tp)


def macro_f1(gold, pred, num_classes: int) -> float:
  """Unweighted mean of the per-class F1 over classes 0..K-1 (T5's mean_multiclass_f1 for CB)."""
  return float(np.mean(per_class_f1(gold, pred, num_classes)))


def matthews(gold, pred) -> float:
  """Matthews correlation (multi-class form, as sklearn; -1 predictions are one more class)."""
  g, p = _arrays(gold, pred)
  classes, inv = np.unique(np.concatenate([g, p]), return_inverse=True)
  k, n = len(classes), len(g)
  cm = np.zeros((k, k), np.float64)
  np.add.at(cm, (inv[:n], inv[n:]), 1)
  t, q, c = cm.sum(1), cm.sum(0), np.trace(cm)
  cov_tp = c * n - t @ q
  cov_pp, cov_tt = n * n - q @ q, n * n - t @ t
  return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp > 0 else 0.0


def pearson(x, y) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x @ x) * (y @ y))
  return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing their average rank (scipy.stats.rankdata's default)."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  ends = np.r_[starts[1:], len(x)]
  avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def spearman(x, y) -> float:
  return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def group_exact_match(gold, pred, groups: Sequence) -> float:
  """Mean over groups of "every prediction in the group is right" (T5's MultiRC exact match)."""
  g, p = _arrays(gold, pred)
  right: dict = collections.defaultdict(lambda: True)
  for key, ok in zip(groups, g == p, strict=False):
    right[key] &= bool(ok)
  return float(np.mean(list(right.values()))) if right else 0.0


# -- text answers --------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _token_f1(target: str, prediction: str) -> float:
  pt, tt = prediction.split(), target.split()
  same = sum((collections.Counter(pt) & collections.Counter(tt)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pt), same / len(tt)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  p = normalize_answer(prediction)
  return float(max(normalize_answer(a) == p for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
  p = normalize_answer(prediction)
  return max(_token_f1(normalize_answer(a), p) for a in answers)


def qa_metrics(
  predictions: Sequence[str], answers: Sequence[Sequence[str]], groups: Sequence | None = None
) -> dict[str, float]:
  """Mean exact match and token F1, each the max over an example's answers. With `groups`, only the
  first example of each group counts (ReCoRD repeats an input once per answer)."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
  keep = range(len(predictions))
  if groups is not None:
    first = {}
    for i, key in enumerate(groups):
      first.setdefault(key if key is not None else ("row", i), i)
    keep = sorted(first.values())
  em = [exact_match(predictions[i], answers[i]) for i in keep]
  f1s = [token_f1(predictions[i], answers[i]) for i in keep]
  return {"exact_match": float(np.mean(em)) if em else 0.0, "token_f1": float(np.mean(f1s)) if f1s else 0.0}


_DETERMINERS = frozenset(
  {
    "a",
    "an",
    "few",
    "her",
    "his",
    "each",
    "every",
    "many",
    "much",
    "my",
    "our",
    "some",
    "that",
    "the",
    "their",
    "these",
    "this",
    "those",
    "which",
    "whose",
    "your",
  }
)


def wsc_referent_match(prediction: str, referent: str) -> bool:
  """Whether a generated referent names the candidate (T5's postprocessors.wsc_simple)."""

  def clean(s: str) -> str:
    return " ".join(w for w in s.strip().lower().split(" ") if w not in _DETERMINERS)

  p, r = clean(prediction), clean(referent)
  if ("'" in p) != ("'" in r):  # "Bob" does not name "Bob's hat"
    return False
  pw, rw = set(p.split(" ")), set(r.split(" "))
  return pw <= rw or rw <= pw


def wsc_accuracy(predictions: Sequence[str], referents: Sequence[str], referent_correct: Sequence[bool]) -> float:
  """Accuracy of "the prediction names the candidate" against "the candidate is the referent"."""
  hits = [
    wsc_referent_match(p, r) == bool(c) for p, r, c in zip(predictions, referents, referent_correct, strict=False)
  ]
  return float(np.mean(hits)) if hits else 0.0


# -- by name ---------------------------------------------------------------------------------------------


def _values(labels: Sequence[str], idx: np.ndarray) -> np.ndarray:
  try:
    table = np.array([float(s) for s in labels], np.float64)
  except ValueError:
    raise ValueError(f"pearson/spearman need numeric label strings, got {list(labels)[:5]}") from None
  # T5's string_to_float maps an unparseable prediction to -1.0.
  return np.where(idx >= 0, table[np.clip(idx, 0, None)], -1.0)


def classification_metrics(
  names: Sequence[str], gold, pred, labels: Sequence[str], groups: Sequence | None = None
) -> dict[str, float]:
  """The named metrics of class-index predictions (gold: [N] label indices, pred: [N], -1 = invalid)."""
  g, p = _arrays(gold, pred)
  out = {}
  for name in names:
    if name == "accuracy":
      out[name] = accuracy(g, p)
    elif name == "f1":
      if len(labels) != 2:
        raise ValueError(f"metric f1 is binary; use macro_f1 for {len(labels)} labels")
      out[name] = f1(g, p)
    elif name == "macro_f1":
      out[name] = macro_f1(g, p, len(labels))
    elif name == "matthews":
      out[name] = matthews(g, p)
    elif name in ("pearson", "spearman"):
      fn = pearson if name == "pearson" else spearman
      out[name] = fn(_values(labels, g), _values(labels, p))
    elif name == "group_exact_match":
      if groups is None:
        raise ValueError("metric group_exact_match needs the examples' groups")
      out[name] = group_exact_match(g, p, groups)
    else:
      raise ValueError(f"unknown classification metric {name!r}; known: {', '.join(CLASSIFICATION)}")
  return out


def generation_metrics(
  names: Sequence[str], predictions: Sequence[str], examples: Sequence[Mapping]
) -> dict[str, float]:
  """The named metrics of generated strings against the examples (their "targets", and "answers" /
  "group" / "referent_correct" where the task provides them)."""
  if len(predictions) != len(examples):
    raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
  out = {}
  for name in names:
    if name in ("exact_match", "token_f1"):
      answers = [ex.get("answers") or [ex["targets"]] for ex in examples]
      groups = [ex.get("group") for ex in examples] if any("group" in ex for ex in examples) else None
      out[name] = qa_metrics(predictions, answers, groups)[name]
    elif name == "wsc_accuracy":
      kept = [(p, ex) for p, ex in zip(predictions, examples, strict=False) if ex.get("referent_correct") is not None]
      out[name] = wsc_accuracy(
        [p for p, _ in kept], [ex["targets"] for _, ex in kept], [ex["referent_correct"] for _, ex in kept]
      )
    else:
      raise ValueError(f"unknown generation metric {name!r}; known: {', '.join(GENERATION)}")
  return out


# -- entity-level scores of tag sequences (seqeval's default, "conlleval" mode) -------------------------------------
# A chunk ends where the previous tag closes one (E, S; B or I before B, S or O; a change of type) and starts where
# this tag opens one (B, S; E or I after O, E or S; a change of type): so "I-X" after "O" starts an entity, and
# "B-X I-Y" is two. Sentences are scored as one sequence with an "O" between them, as seqeval does.


def _split_tag(tag: str) -> tuple[str, str]:
  """ "B-PER" -> ("B", "PER"); "O" -> ("O", "_") (seqeval's reading: the prefix letter, the rest after a dash)."""
  return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return (
    prev_tag in ("E", "S")
    or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
    or (prev_tag not in ("O", ".") and prev_type != type_)
  )


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
  return (
    tag in ("B", "S")
    or (prev_tag in ("E", "S", "O") and tag in ("E", "I") and not (prev_tag == "S" and tag == "S"))
    or (tag not in ("O", ".") and prev_type != type_)
  )


def entities(sentences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
  """Every entity (type, first, last) of tag sentences, positions in the sentences joined with an "O" between."""
  seq = [t for sent in sentences for t in list(sent) + ["O"]]
  out, prev_tag, prev_type, begin = set(), "O", "", 0
  for i, chunk in enumerate(seq + ["O"]):
    tag, type_ = _split_tag(chunk)
    if _chunk_ends(prev_tag, tag, prev_type, type_):
      out.add((prev_type, begin, i - 1))
    if _chunk_starts(prev_tag, tag, prev_type, type_):
      begin = i
    prev_tag, prev_type = tag, type_
  return out


def entity_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
  """Micro precision / recall / F1 over entities (exact type and span) and per-word tag accuracy of predicted tag
  sentences against gold ones (0.0 where undefined)."""
  if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred, strict=False)):
    raise ValueError("gold and predicted tag sentences must have the same lengths")
  g, p = entities(gold), entities(pred)
  tp = len(g & p)
  precision = tp / len(p) if p else 0.0
  recall = tp / len(g) if g else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  words = sum(len(s) for s in gold)
  same = sum(a == b for gs, ps in zip(gold, pred, strict=True) for a, b in zip(gs, ps, strict=True))
  return dict(
    entity_f1=f1, entity_precision=precision, entity_recall=recall, tag_accuracy=same / words if words else 0.0
  )
