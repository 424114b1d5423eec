"""The interface every frozen base model offers, one Protocol per kind; callers dispatch on it, never on strings.

Notation: B batch, L input length, T target length, P prefix length, H hidden, V vocab, C classes, W beams.

A prompt method reaches a model only through a `Prefix` (what it puts in front of the input); the model knows
where that goes for its kind (PEFT's semantics, so exported prompts give PyTorch the same logits):
  * prefix embeddings (prompt tuning, P-tuning) — seq2seq (T5): before the *encoder* input only, the encoder
    mask gets P ones; causal LM: before all tokens with P ones in the mask and positions 0..P+L-1, the prefix
    positions carrying no loss.
  * prefix keys/values (prefix tuning, deep prompts): P key/value slots in front of every attention layer's own —
    a pre-filled KV cache. Causal LM: every layer, the tokens at positions P..P+L-1 (the prefix keys are used as
    given: no rotary embedding is applied to them, as PEFT stores them); seq2seq (T5): the decoder's
    self-attention only (PEFT: the encoder never sees them), decoder positions from P on.
  * prefix embeddings at template slots (P-tuning v1, `prompt.template`): not in front but at the input's virtual
    tokens (input ids -1-k: prompt row k, `data.templates`), which are real tokens with their own mask and positions
    in sequence order; every model kind alike (T5: its encoder input), in `FrozenLM.input_embeddings`.
  * an input offset (DePT) [B|1, s, H]: added to the *input* tokens' embeddings only (never to the prompt, T5's
    decoder or a causal model's target tokens), row i to each row's i-th token counted from its first real token
    (i < s), so a left-padded row gets the offsets it gets unpadded (`add_input_offset`).

Encoders (BERT, RoBERTa, DeBERTa-v2: `EncoderModel`, `models.encoder`, `models.deberta`) are the third kind: no
language-model head (`has_lm_head` False), final hidden states and a pooled output from `encode`, a prompt entering
as PEFT puts it (embeddings before all tokens, [CLS] included; key/value prefixes before every layer's keys).

`kind` ("seq2seq" / "causal" / "encoder") remains a label for provenance and PEFT's task_type; code paths use the
methods and capabilities (`has_lm_head`, `supports_packing`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxprompt.errors import ModelError
from jaxprompt.models import attention
from jaxprompt.models import layers as L


@struct.dataclass
class Prefix:
  """What a prompt method puts in front of a batch's input.

  embeds: [B, P, H] (or [1, P, H], the same for every row) vectors before the input embeddings, in any dtype
    (cast to the compute dtype).
  keys, values: [Y, B, P, K, D] (or [Y, 1, P, K, D]) per attention layer Y (T5: each decoder layer), K key/value
    heads of D dims: slots every query of the layer attends to, before the layer's own keys.
  bank, bank_ids: where per-row `embeds` came from, when they are rows of a bank: the K distinct prompts
    [K, P, H] and each row's prompt [B] (`embeds` = bank[bank_ids]). A model may use them to compute each distinct
    prompt once (`Decoder.shared_prompt`); one that does not just reads `embeds`.
  input_offset: [B, s, H] (or [1, s, H]) added to the input tokens' embeddings at their positions 0..s-1 (DePT),
    in `FrozenLM.input_embeddings`, before the prefix's embeddings are put in front.
  adaption, adaption_gate, adaption_on: [B|1, Y, A, H], [B|1, Y], [B|1, Y] — adaption prompts (LLaMA-Adapter, PEFT's
    ADAPTION_PROMPT): in each attention layer y where adaption_on is 1, every query also attends, in a softmax of
    its own, over the A keys/values the layer's own k/v projections make of adaption[:, y] (no rotary embedding, no
    mask), scaled by the gate, and that output (o-projected as the model's PEFT counterpart does) is added to the
    layer's attention output (`models.kv.adaption_attention`); models with `supports_adaption` only.
  adaption_keys, adaption_values: [Y, B|1, A, K, D] those keys/values, projected once (`FrozenLM.adaption_kv`,
    `models.kv.adaption_keys_values`) in place of `adaption`: input-independent, what a server keeps per prompt and
    per decode slot, and what a model's layers read (the gate and switch fields as above).
  adaption_mask: [B|1, A] (1 = real) when rows carry adaption prompts of different lengths padded to one A (a
    server's decode slots); None when every slot is real. Masked slots take no part in the adaption softmax.
  at_slots: `embeds` go into the input's virtual tokens (ids -1-k take row k; a prompt template), not in front: the
    prefix then takes no positions of its own (`length` 0).
  template_embeds: [B|1, V, H] a prompt template's rows for the input's virtual tokens (ids -1-k take row k), as
    `at_slots` embeds are, beside any `embeds` in front: how one batch mixes templated prompts with others (a
    server's decode slots; a row without a template has no virtual tokens and takes none of them).
  embeds_mask, kv_mask: [B, P] (1 = real) when rows carry prompts of different lengths padded to one P (a server's
    mixed batch), None when every slot is real. Padding goes on the left (the real slots end where the input
    begins), so relative distances and positions are those of the row alone: positions after a key/value prefix
    start at the row's count of real slots.
  """

  embeds: jax.Array | None = None
  keys: jax.Array | None = None
  values: jax.Array | None = None
  bank: jax.Array | None = None
  bank_ids: jax.Array | None = None
  input_offset: jax.Array | None = None
  adaption: jax.Array | None = None
  adaption_gate: jax.Array | None = None
  adaption_on: jax.Array | None = None
  adaption_keys: jax.Array | None = None
  adaption_values: jax.Array | None = None
  adaption_mask: jax.Array | None = None
  template_embeds: jax.Array | None = None
  at_slots: bool = struct.field(pytree_node=False, default=False)
  embeds_mask: jax.Array | None = None
  kv_mask: jax.Array | None = None

  @property
  def adaption_length(self) -> int:
    """Adaption prompt slots A in every layer (as embeddings or keys/values; 0: none)."""
    if self.adaption_keys is not None:
      return self.adaption_keys.shape[2]
    return 0 if self.adaption is None else self.adaption.shape[2]

  def adaption_rows(self, batch_size: int) -> tuple | None:
    """(keys, values [Y, B, A, K, D], gate [B, Y], on [B, Y], mask [B, Y, A]) for `batch_size` rows, or None: what
    a model's layers (and a decoding cache) take. The keys/values must be projected (`FrozenLM.adaption_kv`)."""
    if self.adaption is not None:
      raise ValueError("adaption prompts reach the layers as keys/values: project them first (FrozenLM.adaption_kv)")
    if self.adaption_keys is None:
      return None
    y, _, a = self.adaption_keys.shape[:3]
    mask = jnp.ones((1, a), jnp.int32) if self.adaption_mask is None else self.adaption_mask.astype(jnp.int32)
    kv = [
      jnp.broadcast_to(x, x.shape[:1] + (batch_size,) + x.shape[2:]) for x in (self.adaption_keys, self.adaption_values)
    ]
    rows = (self.adaption_gate, self.adaption_on, jnp.broadcast_to(mask[:, None], (mask.shape[0], y, a)))
    return (*kv, *(jnp.broadcast_to(x, (batch_size,) + x.shape[1:]) for x in rows))

  @property
  def length(self) -> int:
    """Positions the prefix takes in front of the token sequence (its embeddings, unless they go into slots)."""
    return 0 if self.embeds is None or self.at_slots else self.embeds.shape[1]

  @property
  def kv_length(self) -> int:
    """Key/value slots in front of every attention layer."""
    return 0 if self.keys is None else self.keys.shape[2]

  def kv(self, batch_size: int, repeat: int = 1):
    """(keys, values) [Y, B * repeat, P, K, D] (each row repeated `repeat` times in place), or None."""
    if self.keys is None:
      return None

    def rows(a):
      a = jnp.broadcast_to(a, a.shape[:1] + (batch_size,) + a.shape[2:])
      return L.repeat_rows(a, repeat, axis=1)

    return rows(self.keys), rows(self.values)

  def kv_real(self, batch_size: int, repeat: int = 1) -> jax.Array:
    """The key/value slots' mask [B * repeat, P] (all ones without `kv_mask`)."""
    if self.kv_mask is None:
      return jnp.ones((batch_size * repeat, self.kv_length), jnp.int32)
    m = jnp.broadcast_to(self.kv_mask, (batch_size, self.kv_length)).astype(jnp.int32)
    return L.repeat_rows(m, repeat)


@dataclasses.dataclass(frozen=True)
class PrefixSlots:
  """Where a key/value prefix goes in a model, in PEFT's layout: a table [P, layers, 2, heads, head_dim] (keys then
  values; PEFT stores it flat as [P, layers * 2 * heads * head_dim]), attention layer i reading table layer
  `layer_of[i]`. `peft_problem` says why PEFT cannot run such a prefix on this model (export refuses), or None."""

  layers: int
  heads: int
  head_dim: int
  layer_of: tuple[int, ...]
  peft_problem: str | None = None

  @property
  def token_dim(self) -> int:
    """PEFT's token_dim for a prefix: heads * head_dim."""
    return self.heads * self.head_dim

  def per_layer(self) -> "PrefixSlots":
    """One table layer per attention layer, attention layer i reading table layer i: this layout when it is that
    already (decoders), else the table that gives each attention layer its own keys/values where PEFT's shares
    them (T5: PEFT 0.21 gives decoder layer g table layer 2g mod L), which PEFT cannot run (`peft_problem`)."""
    n = len(self.layer_of)
    if self.layer_of == tuple(range(n)) and self.layers == n:
      return self
    problem = (
      f"it holds each of the {n} attention layers' own keys/values, but PEFT 0.21 gives attention layer i table "
      f"layer {list(self.layer_of)}[i] of {self.layers}"
    )
    return PrefixSlots(
      layers=n, heads=self.heads, head_dim=self.head_dim, layer_of=tuple(range(n)), peft_problem=problem
    )

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "PrefixSlots":
    return cls(**{**d, "layer_of": tuple(d["layer_of"])})


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """How transformers' classification model of a kind maps final hidden states to C classes, so a trained head
  loads there (PEFT's `modules_to_save`): `name` is the module's name in that model (`score`, `classifier`,
  `classification_head`); `dense`: a dense H -> H + tanh first (T5's `T5ClassificationHead`: `dense`, `out_proj`);
  `bias`: the output layer has a bias; init as transformers' `_init_weights` (normal, std `init_std` / `dense_std`,
  zero biases); `dropout`: the class's default dropout before the head (and between dense and out_proj)."""

  name: str
  bias: bool
  init_std: float
  dense: bool = False
  dense_std: float = 0.0
  dropout: float = 0.0

  def hf_keys(self) -> dict[str, str]:
    """Our parameter name -> the HF module's tensor name (`name.weight`, ...)."""
    if self.dense:
      keys = dict(dense=f"{self.name}.dense.weight", dense_bias=f"{self.name}.dense.bias")
      keys.update(out=f"{self.name}.out_proj.weight", out_bias=f"{self.name}.out_proj.bias")
      return keys
    return dict(out=f"{self.name}.weight", **({"out_bias": f"{self.name}.bias"} if self.bias else {}))


def last_real(states: jax.Array, mask: jax.Array) -> jax.Array:
  """states [B, L, H], mask [B, L] -> [B, 1, H]: each row's last real token (`LlamaForSequenceClassification`'s
  last non-pad token; either padding side)."""
  last = jnp.max(jnp.where(mask > 0, jnp.arange(mask.shape[1])[None], 0), axis=1)
  return jnp.take_along_axis(states, last[:, None, None], axis=1)


@runtime_checkable
class PromptableLM(Protocol):
  """What training, evaluation, generation and export need from a base model of any kind."""

  kind: ClassVar[str]
  batch_type: ClassVar[type]  # Seq2SeqBatch | CausalBatch: how the data layer lays out tokens for this kind
  supports_packing: ClassVar[bool]  # `score_packed` runs several examples per row (data.pack)
  has_lm_head: ClassVar[bool]  # logits over the vocabulary: text targets, rank classification, generation
  supports_adaption: ClassVar[bool]  # takes adaption prompts (`Prefix.adaption`: decoders, as PEFT)
  config: Any
  dtype: Any  # compute dtype
  options: "ModelOptions"  # how it runs (layer loop, attention, remat, sharing a prompt), fixed at construction
  identity: Any  # where its weights came from (`models.hf.ModelIdentity`), or None for a model built here

  @property
  def hidden_size(self) -> int: ...

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, H] in the compute dtype."""

  def embedding_table(self) -> jax.Array:
    """The input embedding table [V, H] (what prompt initialisers sample from)."""

  def forward(
    self,
    input_ids,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    prefix: Prefix | None = None,
    dropout_rng=None,
  ) -> jax.Array:
    """Logits in float32: seq2seq [B, T, V]; causal [B, P + L, V] (prefix positions included, as PEFT)."""

  def score_targets(
    self, batch, prefix: Prefix | None = None, *, dropout_rng=None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A training batch -> (logits [B, T, V] float32 at the target tokens, targets [B, T], loss mask [B, T])."""

  def label_logprobs(
    self, batch, label_ids: jax.Array, label_mask: jax.Array, prefix: Prefix | None = None
  ) -> jax.Array:
    """Rank classification: sum of label-token log-likelihoods for every (example, label) -> [B, C]."""

  def eval_scores(
    self, batch, label_ids: jax.Array, label_mask: jax.Array, prefix: Prefix | None = None
  ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`score_targets` (no dropout) and `label_logprobs` of one batch, computing what they share once."""

  def prefill(
    self,
    input_ids=None,
    attention_mask=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    max_new_tokens: int,
    num_beams: int = 1,
  ) -> tuple[jax.Array, Any]:
    """Run a generation prefix once -> (logits of the first new token [B * W, V], decoding cache with every
    row repeated W times)."""

  def decode_step(self, cache, tokens: jax.Array, t) -> tuple[jax.Array, Any]:
    """Feed the t-th generated tokens [B'] -> (next logits [B', V], updated cache); t is one step for every row or
    each row's own [B'] (a server's decode slots, each at its own step)."""

  def pad_inputs(self, cache, by: int):
    """`prefill`'s cache laid out as if its inputs were `by` slots longer (masked padding where this kind pads
    inputs), so caches of inputs of any length take the rows of one decode-slot cache."""

  def reorder_cache(self, cache, origin: jax.Array):
    """Beam search: cache row i takes the state of row origin[i]."""

  def dummy_batch(self, batch_size: int, input_length: int, target_length: int):
    """A training batch of ShapeDtypeStructs (ahead-of-time compilation: plan, bench)."""

  def prefix_slots(self) -> PrefixSlots:
    """The layout of a key/value prefix for this model (prefix tuning), as PEFT lays it out."""

  def shared_prompt(
    self, prefix: Prefix | None, batch_size: int, dropout_rng=None
  ) -> tuple[Prefix | None, jax.Array | None]:
    """A soft prompt shared by every row, computed once where the model kind allows (decoders: its keys/values,
    `Decoder.shared_prompt`) -> (the prefix to use, the prompt's last final hidden state or None); T5's encoder is
    bidirectional, so there it returns the prefix unchanged."""

  def adaption_kv(self, prefix: Prefix | None) -> Prefix | None:
    """The prefix with its adaption prompts (`Prefix.adaption`) replaced by their keys/values at every layer
    (`Prefix.adaption_keys` / `adaption_values`, `models.kv.adaption_keys_values`): input-independent, so computed
    once per call (or once per served prompt) and only attended to afterwards. Unchanged without them."""

  def score_packed(self, batch, prompts: jax.Array | None, *, dropout_rng=None):
    """`score_targets` of a packed batch (`batches.PackedSeq2SeqBatch`), where `supports_packing`."""

  # -- what classification heads read (`prompts.heads`) --

  def token_states(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """Input [B, L] -> the final hidden state of every input token [B, L, H] under the prefix (its own positions
    dropped): a token-classification head's features (decoders: the stack's output; T5: the encoder's, as
    `T5ForTokenClassification`)."""

  def sequence_state(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """Input [B, L] -> [B, 1, H]: what the kind's sequence classifier reads (decoders: the last real token, as
    `LlamaForSequenceClassification`; T5: the decoder's state at the input's last EOS, decoder fed the input
    shifted right, as `T5ForSequenceClassification`)."""

  def sequence_head(self) -> HeadLayout:
    """The layout of transformers' sequence-classification head for this model."""

  def token_head(self) -> HeadLayout:
    """The layout of transformers' token-classification head for this model."""


@runtime_checkable
class Seq2SeqLM(PromptableLM, Protocol):
  """Encoder-decoder models (the T5 family)."""

  def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, *, dropout_rng=None) -> jax.Array:
    """-> encoder hidden states [B, L, H]."""

  def decode(
    self,
    decoder_input_ids,
    encoder_hidden,
    encoder_attention_mask=None,
    decoder_attention_mask=None,
    *,
    dropout_rng=None,
  ) -> jax.Array:
    """Teacher-forced decoder -> logits [B, T, V] float32."""


@runtime_checkable
class CausalLM(PromptableLM, Protocol):
  """Decoder-only models (Llama family, GPT-2)."""

  def hidden(
    self, input_ids=None, attention_mask=None, inputs_embeds=None, positions=None, *, dropout_rng=None
  ) -> jax.Array:
    """-> final hidden states [B, L, H] (`logits` maps them to the vocabulary)."""

  def logits(self, x: jax.Array) -> jax.Array:
    """Final hidden states [B, L, H] -> logits [B, L, V] float32."""


@runtime_checkable
class EncoderModel(Protocol):
  """Bidirectional encoders (BERT, RoBERTa, DeBERTa-v2): hidden states for task heads, no language-model head."""

  kind: ClassVar[str]
  has_lm_head: ClassVar[bool]  # False: `require_lm_head` refuses text-to-text work
  config: Any  # `models.encoder.EncoderConfig`; `config.pooler`: whether `pool` exists
  dtype: Any
  options: "ModelOptions"
  identity: Any

  @property
  def hidden_size(self) -> int: ...

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, H] token embeddings (no positions or token types) in the compute dtype."""

  def embedding_table(self) -> jax.Array:
    """The input embedding table [V, H]."""

  def encode(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    dropout_rng=None,
  ):
    """Token ids [B, L] (or embeddings [B, L, H]), mask [B, L], token types [B, L] (None: 0) and a prompt's prefix
    -> `models.encoder.EncoderOutput`: hidden [B, P + L, H] (prefix embeddings in front), mask [B, P + L],
    pooled [B, H] (the pooler on position 0, as transformers; None without a pooler), prefix_length P."""

  def pool(self, x: jax.Array) -> jax.Array:
    """The pooler on one position's final hidden states [B, H] -> [B, H] (e.g. [CLS] at prefix_length)."""

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """The masked-LM head (where `config.mlm_head`): hidden states [B, L, H] -> logits [B, L, V] float32."""

  def prefix_slots(self) -> PrefixSlots:
    """The layout of a key/value prefix for this model, as PEFT lays it out."""

  def shared_prompt(self, prefix: Prefix | None, batch_size: int, dropout_rng=None):
    """Bidirectional: nothing to share; the prefix unchanged."""


def require_lm_head(model, action: str) -> None:
  """Stop with one line (`ModelError`) when `model` has no language-model head and `action` needs one."""
  if not model.has_lm_head:
    raise ModelError(
      f"{action} needs a language-model head, and this {model.config.model_type} {model.kind} model has none "
      "(an encoder gives hidden states and a pooled output: Encoder.encode)"
    )


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """How a model runs, fixed when it is built (`models.loading.load_model` / `build_model` take these).

  layer_loop: scan the layers or unroll them ("auto": `layers.unrolls`); a cached decoding step always scans.
  attention: the attention implementation (`models.attention.IMPLEMENTATIONS`; "auto" picks per platform).
  remat: the layer scan's rematerialisation policy (`layers.remat_policy`).
  share_prompt: run a soft prompt shared by every row once per batch where the kind allows (decoders:
    `shared_prompt`); False runs it per row, as PEFT does (benchmarks compare the two).
  """

  layer_loop: str = "auto"
  attention: str = "auto"
  remat: str = "none"
  share_prompt: bool = True

  def __post_init__(self):
    L.unrolls(self.layer_loop)  # validates
    attention.resolve(self.attention)  # validates
    L.remat_policy(self.remat)  # validates


class FrozenLM(nnx.Module):
  """What every model family shares: its config, compute dtype and options, where its weights came from, the token
  embedding lookup, inputs with a prefix in front, and the dummy batch of its kind. Subclasses set `kind`,
  `batch_type`, `supports_packing`, create their parameters in `init_params`, and implement `embedding_table` and
  the rest of their kind's Protocol. Weights are float32 (or `param_dtype`); compute runs in `dtype`; logits are
  float32."""

  kind: ClassVar[str]
  batch_type: ClassVar[type]
  supports_packing: ClassVar[bool] = False
  has_lm_head: ClassVar[bool] = True
  supports_adaption: ClassVar[bool] = False

  def __init__(
    self,
    cfg,
    *,
    rngs: nnx.Rngs,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    options: ModelOptions | None = None,
    identity=None,
  ):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.options = options or ModelOptions()
    self.identity = identity
    self.init_params(cfg, rngs, param_dtype)

  @property
  def remat(self) -> str:
    return self.options.remat

  @property
  def layer_loop(self) -> str:
    return self.options.layer_loop

  @property
  def attention(self) -> str:
    return self.options.attention

  def adaption_kv(self, prefix: Prefix | None) -> Prefix | None:
    """No adaption prompts here (`supports_adaption` False): the prefix as it is, refused if it carries any."""
    if prefix is not None and prefix.adaption_length:
      raise ModelError(f"{type(self).__name__} takes no adaption prompts (supports_adaption is False)")
    return prefix

  def shared_prompt(self, prefix: Prefix | None, batch_size: int, dropout_rng=None):
    """Nothing to share (see `PromptableLM.shared_prompt`): the prefix as it is."""
    return prefix, None

  def score_packed(self, batch, prompts, *, dropout_rng=None):
    raise NotImplementedError(f"{type(self).__name__} does not pack rows (supports_packing is False)")

  def init_params(self, cfg, rngs: nnx.Rngs, param_dtype) -> None:
    raise NotImplementedError

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, H] in the compute dtype (token embeddings only)."""
    return jnp.take(self.embedding_table(), input_ids, axis=0).astype(self.dtype)

  def input_embeddings(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    *,
    offset_tokens: jax.Array | None = None,
  ):
    """Token ids [B, L] or embeddings [B, L, H] (exactly one) -> (embeddings [B, P + L, H] in the compute dtype
    with the prefix's input offset added to the tokens and its embeddings in front, mask [B, P + L]: P ones, then
    `attention_mask` or all ones). `offset_tokens` [B]: how many of each row's tokens are input (a causal training
    row is input + target: the offset stops at the target); None: all."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError(f"{type(self).__name__} needs exactly one of input_ids and inputs_embeds")
    if prefix is not None and prefix.at_slots:
      if input_ids is None:
        raise ValueError("a templated prompt goes into the input's virtual tokens: give input_ids, not embeddings")
      x = place_prompt(self.embed(jnp.maximum(input_ids, 0)), input_ids, prefix.embeds)
      return x, jnp.ones(x.shape[:2], jnp.int32) if attention_mask is None else attention_mask
    if inputs_embeds is not None:
      x = inputs_embeds.astype(self.dtype)
    elif prefix is not None and prefix.template_embeds is not None:
      x = place_prompt(self.embed(jnp.maximum(input_ids, 0)), input_ids, prefix.template_embeds)
    else:
      x = self.embed(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(x.shape[:2], jnp.int32)
    if prefix is not None and prefix.input_offset is not None:
      x = add_input_offset(x, attention_mask, prefix.input_offset, offset_tokens)
    if prefix is None or prefix.embeds is None:
      return x, attention_mask
    x, mask = L.prepend(prefix.embeds, x, attention_mask)
    if prefix.embeds_mask is not None:
      real = jnp.broadcast_to(prefix.embeds_mask, (x.shape[0], prefix.length)).astype(mask.dtype)
      mask = jnp.concatenate([real, mask[:, prefix.length :]], axis=1)
    return x, mask

  def dummy_batch(self, batch_size: int, input_length: int, target_length: int):
    return self.batch_type.shapes(batch_size, input_length, target_length)


def place_prompt(x: jax.Array, input_ids: jax.Array, embeds: jax.Array) -> jax.Array:
  """Token embeddings x [B, L, H] with prompt row k [B|1, P, H] at every virtual token -1-k of input_ids [B, L]
  (a prompt template's slots; one gather and a select, fixed shapes)."""
  b, p = x.shape[0], embeds.shape[1]
  rows = jnp.broadcast_to(embeds, (b,) + embeds.shape[1:]).astype(x.dtype)
  picked = jnp.take_along_axis(rows, jnp.clip(-1 - input_ids, 0, p - 1)[..., None], axis=1)  # [B, L, H]
  return jnp.where((input_ids < 0)[..., None], picked, x)


def add_input_offset(x: jax.Array, mask: jax.Array, offset: jax.Array, limit: jax.Array | None = None) -> jax.Array:
  """Token embeddings x [B, L, H] (mask [B, L]) plus offset [B|1, s, H]: offset row i goes to each row's i-th
  token counted from its first real one (i < s; and i < limit[b], limit [B], when given). Right-padded rows get
  offsets on their padding too, as DePT's authors add them to the whole padded input (masked keys: no effect);
  left padding gets none, so a left-padded row is embedded as it is alone."""
  b, n = x.shape[:2]
  s = offset.shape[1]
  idx = jnp.arange(n)[None, :] - jnp.argmax(mask > 0, axis=1)[:, None]  # [B, L]: position among the row's tokens
  ok = (idx >= 0) & (idx < s)
  if limit is not None:
    ok &= idx < limit[:, None]
  rows = jnp.broadcast_to(offset.astype(jnp.float32), (b,) + offset.shape[1:])
  add = jnp.take_along_axis(rows, jnp.clip(idx, 0, s - 1)[..., None], axis=1)  # [B, L, H]
  return (x.astype(jnp.float32) + jnp.where(ok[..., None], add, 0.0)).astype(x.dtype)
