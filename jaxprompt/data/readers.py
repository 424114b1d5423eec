"""Local data files -> rows, each with where it came from ("path line N") for error messages.

.jsonl  one JSON object per line (blank lines skipped)
.json   a JSON array of objects
.csv    header row, then comma-separated rows (standard quoting)
.tsv    header row, then tab-separated rows; quotes are text (GLUE's TSVs are not quoted)
.txt    "LABEL text" per line (SST-2 / TREC style): the label is the first whitespace-separated token,
        the text the rest of the line; the task names the two columns these fill.
.conll  CoNLL token classification: "token TAB tag" per line (a token's other columns, if any, are ignored: the tag
        is the last one), a whitespace-only line ends a sentence; one row per sentence, {"tokens": [...],
        "ner_tags": [...]} (HF's field names). Also .annotated (WNUT-17's test file).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterator

from jaxprompt.errors import DataError, MissingPathError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".conll", ".annotated")
_LINE = re.compile(r"(\S+)\s(.*)")


def read_rows(path: str | Path, *, line_fields: tuple[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
  """(where, row) pairs in file order. `line_fields`: the (label, text) columns of a .txt line."""
  path = Path(path)
  if not path.is_file():
    raise MissingPathError(f"data file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    return list(_jsonl(path))
  if suffix == ".json":
    return _json(path)
  if suffix in (".csv", ".tsv"):
    return list(_delimited(path, suffix == ".tsv"))
  if suffix == ".txt":
    if line_fields is None:
      raise DataError(
        f"{path}: 'LABEL text' .txt files only fit single-text tasks (sst2, cola, custom); "
        "use .jsonl/.csv/.tsv with the task's columns"
      )
    return list(_label_text(path, line_fields))
  if suffix in (".conll", ".annotated"):
    return list(_conll(path))
  raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
  with path.open(encoding="utf-8-sig") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path} line {n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
      yield where, row


def _json(path: Path) -> list[tuple[str, dict]]:
  try:
    data = json.loads(path.read_text(encoding="utf-8-sig"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON array of objects (or use .jsonl, one object per line)")
  out = []
  for n, row in enumerate(data):
    if not isinstance(row, dict):
      raise DataError(f"{path} item {n}: expected a JSON object, got {type(row).__name__}")
    out.append((f"{path} item {n}", row))
  return out


def _delimited(path: Path, tabs: bool) -> Iterator[tuple[str, dict]]:
  with path.open(encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tabs else csv.DictReader(f)
    if not reader.fieldnames:
      return
    for row in reader:
      where = f"{path} line {reader.line_num}"
      if None in row:  # DictReader's key for cells beyond the header
        raise DataError(
          f"{where}: {len(reader.fieldnames) + len(row[None])} cells but the header has "
          f"{len(reader.fieldnames)} columns"
        )
      yield where, row


def _label_text(path: Path, fields: tuple[str, str]) -> Iterator[tuple[str, dict]]:
  label_key, text_key = fields
  with path.open(encoding="utf-8-sig") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      m = _LINE.fullmatch(line)
      if m is None:
        raise DataError(f"{path} line {n}: expected 'LABEL text', got {line!r:.80}")
      yield f"{path} line {n}", {label_key: m.group(1), text_key: m.group(2)}


def _conll(path: Path) -> Iterator[tuple[str, dict]]:
  """One row per sentence: its tokens and tags; a whitespace-only line (WNUT-17's train file has lines of a single
  TAB) ends a sentence."""
  tokens: list[str] = []
  tags: list[str] = []
  start = 1
  with path.open(encoding="utf-8-sig") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        if tokens:
          yield f"{path} line {start}", {"tokens": tokens, "ner_tags": tags}
        tokens, tags, start = [], [], n + 1
        continue
      cells = line.split("\t") if "\t" in line else line.split()
      if len(cells) < 2 or not cells[0] or not cells[-1].strip():
        raise DataError(f"{path} line {n}: expected 'token TAB tag', got {line!r:.80}")
      tokens.append(cells[0])
      tags.append(cells[-1].strip())
  if tokens:
    yield f"{path} line {start}", {"tokens": tokens, "ner_tags": tags}
