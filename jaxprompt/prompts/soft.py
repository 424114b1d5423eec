"""Input-layer soft prompts (Lester et al. 2021) and the prompted model.

Notation: B batch, L input length, P prompt length, H hidden, V vocab, K prompts in a bank.

A prompt reaches the frozen model as a `models.interface.Prefix`; where it goes is the model's business (PEFT's
semantics: T5's encoder input only; a decoder's whole sequence, positions 0..P+L-1, no loss on the prompt).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.data import input_format
from jaxprompt.data.input_format import InputFormat
from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts.init import initial_prompt
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.spec import Method, PromptSpec


class PromptMethod(nnx.Module):
  """A prompt-learning method. Its trainable variables are `PromptParam`s (so the optimizer, checkpoints and export
  select them by type); `prefix(batch_size, prompt_ids, dropout_rng=)` is what it puts in front of a batch
  (`models.interface.Prefix`); `inference_value()` is what a trained prompt amounts to at inference (and what
  PEFT saves); `spec()` describes it (`spec.PromptSpec`: method, options) for checkpoints and exports."""

  method: ClassVar[str]
  uses_dropout: ClassVar[bool] = False  # does `prefix` draw dropout (it then takes its own key)

  @property
  def length(self) -> int:
    raise NotImplementedError

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    raise NotImplementedError

  def inference_value(self) -> jax.Array:
    raise NotImplementedError

  def packed_table(self, dropout_rng=None) -> jax.Array:
    """Every prompt's input embeddings as one table [K * P, H] (K prompts: a bank, else 1), what packed rows
    gather their prompt slots from (`data.batches.PackedSeq2SeqBatch`)."""
    raise PromptError(
      f"{self.method} puts no embeddings before the input: packed rows (data.pack) need prompt_tuning or p_tuning"
    )

  def spec(self) -> PromptSpec:
    raise NotImplementedError

  @classmethod
  def stack(cls, modules: Sequence["PromptMethod"]) -> "PromptMethod":
    """K fixed modules of this class (`Method.fixed`) as one bank for mixed batches (row b uses prompt_ids[b])."""
    raise PromptError(f"{cls.__name__} prompts cannot form a bank")


@dataclasses.dataclass(frozen=True)
class PromptTuningSpec(PromptSpec):
  """Prompt tuning has no options of its own (a template, `PromptSpec.template`, says where its rows go)."""

  method: ClassVar[str] = "prompt_tuning"


class SoftPrompt(PromptMethod):
  """Prompt tuning: `embeddings` [P, H] float32, replicated (logical axes prompt / prompt_embed) — or a bank
  [K, P, H] of K prompts for mixed-prompt batches, where each example picks its prompt by id."""

  method = PromptTuningSpec.method

  def __init__(self, value: jax.Array | np.ndarray, *, template: str | None = None):
    self.template = template  # its rows go into a template's slots (`data.templates`), not in front
    value = jnp.asarray(value, jnp.float32)
    if value.ndim not in (2, 3):
      raise PromptError(f"a soft prompt is [P, H] (or a bank [K, P, H]), got shape {value.shape}")
    axes = ("prompt", "prompt_embed") if value.ndim == 2 else ("prompts", "prompt", "prompt_embed")
    self.embeddings = L.param(value, axes, kind=PromptParam)

  @property
  def length(self) -> int:
    return self.embeddings.shape[-2]

  def inference_value(self) -> jax.Array:
    return self.embeddings[...]

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    at_slots = self.template is not None
    if self.embeddings.ndim == 3:  # a bank: the rows, and which of the K prompts each is (`Prefix.bank`)
      return Prefix(embeds=self.rows(prompt_ids), bank=self.embeddings[...], bank_ids=prompt_ids, at_slots=at_slots)
    return Prefix(embeds=self.rows(prompt_ids), at_slots=at_slots)

  def packed_table(self, dropout_rng=None) -> jax.Array:
    return self.embeddings[...].reshape(-1, self.embeddings.shape[-1])

  def spec(self) -> PromptSpec:
    return PromptTuningSpec(template=self.template)

  @classmethod
  def stack(cls, modules: Sequence[PromptMethod]) -> "SoftPrompt":
    """A bank of templated prompts (each row's layout is in its input ids) or of prompts in front, not both."""
    templated = {m.template is not None for m in modules}
    if len(templated) > 1:
      raise PromptError(
        "a mixed batch needs prompts placed alike: templated prompts (prompt.template) and prompts in front of the "
        "input cannot share a batch"
      )
    bank = prompt_bank([m.embeddings[...] for m in modules])
    bank.template = modules[0].template
    return bank

  def rows(self, prompt_ids: jax.Array | None = None) -> jax.Array:
    """[1, P, H]: one prompt for all rows, or [B, P, H]: row `prompt_ids[b]` of a [K, P, H] bank."""
    value = self.embeddings[...]
    if value.ndim == 3:
      if prompt_ids is None:
        raise PromptError("a prompt bank needs prompt_ids for each example")
      return value[prompt_ids]
    return value[None]


def prompt_bank(prompts: Sequence[jax.Array | np.ndarray]) -> SoftPrompt:
  """Stack K prompts of equal shape [P, H] into one bank [K, P, H] (shorter ones are not padded: P must match)."""
  shapes = {tuple(np.shape(p)) for p in prompts}
  if len(shapes) != 1:
    raise PromptError(f"prompts in a bank must share one shape [P, H], got {sorted(shapes)}")
  return SoftPrompt(jnp.stack([jnp.asarray(p, jnp.float32) for p in prompts]))


class PromptedModel(nnx.Module):
  """A frozen base model (any `models.interface.PromptableLM`) plus a prompt method (`PromptMethod`: a soft prompt,
  a prefix, a P-tuning encoder, or a bank of fixed prompts for mixed batches)."""

  def __init__(self, base: nnx.Module, prompt: PromptMethod, head=None, input_format: InputFormat | None = None):
    """`head`: a classification head (`prompts.heads.Head`) trained with the prompt; None: the LM head.
    `input_format`: the trained prompt's task's (`load_prompted`); None: raw text."""
    self.base = base
    self.prompt = prompt
    self.head = head
    self.input_format = input_format

  def input_text(self, value: str | Mapping, *, raw: bool = False) -> str:
    """The text to tokenise for `value` (a task's single text field, or an object of its fields) in the input
    format the prompt was trained with (a T5 task's prefix and fields, a custom template); `raw`: as given."""
    return input_format.apply(self.input_format, value, raw=raw)

  @property
  def kind(self) -> str:
    return self.base.kind

  def prefix(self, batch_size: int, prompt_ids: jax.Array | None = None, *, dropout_rng=None) -> Prefix:
    return self.prompt.prefix(batch_size, prompt_ids, dropout_rng=dropout_rng)

  def _split(self, dropout_rng):
    """(the prompt's dropout key, the base's): a method that draws no dropout leaves the base's key as it was."""
    if not self.prompt.uses_dropout or dropout_rng is None:
      return None, dropout_rng
    return tuple(L.split_keys(dropout_rng, 2))

  def full_logits(
    self,
    input_ids,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    prompt_ids=None,
    dropout_rng=None,
  ) -> jax.Array:
    """The base's logits as PEFT returns them: seq2seq [B, T, V]; causal [B, P + L, V] with the soft prompt's
    positions (none for a key/value prefix)."""
    p_rng, rng = self._split(dropout_rng)
    return self.base.forward(
      input_ids,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask,
      prefix=self.prefix(input_ids.shape[0], prompt_ids, dropout_rng=p_rng),
      dropout_rng=rng,
    )

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    prompt_ids=None,
    dropout_rng=None,
  ) -> jax.Array:
    """Logits of the real positions only, float32: seq2seq [B, T, V]; causal [B, L, V] (no virtual tokens). With a
    classification head, the head's: [B, C] (sequence) or [B, L, C] (per token)."""
    if self.head is not None:
      return self.head_logits(input_ids, attention_mask, prompt_ids=prompt_ids, dropout_rng=dropout_rng)
    logits = self.full_logits(
      input_ids,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask,
      prompt_ids=prompt_ids,
      dropout_rng=dropout_rng,
    )
    return logits[:, logits.shape[1] - input_ids.shape[1] :] if decoder_input_ids is None else logits

  def head_logits(self, input_ids, attention_mask=None, *, prompt_ids=None, dropout_rng=None) -> jax.Array:
    """The classification head's logits, float32: [B, C] for a sequence head, [B, L, C] for a token head."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    p_rng, rng = self._split(dropout_rng)
    prefix = self.prefix(input_ids.shape[0], prompt_ids, dropout_rng=p_rng)
    logits = self.head.logits(self.base, input_ids, attention_mask, prefix, dropout_rng=rng)
    return logits if self.head.kind.per_token else logits[:, 0]

  def score_targets(self, batch, *, prompt_ids=None, dropout_rng=None):
    """(logits [B, T, V], targets [B, T], loss mask [B, T]) of a training batch (`models.interface`); a bank's
    prompt per row: `prompt_ids`, else the batch's `task_ids`. With a head (a `batches.ClassBatch`): the head's
    logits [B, T, C] against the class ids."""
    p_rng, rng = self._split(dropout_rng)
    if self.head is not None:
      prefix = self.prefix(batch.size, _ids(prompt_ids, batch), dropout_rng=p_rng)
      logits = self.head.logits(self.base, batch.input_ids, batch.input_mask, prefix, dropout_rng=rng)
      return logits, batch.labels, batch.label_mask
    if batch.packed:  # several examples per row, each with its prompt in its own slots
      return self.base.score_packed(batch, self.prompt.packed_table(p_rng), dropout_rng=rng)
    prefix = self.prefix(batch.size, _ids(prompt_ids, batch), dropout_rng=p_rng)
    return self.base.score_targets(batch, prefix, dropout_rng=rng)

  def label_logprobs(self, batch, label_ids, label_mask, *, prompt_ids=None) -> jax.Array:
    """[B, C] rank-classification scores under the prompt (a bank's: as `score_targets`)."""
    return self.base.label_logprobs(batch, label_ids, label_mask, self.prefix(batch.size, _ids(prompt_ids, batch)))

  def eval_scores(self, batch, label_ids, label_mask, *, prompt_ids=None):
    """(`score_targets`'s triple, `label_logprobs`) of an evaluation batch, sharing the work the two have in
    common (T5: one encoder pass; decoders: the input runs once, then the target and every label from its cache)."""
    return self.base.eval_scores(batch, label_ids, label_mask, self.prefix(batch.size, _ids(prompt_ids, batch)))


def _ids(prompt_ids, batch):
  return prompt_ids if prompt_ids is not None else batch.task_ids


# -- prompt tuning's registry entry (`prompts.registry`), and what the input-embedding methods share -------------

# prompt.init -> PEFT's PromptTuningInit. class_labels is "sampled vocabulary, then the labels' embeddings" and
# file continues whatever init made that prompt: PEFT has no closer names. PEFT only reads this field when a
# prompt is created for training, never when an adapter is loaded.
PEFT_INIT = {
  "random_uniform": "RANDOM",
  "random_normal": "RANDOM",
  "sampled_vocab": "SAMPLE_VOCAB",
  "class_labels": "SAMPLE_VOCAB",
  "text": "TEXT",
}


def restored(build_fn: Callable[[], PromptMethod], params: dict) -> PromptMethod:
  """The module `build_fn` makes, holding a checkpoint's parameters (built abstractly: no initialiser runs)."""
  module = nnx.eval_shape(build_fn)
  nnx.update(module, jax.tree.map(jnp.asarray, params))
  return module


def check_embeddings(value: np.ndarray, base, where: str) -> None:
  """Input embeddings [P, H] fit a base of hidden size H."""
  if value.shape[1] != base.hidden_size:
    raise PromptError(f"{where}: prompt is {value.shape}, this model's hidden size is {base.hidden_size}")


def fixed_embeddings(value, spec: PromptSpec, slots, where: str) -> SoftPrompt:
  return SoftPrompt(value, template=spec.template)


def peft_embeddings(value: np.ndarray, peft: dict, where) -> np.ndarray:
  """The [P, H] rows the input receives of a PROMPT_TUNING / P_TUNING adapter's `prompt_embeddings` (a seq2seq
  [2P, H] tensor's second half is never read)."""
  p, token_dim = peft["num_virtual_tokens"], peft.get("token_dim")
  if token_dim not in (None, value.shape[1]):
    raise PromptError(f"{where}: token_dim {token_dim} does not match prompt_embeddings {value.shape}")
  if value.shape[0] < p or value.shape[0] % p:
    raise PromptError(f"{where}: prompt_embeddings has {value.shape[0]} rows for {p} virtual tokens")
  return value[:p]


def embedding_peft_fields(value: np.ndarray, record) -> dict:
  """PEFT's fields of an input-embedding method (its PromptEmbedding / PromptEncoder), options aside."""
  arch = record.architecture
  return dict(
    token_dim=int(value.shape[1]),
    num_transformer_submodules=1,
    num_layers=arch.num_layers,
    num_attention_heads=arch.num_attention_heads,
  )


def _peft_init(record, base_path: str | None) -> dict:
  """PEFT's prompt_tuning_init fields for the init that actually made the prompt (RANDOM when unknown)."""
  pc = record.prompt_config or {}
  init = PEFT_INIT.get(pc.get("init"), "RANDOM")
  if init == "TEXT" and pc.get("init_text"):
    return dict(
      prompt_tuning_init="TEXT",
      prompt_tuning_init_text=pc["init_text"],
      tokenizer_name_or_path=record.tokenizer or base_path,
    )
  return dict(
    prompt_tuning_init="SAMPLE_VOCAB" if init == "TEXT" else init,
    prompt_tuning_init_text=None,
    tokenizer_name_or_path=None,
  )


PROMPT_TUNING = Method(
  name=PromptTuningSpec.method,
  spec_type=PromptTuningSpec,
  description="prompt tuning (Lester et al. 2021): learned input embeddings [P, H] before the input",
  embeds=True,
  value_shape="[P, H]",
  saves="embeddings [P, H]",
  peft_type="PROMPT_TUNING",
  build=lambda pcfg, base, tokenizer, labels, rng: SoftPrompt(
    initial_prompt(pcfg, base, tokenizer, labels, rng), template=pcfg.template
  ),
  rebuild=lambda spec, params: SoftPrompt(params["embeddings"], template=spec.template),
  fixed=fixed_embeddings,
  check=check_embeddings,
  peft_fields=lambda value, record, base_path: {
    **embedding_peft_fields(value, record),
    **_peft_init(record, base_path),
  },
  peft_read=lambda value, peft, where: (peft_embeddings(value, peft, where), PromptTuningSpec()),
  templates=True,
)
