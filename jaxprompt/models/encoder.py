"""Bidirectional encoders in Flax NNX: BERT and RoBERTa, selected by config alone (`models.interface.EncoderModel`).

Post-LN blocks (attention, add, LayerNorm; dense GELU MLP, add, LayerNorm), learned absolute positions, token type
embeddings and a LayerNorm on the embedding sum, biases everywhere, and the pooler (dense + tanh on position 0)
where the checkpoint has one. RoBERTa differs only in its positions: they start after the padding id
(`padding_idx + 1`), and padding tokens (by token id) sit at `padding_idx` (transformers'
`create_position_ids_from_input_ids`).

An encoder has no language-model head (`has_lm_head` is False): it gives final hidden states and a pooled output
(`encode`) for task heads; the interface's text-to-text methods refuse with one line (`require_lm_head`). A
masked-LM checkpoint's head (`config.mlm_head`) gives vocabulary logits at any position (`mlm_logits`: P-tuning v1
reads its [MASK]), which is not a generation head.

A prompt enters as PEFT feeds transformers (PEFT 0.21, transformers 5.25; checked against both in
tests/test_encoder.py):
  * prefix embeddings (prompt tuning, P-tuning): before ALL tokens, [CLS] included, through transformers'
    `inputs_embeds` path: the mask gets P ones, the virtual tokens token type 0 (PEFT's SEQ_CLS / TOKEN_CLS models
    prepend zeros to `token_type_ids`; its FEATURE_EXTRACTION model drops `token_type_ids`: pass None), and
    positions run over the whole sequence: BERT 0..P+L-1, RoBERTa padding_idx+1..padding_idx+P+L (sequential:
    `create_position_ids_from_inputs_embeds` cannot see padding). The pooler reads position 0, the first virtual
    token, as transformers' pooler does under PEFT; `pool` pools any other position (P-tuning v2's code pools
    [CLS], at P).
  * key/value prefixes (prefix tuning, P-tuning v2's deep prompts): P slots in front of every layer's keys and
    values, all attended to (bidirectional), and the tokens' positions shifted by P as transformers shifts them by
    the cache length: BERT P..P+L-1, RoBERTa from the token ids with P added.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Iterable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxprompt.errors import ModelError
from jaxprompt.models import kv as KV
from jaxprompt.models import layers as L
from jaxprompt.models.interface import FrozenLM, HeadLayout, Prefix, PrefixSlots, require_lm_head

log = logging.getLogger(__name__)

FAMILIES = ("bert", "roberta")
_HF_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel"}
_HF_MLM_CLASSES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  FAMILIES: ClassVar[tuple[str, ...]] = FAMILIES

  model_type: str  # one of FAMILIES
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  pad_token_id: int | None = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  dropout_rate: float = 0.1  # embeddings and residual branches (hidden_dropout_prob), training only
  attention_dropout_rate: float | None = None  # attention probabilities; None: dropout_rate
  pooler: bool = True  # dense + tanh on position 0 (checkpoints without `pooler.dense.*` have none)
  mlm_head: bool = False  # the masked-LM head (*ForMaskedLM, BertForPreTraining), its decoder tied to the embedding
  weight_prefix: str = ""  # HF key prefix of the body: "" (BertModel), "bert." / "roberta." (task models)
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.model_type not in self.FAMILIES:
      raise ModelError(f"{type(self).__name__}.model_type {self.model_type!r} is not one of {self.FAMILIES}")
    if self.hidden_size % self.num_attention_heads:
      raise ModelError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads")
    if self.model_type == "roberta" and self.pad_token_id is None:
      raise ModelError("a roberta config needs pad_token_id: its positions start after it")
    L.activation(self.hidden_act)  # validates

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def positions_from_ids(self) -> bool:
    """RoBERTa counts positions from padding_idx + 1 and gives padding tokens padding_idx."""
    return self.model_type == "roberta"

  @property
  def attention_dropout(self) -> float:
    return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

  @classmethod
  def from_hf(cls, c: dict[str, Any], keys: Iterable[str] | None = None) -> "EncoderConfig":
    """From a HF config.json dict; `keys` (the checkpoint's tensor names) decide the key prefix and the pooler
    (a config alone: no prefix, a pooler)."""
    mt = c.get("model_type")
    if mt not in FAMILIES:
      raise ModelError(f"model_type {mt!r} is not a supported encoder; supported: {FAMILIES}")
    if c.get("position_embedding_type", "absolute") != "absolute":
      raise ModelError(f"{mt} with position_embedding_type={c['position_embedding_type']!r} is not supported")
    if c.get("is_decoder") or c.get("add_cross_attention"):
      raise ModelError(f"{mt} as a decoder (is_decoder / add_cross_attention) is not supported")
    prefix, pooler, mlm = "", True, False
    keys = set(keys or ())
    if any(k.endswith("word_embeddings.weight") for k in keys):  # a checkpoint's names, not a config alone
      prefix = f"{mt}." if f"{mt}.embeddings.word_embeddings.weight" in keys else ""
      pooler = f"{prefix}pooler.dense.weight" in keys
      mlm = _MLM_TENSORS[mt][0] in keys
      if mlm and c.get("tie_word_embeddings") is False:
        raise ModelError(f"{mt}: a masked-LM head with an untied decoder (tie_word_embeddings false) is not supported")
      heads = sorted(k for k in keys if k.startswith(_HEAD_PREFIXES) and not (mlm and k in _MLM_TENSORS[mt]))
      if heads:
        log.warning("%s: the checkpoint's head tensors (%s, ...) are not loaded: only the encoder body", mt, heads[0])
    return cls(
      **body_fields(c, layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0 if mt == "bert" else 1),
      pooler=pooler,
      mlm_head=mlm,
      weight_prefix=prefix,
    )

  def hf_class(self) -> str:
    """The transformers class a saved folder names (`architectures`)."""
    return (_HF_MLM_CLASSES if self.mlm_head else _HF_CLASSES)[self.model_type]

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' BertModel / RobertaModel reads back to this model."""
    return dict(
      model_type=self.model_type,
      architectures=[self.hf_class()],
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      hidden_act=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      max_position_embeddings=self.max_position_embeddings,
      type_vocab_size=self.type_vocab_size,
      pad_token_id=self.pad_token_id,
      bos_token_id=self.bos_token_id,
      eos_token_id=self.eos_token_id,
      hidden_dropout_prob=self.dropout_rate,
      attention_probs_dropout_prob=self.attention_dropout,
      position_embedding_type="absolute",
      initializer_range=self.initializer_range,
    )


def body_fields(c: dict[str, Any], **defaults) -> dict[str, Any]:
  """The `EncoderConfig` fields every BERT-shaped HF config.json holds, with the family's `defaults` (layer_norm_eps,
  type_vocab_size, pad_token_id)."""
  hidden, attn = c.get("hidden_dropout_prob", 0.1), c.get("attention_probs_dropout_prob", 0.1)
  return dict(
    model_type=c["model_type"],
    vocab_size=c["vocab_size"],
    hidden_size=c["hidden_size"],
    intermediate_size=c["intermediate_size"],
    num_hidden_layers=c["num_hidden_layers"],
    num_attention_heads=c["num_attention_heads"],
    hidden_act=c.get("hidden_act", "gelu"),
    layer_norm_eps=c.get("layer_norm_eps", defaults["layer_norm_eps"]),
    max_position_embeddings=c.get("max_position_embeddings", 512),
    type_vocab_size=c.get("type_vocab_size", defaults["type_vocab_size"]),
    pad_token_id=c.get("pad_token_id", defaults["pad_token_id"]),
    bos_token_id=c.get("bos_token_id"),
    eos_token_id=c.get("eos_token_id"),
    dropout_rate=float(hidden or 0.0),
    attention_dropout_rate=None if attn == hidden else float(attn or 0.0),
    initializer_range=c.get("initializer_range", 0.02),
  )


@struct.dataclass
class EncoderOutput:
  """What `Encoder.encode` returns.

  hidden: final hidden states [B, P + L, H] in the compute dtype, the P prefix-embedding positions in front (as
    transformers returns them under PEFT; a key/value prefix takes no positions).
  mask: [B, P + L] (1 = a real token or a virtual one).
  pooled: [B, H] the pooler on position 0 (transformers' `pooler_output`), or None without a pooler.
  prefix_length: P, where the input's tokens start in `hidden` (its [CLS] is at P).
  """

  hidden: jax.Array
  mask: jax.Array
  pooled: jax.Array | None = None
  prefix_length: int = struct.field(pytree_node=False, default=0)


class EncoderLayers(nnx.Module):
  """All layers, stacked: self-attention then MLP, each followed by add + LayerNorm (post-LN)."""

  def __init__(self, cfg: EncoderConfig, *, rngs, param_dtype):
    y, h, n = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    init = dict(rngs=rngs, param_dtype=param_dtype, std_in=cfg.initializer_range, std_out=cfg.initializer_range)
    self.attn = L.StackedAttention(y, h, n, n, cfg.head_dim, qkv_bias=True, out_bias=True, **init)
    self.mlp = L.StackedMLP(y, h, cfg.intermediate_size, False, bias=True, **init)
    for name in ("attn_norm", "mlp_norm"):
      setattr(self, name, L.param(jnp.ones((y, h), param_dtype), ("layers", "embed")))
      setattr(self, f"{name}_bias", L.param(jnp.zeros((y, h), param_dtype), ("layers", "embed")))


class Encoder(FrozenLM):
  """A BERT / RoBERTa encoder (`models.interface.EncoderModel`)."""

  kind = "encoder"
  batch_type = None  # no text-to-text batches: an encoder has no language-model head
  has_lm_head = False

  def init_params(self, cfg: EncoderConfig, rngs: nnx.Rngs, param_dtype) -> None:
    h, std = cfg.hidden_size, cfg.initializer_range
    self.init_embeddings(cfg, rngs, param_dtype, positions=True, types=True)
    self.layers = EncoderLayers(cfg, rngs=rngs, param_dtype=param_dtype)
    if cfg.pooler:
      self.init_pooler(cfg, rngs, param_dtype)
    if cfg.mlm_head:
      self.mlm_dense = L.param(L.normal_init(rngs, (h, h), std, param_dtype), ("embed", None))
      self.mlm_dense_bias = L.param(jnp.zeros((h,), param_dtype), (None,))
      self.mlm_norm = L.param(jnp.ones((h,), param_dtype), ("embed",))
      self.mlm_norm_bias = L.param(jnp.zeros((h,), param_dtype), ("embed",))
      self.mlm_bias = L.param(jnp.zeros((cfg.vocab_size,), param_dtype), ("vocab",))

  def table(self, rngs, rows: int, axis, param_dtype):
    """A [rows, H] table, normal with the config's std."""
    c = self.config
    return L.param(L.normal_init(rngs, (rows, c.hidden_size), c.initializer_range, param_dtype), (axis, "embed"))

  def init_embeddings(self, cfg: EncoderConfig, rngs, param_dtype, *, positions: bool, types: bool) -> None:
    """Token (+ absolute position) (+ token type) tables and the LayerNorm on their sum."""
    self.embed_tokens = self.table(rngs, cfg.vocab_size, "vocab", param_dtype)
    if positions:
      self.embed_positions = self.table(rngs, cfg.max_position_embeddings, "positions", param_dtype)
    if types:
      self.embed_types = self.table(rngs, cfg.type_vocab_size, None, param_dtype)
    self.embed_norm = L.param(jnp.ones((cfg.hidden_size,), param_dtype), ("embed",))
    self.embed_norm_bias = L.param(jnp.zeros((cfg.hidden_size,), param_dtype), ("embed",))

  def init_pooler(self, cfg: EncoderConfig, rngs, param_dtype) -> None:
    """The pooler's dense H -> H (BERT's pooler, DeBERTa's ContextPooler)."""
    h = cfg.hidden_size
    self.pooler = L.param(L.normal_init(rngs, (h, h), cfg.initializer_range, param_dtype), ("embed", None))
    self.pooler_bias = L.param(jnp.zeros((h,), param_dtype), (None,))

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def embedding_table(self) -> jax.Array:
    return self.embed_tokens[...]

  def prefix_slots(self) -> PrefixSlots:
    c = self.config
    return PrefixSlots(
      layers=c.num_hidden_layers,
      heads=c.num_attention_heads,
      head_dim=c.head_dim,
      layer_of=tuple(range(c.num_hidden_layers)),
    )

  # -- the stack -------------------------------------------------------------------------------

  def positions(self, input_ids, length: int, kv_length: int = 0) -> jax.Array:
    """Position ids [B|1, length] as transformers makes them: from `input_ids` [B, length] (None: transformers'
    `inputs_embeds` path), after `kv_length` cached (prefix) slots."""
    c = self.config
    if not c.positions_from_ids:  # BERT: position_ids[:, cache : cache + length]
      pos = kv_length + jnp.arange(length)[None]
      top = kv_length + length - 1
    elif input_ids is None:  # RoBERTa from embeddings: sequential, and the cache length is not added
      pos = c.pad_token_id + 1 + jnp.arange(length)[None]
      top = c.pad_token_id + length
    else:  # RoBERTa from ids: padding (by id) at padding_idx, the others counted from padding_idx + 1 + cache
      real = (input_ids != c.pad_token_id).astype(jnp.int32)
      pos = (jnp.cumsum(real, axis=1) + kv_length) * real + c.pad_token_id
      top = c.pad_token_id + kv_length + length
    if top >= c.max_position_embeddings:
      raise ModelError(
        f"{c.model_type}: {length} tokens after {kv_length} prefix slots need position {top}, past the model's "
        f"max_position_embeddings {c.max_position_embeddings}"
      )
    return pos

  def embeddings(self, x: jax.Array, positions: jax.Array, token_type_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token embeddings x [B, S, H] + position [B|1, S] and token type [B, S] embeddings, LayerNorm (`mask`
    [B, S]: unused here)."""
    x = x + jnp.take(self.embed_positions[...], positions, axis=0).astype(x.dtype)
    x = x + jnp.take(self.embed_types[...], token_type_ids, axis=0).astype(x.dtype)
    return L.layer_norm(x, self.embed_norm[...], self.embed_norm_bias[...], self.config.layer_norm_eps)

  def encode(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    dropout_rng=None,
  ) -> EncoderOutput:
    """Token ids [B, L] or embeddings [B, L, H] (exactly one; attention_mask [B, L], 1 = real; token_type_ids
    [B, L], None: all 0), with a prompt's `prefix` put where PEFT puts it (module docstring) -> EncoderOutput."""
    x, mask = self.input_embeddings(input_ids, attention_mask, inputs_embeds, prefix)
    b, n = mask.shape
    p = 0 if prefix is None else prefix.length
    kv = None if prefix is None else prefix.kv(b)
    pk = 0 if kv is None else kv[0].shape[2]
    types = jnp.zeros((b, n - p), jnp.int32) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
    types = jnp.concatenate([jnp.zeros((b, p), jnp.int32), jnp.broadcast_to(types, (b, n - p))], axis=1)
    positions = self.positions(input_ids if p == 0 else None, n, pk)
    rngs = L.split_rng(dropout_rng, 2)
    x = L.dropout(self.embeddings(x, positions, types, mask), self.config.dropout_rate, rngs[0])
    key_mask = jnp.concatenate([jnp.ones((b, pk), mask.dtype), mask], axis=1)
    h = self._layers(x, L.mask_to_bias(key_mask), KV.source(kv), rngs[1])
    pooled = self.pool(h[:, 0]) if self.config.pooler else None
    return EncoderOutput(hidden=h, mask=mask, pooled=pooled, prefix_length=p)

  def _layers(self, x: jax.Array, bias: jax.Array, kv: KV.KVSource, rng) -> jax.Array:
    """x [B, S, H] through every layer, attending to all unmasked keys (bias [B, 1, 1, pk + S]) after `kv`."""
    c = self.config
    act, rate, eps = L.activation(c.hidden_act), c.dropout_rate, c.layer_norm_eps
    scores = self.score_terms(x.shape[1])

    def layer(p, x, rng, xs):
      r = L.split_rng(rng, 4)
      extra, scale = scores(p, x, r[3])
      o, _ = KV.self_attention(
        p["attn"],
        x,
        xs["kv"],
        bias=bias if extra is None else bias + extra,
        scale=scale,
        dropout_rate=c.attention_dropout,
        dropout_rng=r[0],
        implementation=self.attention,
      )
      x = L.layer_norm(x + L.dropout(o, rate, r[1]), p["attn_norm"], p["attn_norm_bias"], eps)
      y = L.mlp(x, p["mlp"], act)
      return L.layer_norm(x + L.dropout(y, rate, r[2]), p["mlp_norm"], p["mlp_norm_bias"], eps), None

    x, _ = L.scan_layers(layer, x, L.arrays(self.layers), rng, self.remat, dict(kv=kv), loop=self.layer_loop)
    return x

  def score_terms(self, length: int):
    """For `length` tokens, a function (one layer's params, its inputs [B, S, H], a dropout key) -> (an extra
    attention-score bias [B, N, S, S] or None, the scale of q.k): BERT and RoBERTa add nothing and scale by
    1/sqrt(D); DeBERTa adds its relative-position terms (`models.deberta`)."""
    scale = self.config.head_dim**-0.5
    return lambda p, x, rng: (None, scale)

  def pool(self, x: jax.Array, dropout_rng=None) -> jax.Array:
    """The pooler: [B, H] (one position's final hidden states) -> tanh(x W + b) [B, H] (no dropout in BERT's)."""
    if not self.config.pooler:
      raise ModelError(f"this {self.config.model_type} checkpoint has no pooler (no pooler.dense.* tensors)")
    y = x @ self.pooler[...].astype(x.dtype) + self.pooler_bias[...].astype(x.dtype)
    return jnp.tanh(y)

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """The masked-LM head (P-tuning v1's verbalizer reads it): final hidden states [B, L, H] -> logits [B, L, V]
    float32 (dense, GELU — BERT: hidden_act; RoBERTa: exact GELU always — LayerNorm, the tied decoder + bias)."""
    c = self.config
    if not c.mlm_head:
      raise ModelError(f"this {c.model_type} checkpoint has no masked-LM head (a *ForMaskedLM checkpoint has one)")
    act = L.activation("gelu" if c.model_type == "roberta" else c.hidden_act)
    x = act(hidden @ self.mlm_dense[...].astype(hidden.dtype) + self.mlm_dense_bias[...].astype(hidden.dtype))
    x = L.layer_norm(x, self.mlm_norm[...], self.mlm_norm_bias[...], c.layer_norm_eps)
    return L.lm_logits(x, tied_table=self.embed_tokens[...]) + self.mlm_bias[...].astype(jnp.float32)

  # -- classification heads (`prompts.heads`) --------------------------------------------------

  def token_states(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> final hidden states of the input tokens [B, L, H] (prompt positions dropped), as
    BertForTokenClassification reads them."""
    out = self.encode(input_ids, attention_mask, prefix=prefix, dropout_rng=dropout_rng)
    return out.hidden[:, out.prefix_length :]

  def sequence_state(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> [B, 1, H] at position 0 as transformers' sequence classifiers read it: BERT the pooled output
    (BertForSequenceClassification), RoBERTa the state itself (RobertaClassificationHead's dense + tanh follow in
    the head). Position 0 is [CLS] under a key/value prefix and the first virtual token under a soft prompt in front
    (what PEFT feeds transformers)."""
    r = L.split_rng(dropout_rng, 2)
    out = self.encode(input_ids, attention_mask, prefix=prefix, dropout_rng=r[0])
    first = out.hidden[:, :1]
    return first if self.sequence_head().dense else self.pool(first[:, 0], r[1])[:, None]

  def sequence_head(self) -> HeadLayout:
    c = self.config
    if c.model_type == "roberta":  # RobertaClassificationHead: dense + tanh + out_proj on <s>, no pooler
      return HeadLayout(
        "classifier", bias=True, init_std=c.initializer_range, dense=True, dense_std=c.initializer_range,
        dropout=c.dropout_rate,
      )  # fmt: skip
    if not c.pooler:
      raise ModelError(f"a sequence head reads BERT's pooler; this {c.model_type} checkpoint has none")
    return HeadLayout("classifier", bias=True, init_std=c.initializer_range, dropout=c.dropout_rate)

  def token_head(self) -> HeadLayout:
    # BertForTokenClassification / RobertaForTokenClassification / DebertaV2ForTokenClassification: dropout
    # (classifier_dropout, else hidden_dropout_prob), then `classifier` Linear(H, C)
    c = self.config
    return HeadLayout("classifier", bias=True, init_std=c.initializer_range, dropout=c.dropout_rate)

  # -- what needs a language-model head: refused (models.interface.require_lm_head) --------------

  def forward(self, *args, **kwargs):
    require_lm_head(self, "forward (logits over the vocabulary)")

  def score_targets(self, *args, **kwargs):
    require_lm_head(self, "training on text targets")

  def label_logprobs(self, *args, **kwargs):
    require_lm_head(self, "rank classification")

  def eval_scores(self, *args, **kwargs):
    require_lm_head(self, "evaluation on text targets")

  def prefill(self, *args, **kwargs):
    require_lm_head(self, "generation")

  def decode_step(self, *args, **kwargs):
    require_lm_head(self, "generation")

  def reorder_cache(self, *args, **kwargs):
    require_lm_head(self, "beam search")

  def dummy_batch(self, *args, **kwargs):
    require_lm_head(self, "a text-to-text batch")


# -- strict HF weight maps ---------------------------------------------------------------------

# The masked-LM head: (transform dense, its LayerNorm, the output bias) per family; the decoder weight is the word
# embedding and the decoder bias the output bias (`hf_tied`).
_MLM_TENSORS = {
  "bert": (
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.bias",
  ),
  "roberta": (
    "lm_head.dense.weight",
    "lm_head.dense.bias",
    "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias",
    "lm_head.bias",
  ),
}
_MLM_DECODER = {"bert": "cls.predictions.decoder", "roberta": "lm_head.decoder"}

# Tensors of the task / pre-training heads that BERT and RoBERTa checkpoints carry beside the body
# (BertForPreTraining, *ForMaskedLM, *ForSequenceClassification, *ForTokenClassification): consumed unread.
_HEAD_PREFIXES = ("classifier.", "cls.", "lm_head.")
_HEAD_TENSORS = (
  "classifier.weight",
  "classifier.bias",
  "classifier.dense.weight",
  "classifier.dense.bias",
  "classifier.out_proj.weight",
  "classifier.out_proj.bias",
  "cls.predictions.bias",
  "cls.predictions.transform.dense.weight",
  "cls.predictions.transform.dense.bias",
  "cls.predictions.transform.LayerNorm.weight",
  "cls.predictions.transform.LayerNorm.bias",
  "cls.predictions.decoder.weight",
  "cls.predictions.decoder.bias",
  "cls.seq_relationship.weight",
  "cls.seq_relationship.bias",
  "lm_head.bias",
  "lm_head.dense.weight",
  "lm_head.dense.bias",
  "lm_head.layer_norm.weight",
  "lm_head.layer_norm.bias",
  "lm_head.decoder.weight",
  "lm_head.decoder.bias",
)


def embedding_weight_map(prefix: str, *, positions: bool = True, types: bool = True) -> list[tuple[str, str, str]]:
  """The embedding tables and their LayerNorm of a BERT-shaped body whose keys start with `prefix`."""
  e = f"{prefix}embeddings"
  m = [("embed_tokens", f"{e}.word_embeddings.weight", "copy")]
  if positions:
    m.append(("embed_positions", f"{e}.position_embeddings.weight", "copy"))
  if types:
    m.append(("embed_types", f"{e}.token_type_embeddings.weight", "copy"))
  return m + [("embed_norm", f"{e}.LayerNorm.weight", "copy"), ("embed_norm_bias", f"{e}.LayerNorm.bias", "copy")]


def layer_weight_map(prefix: str, qkv: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
  """Every post-LN layer's tensors (`{i}`: the layer): self-attention projections `qkv` (ours, HF's module name),
  the attention output, its LayerNorm, the MLP and its LayerNorm."""
  blk = f"{prefix}encoder.layer.{{i}}"
  m = []
  for ours, theirs in qkv:
    m += [
      (f"layers.attn.{ours}", f"{blk}.attention.self.{theirs}.weight", "linear"),
      (f"layers.attn.{ours}_bias", f"{blk}.attention.self.{theirs}.bias", "flat"),
    ]
  return m + [
    ("layers.attn.o", f"{blk}.attention.output.dense.weight", "linear_out"),
    ("layers.attn.o_bias", f"{blk}.attention.output.dense.bias", "copy"),
    ("layers.attn_norm", f"{blk}.attention.output.LayerNorm.weight", "copy"),
    ("layers.attn_norm_bias", f"{blk}.attention.output.LayerNorm.bias", "copy"),
    ("layers.mlp.wi", f"{blk}.intermediate.dense.weight", "linear"),
    ("layers.mlp.bi", f"{blk}.intermediate.dense.bias", "copy"),
    ("layers.mlp.wo", f"{blk}.output.dense.weight", "linear"),
    ("layers.mlp.bo", f"{blk}.output.dense.bias", "copy"),
    ("layers.mlp_norm", f"{blk}.output.LayerNorm.weight", "copy"),
    ("layers.mlp_norm_bias", f"{blk}.output.LayerNorm.bias", "copy"),
  ]


def pooler_weight_map(key: str) -> list[tuple[str, str, str]]:
  """The pooler's dense layer, HF module `key` (`bert.pooler.dense`, DeBERTa's `pooler.dense`)."""
  return [("pooler", f"{key}.weight", "linear"), ("pooler_bias", f"{key}.bias", "copy")]


def hf_weight_map(cfg: EncoderConfig) -> list[tuple[str, str, str]]:
  P = cfg.weight_prefix
  m = embedding_weight_map(P) + layer_weight_map(P, (("q", "query"), ("k", "key"), ("v", "value")))
  if cfg.pooler:
    m += pooler_weight_map(f"{P}pooler.dense")
  if cfg.mlm_head:
    ours = ("mlm_dense", "mlm_dense_bias", "mlm_norm", "mlm_norm_bias", "mlm_bias")
    m += [
      (o, t, "linear" if o == "mlm_dense" else "copy") for o, t in zip(ours, _MLM_TENSORS[cfg.model_type], strict=True)
    ]
  return m


def hf_tied(cfg: EncoderConfig) -> tuple[tuple[str, ...], ...]:
  """The masked-LM decoder is the word embedding, its bias the head's output bias: a checkpoint may store either
  name of each (older BERT checkpoints store both)."""
  if not cfg.mlm_head:
    return ()
  dec = _MLM_DECODER[cfg.model_type]
  return (
    (f"{cfg.weight_prefix}embeddings.word_embeddings.weight", f"{dec}.weight"),
    (_MLM_TENSORS[cfg.model_type][-1], f"{dec}.bias"),
  )


def hf_aliases(cfg: EncoderConfig) -> tuple[str, ...]:
  """Tensors a checkpoint may carry that the encoder does not use: its heads' (logged when present) and the
  position-id buffer older checkpoints saved."""
  return _HEAD_TENSORS + (f"{cfg.weight_prefix}embeddings.position_ids",)
