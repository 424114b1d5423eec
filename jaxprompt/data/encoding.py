"""Tokenisation: text examples -> the typed batches of `jaxprompt.batches`, in the layout of a model's batch type.

Notation: B batch (N rows when a batch holds a whole split), L input length, T target length, C classes.

The batch types lay out token ids (`from_token_ids`, `label_rows`, `layout_inputs`); this module calls the
tokenizer (a transformers tokenizer, or anything with the same `__call__`, `eos_token_id`, `bos_token_id` and
`pad_token_id`) with the special tokens each layout wants. With a prompt template (`data.templates`) an input is
its example's fields laid out around the template's virtual tokens (negative ids), cut by its fields only.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from jaxprompt.batches import ClassBatch, input_row, trim
from jaxprompt.data.templates import Template
from jaxprompt.errors import DataError

log = logging.getLogger(__name__)

_CHUNK = 4096  # texts per tokenizer call


def ids_of(tokenizer, texts: Sequence[str], special: bool) -> list[list[int]]:
  """The token ids of each text: each distinct text once (labels and targets repeat), in batched calls (a fast
  tokenizer encodes a list in parallel; one call per text made tokenisation the slow part of setup)."""
  unique = list(dict.fromkeys(texts))
  table: dict[str, list[int]] = {}
  for i in range(0, len(unique), _CHUNK):
    chunk = unique[i : i + _CHUNK]
    table.update(zip(chunk, tokenizer(chunk, add_special_tokens=special)["input_ids"], strict=True))
  return [list(table[t]) for t in texts]


def pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode(
  batch_type,
  examples: Sequence[Mapping[str, str]],
  tokenizer,
  *,
  input_length: int,
  target_length: int,
  name: str = "data",
  template: Template | None = None,
):
  """`{"inputs", "targets"}` examples -> one numpy batch of `batch_type` holding every row; with a `template`, the
  inputs are the examples' "fields" around its virtual tokens."""
  if not examples:
    raise DataError(f"{name}: the dataset is empty")
  if template is None:
    in_ids = ids_of(tokenizer, [ex["inputs"] for ex in examples], True)
  else:
    in_ids, cut = template.token_rows(
      tokenizer, examples, length=input_length, drop_eos=batch_type.INPUT_DROP_EOS, where=name
    )
    if cut:
      log.warning("%s: cut the fields of %d of %d inputs to fit %d tokens", name, cut, len(examples), input_length)
  tgt_ids = ids_of(tokenizer, [ex["targets"] for ex in examples], batch_type.TARGET_SPECIAL)
  batch, cut_in, cut_tgt = batch_type.from_token_ids(
    in_ids,
    tgt_ids,
    eos=tokenizer.eos_token_id,
    pad=pad_id(tokenizer),
    input_length=input_length,
    target_length=target_length,
  )
  if cut_in or cut_tgt:
    log.warning(
      "%s: truncated %d of %d inputs to %d tokens and %d targets to %d tokens",
      name,
      cut_in,
      len(examples),
      input_length,
      cut_tgt,
      target_length,
    )
  return batch


def encode_labels(batch_type, tokenizer, labels: Sequence[str], target_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Label strings -> (ids, mask) [C, T] as `batch_type` scores them (seq2seq: decoder targets with EOS; causal:
  continuations, the text + EOS)."""
  return batch_type.label_rows(
    ids_of(tokenizer, labels, batch_type.LABEL_SPECIAL),
    eos=tokenizer.eos_token_id,
    pad=pad_id(tokenizer),
    target_length=target_length,
  )


def label_lengths(batch_type, tokenizer, labels: Sequence[str]) -> list[int]:
  """Each label's length as `encode_labels` lays it out, before any cut (with its EOS)."""
  eos = 0 if batch_type.LABEL_SPECIAL or tokenizer.eos_token_id is None else 1
  return [len(ids) + eos for ids in ids_of(tokenizer, labels, batch_type.LABEL_SPECIAL)]


def input_rows(
  batch_type,
  tokenizer,
  texts: Sequence[str | Mapping[str, str]],
  template: Template | None = None,
  where: str = "input",
) -> list[list[int]]:
  """Generation inputs' tokens as `batch_type` feeds them (seq2seq: with EOS, as in training; causal: BOS kept, a
  final EOS dropped); an empty input starts from BOS (or EOS / 0). With a `template`, each input is its fields (a
  plain string: the template's single field), laid out as in training (nothing cut)."""
  if template is not None:
    many = len(texts) > 1
    examples = [{"fields": template.values(t, f"{where}[{i}]" if many else where)} for i, t in enumerate(texts)]
    return template.token_rows(tokenizer, examples, drop_eos=batch_type.INPUT_DROP_EOS)[0]
  if any(not isinstance(t, str) for t in texts):
    raise DataError(f"{where}: inputs given as fields need a prompt with a template (prompt.template); give text")
  return [
    input_row(ids, eos=tokenizer.eos_token_id, bos=tokenizer.bos_token_id, drop_eos=batch_type.INPUT_DROP_EOS)
    for ids in ids_of(tokenizer, texts, True)
  ]


def encode_inputs(
  batch_type,
  tokenizer,
  texts: Sequence[str | Mapping[str, str]],
  max_length: int | None = None,
  template: Template | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Inputs for generation [B, longest] in `batch_type`'s padding (seq2seq right, causal left); a longer input than
  `max_length` is cut as the type says (`cut_input`; a templated input is never cut)."""
  rows = input_rows(batch_type, tokenizer, texts, template)
  if max_length and template is None:
    rows = [batch_type.cut_input(r, max_length) for r in rows]
  return batch_type.layout_inputs(rows, max(len(r) for r in rows), pad_id(tokenizer))


# -- classification heads (`prompts.heads`): inputs and class ids ------------------------------------------------


def encode_sequence_labels(
  examples: Sequence[Mapping], tokenizer, *, input_length: int, name: str = "data", word_token: str = "first"
):
  """Examples with a class id ("label"; -1: unlabelled, no loss) -> a `batches.ClassBatch` with one label per row:
  the input with the tokenizer's special tokens, cut to `input_length` keeping a final EOS (T5's classifier reads
  the decoder there)."""
  if not examples:
    raise DataError(f"{name}: the dataset is empty")
  rows, cut = [], 0
  for ids in ids_of(tokenizer, [ex["inputs"] for ex in examples], True):
    row, was_cut = trim(ids, input_length, tokenizer.eos_token_id)
    rows.append(row)
    cut += was_cut
  if cut:
    log.warning("%s: truncated %d of %d inputs to %d tokens", name, cut, len(examples), input_length)
  labels = [[ex["label"]] if ex.get("label", -1) >= 0 else [] for ex in examples]
  return ClassBatch.of_rows(rows, labels, length=input_length, pad=pad_id(tokenizer), per_token=False)


def word_rows(tokenizer, words: Sequence[Sequence[str]]) -> list[tuple[list[int], list[int | None]]]:
  """Pre-split words -> (token ids with the tokenizer's special tokens, the word of each token or None), as
  transformers' `is_split_into_words` encodes them (a fast tokenizer's `word_ids`)."""
  enc = tokenizer([list(w) for w in words], is_split_into_words=True, add_special_tokens=True)
  try:
    return [(list(enc["input_ids"][i]), list(enc.word_ids(i))) for i in range(len(words))]
  except ValueError as e:  # a slow (Python) tokenizer keeps no word alignment
    raise DataError(f"token classification needs a fast tokenizer (word alignment): {e}") from None


def encode_token_labels(
  examples: Sequence[Mapping], tokenizer, *, input_length: int, name: str = "data", word_token: str = "first"
):
  """Examples with "words" and their tag ids "tags" -> a `batches.ClassBatch` with a label per token: a word's
  first sub-token (`word_token` "last": its last) carries its tag, its other sub-tokens and the special tokens none
  (HF's token-classification examples); a row longer than `input_length` is cut (its last words then have no
  prediction: "O")."""
  if not examples:
    raise DataError(f"{name}: the dataset is empty")
  rows, labels, cut = [], [], 0
  for ex, (ids, words) in zip(examples, word_rows(tokenizer, [ex["words"] for ex in examples]), strict=True):
    tags = ex["tags"]
    order = words if word_token == "first" else words[::-1]
    lab, prev = [], None
    for w in order:
      lab.append(-100 if w is None or w == prev else int(tags[w]))
      prev = w
    lab = lab if word_token == "first" else lab[::-1]
    cut += len(ids) > input_length
    rows.append(ids[:input_length])
    labels.append(lab[:input_length])
  if cut:
    log.warning("%s: truncated %d of %d inputs to %d tokens", name, cut, len(examples), input_length)
  return ClassBatch.of_rows(rows, labels, length=input_length, pad=pad_id(tokenizer), per_token=True)
