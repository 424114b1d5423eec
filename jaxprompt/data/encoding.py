"""Tokenisation: text examples -> the typed batches of `jaxprompt.batches`, in the layout of a model's batch type.

Notation: B batch (N rows when a batch holds a whole split), L input length, T target length, C classes.

The batch types lay out token ids (`from_token_ids`, `label_rows`, `layout_inputs`); this module calls the
tokenizer (a transformers tokenizer, or anything with the same `__call__`, `eos_token_id`, `bos_token_id` and
`pad_token_id`) with the special tokens each layout wants.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from jaxprompt.batches import input_row
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
):
  """`{"inputs", "targets"}` examples -> one numpy batch of `batch_type` holding every row."""
  if not examples:
    raise DataError(f"{name}: the dataset is empty")
  in_ids = ids_of(tokenizer, [ex["inputs"] for ex in examples], True)
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


def input_rows(batch_type, tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Generation inputs' tokens as `batch_type` feeds them (seq2seq: with EOS, as in training; causal: BOS kept, a
  final EOS dropped); an empty input starts from BOS (or EOS / 0)."""
  return [
    input_row(ids, eos=tokenizer.eos_token_id, bos=tokenizer.bos_token_id, drop_eos=batch_type.INPUT_DROP_EOS)
    for ids in ids_of(tokenizer, texts, True)
  ]


def encode_inputs(
  batch_type, tokenizer, texts: Sequence[str], max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Inputs for generation [B, longest] in `batch_type`'s padding (seq2seq right, causal left); a longer input than
  `max_length` is cut as the type says (`cut_input`)."""
  rows = [batch_type.cut_input(r, max_length) if max_length else r for r in input_rows(batch_type, tokenizer, texts)]
  return batch_type.layout_inputs(rows, max(len(r) for r in rows), pad_id(tokenizer))
