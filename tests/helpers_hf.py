"""Test helpers (not a test module): tiny random transformers models written to disk, the references our models
are checked against, and a whitespace-id tokenizer."""

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
  "deep-enc-gated-silu": dict(
    feed_forward_proj="gated-silu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=1, d_kv=5
  ),
}


def write_t5(folder: Path, variant: str, seed: int = 0, **overrides) -> Path:
  """A random tiny T5ForConditionalGeneration saved with save_pretrained; returns the folder."""
  from transformers import T5Config, T5ForConditionalGeneration

  kw = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.1,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  )
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


# -- decoder-only models ------------------------------------------------------------------------

DECODER_VARIANTS = {
  # Llama 3: grouped-query attention, llama3 rope scaling (theta/original length chosen so the tiny head
  # dim sees all three frequency bands: kept, smoothed, divided by factor), untied head
  "llama3-gqa-untied": (
    "LlamaForCausalLM",
    dict(
      num_key_value_heads=2,
      tie_word_embeddings=False,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=100.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
      ),
    ),
  ),
  # Llama 2 style with a tied head, plus attention_bias / mlp_bias
  "llama-tied-bias": ("LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
  # Mistral: GQA and a sliding window shorter than the test sequences
  "mistral-window": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4)),
  # Qwen2: q/k/v biases; layer 0 full attention, layer 1 a sliding window
  "qwen2-mixed-window": (
    "Qwen2ForCausalLM",
    dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=3, max_window_layers=1),
  ),
  # GPT-2: learned positions, LayerNorm, fused Conv1D c_attn, tied head
  "gpt2": ("GPT2LMHeadModel", dict()),
}


def write_decoder(folder: Path, variant: str, seed: int = 0, **overrides) -> Path:
  """A random tiny decoder-only transformers model saved with save_pretrained; returns the folder."""
  import transformers

  cls_name, kw = DECODER_VARIANTS[variant]
  # A wide init (0.2, not 0.02) gives peaked next-token distributions, so greedy paths are not near-ties.
  base = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
  if cls_name == "GPT2LMHeadModel":
    base.update(n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64)
  else:
    base.update(
      hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
    )
  base.update(kw)
  base.update(overrides)
  config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config"))
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(config_cls(**base)).eval()
  with torch.no_grad():  # biases start at 0 and norms at 1: randomise them so a swapped mapping shows
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or ".ln_" in name:
        p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(folder)
  return Path(folder)


def load_decoder(folder: Path):
  from transformers import AutoModelForCausalLM

  return AutoModelForCausalLM.from_pretrained(folder).eval()


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
  """Copy a model folder, applying `edit(tensors: dict)` to its model.safetensors (for strict-loading tests)."""
  import shutil

  import numpy as np

  from jaxprompt.models import hf

  shutil.copytree(src, dst)
  f = hf.SafetensorsFile(dst / "model.safetensors")
  names = f.keys()  # a list: a SafetensorsFile is no mapping
  tensors = {k: np.array(f.get(k)) for k in names}
  del f
  edit(tensors)
  hf.save_safetensors(tensors, dst / "model.safetensors")
  return dst


class IdTokenizer:
  """A tokenizer for tests whose texts are space-separated token ids: EOS 2, pad 0, no BOS ("" is an empty input)."""

  pad_token_id, eos_token_id, bos_token_id = 0, 2, None

  def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
    def ids(t):
      return [int(w) for w in t.split()]

    return {"input_ids": ids(text) if isinstance(text, str) else [ids(t) for t in text]}


# -- encoders ----------------------------------------------------------------------------------

ENCODER_VARIANTS = {
  # BERT: two token types, exact GELU, LayerNorm eps 1e-12, a pooler; BertModel saves its keys with no prefix
  "bert": ("BertModel", dict()),
  # RoBERTa: padding id 1, positions from padding_idx + 1, one token type, eps 1e-5
  "roberta": ("RobertaModel", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)),
  # a task checkpoint: keys under "bert.", a classifier beside the body
  "bert-seqcls": ("BertForSequenceClassification", dict(num_labels=3)),
  # a masked-LM checkpoint: keys under "roberta.", no pooler, an lm_head
  "roberta-mlm": ("RobertaForMaskedLM", dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)),
  # bert-base-uncased's format: the masked-LM head (cls.predictions, tanh GELU here) and the NSP head
  "bert-pretraining": ("BertForPreTraining", dict(hidden_act="gelu_new")),
}

DEBERTA_VARIANTS = {
  # DeBERTa-v3's shape: shared key projections, log buckets (mid 4: distances past 4 are bucketed), a LayerNormed
  # relative table, no absolute positions, no token types
  "deberta-v3": (
    "DebertaV2Model",
    dict(
      relative_attention=True,
      position_buckets=8,
      max_relative_positions=20,
      pos_att_type=["p2c", "c2p"],
      share_att_key=True,
      norm_rel_ebd="layer_norm",
      position_biased_input=False,
      type_vocab_size=0,
      layer_norm_eps=1e-7,
    ),
  ),
  # DeBERTa-v2's other options, in a classification checkpoint (keys under "deberta."): separate position
  # projections, no buckets (distances clamped at 3), absolute positions and token types too
  "deberta-v2-seqcls": (
    "DebertaV2ForSequenceClassification",
    dict(
      relative_attention=True,
      position_buckets=-1,
      max_relative_positions=3,
      pos_att_type=["c2p", "p2c"],
      share_att_key=False,
      position_biased_input=True,
      type_vocab_size=2,
      num_labels=2,
    ),
  ),
}


def write_encoder(folder: Path, variant: str, seed: int = 0, **overrides) -> Path:
  """A random tiny BERT / RoBERTa / DeBERTa-v2 transformers model saved with save_pretrained; returns the folder."""
  import transformers

  cls_name, kw = {**ENCODER_VARIANTS, **DEBERTA_VARIANTS}[variant]
  base = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=40,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    initializer_range=0.2,
  )
  if cls_name.startswith("Roberta"):
    base["layer_norm_eps"] = 1e-5
  base.update(kw)
  base.update(overrides)
  family = next(f for f in ("Roberta", "DebertaV2", "Bert") if cls_name.startswith(f))
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(getattr(transformers, f"{family}Config")(**base)).eval()
  with torch.no_grad():  # biases start at 0 and LayerNorms at 1: randomise them so a swapped mapping shows
    for name, p in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  model.save_pretrained(folder)
  return Path(folder)


def load_encoder(folder: Path):
  """The transformers model saved in `folder`, by its config's architecture."""
  import json

  import transformers

  arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
  return getattr(transformers, arch).from_pretrained(folder).eval()


def encoder_with_prefix(body, input_ids, attention_mask, table):
  """An independent prefix-tuning oracle for BERT / RoBERTa: transformers' own layers run with a key/value prefix
  `table` [P, Y, 2, N, D] (PEFT's flat [P, Y * 2 * N * D], reshaped) as a pre-filled cache, the mask with P ones in
  front — what PEFT's PREFIX_TUNING forward does, without PEFT (its SEQ_CLS / TOKEN_CLS forwards refuse prefix
  tuning on encoders). `body` is the bare BertModel / RobertaModel; returns its output."""
  from transformers import DynamicCache

  b, p = input_ids.shape[0], table.shape[0]
  cache = DynamicCache()
  for i in range(table.shape[1]):
    k, v = (table[:, i, j].permute(1, 0, 2)[None].expand(b, -1, -1, -1) for j in (0, 1))  # [B, N, P, D]
    cache.update(k.contiguous(), v.contiguous(), i)
  mask = torch.cat([torch.ones(b, p, dtype=attention_mask.dtype), attention_mask], dim=1)
  return body(input_ids=input_ids, attention_mask=mask, cache=cache)
