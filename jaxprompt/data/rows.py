"""Reading the fields of one dataset row, with errors that name the field.

Rows come from JSONL / CSV / TSV / text files, TFDS or HF `datasets`, so a field may arrive as a JSON
value or as CSV text: an integer field accepts 3 or "3". A problem raises `RowError`; the source that
read the row adds where it came from (file and line, or dataset and example number).

Label values (`label_string`), in this order:
  * a string that is one of the task's label strings is that label;
  * `label_map` (custom tasks) first renames a raw file value to a label string (exact keys, "PREFIX*" keys and
    "re:PATTERN" keys: `mapped_label`);
  * an integer, or a string of digits that is not itself a label, is an index into the label strings
    (TFDS / HF class ids, "0 sentence" text files); -1 means "no label" (TFDS/HF test splits) and
    becomes T5's "<unk>" target;
  * a JSON boolean is an index (False=0, True=1) for tasks whose labels are ("False", "True") only
    (the original SuperGLUE files store BoolQ / WiC / WSC / MultiRC labels that way).
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Mapping, Sequence

from jaxprompt.errors import DataError

UNKNOWN = "<unk>"  # T5's target for rows without a label (label == -1)
_INT = re.compile(r"\s*-?\d+\s*")


class RowError(ValueError):
  """One row cannot be formatted; the caller prefixes where the row came from."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field {field!r}: {problem}")
    self.field = field
    self.problem = problem


def value(row: Mapping[str, Any], key: str) -> Any:
  # CSV readers give None for a missing trailing column, so None counts as missing too.
  if key not in row or row[key] is None:
    present = [k for k, v in row.items() if v is not None]
    raise RowError(key, f"missing (the row has {', '.join(map(str, present)) or 'no fields'})")
  return row[key]


def text(row: Mapping[str, Any], key: str) -> str:
  v = value(row, key)
  if isinstance(v, str):
    return v
  if isinstance(v, numbers.Number) and not isinstance(v, bool):
    return str(v)
  raise RowError(key, f"expected text, got {type(v).__name__} {v!r:.60}")


def integer(row: Mapping[str, Any], key: str) -> int:
  v = value(row, key)
  if (isinstance(v, numbers.Integral) and not isinstance(v, bool)) or (isinstance(v, str) and _INT.fullmatch(v)):
    return int(v)
  raise RowError(key, f"expected an integer, got {v!r:.60}")


def number(row: Mapping[str, Any], key: str) -> float:
  v = value(row, key)
  try:
    if isinstance(v, str) or (isinstance(v, numbers.Real) and not isinstance(v, bool)):
      return float(v)
  except ValueError:  # a string that is no number
    pass
  raise RowError(key, f"expected a number, got {v!r:.60}")


def texts(row: Mapping[str, Any], key: str) -> list[str]:
  v = value(row, key)
  if isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v):
    return list(v)
  raise RowError(key, f"expected a list of strings, got {v!r:.60}")


def check_label_map(label_map: Mapping[str, str], where: str) -> None:
  """Each "re:" key of a label map is a valid regular expression (a DataError naming it otherwise)."""
  for k in label_map:
    if k.startswith("re:"):
      try:
        re.compile(k[3:])
      except re.error as e:
        raise DataError(f"{where}: key {k!r} is not a regular expression ({e})") from None


def mapped_label(label_map: Mapping[str, str], v: Any) -> Any:
  """`v` renamed by a label map: an exact key, else the first key "PREFIX*" whose prefix starts `v`, or "re:PATTERN"
  whose pattern matches all of `v`; unchanged when none fits."""
  raw = str(v)
  if raw in label_map:
    return label_map[raw]
  for k, out in label_map.items():
    if k.endswith("*") and raw.startswith(k[:-1]):
      return out
    if k.startswith("re:") and re.fullmatch(k[3:], raw):
      return out
  return v


def label_string(
  row: Mapping[str, Any], labels: Sequence[str], key: str = "label", label_map: Mapping[str, str] | None = None
) -> str:
  """The label string of `row[key]` (rules in the module docstring), or "<unk>" for -1."""
  v = value(row, key)
  if label_map:
    v = mapped_label(label_map, v)
  if isinstance(v, str):
    if v in labels:
      return v
    if not _INT.fullmatch(v):
      raise RowError(key, f"{v!r} is not one of the labels ({', '.join(labels)})")
    v = int(v)
  if isinstance(v, bool):
    if tuple(labels) == ("False", "True"):
      return labels[int(v)]
    raise RowError(key, f"boolean label {v} needs the labels (False, True); this task's are ({', '.join(labels)})")
  if isinstance(v, numbers.Integral):
    i = int(v)
    if i == -1:
      return UNKNOWN
    if 0 <= i < len(labels):
      return labels[i]
    raise RowError(key, f"label index {i} is outside 0..{len(labels) - 1} ({', '.join(labels)})")
  raise RowError(key, f"expected a label string or index, got {v!r:.60}")
