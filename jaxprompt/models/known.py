"""Architecture configs of well-known checkpoints, so `jaxprompt plan` works offline on config alone.

Values are the published `config.json` fields of the HF checkpoints (no weights are implied)."""

from __future__ import annotations

_T5_V11 = dict(
  model_type="t5",
  feed_forward_proj="gated-gelu",
  tie_word_embeddings=False,
  vocab_size=32128,
  relative_attention_num_buckets=32,
  relative_attention_max_distance=128,
  layer_norm_epsilon=1e-6,
  dropout_rate=0.1,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
)
_SIZES = {  # d_model, d_ff, d_kv, heads, layers (encoder = decoder)
  "small": (512, 1024, 64, 6, 8),
  "base": (768, 2048, 64, 12, 12),
  "large": (1024, 2816, 64, 16, 24),
  "xl": (2048, 5120, 64, 32, 24),
  "xxl": (4096, 10240, 64, 64, 24),
}

KNOWN_CONFIGS: dict[str, dict] = {}
for _size, (_h, _f, _d, _n, _l) in _SIZES.items():
  _cfg = dict(_T5_V11, d_model=_h, d_ff=_f, d_kv=_d, num_heads=_n, num_layers=_l, num_decoder_layers=_l)
  KNOWN_CONFIGS[f"google/t5-{_size}-lm-adapt"] = _cfg
  KNOWN_CONFIGS[f"google/t5-v1_1-{_size}"] = _cfg
