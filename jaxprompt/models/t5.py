"""T5 family in Flax NNX: original T5, T5 v1.1 / LM-adapted / Flan-T5, mT5, UL2-style configs.

Every variant is selected by config alone (HF `config.json` fields):
  * `feed_forward_proj`: "relu" (original T5), "gated-gelu" (v1.1, mT5, Flan), "gated-silu" (UL2-style) ...
  * head tied to the shared embedding, with the d_model**-0.5 rescale of decoder outputs, or untied;
  * `d_kv` independent of d_model / num_heads; encoder and decoder depths independent.
Relative position buckets are bidirectional in the encoder and causal in the decoder; the bias table
belongs to layer 0 and is shared by every layer of its stack. No 1/sqrt(D) attention scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprompt.models import layers as L


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_decoder_layers: int | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True  # head = shared embedding (else a separate lm_head)
  scale_decoder_outputs: bool = True  # decoder output * d_model**-0.5 before the head
  decoder_start_token_id: int = 0
  pad_token_id: int = 0
  eos_token_id: int = 1
  model_type: str = "t5"

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
    L.activation(self.act_name)  # validates

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act_name(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as the original T5 did.
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, has_lm_head: bool | None = None) -> "T5Config":
    """From a HF config.json dict. `has_lm_head` (does the checkpoint carry `lm_head.weight`?) decides
    tying; transformers >= 5 always writes tie_word_embeddings=true and records the rescale separately."""
    tie = hf.get("tie_word_embeddings", True)
    scale = hf.get("scale_decoder_outputs", tie)
    if has_lm_head is not None:
      tie = not has_lm_head
    names = {f.name for f in dataclasses.fields(cls)} - {"tie_word_embeddings", "scale_decoder_outputs"}
    kwargs = {k: hf[k] for k in names if k in hf and hf[k] is not None}
    return cls(**kwargs, tie_word_embeddings=bool(tie), scale_decoder_outputs=bool(scale))

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' T5ForConditionalGeneration reads back to this model."""
    d = dataclasses.asdict(self)
    d.update(architectures=["T5ForConditionalGeneration"], is_encoder_decoder=True)
    return d


class T5Block(nnx.Module):
  """All layers of one T5 stack: self-attention, (cross-attention), MLP, each pre-normed."""

  def __init__(self, cfg: T5Config, num_layers: int, decoder: bool, *, rngs, param_dtype):
    h, n, d = cfg.d_model, cfg.num_heads, cfg.d_kv
    attn = dict(rngs=rngs, param_dtype=param_dtype, std_in=h**-0.5, std_out=(n * d) ** -0.5)
    self.self_attn = L.StackedAttention(num_layers, h, n, n, d, **attn)
    self.self_attn_norm = L.param(jnp.ones((num_layers, h), param_dtype), ("layers", "embed"))
    if decoder:
      self.cross_attn = L.StackedAttention(num_layers, h, n, n, d, **attn)
      self.cross_attn_norm = L.param(jnp.ones((num_layers, h), param_dtype), ("layers", "embed"))
    self.mlp = L.StackedMLP(num_layers, h, cfg.d_ff, cfg.is_gated, rngs=rngs, param_dtype=param_dtype,
                          std_in=h**-0.5, std_out=cfg.d_ff**-0.5)
    self.mlp_norm = L.param(jnp.ones((num_layers, h), param_dtype), ("layers", "embed"))


class T5Stack(nnx.Module):
  def __init__(self, cfg: T5Config, num_layers: int, decoder: bool, *, rngs, param_dtype):
    self.relative_attention_bias = L.param(
        L.normal_init(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.d_model**-0.5, param_dtype),
        ("relpos", "heads"))
    self.layers = T5Block(cfg, num_layers, decoder, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = L.param(jnp.ones((cfg.d_model,), param_dtype), ("embed",))


def _position_bias(table: jax.Array, q_pos: jax.Array, k_pos: jax.Array, bidirectional: bool, cfg: T5Config):
  """table [buckets, N], positions [L], [S] -> bias [1, N, L, S] float32."""
  rel = k_pos[None, :] - q_pos[:, None]
  buckets = L.relative_position_bucket(rel, bidirectional, cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
  return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def _attend(p: dict, x: jax.Array, kv: jax.Array, bias: jax.Array, rate: float, rng) -> jax.Array:
  q = L.project_qkv(x, p["q"])
  k = L.project_qkv(kv, p["k"])
  v = L.project_qkv(kv, p["v"])
  return L.project_out(L.dot_product_attention(q, k, v, bias, scale=1.0, dropout_rate=rate, dropout_rng=rng), p["o"])


class T5(nnx.Module):
  """T5 encoder-decoder. Weights are float32 (or `param_dtype`); compute runs in `dtype`."""

  kind = "seq2seq"

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
               remat: str = "none"):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    self.shared = L.param(L.normal_init(rngs, (cfg.vocab_size, cfg.d_model), 1.0, param_dtype), ("vocab", "embed"))
    self.encoder = T5Stack(cfg, cfg.num_layers, False, rngs=rngs, param_dtype=param_dtype)
    self.decoder = T5Stack(cfg, cfg.num_decoder_layers, True, rngs=rngs, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.param(L.normal_init(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5, param_dtype),
                             ("embed", "vocab"))

  # -- entry points ----------------------------------------------------------------------------

  @property
  def hidden_size(self) -> int:
    return self.config.d_model

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, H] in the compute dtype."""
    return jnp.take(self.shared[...], input_ids, axis=0).astype(self.dtype)

  def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, *, dropout_rng=None) -> jax.Array:
    """-> encoder hidden states [B, L, H]. `inputs_embeds` [B, L, H] replaces the embedding lookup."""
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("encode needs exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    b, l = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.int32)
    rngs = _split(dropout_rng, 3)
    pos = jnp.arange(l)
    bias = _position_bias(self.encoder.relative_attention_bias[...], pos, pos, True, cfg) + L.mask_to_bias(attention_mask)
    rate = cfg.dropout_rate
    x = L.dropout(x, rate, rngs[0])

    def layer(p, x, rng):
      r = _split(rng, 5)
      h = L.rms_norm(x, p["self_attn_norm"], cfg.layer_norm_epsilon)
      x = x + L.dropout(_attend(p["self_attn"], h, h, bias, rate, r[0]), rate, r[1])
      h = L.rms_norm(x, p["mlp_norm"], cfg.layer_norm_epsilon)
      return x + L.dropout(L.mlp(h, p["mlp"], L.activation(cfg.act_name), rate, r[2]), rate, r[3])

    x = L.scan_layers(layer, x, L.arrays(self.encoder.layers), rngs[1], self.remat)
    x = L.rms_norm(x, self.encoder.final_norm[...], cfg.layer_norm_epsilon)
    return L.dropout(x, rate, rngs[2])

  def decode(self, decoder_input_ids, encoder_hidden, encoder_attention_mask=None, decoder_attention_mask=None,
             *, dropout_rng=None) -> jax.Array:
    """Teacher-forced decoder pass -> logits [B, T, V] in float32."""
    cfg = self.config
    x = self.embed(decoder_input_ids)
    b, t = decoder_input_ids.shape
    s = encoder_hidden.shape[1]
    if encoder_attention_mask is None:
      encoder_attention_mask = jnp.ones((b, s), jnp.int32)
    pos = jnp.arange(t)
    self_bias = _position_bias(self.decoder.relative_attention_bias[...], pos, pos, False, cfg) + L.causal_bias(t, t)
    if decoder_attention_mask is not None:
      self_bias = self_bias + L.mask_to_bias(decoder_attention_mask)
    cross_bias = L.mask_to_bias(encoder_attention_mask)
    enc = encoder_hidden.astype(self.dtype)
    rngs = _split(dropout_rng, 3)
    rate = cfg.dropout_rate
    x = L.dropout(x, rate, rngs[0])

    def layer(p, x, rng):
      r = _split(rng, 7)
      h = L.rms_norm(x, p["self_attn_norm"], cfg.layer_norm_epsilon)
      x = x + L.dropout(_attend(p["self_attn"], h, h, self_bias, rate, r[0]), rate, r[1])
      h = L.rms_norm(x, p["cross_attn_norm"], cfg.layer_norm_epsilon)
      x = x + L.dropout(_attend(p["cross_attn"], h, enc, cross_bias, rate, r[2]), rate, r[3])
      h = L.rms_norm(x, p["mlp_norm"], cfg.layer_norm_epsilon)
      return x + L.dropout(L.mlp(h, p["mlp"], L.activation(cfg.act_name), rate, r[4]), rate, r[5])

    x = L.scan_layers(layer, x, L.arrays(self.decoder.layers), rngs[1], self.remat)
    x = L.rms_norm(x, self.decoder.final_norm[...], cfg.layer_norm_epsilon)
    x = L.dropout(x, rate, rngs[2])
    return self.logits(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """Decoder hidden [B, T, H] -> logits [B, T, V] float32."""
    if self.config.scale_decoder_outputs:
      x = x * (self.config.d_model**-0.5)
    if self.config.tie_word_embeddings:
      return jnp.einsum("BTH,VH->BTV", x, self.shared[...].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("BTH,HV->BTV", x, self.lm_head[...].astype(x.dtype), preferred_element_type=jnp.float32)

  # -- cached decoding (jaxprompt.generate) ----------------------------------------------------

  def init_cache(self, encoder_hidden: jax.Array, encoder_attention_mask: jax.Array, max_length: int) -> dict:
    """A decoding cache: empty self-attention k/v [Y, B, T, N, D] for `max_length` decoder positions,
    cross-attention k/v [Y, B, S, N, D] computed once from the encoder output [B, S, H], and its mask [B, S]."""
    enc = encoder_hidden.astype(self.dtype)
    cross = L.arrays(self.decoder.layers.cross_attn)
    ck = jnp.einsum("BSH,YHND->YBSND", enc, cross["k"].astype(self.dtype))
    cv = jnp.einsum("BSH,YHND->YBSND", enc, cross["v"].astype(self.dtype))
    y, b, _, n, d = ck.shape
    empty = jnp.zeros((y, b, max_length, n, d), self.dtype)
    return dict(k=empty, v=empty, cross_k=ck, cross_v=cv, encoder_mask=encoder_attention_mask)

  def decode_step(self, cache: dict, decoder_input_ids: jax.Array, index) -> tuple[jax.Array, dict]:
    """Decoder tokens [B, l] at positions index..index+l-1 -> (logits [B, l, V] float32, updated cache).

    Equals the matching rows of `decode` on the whole prefix: the self-attention keys/values of earlier
    positions come from the cache, the cross-attention ones were projected once by `init_cache`.
    """
    cfg = self.config
    x = self.embed(decoder_input_ids)
    t = cache["k"].shape[2]
    q_pos = index + jnp.arange(x.shape[1])
    k_pos = jnp.arange(t)
    causal = jnp.where(k_pos[None, :] <= q_pos[:, None], 0.0, L.MASK_VALUE)[None, None]
    self_bias = _position_bias(self.decoder.relative_attention_bias[...], q_pos, k_pos, False, cfg) + causal
    cross_bias = L.mask_to_bias(cache["encoder_mask"])
    act = L.activation(cfg.act_name)

    def layer(p, x, rng, xs):
      a, c = p["self_attn"], p["cross_attn"]
      h = L.rms_norm(x, p["self_attn_norm"], cfg.layer_norm_epsilon)
      k = jax.lax.dynamic_update_slice(xs["k"], L.project_qkv(h, a["k"]).astype(xs["k"].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(xs["v"], L.project_qkv(h, a["v"]).astype(xs["v"].dtype), (0, index, 0, 0))
      o = L.dot_product_attention(L.project_qkv(h, a["q"]), k, v, self_bias, scale=1.0)
      x = x + L.project_out(o, a["o"])
      h = L.rms_norm(x, p["cross_attn_norm"], cfg.layer_norm_epsilon)
      o = L.dot_product_attention(L.project_qkv(h, c["q"]), xs["cross_k"], xs["cross_v"], cross_bias, scale=1.0)
      x = x + L.project_out(o, c["o"])
      h = L.rms_norm(x, p["mlp_norm"], cfg.layer_norm_epsilon)
      return x + L.mlp(h, p["mlp"], act), dict(k=k, v=v)

    per_layer = dict(k=cache["k"], v=cache["v"], cross_k=cache["cross_k"], cross_v=cache["cross_v"])
    x, kv = L.scan_layers(layer, x, L.arrays(self.decoder.layers), None, "none", per_layer)
    x = L.rms_norm(x, self.decoder.final_norm[...], cfg.layer_norm_epsilon)
    return self.logits(x), {**cache, **kv}

  def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
               inputs_embeds=None, *, dropout_rng=None) -> jax.Array:
    """Full forward -> logits [B, T, V] float32."""
    if decoder_input_ids is None:
      raise ValueError("T5 needs decoder_input_ids (targets shifted right, starting with decoder_start_token_id)")
    enc_rng, dec_rng = _split(dropout_rng, 2)
    enc = self.encode(input_ids, attention_mask, inputs_embeds, dropout_rng=enc_rng)
    if attention_mask is None:
      attention_mask = jnp.ones(enc.shape[:2], jnp.int32)
    return self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, dropout_rng=dec_rng)


def _split(rng, n):
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs from targets [B, T]: start token, then targets[:, :-1] (T5 teacher forcing)."""
  return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


# -- strict HF weight map ----------------------------------------------------------------------
# (our path, HF key with {i} for the layer, transform); transforms are defined in `jaxprompt.models.hf`.
# Entries with {i} fill the stacked `layers` axis.

def _attn_map(ours: str, hf: str) -> list[tuple[str, str, str]]:
  return [(f"{ours}.{p}", f"{hf}.{p}.weight", "linear_out" if p == "o" else "linear") for p in ("q", "k", "v", "o")]


def hf_weight_map(cfg: T5Config) -> list[tuple[str, str, str]]:
  m = [("shared", "shared.weight", "copy")]
  for stack, decoder in (("encoder", False), ("decoder", True)):
    blk = f"{stack}.block.{{i}}.layer"
    m.append((f"{stack}.relative_attention_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "copy"))
    m += _attn_map(f"{stack}.layers.self_attn", f"{blk}.0.SelfAttention")
    m.append((f"{stack}.layers.self_attn_norm", f"{blk}.0.layer_norm.weight", "copy"))
    ff = 1
    if decoder:
      m += _attn_map(f"{stack}.layers.cross_attn", f"{blk}.1.EncDecAttention")
      m.append((f"{stack}.layers.cross_attn_norm", f"{blk}.1.layer_norm.weight", "copy"))
      ff = 2
    wis = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    m += [(f"{stack}.layers.mlp.{w}", f"{blk}.{ff}.DenseReluDense.{w}.weight", "linear") for w in wis + ("wo",)]
    m.append((f"{stack}.layers.mlp_norm", f"{blk}.{ff}.layer_norm.weight", "copy"))
    m.append((f"{stack}.final_norm", f"{stack}.final_layer_norm.weight", "copy"))
  if not cfg.tie_word_embeddings:
    m.append(("lm_head", "lm_head.weight", "linear"))
  return m


# Keys some checkpoints carry as copies of `shared.weight`; consumed without being read.
HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
