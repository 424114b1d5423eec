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
from flax import nnx, struct

from jaxprompt.batches import PackedSeq2SeqBatch, Seq2SeqBatch
from jaxprompt.errors import ModelError
from jaxprompt.models import kv as KV
from jaxprompt.models import layers as L
from jaxprompt.models.interface import FrozenLM, HeadLayout, Prefix, PrefixSlots, last_real


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
      raise ModelError(f"feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
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
    self.mlp = L.StackedMLP(
      num_layers, h, cfg.d_ff, cfg.is_gated, rngs=rngs, param_dtype=param_dtype, std_in=h**-0.5, std_out=cfg.d_ff**-0.5
    )
    self.mlp_norm = L.param(jnp.ones((num_layers, h), param_dtype), ("layers", "embed"))


class T5Stack(nnx.Module):
  def __init__(self, cfg: T5Config, num_layers: int, decoder: bool, *, rngs, param_dtype):
    self.relative_attention_bias = L.param(
      L.normal_init(rngs, (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.d_model**-0.5, param_dtype),
      ("relpos", "heads"),
    )
    self.layers = T5Block(cfg, num_layers, decoder, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = L.param(jnp.ones((cfg.d_model,), param_dtype), ("embed",))


def _position_bias(table: jax.Array, q_pos: jax.Array, k_pos: jax.Array, bidirectional: bool, cfg: T5Config):
  """table [buckets, N], positions [L] (or each row's own [B, L]), [S] -> bias [1 or B, N, L, S] float32."""
  q_rows = q_pos if q_pos.ndim == 2 else q_pos[None]
  rel = k_pos[None, None, :] - q_rows[:, :, None]  # [B or 1, L, S]
  buckets = L.relative_position_bucket(
    rel, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
  )
  return jnp.transpose(table.astype(jnp.float32)[buckets], (0, 3, 1, 2))


def _qkv(p: dict, x: jax.Array, kv: jax.Array | None):
  """Queries from x [B, L, H]; keys and values from kv [B, S, H] (None: given elsewhere, e.g. a cache)."""
  q = L.project_qkv(x, p["q"])
  return (q,) if kv is None else (q, L.project_qkv(kv, p["k"]), L.project_qkv(kv, p["v"]))


@struct.dataclass
class T5Cache:
  """Cached decoding state: self-attention k/v [Y, B, T, N, D] for T decoder slots (a key/value prefix's P slots
  first, then the start token in slot P = `start` and generated token t in slot P + t + 1), cross-attention k/v
  [Y, B, S, N, D] projected once from the encoder output, the encoder mask [B, S] and the self-attention slots'
  mask [B, T] (a padded key/value prefix's slots are masked)."""

  k: jax.Array
  v: jax.Array
  cross_k: jax.Array | None = None
  cross_v: jax.Array | None = None
  encoder_mask: jax.Array | None = None
  key_mask: jax.Array | None = None
  start: int = struct.field(pytree_node=False, default=0)  # the start token's slot (after a key/value prefix)


class T5(FrozenLM):
  """T5 encoder-decoder (`models.interface.Seq2SeqLM`)."""

  kind = "seq2seq"
  batch_type = Seq2SeqBatch
  supports_packing = True

  def init_params(self, cfg: T5Config, rngs: nnx.Rngs, param_dtype) -> None:
    self.shared = L.param(L.normal_init(rngs, (cfg.vocab_size, cfg.d_model), 1.0, param_dtype), ("vocab", "embed"))
    self.encoder = T5Stack(cfg, cfg.num_layers, False, rngs=rngs, param_dtype=param_dtype)
    self.decoder = T5Stack(cfg, cfg.num_decoder_layers, True, rngs=rngs, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.param(
        L.normal_init(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5, param_dtype), ("embed", "vocab")
      )

  # -- the stacks --------------------------------------------------------------------------------

  @property
  def hidden_size(self) -> int:
    return self.config.d_model

  def embedding_table(self) -> jax.Array:
    return self.shared[...]

  def encode(
    self, input_ids=None, attention_mask=None, inputs_embeds=None, *, segment_ids=None, dropout_rng=None
  ) -> jax.Array:
    """-> encoder hidden states [B, L, H]. `inputs_embeds` [B, L, H] replaces the embedding lookup.
    `segment_ids` [B, L] (packed rows): a token attends only to tokens of its own segment."""
    cfg = self.config
    x, attention_mask = self.input_embeddings(input_ids, attention_mask, inputs_embeds)
    rngs = L.split_rng(dropout_rng, 3)
    pos = jnp.arange(x.shape[1])
    bias = _position_bias(self.encoder.relative_attention_bias[...], pos, pos, True, cfg)
    bias = bias + (L.mask_to_bias(attention_mask) if segment_ids is None else _segment_bias(segment_ids, segment_ids))
    rate = cfg.dropout_rate
    x = L.dropout(x, rate, rngs[0])

    def layer(p, x, rng):
      r = L.split_rng(rng, 5)
      h = L.rms_norm(x, p["self_attn_norm"], cfg.layer_norm_epsilon)
      o, _ = KV.self_attention(
        p["self_attn"],
        h,
        KV.Fresh(),
        bias=bias,
        scale=1.0,
        dropout_rate=rate,
        dropout_rng=r[0],
        implementation=self.attention,
      )
      x = x + L.dropout(o, rate, r[1])
      h = L.rms_norm(x, p["mlp_norm"], cfg.layer_norm_epsilon)
      return x + L.dropout(L.mlp(h, p["mlp"], L.activation(cfg.act_name), rate, r[2]), rate, r[3])

    x = L.scan_layers(layer, x, L.arrays(self.encoder.layers), rngs[1], self.remat, loop=self.layer_loop)
    x = L.rms_norm(x, self.encoder.final_norm[...], cfg.layer_norm_epsilon)
    return L.dropout(x, rate, rngs[2])

  def _decoder(
    self,
    x,
    *,
    q_pos,
    k_pos,
    kv: KV.KVSource,
    cross_bias,
    encoder=None,
    cross_kv=None,
    decoder_mask=None,
    segments=None,
    index=0,
    dropout_rng=None,
  ):
    """The decoder stack: x [B, l, H] at positions q_pos [l] (or each row's own [B, l]) attends to self-attention key
    slots at positions k_pos [S'] from `kv` (`models.kv`: teacher forcing with or without a prefix's P slots in front,
    or a cache written at slot `index`), and across to the encoder: its states `encoder` [B, S, H] (projected here) or
    `cross_kv` (keys, values) [Y, B, S, N, D] projected already, with `cross_bias` [B|1, 1, l|1, S]. `decoder_mask` [B,
    S'] masks self-attention slots; `segments` (packed rows): decoder segment ids [B, l] keep self-attention inside a
    segment -> (final hidden states [B, l, H], the updated cache or None)."""
    cfg = self.config
    self_bias = _position_bias(self.decoder.relative_attention_bias[...], q_pos, k_pos, False, cfg)
    q_rows = q_pos if q_pos.ndim == 2 else q_pos[None]
    self_bias = self_bias + jnp.where(k_pos[None, None, :] <= q_rows[:, :, None], 0.0, L.MASK_VALUE)[:, None]
    if decoder_mask is not None:
      self_bias = self_bias + L.mask_to_bias(decoder_mask)
    if segments is not None:
      self_bias = self_bias + _segment_bias(segments, segments)
    cached = isinstance(kv, KV.Cached)
    rngs = L.split_rng(dropout_rng, 3)
    x = L.dropout(x, cfg.dropout_rate, rngs[0])
    layer = self._decoder_layer(self_bias, cross_bias, encoder, index)
    per_layer = dict(kv=kv)
    if cross_kv is not None:
      per_layer.update(cross_k=cross_kv[0], cross_v=cross_kv[1])
    stacked = L.arrays(self.decoder.layers)
    if cached:  # the cache written in place, the layers in a scan (unrolled, each layer would copy the cache)
      x, written = KV.scan_in_place(layer, x, stacked, rngs[1], per_layer)
    else:
      x, written = L.scan_layers(layer, x, stacked, rngs[1], self.remat, per_layer, loop=self.layer_loop)
    x = L.rms_norm(x, self.decoder.final_norm[...], cfg.layer_norm_epsilon)
    return L.dropout(x, cfg.dropout_rate, rngs[2]), written

  def _decoder_layer(self, self_bias, cross_bias, encoder, index):
    """One decoder layer as the layer scan runs it: (params, x, dropout key, per-layer xs) -> (x, the layer's
    updated cache or None); `_decoder` says what the arguments are."""
    cfg = self.config
    rate, act = cfg.dropout_rate, L.activation(cfg.act_name)

    def layer(p, x, rng, xs):
      r = L.split_rng(rng, 7)
      c = p["cross_attn"]
      h = L.rms_norm(x, p["self_attn_norm"], cfg.layer_norm_epsilon)
      o, written = KV.self_attention(
        p["self_attn"],
        h,
        xs["kv"],
        bias=self_bias,
        scale=1.0,
        index=index,
        dropout_rate=rate,
        dropout_rng=r[0],
        implementation=self.attention,
      )
      x = x + L.dropout(o, rate, r[1])
      h = L.rms_norm(x, p["cross_attn_norm"], cfg.layer_norm_epsilon)
      # teacher forcing projects the encoder output here; cached steps and ranking projected it once
      qkv = _qkv(c, h, encoder) if "cross_k" not in xs else _qkv(c, h, None) + (xs["cross_k"], xs["cross_v"])
      x = x + L.dropout(self._attend(c, *qkv, cross_bias, rate, r[2]), rate, r[3])
      h = L.rms_norm(x, p["mlp_norm"], cfg.layer_norm_epsilon)
      x = x + L.dropout(L.mlp(h, p["mlp"], act, rate, r[4]), rate, r[5])
      return x, written

    return layer

  def _attend(self, p: dict, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, rate: float, rng):
    """Cross-attention (T5 scales no scores) -> [B, l, H]."""
    o = L.dot_product_attention(
      q, k, v, bias, scale=1.0, dropout_rate=rate, dropout_rng=rng, implementation=self.attention
    )
    return L.project_out(o, p["o"])

  def decode_hidden(
    self,
    decoder_input_ids,
    encoder_hidden,
    encoder_attention_mask=None,
    decoder_attention_mask=None,
    *,
    prefix_kv=None,
    dropout_rng=None,
  ) -> jax.Array:
    """Teacher-forced decoder pass -> final decoder hidden states [B, T, H]. `prefix_kv` (keys, values) [Y, B, P, K, D]:
    P self-attention slots in front of every decoder layer's own, at positions 0..P-1, the tokens at P..P+T-1
    (PEFT: the decoder's mask, when given, gets P ones in front)."""
    b, t = decoder_input_ids.shape
    if encoder_attention_mask is None:
      encoder_attention_mask = jnp.ones(encoder_hidden.shape[:2], jnp.int32)
    pk = 0 if prefix_kv is None else prefix_kv[0].shape[2]
    if pk and decoder_attention_mask is not None:
      decoder_attention_mask = jnp.concatenate(
        [jnp.ones((b, pk), decoder_attention_mask.dtype), decoder_attention_mask], axis=1
      )
    x, _ = self._decoder(
      self.embed(decoder_input_ids),
      q_pos=pk + jnp.arange(t),
      k_pos=jnp.arange(pk + t),
      kv=KV.source(prefix_kv),
      encoder=encoder_hidden.astype(self.dtype),
      cross_bias=L.mask_to_bias(encoder_attention_mask),
      decoder_mask=decoder_attention_mask,
      dropout_rng=dropout_rng,
    )
    return x

  def decode(
    self,
    decoder_input_ids,
    encoder_hidden,
    encoder_attention_mask=None,
    decoder_attention_mask=None,
    *,
    prefix_kv=None,
    dropout_rng=None,
  ) -> jax.Array:
    """Teacher-forced decoder pass -> logits [B, T, V] in float32 (`decode_hidden`, then the LM head)."""
    return self.logits(
      self.decode_hidden(
        decoder_input_ids,
        encoder_hidden,
        encoder_attention_mask,
        decoder_attention_mask,
        prefix_kv=prefix_kv,
        dropout_rng=dropout_rng,
      )
    )

  def logits(self, x: jax.Array) -> jax.Array:
    """Decoder hidden [B, T, H] -> logits [B, T, V] float32."""
    if self.config.scale_decoder_outputs:
      x = x * (self.config.d_model**-0.5)
    if self.config.tie_word_embeddings:
      return L.lm_logits(x, tied_table=self.shared[...])
    return L.lm_logits(x, head=self.lm_head[...])

  # -- prompted entry points (models.interface.PromptableLM) ------------------------------------

  def forward(
    self,
    input_ids=None,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    dropout_rng=None,
  ) -> jax.Array:
    """Full forward -> logits [B, T, V] float32."""
    if decoder_input_ids is None:
      raise ValueError("T5 needs decoder_input_ids (targets shifted right, starting with decoder_start_token_id)")
    enc_rng, dec_rng = L.split_rng(dropout_rng, 2)
    x, m = self.input_embeddings(input_ids, attention_mask, inputs_embeds, prefix)
    enc = self.encode(inputs_embeds=x, attention_mask=m, dropout_rng=enc_rng)
    kv = prefix.kv(x.shape[0]) if prefix is not None else None
    return self.decode(decoder_input_ids, enc, m, decoder_attention_mask, prefix_kv=kv, dropout_rng=dec_rng)

  def __call__(
    self,
    input_ids=None,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    inputs_embeds=None,
    *,
    prefix: Prefix | None = None,
    dropout_rng=None,
  ) -> jax.Array:
    return self.forward(
      input_ids,
      attention_mask,
      decoder_input_ids,
      decoder_attention_mask,
      inputs_embeds=inputs_embeds,
      prefix=prefix,
      dropout_rng=dropout_rng,
    )

  def score_targets(self, batch: Seq2SeqBatch, prefix: Prefix | None = None, *, dropout_rng=None):
    dec_in = shift_right(batch.target_ids, self.config.decoder_start_token_id)
    logits = self.forward(batch.input_ids, batch.input_mask, dec_in, prefix=prefix, dropout_rng=dropout_rng)
    return logits, batch.target_ids, batch.target_mask

  def score_packed(self, batch: PackedSeq2SeqBatch, prompts: jax.Array | None, *, dropout_rng=None):
    """`score_targets` of a packed batch: `prompts` [K * P, H] (K prompts of P vectors; None: no prompt) fill the
    prompt slots (`batch.prompt_slots`), every example attends only inside its segment -> (logits [R, T', V],
    targets, loss mask), each example's logits those of its unpacked row."""
    enc_rng, dec_rng = L.split_rng(dropout_rng, 2)
    x = self.embed(batch.input_ids)
    if prompts is not None:
      slots = batch.prompt_slots
      x = jnp.where((slots >= 0)[..., None], prompts.astype(x.dtype)[jnp.maximum(slots, 0)], x)
    seg = batch.input_segments
    enc = self.encode(inputs_embeds=x, attention_mask=seg > 0, segment_ids=seg, dropout_rng=enc_rng)
    t = batch.decoder_input_ids.shape[1]
    x, _ = self._decoder(
      self.embed(batch.decoder_input_ids),
      q_pos=jnp.arange(t),
      k_pos=jnp.arange(t),
      kv=KV.Fresh(),
      encoder=enc.astype(self.dtype),
      cross_bias=_segment_bias(batch.target_segments, seg),
      segments=batch.target_segments,
      dropout_rng=dec_rng,
    )
    return self.logits(x), batch.target_ids, batch.target_mask

  def label_logprobs(self, batch: Seq2SeqBatch, label_ids, label_mask, prefix: Prefix | None = None) -> jax.Array:
    """Encode once, decode every label: [B, C]."""
    x, m = self.input_embeddings(batch.input_ids, batch.input_mask, prefix=prefix)
    return self._rank(self.encode(inputs_embeds=x, attention_mask=m), m, label_ids, label_mask, prefix)

  def eval_scores(self, batch: Seq2SeqBatch, label_ids, label_mask, prefix: Prefix | None = None):
    """`score_targets` and `label_logprobs` of one batch from one encoder pass: (logits [B, T, V], targets, loss
    mask), [B, C]."""
    x, m = self.input_embeddings(batch.input_ids, batch.input_mask, prefix=prefix)
    enc = self.encode(inputs_embeds=x, attention_mask=m)
    kv = prefix.kv(batch.size) if prefix is not None else None
    logits = self.decode(shift_right(batch.target_ids, self.config.decoder_start_token_id), enc, m, prefix_kv=kv)
    return (logits, batch.target_ids, batch.target_mask), self._rank(enc, m, label_ids, label_mask, prefix)

  def _rank(self, enc, m, label_ids, label_mask, prefix: Prefix | None) -> jax.Array:
    """Every label decoded from the encoder states enc [B, S, H] (mask m) -> [B, C] log-likelihoods; the
    cross-attention keys and values are projected once per example, not once per label."""
    b, (c, t) = enc.shape[0], label_ids.shape
    tgt, tmask = jnp.tile(label_ids, (b, 1)), jnp.tile(label_mask, (b, 1))
    kv = prefix.kv(b, repeat=c) if prefix is not None else None
    pk = 0 if kv is None else kv[0].shape[2]
    real = None if prefix is None or prefix.kv_mask is None else prefix.kv_real(b, repeat=c)  # a padded prefix
    cross = tuple(jnp.repeat(a, c, axis=1) for a in self._cross_kv(enc.astype(self.dtype)))
    x, _ = self._decoder(
      self.embed(shift_right(tgt, self.config.decoder_start_token_id)),
      q_pos=pk + jnp.arange(t),
      k_pos=jnp.arange(pk + t),
      kv=KV.source(kv),
      cross_kv=cross,
      cross_bias=L.mask_to_bias(jnp.repeat(m, c, axis=0)),
      decoder_mask=None if real is None else jnp.concatenate([real, jnp.ones((b * c, t), real.dtype)], axis=1),
    )
    return L.sequence_logprob(self.logits(x), tgt, tmask).reshape(b, c)

  def _cross_kv(self, enc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encoder states [B, S, H] -> every decoder layer's cross-attention keys and values [Y, B, S, N, D]."""
    cross = L.arrays(self.decoder.layers.cross_attn)
    return (
      jnp.einsum("BSH,YHND->YBSND", enc, cross["k"].astype(self.dtype)),
      jnp.einsum("BSH,YHND->YBSND", enc, cross["v"].astype(self.dtype)),
    )

  # -- classification heads (`prompts.heads`) --------------------------------------------------

  def token_states(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> the encoder's final states of the input tokens [B, L, H], a soft prompt's positions dropped
    (`T5ForTokenClassification` is the encoder alone: a key/value prefix, which PEFT puts in the decoder, is
    refused)."""
    if prefix is not None and prefix.keys is not None:
      raise ModelError("T5 token classification reads the encoder; a key/value prefix reaches T5's decoder only")
    x, m = self.input_embeddings(input_ids, attention_mask, prefix=prefix)
    enc = self.encode(inputs_embeds=x, attention_mask=m, dropout_rng=dropout_rng)
    return enc[:, enc.shape[1] - input_ids.shape[1] :]

  def sequence_state(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> [B, 1, H] as `T5ForSequenceClassification`: the decoder, fed the input shifted right (no
    decoder mask), read at the input's last EOS (a row without one: its last real token)."""
    enc_rng, dec_rng = L.split_rng(dropout_rng, 2)
    x, m = self.input_embeddings(input_ids, attention_mask, prefix=prefix)
    enc = self.encode(inputs_embeds=x, attention_mask=m, dropout_rng=enc_rng)
    kv = prefix.kv(x.shape[0]) if prefix is not None else None
    dec_in = shift_right(input_ids, self.config.decoder_start_token_id)
    h = self.decode_hidden(dec_in, enc, m, prefix_kv=kv, dropout_rng=dec_rng)
    eos = (input_ids == self.config.eos_token_id) & (attention_mask > 0)
    return last_real(h, jnp.where(jnp.any(eos, axis=1, keepdims=True), eos, attention_mask))

  def sequence_head(self) -> HeadLayout:
    # T5ClassificationHead: dense (H -> H) + tanh + out_proj, both normal(d_model ** -0.5) with zero biases;
    # classifier_dropout 0.0 (initializer_factor 1.0: ours keeps none)
    std = self.config.d_model**-0.5
    return HeadLayout(name="classification_head", bias=True, init_std=std, dense=True, dense_std=std)

  def token_head(self) -> HeadLayout:
    # T5ForTokenClassification: `classifier` Linear(H, C), normal(1.0) (initializer_factor), zero bias
    return HeadLayout(name="classifier", bias=True, init_std=1.0)

  def prefix_slots(self) -> PrefixSlots:
    c = self.config
    # PEFT reads num_hidden_layers, which T5Config maps to num_layers: the *encoder's* depth, L. Its seq2seq
    # cache concatenates the [2L] key/value slots with themselves and gives decoder layer g the pair
    # (4g mod 2L, 4g + 1 mod 2L), i.e. table layer 2g mod L (a PEFT 0.21 quirk, reproduced so that exports give
    # PEFT's logits: with L = 2 table layer 1 is never read). A decoder deeper than L makes PEFT fail.
    problem = None
    if c.num_decoder_layers > c.num_layers:
      problem = (
        f"PEFT 0.21's seq2seq prefix tuning gives decoder layer g entry g of a cache with num_layers = "
        f"{c.num_layers} entries and fails (IndexError) on this decoder's {c.num_decoder_layers} layers"
      )
    elif c.d_kv * c.num_heads != c.d_model:
      problem = (
        f"PEFT 0.21 takes T5's head dimension to be d_model / num_heads = {c.d_model / c.num_heads:g}, "
        f"but this model's d_kv is {c.d_kv}"
      )
    return PrefixSlots(
      layers=c.num_layers,
      heads=c.num_heads,
      head_dim=c.d_kv,
      layer_of=tuple((2 * g) % c.num_layers for g in range(c.num_decoder_layers)),
      peft_problem=problem,
    )

  # -- cached decoding ----------------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int) -> T5Cache:
    """Empty self-attention k/v for `max_length` decoder slots (cross-attention comes with `prefill`)."""
    c = self.config
    empty = jnp.zeros((c.num_decoder_layers, batch_size, max_length, c.num_heads, c.d_kv), self.dtype)
    return T5Cache(k=empty, v=empty)

  def prefill(
    self,
    input_ids=None,
    attention_mask=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    max_new_tokens: int,
    num_beams: int = 1,
  ) -> tuple[jax.Array, T5Cache]:
    """Encode once (any padding), project cross-attention k/v once, decode the start token (after a key/value
    prefix's slots, pre-filled)."""
    w, pk = num_beams, 0 if prefix is None else prefix.kv_length
    x, mask = self.input_embeddings(input_ids, attention_mask, inputs_embeds, prefix)
    enc = L.repeat_rows(self.encode(inputs_embeds=x, attention_mask=mask), w).astype(self.dtype)
    ck, cv = self._cross_kv(enc)
    cache = self.init_cache(enc.shape[0], pk + max_new_tokens + 1)  # the last slot is never read
    real = jnp.ones((enc.shape[0], 0), jnp.int32) if prefix is None else prefix.kv_real(mask.shape[0], repeat=w)
    key_mask = jnp.concatenate([real, jnp.ones((enc.shape[0], max_new_tokens + 1), jnp.int32)], axis=1)
    cache = cache.replace(cross_k=ck, cross_v=cv, encoder_mask=L.repeat_rows(mask, w), key_mask=key_mask, start=pk)
    k, v = KV.fill_prefix(cache.k, cache.v, prefix, mask.shape[0], repeat=w)
    cache = cache.replace(k=k, v=v)
    start = jnp.full((enc.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
    logits, cache = self._cached_step(cache, start, pk)
    return logits[:, 0], cache

  def decoder_keys_values(self, decoder_input_ids, input_ids, attention_mask=None) -> tuple[jax.Array, jax.Array]:
    """The keys and values [Y, B, T, N, D] every decoder self-attention layer computes for decoder_input_ids
    [B, T] (teacher forced from position 0) reading the encoder states of input_ids [B, S]: what a cache holds
    after decoding them, so a key/value prefix of these T slots (one table layer per decoder layer) makes the model
    the one with these tokens in front of its decoder input, for this encoder input."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    enc = self.encode(input_ids, attention_mask).astype(self.dtype)
    b, t = decoder_input_ids.shape
    ck, cv = self._cross_kv(enc)
    cache = self.init_cache(b, t).replace(
      cross_k=ck, cross_v=cv, encoder_mask=attention_mask, key_mask=jnp.ones((b, t), jnp.int32)
    )
    _, cache = self._cached_step(cache, decoder_input_ids, 0)
    return cache.k, cache.v

  def decode_step(self, cache: T5Cache, tokens: jax.Array, t) -> tuple[jax.Array, T5Cache]:
    logits, cache = self._cached_step(cache, tokens[:, None], cache.start + jnp.asarray(t) + 1)
    return logits[:, 0], cache

  def _cached_step(self, cache: T5Cache, decoder_input_ids: jax.Array, index) -> tuple[jax.Array, T5Cache]:
    """Decoder tokens [B, l] at slots index..index+l-1 -> (logits [B, l, V] float32, updated cache); equals the
    matching rows of `decode` on the whole prefix."""
    x, written = self._decoder(
      self.embed(decoder_input_ids),
      q_pos=jnp.asarray(index)[..., None] + jnp.arange(decoder_input_ids.shape[1]),
      k_pos=jnp.arange(cache.k.shape[2]),
      kv=KV.Cached(cache.k, cache.v),
      cross_kv=(cache.cross_k, cache.cross_v),
      cross_bias=L.mask_to_bias(cache.encoder_mask),
      decoder_mask=cache.key_mask,
      index=index,
    )
    return self.logits(x), cache.replace(k=written.keys, v=written.values)

  def reorder_cache(self, cache: T5Cache, origin: jax.Array) -> T5Cache:
    # cross-attention state (and the prefix's mask) is the same for every beam of an example: the self-attention
    # k/v move
    return cache.replace(k=cache.k[:, origin], v=cache.v[:, origin])

  def pad_inputs(self, cache: T5Cache, by: int) -> T5Cache:
    """Encoder inputs are right-padded: `by` masked encoder slots after them (cross-attention keys/values)."""
    if by == 0:
      return cache
    slots = lambda a, axis: jnp.pad(a, [(0, by) if i == axis else (0, 0) for i in range(a.ndim)])  # noqa: E731
    return cache.replace(
      cross_k=slots(cache.cross_k, 2), cross_v=slots(cache.cross_v, 2), encoder_mask=slots(cache.encoder_mask, 1)
    )


def _segment_bias(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
  """[B, L], [B, S] segment ids -> additive bias [B, 1, L, S]: 0 within a segment, masked across."""
  return jnp.where(q_segments[:, None, :, None] == k_segments[:, None, None, :], 0.0, L.MASK_VALUE).astype(jnp.float32)


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
    m.append(
      (
        f"{stack}.relative_attention_bias",
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "copy",
      )
    )
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
