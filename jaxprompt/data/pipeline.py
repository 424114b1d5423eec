"""Token batches -> deterministic, resumable global batches (training) and fixed-order padded batches (eval).

Notation: N examples, B global batch, b = B / process_count.

A split is encoded once into one batch holding every row (`data.batches`: `Seq2SeqBatch` / `CausalBatch`, numpy
arrays); these iterators only pick rows, whatever the batch type.

The training stream is a concatenation of epochs, each a permutation seeded by (seed, epoch), so batch k
is a pure function of (seed, k): a checkpoint needs to remember only k (`position`) to resume exactly,
and each host takes its own contiguous share of every global batch.

Length buckets: a batch's input is padded only to the smallest bucket that holds its longest real input (one
compiled step per bucket, cached), not to `data.input_length`. The bucket is a function of the *global* batch's
rows, so every host picks the same one; the order of examples is the unbucketed order, so resuming stays exact.

Grouping by length (`data.group_by_length` = W > 0, HF's `group_by_length` with W = 50): each window of W batches
of the epoch's permutation is sorted by input length, cut into batches, and the batches are shuffled within the
window — batches of similar lengths, so less padding, still a pure function of (seed, epoch).

Packing (`data.pack`, seq2seq models): each host's share of a global batch goes into as few rows as first-fit
decreasing allows, several examples per row, each with its own prompt slots (`data.batches.pack_seq2seq`); a row is
as long as the unpacked row (prompt + the batch's length bucket), and every host packs into as many rows as the
fullest host needs (one shape per step on every host). Which examples a step trains on is the unpacked order's, so
resuming stays exact.

A mixture of tasks (`MixtureStream`, `data.mixture`): the rows of every task one after another; each slot of batch
k picks a task by its mixing rate (seeded by (seed, k)) and takes that task's next example from its own shuffled
epochs, so resuming needs k and every task's position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from jaxprompt.batches import num_rows, pack_bins, pack_seq2seq, take_rows
from jaxprompt.errors import DataError

MIN_AUTO_BUCKET = 64


def bucket_lengths(spec: str | Sequence[int], input_length: int) -> tuple[int, ...]:
  """`data.length_buckets` -> the input lengths batches are padded to, ascending, the last = input_length.
  "auto": powers of two from 64 and the halfway points 1.5 x 2^k (64, 96, 128, 192, 256, 384, ...) below
  input_length — at most a third of a batch's input is padding, for about twice the compiles of powers of two
  (T5-small on RTE against PEFT's exact per-batch padding: 0.90x with powers of two, 0.96x with these);
  "none": input_length only."""
  if spec == "none":
    return (input_length,)
  if spec == "auto":
    spec = [b for k in range(6, 31) for b in (2**k, 3 * 2 ** (k - 1)) if MIN_AUTO_BUCKET <= b < input_length]
  return tuple(sorted({int(b) for b in spec if b < input_length} | {input_length}))


def fit_bucket(needed: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `needed` tokens (buckets ascending; the last holds every row)."""
  return next((b for b in buckets if b >= needed), buckets[-1])


@dataclasses.dataclass(frozen=True)
class Packing:
  """How a stream packs seq2seq examples into rows (`data.pack`).

  prompt_length: P, the slots each example's prompt takes in its row.
  start_id: the decoder start token.
  rows_for: (rows needed, row slots) -> rows to use (>= needed): room for an even split into devices and
    microbatches (`training.step.packed_rows`); None: as needed.
  A packed row is as long as the batch's unpacked row would be, P + its length bucket: packing refills the padding
  of the unpacked rows with other examples (fewer rows), it never makes a row longer (attention's cost per token
  grows with the row)."""

  prompt_length: int
  start_id: int
  rows_for: Callable[[int, int], int] | None = None

  def pack(self, batch, inputs: Sequence[np.ndarray], targets: Sequence[np.ndarray], share: int):
    """This host's rows `batch` (share `share` of the global batch, cropped to its length bucket; the input and
    target lengths of every host's share: `inputs`, `targets`) -> a `PackedSeq2SeqBatch` of the same shape on every
    host."""
    length = self.prompt_length + batch.input_length
    plans = [pack_bins([self.prompt_length + int(n) for n in s], length) for s in inputs]
    rows = max(len(p) for p in plans)
    tlength = max(int(t[b].sum()) for p, t in zip(plans, targets, strict=False) for b in p)
    tlength = _pow2(max(tlength, batch.target_mask.shape[1]), 8)
    if self.rows_for:
      rows = self.rows_for(rows, length + tlength)
    return pack_seq2seq(batch, plans[share], self.prompt_length, rows, length, tlength, self.start_id)


def _pow2(n: int, least: int) -> int:
  return max(least, 1 << (n - 1).bit_length())


class Recorded:
  """A batch stream that keeps each batch it hands out in `fed` (everything else passes through): what a parity
  check replays through another framework (`training.trainer.fit_recorded`)."""

  def __init__(self, stream, fed: list):
    self._stream, self._fed = stream, fed

  def __next__(self):
    batch = next(self._stream)
    self._fed.append(batch)
    return batch

  def __getattr__(self, name):
    return getattr(self._stream, name)


class BatchStream:
  """Endless shuffled global batches; `position` (batches consumed) is all that resuming needs."""

  def __init__(
    self,
    rows: Any,
    global_batch: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    position: int = 0,
    buckets: Sequence[int] | None = None,
    group_by_length: int = 0,
    packing: Packing | None = None,
  ):
    self.rows = rows
    self.packing = packing
    self.process_count = process_count
    self.n = num_rows(rows)
    self.buckets = tuple(buckets) if buckets else None
    self.group = group_by_length
    self.lengths = rows.input_lengths()  # [N] real input tokens
    self.target_lengths = np.asarray(rows.loss_mask).sum(axis=1)  # [N] target tokens
    self.last_length = rows.input_length  # the input length of the last batch (its bucket)
    self.last_pad_fraction = 0.0  # of the last global batch's input slots, the padding
    if global_batch % process_count:
      raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    self.global_batch = global_batch
    self.local = global_batch // process_count
    self.seed, self.shuffle = seed, shuffle
    self.process_index = process_index
    self.position = position
    self.member_positions: list[int] = []  # a mixture's per-task positions (`MixtureStream`)
    self._perm_cache: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      rng = np.random.default_rng([self.seed, epoch])
      perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
      self._perm_cache = {epoch: self._grouped(perm, rng) if self.group else perm}
    return self._perm_cache[epoch]

  def _grouped(self, perm: np.ndarray, rng) -> np.ndarray:
    """Each window of `group` batches sorted by length and cut into batches, the batches shuffled within it."""
    b, out = self.global_batch, []
    for start in range(0, self.n, self.group * b):
      window = perm[start : start + self.group * b]
      window = window[np.argsort(self.lengths[window], kind="stable")]
      full = len(window) // b * b
      batches = window[:full].reshape(-1, b)
      out += [batches[rng.permutation(len(batches))].reshape(-1), window[full:]]
    return np.concatenate(out)

  def global_indices(self, k: int) -> np.ndarray:
    """Example indices of global batch k (every host's rows)."""
    out = np.empty(self.global_batch, np.int64)
    for j in range(self.global_batch):
      pos = k * self.global_batch + j
      out[j] = self._perm(pos // self.n)[pos % self.n]
    return out

  def indices(self, k: int) -> np.ndarray:
    """Example indices of global batch k (this host's share)."""
    return self._share(self.global_indices(k))

  def _share(self, every: np.ndarray) -> np.ndarray:
    return every[self.process_index * self.local : (self.process_index + 1) * self.local]

  @property
  def epoch(self) -> float:
    return self.position * self.global_batch / self.n

  def __iter__(self) -> Iterator[Any]:
    return self

  def _next_indices(self) -> np.ndarray:
    return self.global_indices(self.position)

  def __next__(self) -> Any:
    every = self._next_indices()
    batch = take_rows(self.rows, self._share(every))
    if self.buckets:
      batch = batch.cropped(fit_bucket(int(self.lengths[every].max()), self.buckets))
    self.last_length = batch.input_length
    slots = self.global_batch * batch.input_length  # input slots, prompts not counted
    if self.packing:
      shares = every.reshape(self.process_count, self.local)
      batch = self.packing.pack(
        batch, [self.lengths[s] for s in shares], [self.target_lengths[s] for s in shares], self.process_index
      )
      slots = self.process_count * batch.size * batch.input_length - self.global_batch * self.packing.prompt_length
    self.last_pad_fraction = 1.0 - float(self.lengths[every].sum()) / slots
    self.position += 1
    return batch


def mixing_rates(sizes: Sequence[int], rates: Sequence[float | None], cap: int | None = None) -> np.ndarray:
  """Each member's probability of being drawn: its rate, or (no rates) its number of examples capped at `cap`
  (seqio's examples-proportional mixing with `maximum`), normalised."""
  raw = np.asarray([r if r is not None else min(n, cap or n) for n, r in zip(sizes, rates, strict=False)], np.float64)
  return raw / raw.sum()


class MixtureStream(BatchStream):
  """Global batches drawn from several tasks' rows (`rows` holds them one member after another, `sizes` rows
  each): every slot of batch k picks a member with probability `rates` (a generator seeded by (seed, k)), then
  takes that member's next example from its own endless shuffled epochs (seeded by (seed, member, epoch)).
  `member_positions` (examples each member has given) and `position` are all that resuming needs."""

  def __init__(
    self,
    rows: Any,
    sizes: Sequence[int],
    rates: Sequence[float],
    global_batch: int,
    *,
    member_positions: Sequence[int] = (),
    **kw,
  ):
    super().__init__(rows, global_batch, **kw)
    if sum(sizes) != self.n or len(rates) != len(sizes):
      raise ValueError(
        f"mixture of {len(sizes)} members with {sum(sizes)} rows and {len(rates)} rates, got {self.n} rows"
      )
    self.sizes, self.rates = tuple(sizes), np.asarray(rates, np.float64)
    self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    self.member_positions = list(member_positions) or [0] * len(sizes)
    if len(self.member_positions) != len(sizes):
      raise DataError(
        f"the checkpoint has data positions for {len(self.member_positions)} tasks, the mixture has "
        f"{len(sizes)}: resume with the mixture it was trained on"
      )
    self._member_perms: dict[tuple[int, int], np.ndarray] = {}

  def _member_index(self, member: int, pos: int) -> int:
    n = self.sizes[member]
    key = (member, pos // n)
    if key not in self._member_perms:
      if len(self._member_perms) > 4 * len(self.sizes):
        self._member_perms.clear()
      rng = np.random.default_rng([self.seed, member, pos // n])
      self._member_perms[key] = rng.permutation(n) if self.shuffle else np.arange(n)
    return int(self.offsets[member] + self._member_perms[key][pos % n])

  def _next_indices(self) -> np.ndarray:
    which = np.random.default_rng([self.seed, self.position, 1 << 20]).choice(
      len(self.sizes), self.global_batch, p=self.rates
    )
    out = np.empty(self.global_batch, np.int64)
    for j, m in enumerate(which):
      out[j] = self._member_index(m, self.member_positions[m])
      self.member_positions[m] += 1
    return out

  def global_indices(self, k: int) -> np.ndarray:
    raise NotImplementedError("a mixture's batches depend on the members' positions: iterate the stream")

  @property
  def epoch(self) -> float:
    return float(np.mean(np.asarray(self.member_positions) / np.asarray(self.sizes)))


def eval_batches(
  rows: Any, batch_size: int, *, process_index: int = 0, process_count: int = 1, buckets: Sequence[int] | None = None
) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
  """Fixed-order global batches covering every example once (the last one padded), each input padded to its
  length bucket (`buckets`; None: the encoded length).

  Yields (this host's rows, their weights [b] — 1 for real examples, 0 for padding — and the example index
  of every row of the *global* batch [B], -1 for padding)."""
  n = num_rows(rows)
  local = batch_size // process_count
  lengths = rows.input_lengths() if buckets else None
  for start in range(0, n, batch_size):
    global_idx = np.arange(start, start + batch_size)
    idx = global_idx[process_index * local : (process_index + 1) * local]
    valid = idx < n
    batch = take_rows(rows, np.where(valid, idx, 0))
    if buckets:
      batch = batch.cropped(fit_bucket(int(lengths[global_idx[global_idx < n]].max()), buckets))
    yield batch, valid.astype(np.float32), np.where(global_idx < n, global_idx, -1)
