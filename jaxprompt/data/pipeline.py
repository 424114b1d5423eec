"""Text-to-text examples -> fixed-shape token arrays -> deterministic, resumable global batches.

Notation: N examples, L input length, T target length, B global batch, b = B / process_count.

seq2seq arrays: input_ids/input_mask [N, L], target_ids/target_mask [N, T] (EOS appended after trimming,
as seqio does). causal arrays: tokens/token_mask/target_mask [N, L + T] holding the input then the target
in one right-padded sequence; `target_mask` marks the target tokens (the only ones with a loss), and
`input_ids`/`input_mask` [N, L] (left-padded) hold the input alone for scoring and generation;
`target_index`/`target_valid` [N, T] locate the target tokens, so the loss needs logits there only.

The batch stream is a concatenation of epochs, each a permutation seeded by (seed, epoch), so batch k
is a pure function of (seed, k): a checkpoint needs to remember only k (`position`) to resume exactly,
and each host takes its own contiguous share of every global batch.
"""

from __future__ import annotations

import logging
from typing import Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Data that cannot be used: empty dataset, missing fields, a batch larger than the data..."""


def _ids(tokenizer, text: str, special: bool) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pad(rows: list[list[int]], length: int, pad_id: int, left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    if left:
      ids[i, length - len(r):] = r
      mask[i, length - len(r):] = 1
    else:
      ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
  return ids, mask


def _trim(ids: list[int], length: int, eos: int | None) -> tuple[list[int], bool]:
  if len(ids) <= length:
    return ids, False
  if eos is not None and ids and ids[-1] == eos:
    return ids[:length - 1] + [eos], True
  return ids[:length], True


def encode_examples(examples: Sequence[Mapping[str, str]], tokenizer, *, kind: str, input_length: int,
                    target_length: int, name: str = "data") -> dict[str, np.ndarray]:
  """Tokenise `{"inputs", "targets"}` examples to fixed lengths; warns with the number truncated."""
  if not examples:
    raise DataError(f"{name}: the dataset is empty")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  cut_in = cut_tgt = 0
  if kind == "seq2seq":
    ins, tgts = [], []
    for ex in examples:
      a, ca = _trim(_ids(tokenizer, ex["inputs"], True), input_length, eos)
      t, ct = _trim(_ids(tokenizer, ex["targets"], True), target_length, eos)
      ins.append(a), tgts.append(t)
      cut_in += ca
      cut_tgt += ct
    input_ids, input_mask = _pad(ins, input_length, pad)
    target_ids, target_mask = _pad(tgts, target_length, pad)
    out = dict(input_ids=input_ids, input_mask=input_mask, target_ids=target_ids, target_mask=target_mask)
  elif kind == "causal":
    seqs, tmasks, ins = [], [], []
    for ex in examples:
      a = _ids(tokenizer, ex["inputs"], True)  # BOS (if the tokenizer adds one) + input
      if eos is not None and a and a[-1] == eos:
        a = a[:-1]
      if len(a) > input_length:
        a, cut_in = a[:input_length], cut_in + 1
      t = _ids(tokenizer, ex["targets"], False) + ([eos] if eos is not None else [])
      if len(t) > target_length:
        t, cut_tgt = t[:target_length], cut_tgt + 1
      seqs.append(a + t)
      tmasks.append([0] * len(a) + [1] * len(t))
      ins.append(a)
    tokens, token_mask = _pad(seqs, input_length + target_length, pad)
    target_mask, _ = _pad(tmasks, input_length + target_length, 0)
    input_ids, input_mask = _pad(ins, input_length, pad, left=True)
    # where each row's target tokens sit in `tokens` ([N, T], padded with 0 / valid 0)
    target_index, target_valid = _pad([list(range(len(a), len(a) + len(t))) for a, t in
                                       zip(ins, (s[len(a):] for a, s in zip(ins, seqs)))], target_length, 0)
    out = dict(tokens=tokens, token_mask=token_mask, target_mask=target_mask, input_ids=input_ids,
               input_mask=input_mask, target_index=target_index, target_valid=target_valid)
  else:
    raise ValueError(f"unknown model kind {kind!r}")
  if cut_in or cut_tgt:
    log.warning("%s: truncated %d of %d inputs to %d tokens and %d targets to %d tokens", name, cut_in,
                len(examples), input_length, cut_tgt, target_length)
  out["truncated"] = np.array([cut_in, cut_tgt], np.int64)
  return out


def _rows(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in arrays.items() if k != "truncated"}


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  return len(next(v for k, v in arrays.items() if k != "truncated"))


class BatchStream:
  """Endless shuffled global batches; `position` (batches consumed) is all that resuming needs."""

  def __init__(self, arrays: Mapping[str, np.ndarray], global_batch: int, *, seed: int = 0, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1, position: int = 0):
    self.arrays = arrays
    self.n = num_rows(arrays)
    if global_batch % process_count:
      raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    self.global_batch = global_batch
    self.local = global_batch // process_count
    self.seed, self.shuffle = seed, shuffle
    self.process_index = process_index
    self.position = position
    self._perm_cache: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                          else np.arange(self.n)}
    return self._perm_cache[epoch]

  def indices(self, k: int) -> np.ndarray:
    """Example indices of global batch k (this host's share)."""
    start = k * self.global_batch + self.process_index * self.local
    out = np.empty(self.local, np.int64)
    for j in range(self.local):
      pos = start + j
      out[j] = self._perm(pos // self.n)[pos % self.n]
    return out

  @property
  def epoch(self) -> float:
    return self.position * self.global_batch / self.n

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _rows(self.arrays, self.indices(self.position))
    self.position += 1
    return batch


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
  """Fixed-order global batches covering every example once (the last one padded).

  Yields (this host's rows, their weights [b] — 1 for real examples, 0 for padding — and the example index
  of every row of the *global* batch [B], -1 for padding)."""
  n = num_rows(arrays)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    global_idx = np.arange(start, start + batch_size)
    idx = global_idx[process_index * local:(process_index + 1) * local]
    valid = idx < n
    yield _rows(arrays, np.where(valid, idx, 0)), valid.astype(np.float32), np.where(global_idx < n, global_idx, -1)
