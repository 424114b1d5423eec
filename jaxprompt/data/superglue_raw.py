"""The original SuperGLUE jsonl files (the benchmark's own downloads) -> TFDS-style rows.

TFDS flattens three tasks before T5 sees them; doing the same here lets a local copy of the original
files give exactly the text that TFDS would. Rows that are already flat pass through unchanged.
Mirrors tensorflow_datasets/text/super_glue.py (`_generate_examples`, `_fix_wst`, record entities).
"""

from __future__ import annotations

from typing import Any, Mapping

from jaxprompt.data import rows as R

Row = Mapping[str, Any]


def multirc(row: Row) -> list[Row]:
  """{"passage": {"text", "questions": [{"question", "answers": [...]}]}} -> one row per answer."""
  passage = row.get("passage")
  if not isinstance(passage, Mapping):
    return [row]
  out = []
  for q in R.value(passage, "questions"):
    for a in R.value(q, "answers"):
      label = a.get("label")
      out.append(
        {
          "paragraph": R.text(passage, "text"),
          "question": R.text(q, "question"),
          "answer": R.text(a, "text"),
          "label": -1 if label is None else int(bool(label)),
          "idx": {"paragraph": row.get("idx"), "question": q.get("idx"), "answer": a.get("idx")},
        }
      )
  return out


def record(row: Row) -> list[Row]:
  """{"passage": {"text", "entities": [{start, end}]}, "qas": [...]} -> one row per query.

  Entities and answers become sorted, de-duplicated strings, as TFDS stores them (so T5 lists them)."""
  passage = row.get("passage")
  if not isinstance(passage, Mapping):
    return [row]
  text = R.text(passage, "text")
  entities = sorted({text[R.integer(e, "start") : R.integer(e, "end") + 1] for e in R.value(passage, "entities")})
  return [
    {
      "passage": text,
      "query": R.text(qa, "query"),
      "entities": entities,
      "answers": sorted({R.text(a, "text") for a in qa.get("answers", [])}),
      "idx": {"passage": row.get("idx"), "query": qa.get("idx")},
    }
    for qa in R.value(row, "qas")
  ]


def wsc(row: Row) -> list[Row]:
  """{"text", "target": {span1_index, span1_text, ...}} -> flat row with TFDS's wsc.fixed span fixes."""
  target = row.get("target")
  if not isinstance(target, Mapping):
    return [row]
  ex = {k: v for k, v in row.items() if k != "target"}
  ex.update(target)
  _fix_spans(ex)
  return [ex]


def _fix_spans(ex: dict) -> None:
  # TFDS `_fix_wst`, including its quirk: the "theyscold" text fix is computed and thrown away.
  for k in ("span1", "span2"):
    span, index = R.text(ex, k + "_text"), R.integer(ex, k + "_index")
    if span in ex["text"] or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
      continue
    if "theyscold" in span:
      ex["span2_index"] = 10
    first_word = ex["text"].split()[index]
    span = (span[0].lower() if first_word[0].islower() else span[0].upper()) + span[1:]
    span = span.rstrip(".").replace("\n", " ")
    ex[k + "_text"] = span
    if span not in ex["text"]:
      raise R.RowError(k + "_text", f"{span!r} is not part of the text")
