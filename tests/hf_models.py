"""Tiny random transformers models written to disk: the references our models are checked against."""

from __future__ import annotations

from pathlib import Path

import torch

T5_VARIANTS = {
    # original T5: ReLU FFN, head tied to the embedding with the d_model**-0.5 rescale
    "t5-relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 v1.1 / LM-adapted / Flan-T5: gated-GELU, untied head
    "t5v11-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # mT5-like: large vocabulary, gated-GELU, untied
    "mt5-large-vocab": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=2500),
    # unequal depths, d_kv independent of d_model / heads, UL2-style gated-SiLU
    "deep-enc-gated-silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False, num_layers=3,
                                num_decoder_layers=1, d_kv=5),
}


def write_t5(folder: Path, variant: str, seed: int = 0, **overrides) -> Path:
  """A random tiny T5ForConditionalGeneration saved with save_pretrained; returns the folder."""
  from transformers import T5Config, T5ForConditionalGeneration

  kw = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  kw.update(T5_VARIANTS[variant])
  kw.update(overrides)
  tie = kw["tie_word_embeddings"]
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(T5Config(**kw))
  if kw.get("model_type") == "mt5" or variant.startswith("mt5"):
    model.config.model_type = "mt5"
  if not tie:
    # transformers 5 ties lm_head by default; real v1.1 checkpoints carry their own lm_head.weight.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(kw["vocab_size"], kw["d_model"]) * kw["d_model"] ** -0.5)
  model.save_pretrained(folder)
  return Path(folder)


def load_t5(folder: Path):
  from transformers import T5ForConditionalGeneration

  return T5ForConditionalGeneration.from_pretrained(folder).eval()
