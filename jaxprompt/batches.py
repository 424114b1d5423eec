"""Typed batches: what the data layer hands to each model kind, from tokenisation to the jitted step.

Notation: B batch (N rows when a batch holds a whole split), L input length, T target length, C classes.

A batch is a frozen dataclass registered as a pytree (`flax.struct`), so it is a jit argument, it is sharded
field by field, and `jax.tree.map(lambda a: a[idx], batch)` takes rows. Each model kind names its batch type
(`model.batch_type`); the batch type knows how that kind lays tokens out, so nothing downstream switches on
the kind:

  Seq2SeqBatch  input_ids / input_mask [B, L] right-padded; target_ids / target_mask [B, T] (EOS appended after
                trimming, as seqio does).
  CausalBatch   tokens / token_mask [B, L + T]: the input then the target in one right-padded sequence;
                target_index / target_valid [B, T] locate the target tokens in `tokens` (the only ones with a
                loss, so logits are needed there only); input_ids / input_mask [B, L] hold the input alone,
                left-padded, for rank scoring and generation.

Both carry an optional `task_ids` [B] (int32): the prompt each row uses when a run trains one prompt per task
(`prompt.per_task`, a bank [K, P, ...]); None otherwise.

Input ids below 0 are a prompt template's virtual tokens (`data.templates`): id -1-k is the prompt's row k, a real
token (mask 1, a position of its own) whose embedding the model takes from the prompt (`models.interface`).

This module is a leaf (numpy, JAX and Flax only): models name their batch type without importing the data layer.
Layouts work on token ids; tokenisation (text -> ids, the tokenizer's special tokens) is `data.encoding`'s.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import jax
import numpy as np
from flax import struct

from jaxprompt.errors import DataError


def pad_rows(
  rows: Sequence[Sequence[int]], length: int, pad_id: int, *, left: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """Token rows -> (ids, mask) [N, length] int32, padded on the right (or the left)."""
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    at = slice(length - len(r), length) if left else slice(0, len(r))
    ids[i, at] = r
    mask[i, at] = 1
  return ids, mask


def trim(ids: list[int], length: int, eos: int | None) -> tuple[list[int], bool]:
  """At most `length` tokens, keeping a final EOS; (ids, whether anything was cut)."""
  if len(ids) <= length:
    return ids, False
  if eos is not None and ids and ids[-1] == eos:
    return ids[: length - 1] + [eos], True
  return ids[:length], True


def input_row(ids: list[int], *, eos: int | None, bos: int | None, drop_eos: bool) -> list[int]:
  """A generation input's tokens (tokenised with special tokens): a final EOS dropped when `drop_eos`; an empty
  input starts from BOS (or EOS / 0)."""
  if drop_eos and eos is not None and ids and ids[-1] == eos:
    ids = ids[:-1]
  return ids or [bos if bos is not None else (eos or 0)]


class _Batch:
  """What both batch types share: the row count, the loss mask, and encoding a split (each type tokenises and
  lays out rows)."""

  LOSS_MASK: ClassVar[str]  # the field that is 1 where a target token carries a loss
  TARGET_SPECIAL: ClassVar[bool]  # whether targets are tokenised with the tokenizer's special tokens

  @property
  def size(self) -> int:
    return jax.tree.leaves(self)[0].shape[0]

  @property
  def loss_mask(self) -> jax.Array:
    """[B, T]: 1 where a target token carries a loss."""
    return getattr(self, self.LOSS_MASK)

  def with_task_ids(self, ids) -> "_Batch":
    """The same rows, each under prompt `ids[b]` of a bank (an int, or [B] ints)."""
    return self.replace(task_ids=np.broadcast_to(np.asarray(ids, np.int32), (num_rows(self),)).copy())

  packed: ClassVar[bool] = False  # several examples per row (`PackedSeq2SeqBatch`)

  @property
  def loss_segments(self) -> jax.Array | None:
    """[B, T] the example each target token belongs to, when a row holds several (packed); None: one per row."""
    return None

  @property
  def num_examples(self):
    """Examples in this batch (rows, unless packed)."""
    return self.size

  def tokens_per_row(self, prompt_length: int) -> int:
    """Token slots one row runs through the model: a prompt, the input and the target."""
    return prompt_length + self.row_length

  @property
  def row_length(self) -> int:
    """The tokens a row carries: its (padded) input and target, L + T."""
    return self.input_ids.shape[1] + self.loss_mask.shape[1]

  @property
  def input_length(self) -> int:
    """L: the (padded) input length of this batch."""
    return self.input_ids.shape[1]

  def input_lengths(self) -> np.ndarray:
    """[B] real input tokens per row (numpy)."""
    return np.asarray(self.input_mask).sum(axis=1)

  def cropped(self, input_length: int):
    """The same rows with the input padded to `input_length` only (at least every row's real input tokens):
    padding is dropped, never a token (length buckets, `data.pipeline`)."""
    raise NotImplementedError

  @classmethod
  def from_token_ids(
    cls,
    input_ids: Sequence[list[int]],
    target_ids: Sequence[list[int]],
    *,
    eos: int | None,
    pad: int,
    input_length: int,
    target_length: int,
  ) -> tuple["_Batch", int, int]:
    """Tokenised examples (inputs with special tokens; targets as `TARGET_SPECIAL` says) -> (one numpy batch of
    every row in this type's layout, inputs cut, targets cut)."""
    ins, tgts, cut_in, cut_tgt = [], [], 0, 0
    for a_ids, t_ids in zip(input_ids, target_ids, strict=True):
      (a, ca), (t, ct) = cls._tokenize(eos, a_ids, t_ids, input_length, target_length)
      ins.append(a)
      tgts.append(t)
      cut_in, cut_tgt = cut_in + ca, cut_tgt + ct
    return cls._layout(ins, tgts, pad, input_length, target_length), cut_in, cut_tgt


@struct.dataclass
class Seq2SeqBatch(_Batch):
  input_ids: jax.Array  # [B, L]
  input_mask: jax.Array  # [B, L]
  target_ids: jax.Array  # [B, T]
  target_mask: jax.Array  # [B, T]
  task_ids: jax.Array | None = None  # [B]: each row's prompt in a bank (prompt.per_task)
  LOSS_MASK: ClassVar[str] = "target_mask"
  TARGET_SPECIAL: ClassVar[bool] = True

  @staticmethod
  def _tokenize(eos, input_ids: list[int], target_ids: list[int], input_length: int, target_length: int):
    return trim(input_ids, input_length, eos), trim(target_ids, target_length, eos)

  @classmethod
  def _layout(cls, ins, tgts, pad: int, input_length: int, target_length: int) -> "Seq2SeqBatch":
    return cls(*pad_rows(ins, input_length, pad), *pad_rows(tgts, target_length, pad))

  LABEL_SPECIAL: ClassVar[bool] = True  # labels are decoder targets: tokenised with special tokens (EOS)
  INPUT_DROP_EOS: ClassVar[bool] = False  # generation inputs keep their EOS, as in training

  @staticmethod
  def label_rows(
    label_ids: Sequence[list[int]], *, eos: int | None, pad: int, target_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised labels -> (ids, mask) [C, T] as decoder targets (with EOS)."""
    return pad_rows([trim(ids, target_length, eos)[0] for ids in label_ids], target_length, pad)

  @staticmethod
  def cut_input(row: list[int], max_length: int) -> list[int]:
    """A long generation input keeps its start (an encoder input, as in training)."""
    return row[:max_length]

  @staticmethod
  def layout_inputs(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder inputs right-padded as in training and PEFT (T5's relative positions would otherwise put a soft
    prompt further from a shorter input)."""
    return pad_rows(rows, length, pad_id)

  def cropped(self, input_length: int) -> "Seq2SeqBatch":
    return self.replace(input_ids=self.input_ids[:, :input_length], input_mask=self.input_mask[:, :input_length])

  def hf_inputs(self) -> dict[str, np.ndarray]:
    """The same rows in transformers' training layout: labels -100 where there is no loss."""
    labels = np.where(np.asarray(self.target_mask) > 0, np.asarray(self.target_ids), -100)
    return dict(input_ids=np.asarray(self.input_ids), attention_mask=np.asarray(self.input_mask), labels=labels)

  def hf_with_target(self, target: Sequence[int]) -> dict[str, np.ndarray]:
    """`hf_inputs` with `target` (token ids) as every row's target: how transformers scores one label per row."""
    return dict(
      input_ids=np.asarray(self.input_ids),
      attention_mask=np.asarray(self.input_mask),
      labels=np.tile(np.asarray(target, np.int64), (self.size, 1)),
    )

  @classmethod
  def shapes(cls, batch_size: int, input_length: int, target_length: int) -> "Seq2SeqBatch":
    def s(n):
      return jax.ShapeDtypeStruct((batch_size, n), np.int32)

    return cls(s(input_length), s(input_length), s(target_length), s(target_length))


@struct.dataclass
class PackedSeq2SeqBatch(_Batch):
  """Several seq2seq examples per row (`data.pack`, T5X-style packing), each with its own soft prompt: encoder row
  r holds segments [prompt; input] one after another, decoder row r the same examples' targets, and attention never
  crosses a segment (segment ids; 0 = padding). Relative positions inside a segment are those of the example alone,
  so every example's logits equal its unpacked row's. R rows, S encoder slots, T' decoder slots."""

  input_ids: jax.Array  # [R, S]: input tokens (pad at prompt slots)
  input_segments: jax.Array  # [R, S]: 1, 2, ... per example in the row; 0 = padding
  prompt_slots: jax.Array  # [R, S]: k * P + i at prompt position i of an example under prompt k; -1 elsewhere
  decoder_input_ids: jax.Array  # [R, T']: each example's targets shifted right, starting with the start token
  target_ids: jax.Array  # [R, T']
  target_mask: jax.Array  # [R, T']
  target_segments: jax.Array  # [R, T']: the segment of the encoder row each target token belongs to; 0 = padding
  LOSS_MASK: ClassVar[str] = "target_mask"
  packed: ClassVar[bool] = True

  @property
  def input_mask(self) -> jax.Array:
    """[R, S]: 1 at every slot an example uses (its prompt's included)."""
    return (self.input_segments > 0).astype(np.int32)

  def input_lengths(self) -> np.ndarray:
    """[R] real input tokens per row, prompts not counted (numpy)."""
    return ((np.asarray(self.input_segments) > 0) & (np.asarray(self.prompt_slots) < 0)).sum(axis=1)

  @property
  def loss_segments(self) -> jax.Array:
    return self.target_segments

  def tokens_per_row(self, prompt_length: int) -> int:
    return self.row_length  # prompts are inside the rows

  @property
  def num_examples(self):
    """Examples packed in this batch (traced under jit): the segments that start in the decoder rows."""
    seg = self.target_segments
    starts = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
    return (seg[:, 0] > 0).sum() + starts.sum()


def pack_bins(sizes: Sequence[int], capacity: int) -> list[list[int]]:
  """First-fit decreasing: indices of `sizes` grouped into bins of at most `capacity` (each size <= capacity),
  deterministic (ties keep index order)."""
  bins: list[list[int]] = []
  room: list[int] = []
  for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
    j = next((j for j, r in enumerate(room) if r >= sizes[i]), None)
    if j is None:
      bins.append([])
      room.append(capacity)
      j = len(bins) - 1
    bins[j].append(i)
    room[j] -= sizes[i]
  return bins


def pack_seq2seq(
  batch: Seq2SeqBatch,
  bins: Sequence[Sequence[int]],
  prompt_length: int,
  rows: int,
  input_length: int,
  target_length: int,
  start_id: int,
) -> PackedSeq2SeqBatch:
  """Rows of `batch` (numpy) packed as `bins` says (bin r -> row r, examples in bin order) into `rows` rows of
  `input_length` encoder and `target_length` decoder slots (pad id 0, T5's); rows past the bins are padding."""
  ids = np.asarray(batch.input_ids)
  lens, tlens = batch.input_lengths(), np.asarray(batch.target_mask).sum(axis=1)
  tgt = np.asarray(batch.target_ids)
  tasks = np.zeros(len(ids), np.int32) if batch.task_ids is None else np.asarray(batch.task_ids)

  def full(v):
    return np.full((rows, input_length), v, np.int32)

  def tfull(v):
    return np.full((rows, target_length), v, np.int32)

  inp, seg, slots = full(0), full(0), full(-1)
  dec, out, tmask, tseg = tfull(0), tfull(0), tfull(0), tfull(0)
  for r, members in enumerate(bins):
    at = t_at = 0
    for s, i in enumerate(members, start=1):
      n, t = prompt_length + int(lens[i]), int(tlens[i])
      if at + n > input_length or t_at + t > target_length:
        raise DataError(
          f"packing: example {i} ({n} encoder / {t} decoder tokens) does not fit row {r} "
          f"({input_length} / {target_length} slots)"
        )
      slots[r, at : at + prompt_length] = tasks[i] * prompt_length + np.arange(prompt_length)
      inp[r, at + prompt_length : at + n] = ids[i, : lens[i]]
      seg[r, at : at + n] = s
      out[r, t_at : t_at + t] = tgt[i, :t]
      dec[r, t_at] = start_id
      dec[r, t_at + 1 : t_at + t] = tgt[i, : t - 1]
      tmask[r, t_at : t_at + t] = 1
      tseg[r, t_at : t_at + t] = s
      at, t_at = at + n, t_at + t
  return PackedSeq2SeqBatch(inp, seg, slots, dec, out, tmask, tseg)


@struct.dataclass
class CausalBatch(_Batch):
  tokens: jax.Array  # [B, L + T]
  token_mask: jax.Array  # [B, L + T]
  target_index: jax.Array  # [B, T]
  target_valid: jax.Array  # [B, T]
  input_ids: jax.Array  # [B, L], left-padded
  input_mask: jax.Array  # [B, L]
  task_ids: jax.Array | None = None  # [B]: each row's prompt in a bank (prompt.per_task)
  LOSS_MASK: ClassVar[str] = "target_valid"
  TARGET_SPECIAL: ClassVar[bool] = False

  @staticmethod
  def _tokenize(eos, input_ids: list[int], target_ids: list[int], input_length: int, target_length: int):
    """The input keeps BOS (when the tokenizer adds one) and drops a final EOS; the target is its text + EOS, a long
    one cut keeping that EOS (as `trim` cuts seq2seq targets and `label_rows` the labels rank evaluation scores)."""
    a = input_ids
    if eos is not None and a and a[-1] == eos:
      a = a[:-1]
    t = target_ids + ([eos] if eos is not None else [])
    return (a[:input_length], len(a) > input_length), trim(t, target_length, eos)  # as `label_rows` cuts labels

  @classmethod
  def _layout(cls, ins, tgts, pad: int, input_length: int, target_length: int) -> "CausalBatch":
    tokens, token_mask = pad_rows([a + t for a, t in zip(ins, tgts, strict=False)], input_length + target_length, pad)
    target_index, target_valid = pad_rows(
      [list(range(len(a), len(a) + len(t))) for a, t in zip(ins, tgts, strict=False)], target_length, 0
    )
    return cls(tokens, token_mask, target_index, target_valid, *pad_rows(ins, input_length, pad, left=True))

  LABEL_SPECIAL: ClassVar[bool] = False  # labels are continuations: the text + EOS, no BOS
  INPUT_DROP_EOS: ClassVar[bool] = True  # generation prompts keep BOS and drop a final EOS

  @staticmethod
  def label_rows(
    label_ids: Sequence[list[int]], *, eos: int | None, pad: int, target_length: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised labels (no special tokens) -> (ids, mask) [C, T] as continuations: the text + EOS."""
    rows = [trim(ids + ([eos] if eos is not None else []), target_length, eos)[0] for ids in label_ids]
    return pad_rows(rows, target_length, pad)

  @staticmethod
  def cut_input(row: list[int], max_length: int) -> list[int]:
    """A long generation prompt keeps its end (what the next token follows)."""
    return row[-max_length:]

  @staticmethod
  def layout_inputs(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded, as training's scoring inputs and as transformers pads for generation."""
    return pad_rows(rows, length, pad_id, left=True)

  def cropped(self, input_length: int) -> "CausalBatch":
    # `tokens` is right-padded (a row's input + target fit in input_length + T); the input alone is left-padded
    n = input_length + self.target_index.shape[1]
    return self.replace(
      tokens=self.tokens[:, :n],
      token_mask=self.token_mask[:, :n],
      input_ids=self.input_ids[:, self.input_length - input_length :],
      input_mask=self.input_mask[:, self.input_length - input_length :],
    )

  def hf_inputs(self) -> dict[str, np.ndarray]:
    """The same rows in transformers' training layout: one sequence, labels -100 except on the targets."""
    tokens = np.asarray(self.tokens)
    labels = np.full_like(tokens, -100)
    r, t = np.nonzero(np.asarray(self.target_valid))
    at = np.asarray(self.target_index)[r, t]
    labels[r, at] = tokens[r, at]
    return dict(input_ids=tokens, attention_mask=np.asarray(self.token_mask), labels=labels)

  def hf_with_target(self, target: Sequence[int]) -> dict[str, np.ndarray]:
    """`hf_inputs` with `target` (token ids) as every row's target: [input, target] right-padded to the longest,
    labels -100 except on the target (how transformers scores one label per row)."""
    ins = [list(r[k > 0]) for r, k in zip(np.asarray(self.input_ids), np.asarray(self.input_mask), strict=False)]
    n, t = max(len(a) for a in ins) + len(target), list(target)
    ids, mask, labels = (
      np.zeros((self.size, n), np.int64),
      np.zeros((self.size, n), np.int64),
      np.full((self.size, n), -100),
    )
    for i, a in enumerate(ins):
      ids[i, : len(a) + len(t)], mask[i, : len(a) + len(t)], labels[i, len(a) : len(a) + len(t)] = a + t, 1, t
    return dict(input_ids=ids, attention_mask=mask, labels=labels)

  @classmethod
  def shapes(cls, batch_size: int, input_length: int, target_length: int) -> "CausalBatch":
    def s(n):
      return jax.ShapeDtypeStruct((batch_size, n), np.int32)

    n = input_length + target_length
    return cls(s(n), s(n), s(target_length), s(target_length), s(input_length), s(input_length))


def num_rows(batch) -> int:
  return len(jax.tree.leaves(batch)[0])


def take_rows(batch, idx: np.ndarray):
  """Rows `idx` of a numpy batch (any batch type)."""
  return jax.tree.map(lambda a: a[idx], batch)


def concat_rows(batches: Sequence):
  """One numpy batch holding the rows of `batches` (of one type and length layout) in order."""
  return jax.tree.map(lambda *a: np.concatenate(a), *batches)


@struct.dataclass
class ClassBatch(_Batch):
  """Examples for a classification head (`prompts.heads`), for every model kind: the input alone, right-padded (a
  causal model's real tokens then see what they see unpadded), and class ids. A sequence head has one label per
  row (T = 1); a token head one per input position (T = L), -100-style positions (special tokens, a word's later
  sub-tokens, padding) masked out."""

  input_ids: jax.Array  # [B, L]
  input_mask: jax.Array  # [B, L]
  labels: jax.Array  # [B, T] class ids (0 where masked)
  label_mask: jax.Array  # [B, T]
  task_ids: jax.Array | None = None  # [B]: each row's prompt in a bank (prompt.per_task)
  per_token: bool = struct.field(pytree_node=False, default=False)
  LOSS_MASK: ClassVar[str] = "label_mask"

  @property
  def row_length(self) -> int:
    return self.input_ids.shape[1]

  def cropped(self, input_length: int) -> "ClassBatch":
    labels, mask = (
      (self.labels[:, :input_length], self.label_mask[:, :input_length])
      if self.per_token
      else (self.labels, self.label_mask)
    )
    return self.replace(
      input_ids=self.input_ids[:, :input_length],
      input_mask=self.input_mask[:, :input_length],
      labels=labels,
      label_mask=mask,
    )

  @classmethod
  def of_rows(
    cls, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, length: int, pad: int, per_token: bool
  ) -> "ClassBatch":
    """Token rows [N][<= length] and their labels (per token: one per token, -100 for none; else one per row)
    -> a numpy batch."""
    ids, mask = pad_rows(rows, length, pad)
    width = length if per_token else 1
    out = np.full((len(rows), width), -100, np.int64)
    for i, lab in enumerate(labels):
      out[i, : len(lab)] = lab
    return cls(ids, mask, np.maximum(out, 0).astype(np.int32), (out >= 0).astype(np.int32), per_token=per_token)

  @classmethod
  def shapes(cls, batch_size: int, input_length: int, target_length: int, per_token: bool = False) -> "ClassBatch":
    def s(n):
      return jax.ShapeDtypeStruct((batch_size, n), np.int32)

    t = input_length if per_token else 1
    return cls(s(input_length), s(input_length), s(t), s(t), per_token=per_token)
