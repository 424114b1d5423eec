"""Decoder-only language models in Flax NNX: Llama 2/3, Mistral, Qwen2 and GPT-2, selected by config alone.

  * Llama family: RMSNorm, rotary positions (default, linear or llama3 frequency scaling), grouped-query
    attention, gated MLP, tied or untied head. Qwen2 adds q/k/v biases; Mistral (and Qwen2's
    `sliding_attention` layers) attend only to the last `sliding_window` cache slots.
  * GPT-2: learned absolute positions, LayerNorm with bias, dense gelu_new MLP, biases everywhere, tied head.
    Its Conv1D weights are stored [in, out] and q|k|v are fused in one `c_attn` tensor (split by the map).

Positions default to 0..L-1 whatever the padding, as transformers' forward does (and what PEFT gives a
soft prompt: 0..P+L-1). Generation passes positions counted from the first real token instead, as
transformers' generate does, so a left-padded row decodes like the same row unpadded.

One layer function serves both the full forward pass and cached decoding (`init_cache` / `extend`):
with a cache each layer writes its new keys/values at slot `index` and attends over all S slots, masked
by slot (causal, padding, sliding window) exactly as transformers masks by cache position.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxprompt.batches import CausalBatch
from jaxprompt.errors import ModelError
from jaxprompt.models import hf
from jaxprompt.models import kv as KV
from jaxprompt.models import layers as L
from jaxprompt.models.interface import FrozenLM, HeadLayout, Prefix, PrefixSlots, last_real

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
_HF_CLASSES = {
  "llama": "LlamaForCausalLM",
  "mistral": "MistralForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "gpt2": "GPT2LMHeadModel",
}
_INIT_STD = 0.02  # transformers' initializer_range default, for randomly built models


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  model_type: str  # one of FAMILIES: the HF model_type written back by `to_hf`
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  hidden_act: str = "silu"
  gated_mlp: bool = True  # act(x wi_0) * x wi_1 (Llama) or act(x wi) (GPT-2)
  norm_type: str = "rms"  # "rms" or "layer" (LayerNorm with bias)
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  position_type: str = "rope"  # "rope" or "learned"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "default", "linear" or "llama3"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None  # None: max_position_embeddings
  rope_freq_factors: tuple[float, ...] | None = None  # llama.cpp's rope_freqs tensor (GGUF only)
  sliding_windows: tuple[int, ...] | None = None  # per layer, 0 = full attention; None: all full
  scale_attn_weights: bool = True  # scores * head_dim**-0.5 (GPT-2 can turn it off)
  tie_word_embeddings: bool = False
  dropout_rate: float = 0.0  # embeddings, attention probabilities and residual branches (training only)
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  weight_prefix: str | None = None  # HF key prefix of the body ("model." / "transformer."; "" for bare)

  def __post_init__(self):
    def fix(k, v):
      return object.__setattr__(self, k, v)

    if self.model_type not in FAMILIES:
      raise ModelError(f"DecoderConfig.model_type {self.model_type!r} is not one of {FAMILIES}")
    if self.num_key_value_heads is None:
      fix("num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      fix("head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ModelError(
        f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
        f"{self.num_key_value_heads}"
      )
    if self.rope_original_max_position_embeddings is None:
      fix("rope_original_max_position_embeddings", self.max_position_embeddings)
    if isinstance(self.eos_token_id, (list, tuple)):
      fix("eos_token_id", tuple(int(i) for i in self.eos_token_id))
    if self.rope_freq_factors is not None:
      fix("rope_freq_factors", tuple(float(f) for f in self.rope_freq_factors))
    if self.sliding_windows is not None:
      windows = tuple(int(w or 0) for w in self.sliding_windows)
      if len(windows) != self.num_hidden_layers:
        raise ModelError(f"sliding_windows has {len(windows)} entries for {self.num_hidden_layers} layers")
      fix("sliding_windows", windows if any(windows) else None)
    if self.weight_prefix is None:
      fix("weight_prefix", "transformer." if self.model_type == "gpt2" else "model.")
    if self.norm_type not in ("rms", "layer"):
      raise ModelError(f"norm_type {self.norm_type!r} is not 'rms' or 'layer'")
    if self.position_type not in ("rope", "learned"):
      raise ModelError(f"position_type {self.position_type!r} is not 'rope' or 'learned'")
    L.activation(self.hidden_act)  # validates
    if self.position_type == "rope":
      self.inv_freq()  # validates rope_type

  @property
  def adaption_projects_out(self) -> bool:
    """PEFT's adaption prompts add o_proj(adapter output) on Llama / Mistral, the raw output on GPT-2 (its
    AdaptedAttentionGPT has no o-projection)."""
    return self.model_type != "gpt2"

  def inv_freq(self) -> np.ndarray:
    """Rotary inverse frequencies [D // 2] (static: computed from the config, never a parameter)."""
    return L.rope_inv_freq(
      self.head_dim,
      self.rope_theta,
      rope_type=self.rope_type,
      factor=self.rope_factor,
      low_freq_factor=self.rope_low_freq_factor,
      high_freq_factor=self.rope_high_freq_factor,
      original_max_positions=self.rope_original_max_position_embeddings,
      freq_factors=self.rope_freq_factors,
    )

  # -- HF config.json ---------------------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf_cfg: dict[str, Any], keys: Iterable[str] | None = None) -> "DecoderConfig":
    """From a HF config.json dict (transformers 4.x or 5.x field names). `keys` (the checkpoint's tensor
    names) decides the key prefix and ties the head when the checkpoint has no `lm_head.weight`."""
    mt = hf_cfg.get("model_type")
    if mt not in FAMILIES:
      raise ModelError(f"model_type {mt!r} is not a supported decoder; supported: {FAMILIES}")
    kw = _gpt2_fields(hf_cfg) if mt == "gpt2" else _llama_fields(hf_cfg, mt)
    eos = hf_cfg.get("eos_token_id")
    kw.update(
      model_type=mt,
      vocab_size=hf_cfg["vocab_size"],
      bos_token_id=hf_cfg.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=hf_cfg.get("pad_token_id"),
    )
    tie = bool(hf_cfg.get("tie_word_embeddings", mt == "gpt2"))
    if keys is not None:
      keys = set(keys)
      body = "wte.weight" if mt == "gpt2" else "embed_tokens.weight"
      default = "transformer." if mt == "gpt2" else "model."
      kw["weight_prefix"] = default if f"{default}{body}" in keys or body not in keys else ""
      if not tie and "lm_head.weight" not in keys:
        log.warning(
          "config says the head is untied, but the checkpoint has no lm_head.weight: tying it to the input embedding"
        )
        tie = True
    return cls(**kw, tie_word_embeddings=tie)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that transformers' *ForCausalLM reads back to this model."""
    mt = self.model_type
    d: dict[str, Any] = dict(
      model_type=mt,
      architectures=[_HF_CLASSES[mt]],
      vocab_size=self.vocab_size,
      tie_word_embeddings=self.tie_word_embeddings,
      bos_token_id=self.bos_token_id,
      eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
      pad_token_id=self.pad_token_id,
    )
    if self.rope_freq_factors is not None:
      raise ModelError("rope frequency factors from a GGUF file (rope_freqs) have no transformers config field")
    d.update(_gpt2_fields_out(self) if mt == "gpt2" else _llama_fields_out(self, mt))
    return d


def _gpt2_fields_out(cfg: DecoderConfig) -> dict[str, Any]:
  """to_hf's GPT-2 fields (checked: GPT-2 can express this config)."""
  d: dict[str, Any] = {}
  _expect(
    cfg,
    dict(
      norm_type="layer",
      position_type="learned",
      gated_mlp=False,
      qkv_bias=True,
      out_bias=True,
      mlp_bias=True,
      sliding_windows=None,
    ),
    "gpt2",
  )
  if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or cfg.num_key_value_heads != cfg.num_attention_heads:
    raise ModelError("gpt2 needs head_dim * num_attention_heads == hidden_size and no grouped-query attention")
  d.update(
    n_embd=cfg.hidden_size,
    n_layer=cfg.num_hidden_layers,
    n_head=cfg.num_attention_heads,
    n_inner=cfg.intermediate_size,
    n_positions=cfg.max_position_embeddings,
    activation_function=cfg.hidden_act,
    layer_norm_epsilon=cfg.norm_eps,
    resid_pdrop=cfg.dropout_rate,
    embd_pdrop=cfg.dropout_rate,
    attn_pdrop=cfg.dropout_rate,
    scale_attn_weights=cfg.scale_attn_weights,
  )
  return d


def _llama_fields_out(cfg: DecoderConfig, mt: str) -> dict[str, Any]:
  """to_hf's Llama-family fields (checked: the family can express this config)."""
  d: dict[str, Any] = {}
  _expect(cfg, dict(norm_type="rms", position_type="rope", gated_mlp=True, scale_attn_weights=True), mt)
  rope: dict[str, Any] = dict(rope_type=cfg.rope_type, rope_theta=cfg.rope_theta)
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    rope.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
    )
  d.update(
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_hidden_layers,
    num_attention_heads=cfg.num_attention_heads,
    num_key_value_heads=cfg.num_key_value_heads,
    head_dim=cfg.head_dim,
    hidden_act=cfg.hidden_act,
    max_position_embeddings=cfg.max_position_embeddings,
    rms_norm_eps=cfg.norm_eps,
    rope_parameters=rope,
    attention_dropout=cfg.dropout_rate,
  )
  windows = cfg.sliding_windows or (0,) * cfg.num_hidden_layers
  if mt == "llama":
    if cfg.qkv_bias != cfg.out_bias:
      raise ModelError("llama's attention_bias covers q, k, v and o together")
    if any(windows):
      raise ModelError("llama has no sliding-window attention")
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  elif mt == "mistral":
    _expect(cfg, dict(qkv_bias=False, out_bias=False, mlp_bias=False), mt)
    if len(set(windows)) != 1:
      raise ModelError("mistral uses one sliding window for every layer")
    d.update(sliding_window=windows[0] or None)
  else:  # qwen2
    _expect(cfg, dict(qkv_bias=True, out_bias=False, mlp_bias=False), mt)
    used = {w for w in windows if w}
    if len(used) > 1:
      raise ModelError("qwen2 uses one sliding window size for its sliding layers")
    d.update(
      use_sliding_window=bool(used),
      sliding_window=used.pop() if used else None,
      layer_types=["sliding_attention" if w else "full_attention" for w in windows],
      max_window_layers=cfg.num_hidden_layers,
    )
  return d


def _expect(cfg: DecoderConfig, want: dict, family: str):
  for k, v in want.items():
    if getattr(cfg, k) != v:
      raise ModelError(f"a {family} config cannot express {k}={getattr(cfg, k)!r} (transformers' {family} has {v!r})")


def _llama_fields(c: dict, mt: str) -> dict:
  rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise ModelError(f"per-layer-type rope parameters are not supported: {rope}")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ModelError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
  if rope_type not in ("default", "linear", "llama3"):
    raise ModelError(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
  y = c["num_hidden_layers"]
  windows = None
  if mt == "mistral":
    windows = (c.get("sliding_window") or 0,) * y
  elif mt == "qwen2":
    sw = c.get("sliding_window") if c.get("use_sliding_window", False) else None
    types = c.get("layer_types") or [
      "sliding_attention" if sw and i >= c.get("max_window_layers", 28) else "full_attention" for i in range(y)
    ]
    windows = tuple((sw or 0) if t == "sliding_attention" else 0 for t in types)
  bias = bool(c.get("attention_bias", False))
  return dict(
    hidden_size=c["hidden_size"],
    intermediate_size=c["intermediate_size"],
    num_hidden_layers=y,
    num_attention_heads=c["num_attention_heads"],
    num_key_value_heads=c.get("num_key_value_heads"),
    head_dim=c.get("head_dim"),
    hidden_act=c.get("hidden_act", "silu"),
    gated_mlp=True,
    norm_type="rms",
    norm_eps=c.get("rms_norm_eps", 1e-6),
    qkv_bias=True if mt == "qwen2" else bias,
    out_bias=bias if mt == "llama" else False,
    mlp_bias=bool(c.get("mlp_bias", False)) if mt == "llama" else False,
    position_type="rope",
    max_position_embeddings=c.get("max_position_embeddings", 2048),
    rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
    rope_type=rope_type,
    rope_factor=rope.get("factor", 1.0),
    rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
    rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
    rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
    sliding_windows=windows,
    dropout_rate=float(c.get("attention_dropout", 0.0) or 0.0),
  )


def _gpt2_fields(c: dict) -> dict:
  for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
    if c.get(flag):
      raise ModelError(f"gpt2 with {flag}=true is not supported")
  h = c.get("n_embd", c.get("hidden_size"))
  return dict(
    hidden_size=h,
    intermediate_size=c.get("n_inner") or 4 * h,
    num_hidden_layers=c.get("n_layer"),
    num_attention_heads=c.get("n_head"),
    hidden_act=c.get("activation_function", "gelu_new"),
    gated_mlp=False,
    norm_type="layer",
    norm_eps=c.get("layer_norm_epsilon", 1e-5),
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
    position_type="learned",
    max_position_embeddings=c.get("n_positions", 1024),
    scale_attn_weights=c.get("scale_attn_weights", True),
    dropout_rate=float(c.get("resid_pdrop", 0.1)),
  )


# -- the model -----------------------------------------------------------------------------------


class DecoderBlock(nnx.Module):
  """All layers, stacked: pre-normed self-attention and MLP."""

  def __init__(self, cfg: DecoderConfig, *, rngs, param_dtype):
    y, h = cfg.num_hidden_layers, cfg.hidden_size
    init = dict(rngs=rngs, param_dtype=param_dtype, std_in=_INIT_STD, std_out=_INIT_STD)
    self.attn = L.StackedAttention(
      y,
      h,
      cfg.num_attention_heads,
      cfg.num_key_value_heads,
      cfg.head_dim,
      qkv_bias=cfg.qkv_bias,
      out_bias=cfg.out_bias,
      **init,
    )
    self.attn_norm = L.param(jnp.ones((y, h), param_dtype), ("layers", "embed"))
    self.mlp = L.StackedMLP(y, h, cfg.intermediate_size, cfg.gated_mlp, bias=cfg.mlp_bias, **init)
    self.mlp_norm = L.param(jnp.ones((y, h), param_dtype), ("layers", "embed"))
    if cfg.norm_type == "layer":
      self.attn_norm_bias = L.param(jnp.zeros((y, h), param_dtype), ("layers", "embed"))
      self.mlp_norm_bias = L.param(jnp.zeros((y, h), param_dtype), ("layers", "embed"))


@struct.dataclass
class DecoderCache:
  """Cached decoding state: k/v [Y, B, S, K, D] for S slots, key_mask [B, S] (1 = a real token's slot),
  next_pos [B] (the position of the first generated token: the row's count of real prefix slots) and
  start (the slot of the first generated token); `adaption`: the rows' adaption prompts' keys/values, gates and
  masks (`Prefix.adaption_rows`: keys/values layers first, the rest batch-major), projected once at prefill and
  attended to by every decoding step."""

  k: jax.Array
  v: jax.Array
  key_mask: jax.Array | None = None
  next_pos: jax.Array | None = None
  adaption: tuple | None = None
  start: int = struct.field(pytree_node=False, default=0)


class Decoder(FrozenLM):
  """A decoder-only LM (`models.interface.CausalLM`)."""

  kind = "causal"
  batch_type = CausalBatch
  supports_adaption = True

  def init_params(self, cfg: DecoderConfig, rngs: nnx.Rngs, param_dtype) -> None:
    h, v = cfg.hidden_size, cfg.vocab_size
    self.embed_tokens = L.param(L.normal_init(rngs, (v, h), _INIT_STD, param_dtype), ("vocab", "embed"))
    if cfg.position_type == "learned":
      self.embed_positions = L.param(
        L.normal_init(rngs, (cfg.max_position_embeddings, h), _INIT_STD, param_dtype), ("positions", "embed")
      )
    self.layers = DecoderBlock(cfg, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = L.param(jnp.ones((h,), param_dtype), ("embed",))
    if cfg.norm_type == "layer":
      self.final_norm_bias = L.param(jnp.zeros((h,), param_dtype), ("embed",))
    if not cfg.tie_word_embeddings:
      self.lm_head = L.param(L.normal_init(rngs, (h, v), _INIT_STD, param_dtype), ("embed", "vocab"))

  # -- the stack -------------------------------------------------------------------------------

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def embedding_table(self) -> jax.Array:
    return self.embed_tokens[...]

  def hidden(
    self,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    positions=None,
    *,
    prefix_kv=None,
    adaption=None,
    dropout_rng=None,
  ) -> jax.Array:
    """-> final hidden states [B, L, H] (`logits` maps them to the vocabulary); arguments as `__call__`, and
    `prefix_kv` (keys, values) [Y, B, P, K, D]: P slots in front of every layer's keys, the tokens at P..;
    `adaption`: adaption prompts' keys/values (`Prefix.adaption_rows`)."""
    x, attention_mask = self.input_embeddings(input_ids, attention_mask, inputs_embeds)
    b, n = x.shape[:2]
    pk = 0 if prefix_kv is None else prefix_kv[0].shape[2]
    if positions is None:
      positions = pk + jnp.arange(n)
    positions = jnp.broadcast_to(positions, (b, n))
    if pk:
      attention_mask = jnp.concatenate([jnp.ones((b, pk), attention_mask.dtype), attention_mask], axis=1)
    h, _ = self._run(
      x,
      positions=positions,
      key_mask=attention_mask,
      q_index=pk + jnp.arange(n),
      kv=KV.source(prefix_kv),
      adaption=adaption,
      dropout_rng=dropout_rng,
    )
    return h

  def __call__(
    self, input_ids=None, attention_mask=None, inputs_embeds=None, positions=None, *, dropout_rng=None
  ) -> jax.Array:
    """-> logits [B, L, V] float32. `inputs_embeds` [B, L, H] replaces the lookup; `positions` [B, L] or [L]
    defaults to 0..L-1; `attention_mask` [B, L] (1 = real token) masks padded keys."""
    return self.logits(self.hidden(input_ids, attention_mask, inputs_embeds, positions, dropout_rng=dropout_rng))

  def logits(self, x: jax.Array) -> jax.Array:
    """Final hidden states [B, L, H] -> logits [B, L, V] float32."""
    if self.config.tie_word_embeddings:
      return L.lm_logits(x, tied_table=self.embed_tokens[...])
    return L.lm_logits(x, head=self.lm_head[...])

  def _norm(self, x, p: dict, name: str) -> jax.Array:
    if self.config.norm_type == "layer":
      return L.layer_norm(x, p[name], p[f"{name}_bias"], self.config.norm_eps)
    return L.rms_norm(x, p[name], self.config.norm_eps)

  def _run(self, x, *, positions, key_mask, q_index, kv: KV.KVSource, index=0, adaption=None, dropout_rng=None):
    """x [B, L, H], positions [B, L], key_mask [B, S], q_index [L] or [B, L] (the slots of the queries), `kv` the
    other keys and values every layer attends to (`models.kv`: none; a prefix's P slots, S = P + L; or a cache of S
    slots the new keys/values are written into at `index`), masked by slot (causal, padding, sliding window) as
    transformers masks by cache position; `adaption` (`Prefix.adaption_rows`: keys/values [Y, B, A, K, D], gates
    [B, Y], on [B, Y], mask [B, Y, A]) or None -> (final hidden states [B, L, H], the updated cache or None)."""
    cfg = self.config
    rate = cfg.dropout_rate
    rngs = L.split_rng(dropout_rng, 2)
    if cfg.position_type == "learned":
      x = x + jnp.take(self.embed_positions[...], positions, axis=0).astype(self.dtype)
    x = L.dropout(x, rate, rngs[0])
    k_index = jnp.arange(key_mask.shape[1])
    q_rows = q_index if q_index.ndim == 2 else q_index[None]  # [B or 1, L]: one query slot per row (decode slots)
    distance = q_rows[:, :, None] - k_index[None, None, :]  # [B or 1, L, S]
    allowed = (distance >= 0)[:, None] & key_mask[:, None, None, :].astype(bool)
    rope = L.rope_cos_sin(positions, cfg.inv_freq()) if cfg.position_type == "rope" else None
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    act = L.activation(cfg.hidden_act)
    cached = isinstance(kv, KV.Cached)
    per_layer = dict(window=jnp.asarray(cfg.sliding_windows or (0,) * cfg.num_hidden_layers, jnp.int32), kv=kv)
    if adaption is not None:  # keys/values come layers first; the gates, switches and masks batch-major
      k, v, *rest = adaption
      per_layer["adaption"] = (k, v, *(jnp.moveaxis(a, 1, 0) for a in rest))
    else:
      per_layer["adaption"] = None

    def layer(p, x, rng, xs):
      r = L.split_rng(rng, 3)
      w = xs["window"]
      # transformers' sliding window: key slot > query slot - window
      ok = allowed & ((w == 0) | (distance < w))[:, None]
      bias = jnp.where(ok, 0.0, L.MASK_VALUE).astype(jnp.float32)  # [B, 1, L, S]
      o, written = KV.self_attention(
        p["attn"],
        self._norm(x, p, "attn_norm"),
        xs["kv"],
        bias=bias,
        scale=scale,
        index=index,
        rope=rope,
        dropout_rate=rate,
        dropout_rng=r[0],
        implementation=self.attention,
        adaption=xs["adaption"],
        adaption_projects_out=cfg.adaption_projects_out,
      )
      x = x + L.dropout(o, rate, r[1])
      h = self._norm(x, p, "mlp_norm")
      return x + L.dropout(L.mlp(h, p["mlp"], act), rate, r[2]), written

    if cached:  # the cache written in place, the layers in a scan (unrolled, each layer would copy the cache)
      x, written = KV.scan_in_place(layer, x, L.arrays(self.layers), rngs[1], per_layer)
    else:
      x, written = L.scan_layers(layer, x, L.arrays(self.layers), rngs[1], self.remat, per_layer, loop=self.layer_loop)
    p = dict(final_norm=self.final_norm[...])
    if cfg.norm_type == "layer":
      p["final_norm_bias"] = self.final_norm_bias[...]
    return self._norm(x, p, "final_norm"), written

  # -- prompted entry points (models.interface.PromptableLM) ------------------------------------

  def adaption_kv(self, prefix: Prefix | None) -> Prefix | None:
    if prefix is None or prefix.adaption is None:
      return prefix
    p = L.arrays(self.layers)["attn"]  # every layer's k/v projections, stacked
    k, v = KV.adaption_keys_values(p, prefix.adaption.astype(self.dtype))
    return prefix.replace(adaption=None, adaption_keys=k, adaption_values=v)

  def _adaption(self, prefix: Prefix, batch_size: int) -> tuple | None:
    """The rows' adaption prompts as the layers take them (`Prefix.adaption_rows`), projected here if need be."""
    return self.adaption_kv(prefix).adaption_rows(batch_size)

  def shared_prompt(
    self, prefix: Prefix | None, batch_size: int, dropout_rng=None
  ) -> tuple[Prefix | None, jax.Array | None]:
    """A soft prompt the same for every row ([1, P, H] embeddings) is, under causal attention, the same P hidden
    states, keys and values in every row: run it once (batch 1, positions 0..P-1) and hand the rows its keys and
    values as a key/value prefix — exactly the per-row computation without P extra tokens per row through every
    layer (gradients reach the prompt through the keys/values). -> (the prefix to use, the prompt's last final
    hidden state [1, H], which predicts a first token after an empty input; None where nothing was shared).
    Rows of a bank of K < B prompts (`Prefix.bank`, one prompt per task or per ensemble member) run the K
    prompts once each (batch K) and every row takes its prompt's keys/values (the last hidden state is then [B, H]).
    Falls back to the per-row prompt (logged once) where that is not exact: dropout on the prompt positions,
    a different prompt in every row, or a prompt together with a key/value prefix."""
    if prefix is None or prefix.embeds is None or prefix.length == 0 or not self.options.share_prompt:
      return prefix, None
    banked = prefix.bank_ids is not None and prefix.bank.shape[0] < batch_size
    per_row = (
      "dropout touches the prompt positions"
      if dropout_rng is not None and self.config.dropout_rate
      else "each row has its own prompt"
      if prefix.embeds.shape[0] != 1 and batch_size > 1 and not banked
      else "a key/value prefix is present"
      if prefix.keys is not None
      else None
    )
    if per_row:
      _log_once(f"soft prompt run per row (not shared across the batch): {per_row}")
      return prefix, None
    x = (prefix.bank if banked else prefix.embeds[:1]).astype(self.dtype)  # [K or 1, P, H]: each distinct prompt
    k, p = x.shape[:2]
    cache = self.init_cache(k, p).replace(key_mask=jnp.ones((k, p), jnp.int32))
    h, cache = self._extend(cache, x, jnp.broadcast_to(jnp.arange(p), (k, p)), 0)
    offset = prefix.input_offset  # the input's own (DePT): it still goes on the input tokens
    if not banked:
      return Prefix(keys=cache.k, values=cache.v, input_offset=offset), h[:, -1]
    ids = prefix.bank_ids
    return Prefix(keys=cache.k[:, ids], values=cache.v[:, ids], input_offset=offset), h[ids, -1]

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
    """-> logits [B, P + L, V] float32 with positions 0..P+L-1 (prefix embedding positions included, as PEFT
    returns; a key/value prefix takes no positions in the output)."""
    if decoder_input_ids is not None or decoder_attention_mask is not None:
      raise ValueError("a decoder-only model takes no decoder_input_ids / decoder_attention_mask")
    x, m = self.input_embeddings(input_ids, attention_mask, inputs_embeds, prefix)
    kv, ad = (prefix.kv(x.shape[0]), self._adaption(prefix, x.shape[0])) if prefix is not None else (None, None)
    return self.logits(
      self.hidden(inputs_embeds=x, attention_mask=m, prefix_kv=kv, adaption=ad, dropout_rng=dropout_rng)
    )

  def score_targets(self, batch: CausalBatch, prefix: Prefix | None = None, *, dropout_rng=None):
    # Logits only where there is a loss: the LM head over every prompt and input position would cost
    # 2 * B * (P + L) * H * V FLOPs (forward and backward) for nothing.
    prefix, last = self.shared_prompt(prefix, batch.size, dropout_rng)
    # an input offset (DePT) reaches the input tokens only, not the target after them
    inputs = jnp.sum(batch.input_mask, axis=1)
    x, m = self.input_embeddings(batch.tokens, batch.token_mask, prefix=prefix, offset_tokens=inputs)
    kv, ad = (prefix.kv(batch.size), self._adaption(prefix, batch.size)) if prefix is not None else (None, None)
    h = self.hidden(inputs_embeds=x, attention_mask=m, prefix_kv=kv, adaption=ad, dropout_rng=dropout_rng)
    if last is not None:  # the shared prompt's last position stands in front, as the per-row prompt's would
      h = jnp.concatenate([jnp.broadcast_to(last[:, None].astype(h.dtype), (h.shape[0], 1, h.shape[2])), h], 1)
    p = h.shape[1] - batch.tokens.shape[1]
    idx = batch.target_index  # [B, T] positions of the target tokens in `tokens`
    # position t predicts t + 1; a target at token 0 (empty input, no BOS) is predicted from the prompt's last
    # position, as in PEFT, and never from its own position (which sees it); without a prompt it has no loss
    at = p + idx - 1
    hs = jnp.take_along_axis(h, jnp.maximum(at, 0)[..., None], axis=1)
    targets = jnp.take_along_axis(batch.tokens, idx, axis=1)
    return self.logits(hs), targets, batch.target_valid * (at >= 0).astype(batch.target_valid.dtype)

  def label_logprobs(self, batch: CausalBatch, label_ids, label_mask, prefix: Prefix | None = None) -> jax.Array:
    """[prefix, input (left-padded), label] per (example, label) -> [B, C]. The input runs once into a cache
    (`prefill`) and only the C labels' tokens run per example: L + C * T tokens per example, not C * (L + T)."""
    (scores,) = self._continuations(batch, prefix, [(label_ids, label_mask)])
    return scores

  def eval_scores(self, batch: CausalBatch, label_ids, label_mask, prefix: Prefix | None = None):
    """`score_targets` and `label_logprobs` of one batch with the input run once: (logits [B, T, V], targets,
    loss mask), [B, C]."""
    idx = batch.target_index
    targets = jnp.take_along_axis(batch.tokens, idx, axis=1)
    # as `score_targets`: a target at token 0 (an empty input) has a loss only after a soft prompt's positions
    prompted = prefix is not None and prefix.embeds is not None and prefix.length > 0
    mask = batch.target_valid * ((idx > 0) | prompted).astype(batch.target_valid.dtype)
    (logits, mask), scores = self._continuations(batch, prefix, [None, (label_ids, label_mask)], gold=(targets, mask))
    return (logits, targets, mask), scores

  def _continuations(self, batch: CausalBatch, prefix: Prefix | None, conts, gold=None) -> list:
    """Run [prefix, left-padded input] once into a cache of L + T slots, then every continuation from it: each
    of `conts` (ids, mask) [C, T] -> [B, C] log-likelihoods (the cache repeated C times); None -> the batch's
    own `gold` (targets, mask) [B, T] -> (logits [B, T, V], loss mask). Positions count real tokens only, as in
    training, so each score is the training likelihood of that continuation as the target."""
    longest = max((gold[0] if c is None else c[0]).shape[1] for c in conts)
    first, cache = self.prefill(batch.input_ids, batch.input_mask, prefix=prefix, max_new_tokens=max(longest - 1, 1))
    b, out = batch.size, []
    for cont in conts:
      ids, mask = gold if cont is None else (jnp.tile(cont[0], (b, 1)), jnp.tile(cont[1], (b, 1)))
      r, t = ids.shape[0] // b, ids.shape[1]
      rows = jax.tree.map(lambda a, r=r: L.repeat_rows(a, r, axis=_batch_axis(a)), cache)
      # token 0 follows the input's last real slot (or a prompt's last slot after an empty input), as in training
      logits = L.repeat_rows(first, r)[:, None]
      if t > 1:
        h, _ = self._extend(rows, self.embed(ids[:, : t - 1]), rows.next_pos[:, None] + jnp.arange(t - 1), rows.start)
        logits = jnp.concatenate([logits, self.logits(h)], axis=1)
      out.append((logits, mask) if cont is None else L.sequence_logprob(logits, ids, mask).reshape(b, r))
    return out

  # -- classification heads (`prompts.heads`) --------------------------------------------------

  def token_states(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> final hidden states of the input tokens [B, L, H] (the prompt's positions dropped), positions as
    `forward` (0..P+L-1 after a soft prompt, P.. after a key/value prefix: what PEFT feeds the HF model)."""
    x, m = self.input_embeddings(input_ids, attention_mask, prefix=prefix)
    kv = prefix.kv(x.shape[0]) if prefix is not None else None
    h = self.hidden(inputs_embeds=x, attention_mask=m, prefix_kv=kv, dropout_rng=dropout_rng)
    return h[:, h.shape[1] - input_ids.shape[1] :]

  def sequence_state(self, input_ids, attention_mask, prefix: Prefix | None = None, *, dropout_rng=None) -> jax.Array:
    """[B, L] -> [B, 1, H]: the last real token's final hidden state (`LlamaForSequenceClassification`)."""
    return last_real(self.token_states(input_ids, attention_mask, prefix, dropout_rng=dropout_rng), attention_mask)

  def sequence_head(self) -> HeadLayout:
    # LlamaForSequenceClassification / GPT2ForSequenceClassification: `score`, Linear(H, C, bias=False)
    return HeadLayout(name="score", bias=False, init_std=_INIT_STD)

  def token_head(self) -> HeadLayout:
    # GenericForTokenClassification (Llama, Mistral, Qwen2): `score`; GPT2ForTokenClassification: `classifier`;
    # both Linear(H, C) with a bias after dropout 0.1 (no classifier_dropout / hidden_dropout in their configs)
    name = "classifier" if self.config.model_type == "gpt2" else "score"
    return HeadLayout(name=name, bias=True, init_std=_INIT_STD, dropout=0.1)

  def prefix_slots(self) -> PrefixSlots:
    # PEFT (#1901): with num_key_value_heads the prefix has K heads of head_dim (config.head_dim when set)
    c = self.config
    return PrefixSlots(
      layers=c.num_hidden_layers,
      heads=c.num_key_value_heads,
      head_dim=c.head_dim,
      layer_of=tuple(range(c.num_hidden_layers)),
    )

  # -- cached decoding -------------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int) -> DecoderCache:
    """An empty KV cache: k/v [Y, B, S, K, D] in the compute dtype, every slot masked."""
    c = self.config
    shape = (c.num_hidden_layers, batch_size, max_length, c.num_key_value_heads, c.head_dim)
    return DecoderCache(
      k=jnp.zeros(shape, self.dtype),
      v=jnp.zeros(shape, self.dtype),
      key_mask=jnp.zeros((batch_size, max_length), jnp.int32),
      next_pos=jnp.zeros((batch_size,), jnp.int32),
    )

  def prefill(
    self,
    input_ids=None,
    attention_mask=None,
    *,
    inputs_embeds=None,
    prefix: Prefix | None = None,
    max_new_tokens: int,
    num_beams: int = 1,
  ) -> tuple[jax.Array, DecoderCache]:
    """Masked slots may sit anywhere in the prefix (left padding, a soft prompt before the padding, an empty
    input after a prompt); every row needs one real slot. The prefix runs once into a cache of L + T slots, the
    first new token comes from each row's last real slot, and positions count real slots only (cumsum of the
    mask - 1), as transformers' generate does, so a padded row decodes as it would alone. A key/value prefix is
    a pre-filled cache: its P slots come first, and the tokens' positions start at P; so is a soft prompt shared
    by every row (`shared_prompt`: computed once, not per row)."""
    b0 = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
    prefix, shared_last = self.shared_prompt(prefix, b0)
    x, mask = self.input_embeddings(input_ids, attention_mask, inputs_embeds, prefix)
    b, n = mask.shape
    w, pk = num_beams, 0 if prefix is None else prefix.kv_length
    real = jnp.ones((b, 0), mask.dtype) if prefix is None else prefix.kv_real(b).astype(mask.dtype)  # [B, P]
    key_mask = jnp.concatenate([real, mask, jnp.ones((b, max_new_tokens), mask.dtype)], 1)
    cache = self.init_cache(b, pk + n + max_new_tokens).replace(key_mask=key_mask)  # [B, S] slots
    cache = cache.replace(adaption=self._adaption(prefix, b) if prefix is not None else None)
    k, v = KV.fill_prefix(cache.k, cache.v, prefix, b)
    cache = cache.replace(k=k, v=v)
    p0 = jnp.sum(real, axis=1, keepdims=True)  # [B, 1]: the row's real prefix slots, where its tokens' positions start
    h, cache = self._extend(cache, x, p0 + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0), pk)
    last = n - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # each row's last real slot
    h_last = h[jnp.arange(b), last]
    if shared_last is not None:  # an empty input after a shared prompt: its first token follows the prompt
      h_last = jnp.where(jnp.any(mask > 0, axis=1)[:, None], h_last, shared_last.astype(h.dtype))
    logits0 = self.logits(h_last[:, None])[:, 0]
    cache = cache.replace(next_pos=p0[:, 0] + jnp.sum(mask, axis=1), start=pk + n)
    return L.repeat_rows(logits0, w), jax.tree.map(lambda a: L.repeat_rows(a, w, axis=_batch_axis(a)), cache)

  def decode_step(self, cache: DecoderCache, tokens: jax.Array, t) -> tuple[jax.Array, DecoderCache]:
    h, cache = self._extend(cache, self.embed(tokens[:, None]), (cache.next_pos + t)[:, None], cache.start + t)
    return self.logits(h)[:, 0], cache

  def pad_inputs(self, cache: DecoderCache, by: int) -> DecoderCache:
    """Inputs are left-padded: `by` masked slots go in front of the prefix (masked)."""
    if by == 0:
      return cache
    slots = lambda a, axis: jnp.pad(a, [(by, 0) if i == axis else (0, 0) for i in range(a.ndim)])  # noqa: E731
    return cache.replace(
      k=slots(cache.k, 2), v=slots(cache.v, 2), key_mask=slots(cache.key_mask, 1), start=cache.start + by
    )

  def _extend(self, cache: DecoderCache, x: jax.Array, positions: jax.Array, index) -> tuple[jax.Array, DecoderCache]:
    """Run l new tokens [B, l, H] (positions [B, l]) at cache slots index..index+l-1 (index: one for every row or
    each row's own [B]) -> (final hidden states [B, l, H], the cache with their k/v)."""
    h, written = self._run(
      x.astype(self.dtype),
      positions=positions,
      key_mask=cache.key_mask,
      q_index=jnp.asarray(index)[..., None] + jnp.arange(x.shape[1]),
      kv=KV.Cached(cache.k, cache.v),
      index=index,
      adaption=cache.adaption,
    )
    return h, cache.replace(k=written.keys, v=written.values)

  def reorder_cache(self, cache: DecoderCache, origin: jax.Array) -> DecoderCache:
    return cache.replace(
      k=cache.k[:, origin],
      v=cache.v[:, origin],
      key_mask=cache.key_mask[origin],
      next_pos=cache.next_pos[origin],
      adaption=None if cache.adaption is None else tuple(jnp.take(a, origin, _batch_axis(a)) for a in cache.adaption),
    )


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    log.info(message)


def _batch_axis(a) -> int:
  """k/v carry layers first ([Y, B, ...]); the other cache fields are batch-major."""
  return 1 if jnp.ndim(a) == 5 else 0


# -- strict HF weight maps ---------------------------------------------------------------------
# (our path, HF key with {i} for the layer, transform); transforms live in `jaxprompt.models.hf`.


def _conv1d(k: int):
  """GPT-2 Conv1D weight [in, out] -> ours [in dims (k of them)..., out dims...]: a reshape."""
  return (
    lambda s: (math.prod(s[:k]), math.prod(s[k:])),
    lambda w, s: w.reshape(s),
    lambda a: np.ascontiguousarray(a.reshape(math.prod(a.shape[:k]), -1)),
  )


def _fused_weight(part: int, parts: int = 3):
  """Part `part` of c_attn.weight [H, 3 N D] (q|k|v along the output axis) -> ours [H, N, D]."""

  def to_ours(w, s):
    n = math.prod(s[1:])
    return w[:, part * n : (part + 1) * n].reshape(s)

  return (lambda s: (s[0], parts * math.prod(s[1:])), to_ours, lambda a: a.reshape(a.shape[0], -1))


def _fused_bias(part: int, parts: int = 3):
  """Part `part` of c_attn.bias [3 N D] -> ours [N, D]."""

  def to_ours(w, s):
    n = math.prod(s)
    return w[part * n : (part + 1) * n].reshape(s)

  return (lambda s: (parts * math.prod(s),), to_ours, lambda a: a.reshape(-1))


hf.register_transform("conv1d_out", *_conv1d(2))
for _j, _p in enumerate("qkv"):
  hf.register_transform(f"c_attn_{_p}", *_fused_weight(_j), fuse_axis=1)
  hf.register_transform(f"c_attn_bias_{_p}", *_fused_bias(_j), fuse_axis=0)


def _llama_map(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
  P = cfg.weight_prefix
  blk = f"{P}layers.{{i}}"
  m = [("embed_tokens", f"{P}embed_tokens.weight", "copy")]
  for p in "qkvo":
    m.append((f"layers.attn.{p}", f"{blk}.self_attn.{p}_proj.weight", "linear_out" if p == "o" else "linear"))
    if (cfg.qkv_bias and p != "o") or (cfg.out_bias and p == "o"):
      m.append((f"layers.attn.{p}_bias", f"{blk}.self_attn.{p}_proj.bias", "copy" if p == "o" else "flat"))
  for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
    m.append((f"layers.mlp.{ours}", f"{blk}.mlp.{theirs}.weight", "linear"))
    if cfg.mlp_bias:
      m.append((f"layers.mlp.{ours.replace('w', 'b')}", f"{blk}.mlp.{theirs}.bias", "copy"))
  m += [
    ("layers.attn_norm", f"{blk}.input_layernorm.weight", "copy"),
    ("layers.mlp_norm", f"{blk}.post_attention_layernorm.weight", "copy"),
    ("final_norm", f"{P}norm.weight", "copy"),
  ]
  return m


def _gpt2_map(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
  P = cfg.weight_prefix
  blk = f"{P}h.{{i}}"
  m = [("embed_tokens", f"{P}wte.weight", "copy"), ("embed_positions", f"{P}wpe.weight", "copy")]
  for p in "qkv":
    m += [
      (f"layers.attn.{p}", f"{blk}.attn.c_attn.weight", f"c_attn_{p}"),
      (f"layers.attn.{p}_bias", f"{blk}.attn.c_attn.bias", f"c_attn_bias_{p}"),
    ]
  m += [
    ("layers.attn.o", f"{blk}.attn.c_proj.weight", "conv1d_out"),
    ("layers.attn.o_bias", f"{blk}.attn.c_proj.bias", "copy"),
    ("layers.mlp.wi", f"{blk}.mlp.c_fc.weight", "copy"),  # Conv1D [H, F] is already ours
    ("layers.mlp.bi", f"{blk}.mlp.c_fc.bias", "copy"),
    ("layers.mlp.wo", f"{blk}.mlp.c_proj.weight", "copy"),
    ("layers.mlp.bo", f"{blk}.mlp.c_proj.bias", "copy"),
  ]
  for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
    m += [(f"layers.{ours}", f"{blk}.{theirs}.weight", "copy"), (f"layers.{ours}_bias", f"{blk}.{theirs}.bias", "copy")]
  m += [("final_norm", f"{P}ln_f.weight", "copy"), ("final_norm_bias", f"{P}ln_f.bias", "copy")]
  return m


def hf_weight_map(cfg: DecoderConfig) -> list[tuple[str, str, str]]:
  m = _gpt2_map(cfg) if cfg.model_type == "gpt2" else _llama_map(cfg)
  if not cfg.tie_word_embeddings:
    m.append(("lm_head", "lm_head.weight", "linear"))
  return m


def hf_tied(cfg: DecoderConfig) -> tuple[tuple[str, ...], ...]:
  """A tied head is one tensor that a checkpoint may store as the embedding, as `lm_head.weight`, or both."""
  if not cfg.tie_word_embeddings:
    return ()
  return ((f"{cfg.weight_prefix}{'wte' if cfg.model_type == 'gpt2' else 'embed_tokens'}.weight", "lm_head.weight"),)


def hf_aliases(cfg: DecoderConfig) -> tuple[str, ...]:
  """Tensors a checkpoint may carry that the model does not need: consumed without being read."""
  out = ("lm_head.weight",) if cfg.tie_word_embeddings else ()  # a stored copy of the tied head
  if cfg.model_type == "gpt2":
    # causal-mask buffers older GPT-2 checkpoints saved (transformers ignores them too)
    out += tuple(
      f"{cfg.weight_prefix}h.{i}.attn.{b}" for i in range(cfg.num_hidden_layers) for b in ("bias", "masked_bias")
    )
  return out
