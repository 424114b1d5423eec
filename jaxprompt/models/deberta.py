"""DeBERTa-v2 / v3 encoders (`model_type` "deberta-v2"): the BERT-shaped post-LN body of `models.encoder` with
disentangled attention.

Each layer's scores are q.k plus content-to-position (c2p: q_i . Kr[δ(i, j)]) and position-to-content (p2c:
k_j . Qr[δ(j, i)]) terms, all divided by sqrt(D * (1 + number of terms)); Kr / Qr project a shared relative
position table (optionally LayerNormed) by the layer's own key / query projections (`share_att_key`) or by
separate ones; δ is the relative distance i - j, log-bucketed past `position_buckets / 2` (transformers'
`make_log_bucket_position`). Absolute positions enter the input only where `position_biased_input` (DeBERTa-v3:
no), token types only where `type_vocab_size` > 0; the embeddings are zeroed at padding (`mask`). No masked-LM
head here.

Sequence heads: DebertaV2ForSequenceClassification reads position 0 through its ContextPooler (dropout
`pooler_dropout`, dense H -> H, `pooler_hidden_act`: GELU by default) and then `classifier` (dropout `cls_dropout`,
else `hidden_dropout_prob`; Linear H -> C). The pooler is part of the frozen base here, as BERT's, loaded from a
checkpoint that has `pooler.dense.*` (a *ForSequenceClassification one); PEFT's SEQ_CLS adapters likewise train
and save only `classifier` (modules_to_save). A checkpoint without a pooler gives no sequence head (one-line error).

A prompt: embeddings go before all tokens (as PEFT feeds `inputs_embeds`), and relative distances then run over
the whole P + L sequence. Key/value prefixes are refused: DeBERTa's relative terms need a position for every key,
which neither transformers nor PEFT define for prefix slots (PEFT's prefix tuning cannot run on this model).
Not supported: the convolution after the first layer (`conv_kernel_size` > 0, DeBERTa-v2 xlarge / xxlarge),
`embedding_size` != `hidden_size`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.errors import ModelError
from jaxprompt.models import layers as L
from jaxprompt.models.encoder import (
  Encoder,
  EncoderConfig,
  EncoderLayers,
  EncoderOutput,
  body_fields,
  embedding_weight_map,
  layer_weight_map,
  pooler_weight_map,
)
from jaxprompt.models.interface import HeadLayout, Prefix

log = logging.getLogger(__name__)

FAMILIES = ("deberta-v2",)
_POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config(EncoderConfig):
  FAMILIES: ClassVar[tuple[str, ...]] = FAMILIES

  relative_attention: bool = True
  position_buckets: int = 256  # <= 0: no bucketing
  max_relative_positions: int = -1  # < 1: max_position_embeddings
  pos_att_type: tuple[str, ...] = ("p2c", "c2p")
  share_att_key: bool = True
  norm_rel_ebd: bool = True  # LayerNorm on the relative position table
  position_biased_input: bool = False
  pooler: bool = False  # ContextPooler (`pooler.dense.*`, a *ForSequenceClassification checkpoint's)
  pooler_hidden_act: str = "gelu"
  pooler_dropout: float = 0.0  # on position 0, before the pooler's dense layer (training only)
  cls_dropout: float | None = None  # before the classifier; None: dropout_rate (hidden_dropout_prob)

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type))
    unknown = set(self.pos_att_type) - set(_POS_ATT_TYPES)
    if unknown:
      raise ModelError(f"deberta-v2 pos_att_type {sorted(unknown)} is not supported; known: {_POS_ATT_TYPES}")
    if self.mlm_head:
      raise ModelError("deberta-v2 has no masked-LM head here")
    L.activation(self.pooler_hidden_act)  # validates

  @property
  def att_span(self) -> int:
    """Relative distances kept: the table has 2 * att_span rows."""
    if self.position_buckets > 0:
      return self.position_buckets
    return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

  @classmethod
  def from_hf(cls, c: dict[str, Any], keys: Iterable[str] | None = None) -> "DebertaV2Config":
    mt = c.get("model_type")
    if mt not in FAMILIES:
      raise ModelError(f"model_type {mt!r} is not DeBERTa-v2")
    if c.get("conv_kernel_size", 0) > 0:
      raise ModelError("deberta-v2 with conv_kernel_size > 0 (the xlarge / xxlarge convolution) is not supported")
    if c.get("embedding_size", c["hidden_size"]) != c["hidden_size"]:
      raise ModelError("deberta-v2 with embedding_size != hidden_size is not supported")
    if (
      c.get("attention_head_size", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"]
      != (c["hidden_size"])
    ):
      raise ModelError("deberta-v2 with attention_head_size * num_attention_heads != hidden_size is not supported")
    if c.get("pooler_hidden_size", c["hidden_size"]) != c["hidden_size"]:
      raise ModelError("deberta-v2 with pooler_hidden_size != hidden_size is not supported")
    keys = set(keys or ())
    prefix = "deberta." if "deberta.embeddings.word_embeddings.weight" in keys else ""
    pooler = _POOLER + ".weight" in keys
    body = ("embeddings.", "encoder.", "deberta.") + ((_POOLER,) if pooler else ())
    heads = sorted(k for k in keys if not k.startswith(body))
    if heads:
      log.warning("deberta-v2: the checkpoint's head tensors (%s, ...) are not loaded: only the encoder body", heads[0])
    pos = c.get("pos_att_type") or ()
    pos = [p.strip() for p in pos.lower().split("|")] if isinstance(pos, str) else list(pos)
    norm = [x.strip() for x in str(c.get("norm_rel_ebd", "none")).lower().split("|")]
    return cls(
      **body_fields(c, layer_norm_eps=1e-7, type_vocab_size=0, pad_token_id=0),
      weight_prefix=prefix,
      relative_attention=bool(c.get("relative_attention", False)),
      position_buckets=c.get("position_buckets", -1),
      max_relative_positions=c.get("max_relative_positions", -1),
      pos_att_type=tuple(pos),
      share_att_key=bool(c.get("share_att_key", False)),
      norm_rel_ebd="layer_norm" in norm,
      position_biased_input=bool(c.get("position_biased_input", True)),
      pooler=pooler,
      pooler_hidden_act=c.get("pooler_hidden_act", "gelu"),
      pooler_dropout=float(c.get("pooler_dropout", 0.0) or 0.0),
      cls_dropout=None if c.get("cls_dropout") is None else float(c["cls_dropout"]),
    )

  def hf_class(self) -> str:
    return "DebertaV2ForSequenceClassification" if self.pooler else "DebertaV2Model"

  def to_hf(self) -> dict[str, Any]:
    d = super().to_hf()
    d.update(
      relative_attention=self.relative_attention,
      position_buckets=self.position_buckets,
      max_relative_positions=self.max_relative_positions,
      pos_att_type=list(self.pos_att_type),
      share_att_key=self.share_att_key,
      norm_rel_ebd="layer_norm" if self.norm_rel_ebd else "none",
      position_biased_input=self.position_biased_input,
      pooler_hidden_size=self.hidden_size,
      pooler_hidden_act=self.pooler_hidden_act,
      pooler_dropout=self.pooler_dropout,
      cls_dropout=self.cls_dropout,
    )
    del d["position_embedding_type"]
    return d


def log_bucket_position(rel: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
  """transformers' `make_log_bucket_position` in float32: distances within bucket_size / 2 kept, longer ones
  log-spaced up to max_position."""
  sign = np.sign(rel)
  mid = bucket_size // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
  ratio = np.log(abs_pos.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
  log_pos = np.ceil(ratio * np.float32(mid - 1)).astype(np.float32) + np.float32(mid)
  return np.where(abs_pos <= mid, rel, log_pos * sign).astype(np.int64)


def relative_positions(length: int, cfg: DebertaV2Config) -> np.ndarray:
  """δ(i, j) = i - j [L, L] (bucketed as the config says), static."""
  q = np.arange(length)
  rel = q[:, None] - q[None, :]
  max_pos = cfg.max_relative_positions if cfg.max_relative_positions >= 1 else cfg.max_position_embeddings
  if cfg.position_buckets > 0 and max_pos > 0:
    rel = log_bucket_position(rel, cfg.position_buckets, max_pos)
  return rel


class DebertaLayers(EncoderLayers):
  """The encoder's stacked layers plus, without `share_att_key`, each layer's position key / query projections."""

  def __init__(self, cfg: DebertaV2Config, *, rngs, param_dtype):
    super().__init__(cfg, rngs=rngs, param_dtype=param_dtype)
    y, h, n, d = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    if cfg.relative_attention and not cfg.share_att_key:
      for name, kind in (("pos_k", "c2p"), ("pos_q", "p2c")):
        if kind in cfg.pos_att_type:
          w = L.normal_init(rngs, (y, h, n, d), cfg.initializer_range, param_dtype)
          setattr(self, name, L.param(w, ("layers", "embed", "heads", "kv")))
          setattr(self, f"{name}_bias", L.param(jnp.zeros((y, n, d), param_dtype), ("layers", "heads", "kv")))


class DebertaV2(Encoder):
  """A DeBERTa-v2 / v3 encoder (`models.interface.EncoderModel`; its ContextPooler where the checkpoint has one)."""

  def init_params(self, cfg: DebertaV2Config, rngs, param_dtype) -> None:
    h = cfg.hidden_size
    self.init_embeddings(cfg, rngs, param_dtype, positions=cfg.position_biased_input, types=cfg.type_vocab_size > 0)
    self.layers = DebertaLayers(cfg, rngs=rngs, param_dtype=param_dtype)
    if cfg.relative_attention:
      self.rel_embeddings = self.table(rngs, 2 * cfg.att_span, None, param_dtype)
      if cfg.norm_rel_ebd:
        self.rel_norm = L.param(jnp.ones((h,), param_dtype), ("embed",))
        self.rel_norm_bias = L.param(jnp.zeros((h,), param_dtype), ("embed",))
    if cfg.pooler:
      self.init_pooler(cfg, rngs, param_dtype)

  def _require_pooler(self) -> DebertaV2Config:
    if not self.config.pooler:
      raise ModelError(
        "deberta-v2: a sequence head reads DebertaV2ForSequenceClassification's ContextPooler, and this checkpoint "
        "has none (no pooler.dense.* tensors); head.type token needs none"
      )
    return self.config

  def pool(self, x: jax.Array, dropout_rng=None) -> jax.Array:
    """ContextPooler: [B, H] (position 0's final hidden states) -> act(dropout(x) W + b) [B, H]."""
    c = self._require_pooler()
    x = L.dropout(x, c.pooler_dropout, dropout_rng)
    y = x @ self.pooler[...].astype(x.dtype) + self.pooler_bias[...].astype(x.dtype)
    return L.activation(c.pooler_hidden_act)(y)

  def sequence_head(self) -> HeadLayout:
    c = self._require_pooler()
    rate = c.dropout_rate if c.cls_dropout is None else c.cls_dropout
    return HeadLayout("classifier", bias=True, init_std=c.initializer_range, dropout=rate)

  def positions(self, input_ids, length: int, kv_length: int = 0) -> jax.Array:
    """0..length-1 (used only where `position_biased_input`)."""
    if self.config.position_biased_input and length > self.config.max_position_embeddings:
      raise ModelError(
        f"deberta-v2: {length} tokens, past max_position_embeddings {self.config.max_position_embeddings}"
      )
    return jnp.arange(length)[None]

  def embeddings(self, x: jax.Array, positions: jax.Array, token_type_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Token (+ absolute position) (+ token type) embeddings, LayerNorm, zeroed where `mask` [B, S] is 0."""
    c = self.config
    if c.position_biased_input:
      x = x + jnp.take(self.embed_positions[...], positions, axis=0).astype(x.dtype)
    if c.type_vocab_size > 0:
      x = x + jnp.take(self.embed_types[...], token_type_ids, axis=0).astype(x.dtype)
    x = L.layer_norm(x, self.embed_norm[...], self.embed_norm_bias[...], c.layer_norm_eps)
    return x * mask[..., None].astype(x.dtype)

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
    """As `Encoder.encode`; a key/value prefix is refused (module docstring). Outputs at padded positions differ
    from transformers' (which lets them attend nowhere); the real tokens' agree."""
    if prefix is not None and prefix.keys is not None:
      raise ModelError(
        "deberta-v2 takes no key/value prefix (prefix tuning, deep prompts): its relative-position attention has "
        "no position for prefix slots; use an input prompt (prompt tuning, P-tuning)"
      )
    return super().encode(
      input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds, prefix=prefix, dropout_rng=dropout_rng
    )

  def score_terms(self, length: int):
    """DeBERTa's c2p and p2c terms (module docstring) as a bias [B, N, L, L], and 1 / sqrt(D * (1 + terms))."""
    c = self.config
    scale = float(np.float32(1.0) / np.sqrt(np.float32(c.head_dim) * np.float32(1 + len(c.pos_att_type))))
    if not c.relative_attention:
      return lambda p, x, rng: (None, scale)
    span = c.att_span
    rel = relative_positions(length, c)
    c2p_idx = jnp.asarray(np.clip(rel + span, 0, 2 * span - 1))  # [L (query i), L (key j)]
    p2c_idx = jnp.asarray(np.clip(-rel + span, 0, 2 * span - 1))  # [L (key j), L (query i)]: -δ(j, i)
    table = self.rel_embeddings[...]
    if c.norm_rel_ebd:
      table = L.layer_norm(table, self.rel_norm[...], self.rel_norm_bias[...], c.layer_norm_eps)

    def terms(p, x, rng):
      a, r = p["attn"], L.dropout(table.astype(x.dtype), c.dropout_rate, rng)[None]  # [1, 2 span, H]
      b, n = x.shape[0], c.num_attention_heads
      bias = jnp.zeros((b, n, length, length), jnp.float32)
      if "c2p" in c.pos_att_type:
        pos_k = L.project_qkv(r, *((a["k"], a["k_bias"]) if c.share_att_key else (p["pos_k"], p["pos_k_bias"])))[0]
        q = L.project_qkv(x, a["q"], a["q_bias"])
        c2p = jnp.einsum("BLND,RND->BNLR", q, pos_k, preferred_element_type=jnp.float32)
        bias = bias + jnp.take_along_axis(c2p, jnp.broadcast_to(c2p_idx, (b, n, length, length)), axis=-1)
      if "p2c" in c.pos_att_type:
        pos_q = L.project_qkv(r, *((a["q"], a["q_bias"]) if c.share_att_key else (p["pos_q"], p["pos_q_bias"])))[0]
        k = L.project_qkv(x, a["k"], a["k_bias"])
        p2c = jnp.einsum("BSND,RND->BNSR", k, pos_q, preferred_element_type=jnp.float32)
        p2c = jnp.take_along_axis(p2c, jnp.broadcast_to(p2c_idx, (b, n, length, length)), axis=-1)
        bias = bias + jnp.swapaxes(p2c, -1, -2)
      return bias * scale, scale

    return terms


# -- strict HF weight maps ---------------------------------------------------------------------


def hf_weight_map(cfg: DebertaV2Config) -> list[tuple[str, str, str]]:
  P, blk = cfg.weight_prefix, f"{cfg.weight_prefix}encoder.layer.{{i}}"
  m = embedding_weight_map(P, positions=cfg.position_biased_input, types=cfg.type_vocab_size > 0)
  m += layer_weight_map(P, (("q", "query_proj"), ("k", "key_proj"), ("v", "value_proj")))
  if cfg.relative_attention and not cfg.share_att_key:
    separate = (("pos_k", "pos_key_proj", "c2p"), ("pos_q", "pos_query_proj", "p2c"))
    for ours, theirs, _ in (x for x in separate if x[2] in cfg.pos_att_type):
      m += [
        (f"layers.{ours}", f"{blk}.attention.self.{theirs}.weight", "linear"),
        (f"layers.{ours}_bias", f"{blk}.attention.self.{theirs}.bias", "flat"),
      ]
  if cfg.relative_attention:
    m.append(("rel_embeddings", f"{P}encoder.rel_embeddings.weight", "copy"))
    if cfg.norm_rel_ebd:
      m += [
        ("rel_norm", f"{P}encoder.LayerNorm.weight", "copy"),
        ("rel_norm_bias", f"{P}encoder.LayerNorm.bias", "copy"),
      ]
  return m + (pooler_weight_map(_POOLER) if cfg.pooler else [])


_POOLER = "pooler.dense"  # DebertaV2ForSequenceClassification's ContextPooler, beside the body ("deberta.")
# Heads of DeBERTa-v2's task and masked-LM models, consumed unread (logged by `DebertaV2Config.from_hf`).
_HEAD_TENSORS = (
  "classifier.weight",
  "classifier.bias",
  "cls.predictions.bias",
  "cls.predictions.transform.dense.weight",
  "cls.predictions.transform.dense.bias",
  "cls.predictions.transform.LayerNorm.weight",
  "cls.predictions.transform.LayerNorm.bias",
  "cls.predictions.decoder.weight",
  "cls.predictions.decoder.bias",
  "lm_predictions.lm_head.bias",
  "lm_predictions.lm_head.dense.weight",
  "lm_predictions.lm_head.dense.bias",
  "lm_predictions.lm_head.LayerNorm.weight",
  "lm_predictions.lm_head.LayerNorm.bias",
)


def hf_aliases(cfg: DebertaV2Config) -> tuple[str, ...]:
  """Head tensors, and the absolute position table a checkpoint may carry unused (transformers ignores it)."""
  out = _HEAD_TENSORS + (f"{cfg.weight_prefix}embeddings.position_ids",)
  return out if cfg.position_biased_input else out + (f"{cfg.weight_prefix}embeddings.position_embeddings.weight",)
