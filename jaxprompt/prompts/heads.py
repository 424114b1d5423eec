"""Classification heads trained with the prompt (`head.type`): sequence classification (one label per example) and
token classification (one label per word), verbalizer-free, as P-tuning v2 and transformers' *ForSequence- /
*ForTokenClassification models run them.

Notation: B batch, L input length, H hidden, C classes, T the head's positions (1 for a sequence, L for tokens).

  head.type  reads (`models.interface`)                     HF module (PEFT modules_to_save)   PEFT task_type
  lm         the language-model head, as before (no head)   -                                   CAUSAL_LM / SEQ_2_SEQ_LM
  sequence   `sequence_state` [B, 1, H]: decoders the last  decoders `score` (no bias);         SEQ_CLS
             real token; T5 the decoder at the last EOS     T5 `classification_head`
  token      `token_states` [B, L, H]: every input token    `score` / `classifier` (bias)       TOKEN_CLS

A head's weights are `HeadParam`s, a kind of `PromptParam`: the optimizer, checkpoints, exact resume and every
export select them with the prompt, and the frozen base stays as it was. What a head is (type, label strings) is a
`HeadSpec` in the prompt's record; its weights travel in transformers' layout and names (`Head.hf_tensors`:
`score.weight` [C, H], ...), which is what PEFT saves as `base_model.<name>...` for SEQ_CLS / TOKEN_CLS adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.batches import ClassBatch
from jaxprompt.data import encoding
from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import HeadLayout
from jaxprompt.prompts.params import PromptParam


class HeadParam(PromptParam):
  """A classification head's weight: trained with the prompt (a `PromptParam`), told apart from it by type."""


@dataclasses.dataclass(frozen=True)
class HeadType:
  """A kind of head: what it reads from the base model, the layout transformers gives it there, PEFT's task_type
  and whether it labels every token."""

  name: str
  per_token: bool
  peft_task_type: str
  states: Callable[..., jax.Array]  # (base, input_ids, mask, prefix, dropout_rng=) -> [B, T, H]
  layout: Callable[..., HeadLayout]  # base -> HeadLayout
  encode: Callable[..., ClassBatch]  # (examples, tokenizer, input_length=, name=, word_token=) -> every row's labels
  description: str


HEAD_TYPES: dict[str, HeadType] = {
  t.name: t
  for t in (
    HeadType(
      "sequence",
      False,
      "SEQ_CLS",
      lambda base, ids, mask, prefix, dropout_rng=None: base.sequence_state(ids, mask, prefix, dropout_rng=dropout_rng),
      lambda base: base.sequence_head(),
      encoding.encode_sequence_labels,
      "one label per example (the last real token; T5: the decoder at EOS)",
    ),
    HeadType(
      "token",
      True,
      "TOKEN_CLS",
      lambda base, ids, mask, prefix, dropout_rng=None: base.token_states(ids, mask, prefix, dropout_rng=dropout_rng),
      lambda base: base.token_head(),
      encoding.encode_token_labels,
      "one label per word (its first sub-token; the rest carry no loss)",
    ),
  )
}


def head_type(name: str) -> HeadType:
  if name not in HEAD_TYPES:
    raise PromptError(f"unknown head type {name!r}; heads: {', '.join(HEAD_TYPES)}")
  return HEAD_TYPES[name]


def by_task_type(task_type: str | None) -> HeadType | None:
  """The head a PEFT task_type trains (None: a language-model adapter)."""
  return next((t for t in HEAD_TYPES.values() if t.peft_task_type == task_type), None)


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """What a trained head is: its type (`HEAD_TYPES`), the label strings of its C classes in order, and its layout on
  the base it was trained on (`models.interface.HeadLayout`; None for a PEFT adapter until it meets its base)."""

  type: str
  labels: tuple[str, ...]
  layout: HeadLayout | None = None
  word_token: str = "first"  # token heads: the sub-token of a word that carries its label (`head.word_token`)

  def encode(self, examples, tokenizer, *, input_length: int, name: str) -> ClassBatch:
    """Examples -> every row's input and class ids, as this head trains on them."""
    return self.kind.encode(examples, tokenizer, input_length=input_length, name=name, word_token=self.word_token)

  @property
  def kind(self) -> HeadType:
    return head_type(self.type)

  @property
  def num_labels(self) -> int:
    return len(self.labels)

  def on(self, base) -> "HeadSpec":
    """This spec with `base`'s layout for its type (PromptError when a recorded layout differs)."""
    layout = self.kind.layout(base)
    if self.layout is not None and self.layout.hf_keys() != layout.hf_keys():
      raise PromptError(
        f"a {self.type} head saved as {sorted(self.layout.hf_keys().values())} does not fit this base model's "
        f"{sorted(layout.hf_keys().values())}"
      )
    return dataclasses.replace(self, layout=layout)

  def to_json(self) -> dict:
    out = dict(type=self.type, labels=list(self.labels))
    if self.word_token != "first":
      out["word_token"] = self.word_token
    if self.layout is not None:
      out["layout"] = dataclasses.asdict(self.layout)
    return out

  @classmethod
  def from_json(cls, d: dict) -> "HeadSpec":
    layout = HeadLayout(**d["layout"]) if d.get("layout") else None
    return cls(
      type=d["type"], labels=tuple(d.get("labels") or ()), layout=layout, word_token=d.get("word_token", "first")
    )


class Head(nnx.Module):
  """A classification head on a base model's final hidden states: [dropout, dense, tanh] (T5's), dropout, then the
  output layer -> logits [..., C] float32. Weights are [in, out] here (HF's Linear stores [out, in])."""

  def __init__(self, spec: HeadSpec, hidden: int, *, rng=None, dropout: float | None = None):
    """`spec` with its layout; `rng`: initialise as transformers does (normal with the layout's std, zero biases);
    None: zeros (weights loaded after)."""
    self.spec = spec
    self.layout = layout = spec.layout
    self.rate = layout.dropout if dropout is None else dropout
    c = spec.num_labels
    keys = list(jax.random.split(rng, 2)) if rng is not None else [None, None]

    def weight(key, shape, std, axes):
      value = jnp.zeros(shape, jnp.float32) if key is None else std * jax.random.normal(key, shape, jnp.float32)
      return L.param(value, axes, kind=HeadParam)

    if layout.dense:
      self.dense = weight(keys[1], (hidden, hidden), layout.dense_std, ("prompt_embed", None))
      self.dense_bias = L.param(jnp.zeros((hidden,), jnp.float32), (None,), kind=HeadParam)
    self.out = weight(keys[0], (hidden, c), layout.init_std, ("prompt_embed", None))
    if layout.bias:
      self.out_bias = L.param(jnp.zeros((c,), jnp.float32), (None,), kind=HeadParam)

  @property
  def kind(self) -> HeadType:
    return self.spec.kind

  def __call__(self, states: jax.Array, *, dropout_rng=None) -> jax.Array:
    """states [B, T, H] -> logits [B, T, C] float32 (dropout only with a key)."""
    r = L.split_rng(dropout_rng, 2)
    x = L.dropout(states.astype(jnp.float32), self.rate, r[0])
    if self.layout.dense:
      x = jnp.tanh(x @ self.dense[...] + self.dense_bias[...])
      x = L.dropout(x, self.rate, r[1])
    x = x @ self.out[...]
    return x + self.out_bias[...] if self.layout.bias else x

  def logits(self, base, input_ids, attention_mask, prefix, *, dropout_rng=None) -> jax.Array:
    """The head's logits [B, T, C] of an input [B, L] under `prefix` (T = 1 for a sequence head, L per token)."""
    r = L.split_rng(dropout_rng, 2)
    states = self.kind.states(base, input_ids, attention_mask, prefix, dropout_rng=r[0])
    return self(states, dropout_rng=r[1])

  # -- transformers' layout (exports, PEFT's modules_to_save) --

  def hf_tensors(self) -> dict[str, np.ndarray]:
    """{HF tensor name (`score.weight`, ...): float32 array in HF's layout}."""
    return hf_tensors(self.layout, {k: getattr(self, k)[...] for k in self.layout.hf_keys()})

  def load_hf(self, tensors: dict[str, np.ndarray], where: str) -> "Head":
    """This head holding `tensors` (HF names and layout, as `hf_tensors`); PromptError naming a missing or
    misshapen tensor."""
    for ours, key in self.layout.hf_keys().items():
      if key not in tensors:
        raise PromptError(f"{where}: no head tensor {key!r} for a {self.spec.type} head (found {sorted(tensors)})")
      a = np.asarray(tensors[key], np.float32)
      a = a.T if a.ndim == 2 else a
      want = getattr(self, ours).shape
      if a.shape != want:
        raise PromptError(
          f"{where}: head tensor {key!r} is {a.T.shape if a.ndim == 2 else a.shape}, expected "
          f"{want[::-1] if len(want) == 2 else want}"
        )
      getattr(self, ours).value = jnp.asarray(a)
    return self


def hf_tensors(layout: HeadLayout, params: dict) -> dict[str, np.ndarray]:
  """A head's parameters (ours: a checkpoint's `head` tree) -> {HF tensor name: float32 array in HF's layout}."""
  out = {}
  for ours, key in layout.hf_keys().items():
    a = np.asarray(params[ours], np.float32)
    out[key] = np.ascontiguousarray(a.T if a.ndim == 2 else a)
  return out


def build(spec: HeadSpec, base, rng, *, dropout: float | None = None) -> Head:
  """A freshly initialised head of `spec` on `base` (transformers' init for that model's head)."""
  if spec.num_labels < 1:
    raise PromptError(f"a {spec.type} head needs label strings (the task has none)")
  return Head(spec.on(base), base.hidden_size, rng=rng, dropout=dropout)


def from_hf(spec: HeadSpec, base, tensors: dict[str, np.ndarray], where: str) -> Head:
  """A trained head on `base` from its HF-layout tensors (an export, a PEFT adapter's modules_to_save)."""
  return Head(spec.on(base), base.hidden_size).load_hf(tensors, where)
