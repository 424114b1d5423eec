"""T5's text formats for GLUE and SuperGLUE, reproduced exactly in plain Python.

Source: google-research/text-to-text-transfer-transformer, t5/data/preprocessors.py (`glue`, `stsb`,
`wsc_simple` with `_wsc_inputs`, `record`) and t5/data/glue_utils.py (benchmark names, feature order),
and google-research/prompt-tuning's `remove_first_text_token` for the paper's "taskless" variant.

T5 joins with `tf.strings.join(separator=" ")`: no stripping and no whitespace collapsing, so neither do
we. Each formatter maps one row (TFDS feature names) to a list of examples, because ReCoRD yields one
example per answer and WSC's training split keeps only rows whose candidate is the right referent.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from jaxprompt.data import rows as R

Row = Mapping[str, Any]

# STS-B: T5 rounds the score to the nearest 0.2 and prints it with one decimal, making it a 26-way
# classification ("0.0" ... "5.0"); these strings double as rank-classification labels.
STSB_LABELS = tuple(f"{i / 5:.1f}" for i in range(26))


def remove_first_text_token(inputs: str) -> str:
  # prompt-tuning's taskless variant: tf.strings.regex_replace(x, r"^[^ ]* ", "", replace_global=False).
  return re.sub(r"^[^ ]* ", "", inputs, count=1)


def glue(row: Row, split: str, *, benchmark: str, features: Sequence[str], labels: Sequence[str]) -> list[dict]:
  """`benchmark key1: v1 key2: v2 ...` -> label string (T5's `preprocessors.glue`)."""
  parts = [benchmark]
  fields = {key: R.text(row, key) for key in features}
  for key in features:
    parts += [f"{key}:", fields[key]]
  inputs = " ".join(parts)
  if benchmark == "multirc":
    # T5 strips MultiRC's HTML markup after joining.
    inputs = re.sub(r"<(/)?b>", "", inputs.replace("<br>", " "))
  # "fields": the features by name, what a prompt template places (`data.templates`)
  return [{"inputs": inputs, "targets": R.label_string(row, labels), "fields": fields}]


def stsb_target(score: float) -> str:
  # tf.as_string(tf.round(x * 5) / 5, precision=1) on a float32 feature: float32 arithmetic and
  # round-half-to-even, as TF does, so boundary scores (2.5 -> "2.4") match T5 exactly.
  x = np.float32(score)
  return f"{float(np.round(x * np.float32(5)) / np.float32(5)):.1f}"


def stsb(row: Row, split: str) -> list[dict]:
  fields = {key: R.text(row, key) for key in ("sentence1", "sentence2")}
  inputs = " ".join(["stsb sentence1:", fields["sentence1"], "sentence2:", fields["sentence2"]])
  return [{"inputs": inputs, "targets": stsb_target(R.number(row, "label")), "fields": fields}]


# Two WSC texts where T5 hard-codes the blanked text (span2_index points at the wrong word).
_WSC_SPECIAL = {
  (
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite "
    'loud. "Good for him," he said. '
  ): (
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed out quite "
    'loud. "Good for X ," he said.'
  ),
  (
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic pebble in "
    "an iron safe . Some day they might want to use it , but really for now, what more could they wish for?"
  ): (
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic pebble in "
    "an iron safe . Some day they might want to use X , but really for now, what more could they wish for?"
  ),
}


def wsc_inputs(row: Row) -> str:
  """The WSC text with the pronoun (word span2_index, split on single spaces) replaced by X."""
  text = R.text(row, "text")
  if text in _WSC_SPECIAL:
    return _WSC_SPECIAL[text]
  words = text.split(" ")
  i = R.integer(row, "span2_index")
  pronoun = R.text(row, "span2_text")
  # T5 asserts these (its blanking has no case for a pronoun at either end of the text).
  if not 0 < i < len(words):
    raise R.RowError("span2_index", f"{i} is not inside the text's words 1..{len(words) - 1}")
  if words[i] != pronoun:
    raise R.RowError("span2_index", f"word {i} is {words[i]!r}, not span2_text {pronoun!r}")
  return " ".join([" ".join(words[:i]), "X", " ".join(words[i + 1 :])])


def wsc_simple(row: Row, split: str) -> list[dict]:
  """`wsc: ... *pronoun* ...` -> the candidate referent (T5's `wsc_simple`, a generative task).

  On "train" only rows whose candidate is the right referent are kept (T5's training task); other splits
  keep every row and record `referent_correct` for `metrics.wsc_accuracy`."""
  raw = row.get("label")
  label = R.UNKNOWN if raw is None else R.label_string(row, ("False", "True"))
  correct = None if label == R.UNKNOWN else label == "True"
  # T5 filters with tf.cast(x.get("label", False), tf.bool): a missing label drops the row, -1 keeps it.
  if split == "train" and (raw is None or correct is False):
    return []
  pronoun = R.text(row, "span2_text")
  # tf.strings.regex_replace is global: every " X " becomes the marked pronoun, as in T5.
  marked = re.sub(r" X ", lambda _: f" *{pronoun}* ", wsc_inputs(row))
  return [{"inputs": f"wsc: {marked}", "targets": R.text(row, "span1_text"), "referent_correct": correct}]


def _group(row: Row, keys: Sequence[str]) -> str | None:
  idx = row.get("idx")
  if isinstance(idx, Mapping) and all(k in idx for k in keys):
    return "-".join(str(idx[k]) for k in keys)
  return None


def multirc(row: Row, split: str, *, labels: Sequence[str]) -> list[dict]:
  """T5's `glue` with MultiRC's fixed order question, answer, paragraph; `group` = the question (for
  the per-question exact-match metric)."""
  out = glue(row, split, benchmark="multirc", features=("question", "answer", "paragraph"), labels=labels)
  out[0]["group"] = _group(row, ("paragraph", "question"))
  return out


def record(row: Row, split: str) -> list[dict]:
  """`record query: ... entities: a, b passage: ...` -> one example per answer ("<unk>" if none)."""
  passage = R.text(row, "passage")
  passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", passage)
  passage = re.sub(r"\n@highlight\n", ". ", passage)
  inputs = " ".join(
    ["record query:", R.text(row, "query"), "entities:", ", ".join(R.texts(row, "entities")), "passage:", passage]
  )
  answers = R.texts(row, "answers") if row.get("answers") is not None else []
  group = _group(row, ("passage", "query"))
  return [{"inputs": inputs, "targets": a, "answers": answers, "group": group} for a in answers or [R.UNKNOWN]]
