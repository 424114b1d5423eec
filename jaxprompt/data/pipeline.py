"""Token batches -> deterministic, resumable global batches (training) and fixed-order padded batches (eval).

Notation: N examples, B global batch, b = B / process_count.

A split is encoded once into one batch holding every row (`data.batches`: `Seq2SeqBatch` / `CausalBatch`, numpy
arrays); these iterators only pick rows, whatever the batch type.

The training stream is a concatenation of epochs, each a permutation seeded by (seed, epoch), so batch k
is a pure function of (seed, k): a checkpoint needs to remember only k (`position`) to resume exactly,
and each host takes its own contiguous share of every global batch.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from jaxprompt.data.batches import num_rows, take_rows
from jaxprompt.errors import DataError


class BatchStream:
  """Endless shuffled global batches; `position` (batches consumed) is all that resuming needs."""

  def __init__(self, rows: Any, global_batch: int, *, seed: int = 0, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1, position: int = 0):
    self.rows = rows
    self.n = num_rows(rows)
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

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    batch = take_rows(self.rows, self.indices(self.position))
    self.position += 1
    return batch


def eval_batches(rows: Any, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """Fixed-order global batches covering every example once (the last one padded).

  Yields (this host's rows, their weights [b] — 1 for real examples, 0 for padding — and the example index
  of every row of the *global* batch [B], -1 for padding)."""
  n = num_rows(rows)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    global_idx = np.arange(start, start + batch_size)
    idx = global_idx[process_index * local:(process_index + 1) * local]
    valid = idx < n
    yield take_rows(rows, np.where(valid, idx, 0)), valid.astype(np.float32), np.where(global_idx < n, global_idx, -1)
