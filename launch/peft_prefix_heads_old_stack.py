"""Prefix tuning with a classification head, run by PEFT's own forward on an older stack: transformers 5 + PEFT 0.21
refuse it ("Model does not support past key values which are required for prefix tuning"), transformers 4.57 +
PEFT 0.17 run it. Two steps, two Python environments:

    python launch/peft_prefix_heads_old_stack.py make OUT                # transformers 5: adapters + our logits
    OLD_VENV/bin/python launch/peft_prefix_heads_old_stack.py check OUT  # transformers 4.57 + PEFT 0.17: PEFT's logits

`make` writes a random tiny Llama (GQA, no RoPE scaling: a config both transformers versions read alike), PEFT
PREFIX_TUNING adapters with random weights for SEQ_CLS and TOKEN_CLS, with and without the projection, and
jaxprompt's logits of each (`load_prompted`); `check` runs PEFT's forward there and prints the largest difference
(rows unpadded: PEFT's prefix forward passes input_ids, so transformers finds the last token either way).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

IDS = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
CASES = [(tt, proj) for tt in ("SEQ_CLS", "TOKEN_CLS") for proj in (False, True)]


def _cls(tt: str):
  import transformers

  return transformers.LlamaForTokenClassification if tt == "TOKEN_CLS" else transformers.LlamaForSequenceClassification


def make(out: Path) -> None:
  import transformers
  from peft import PrefixTuningConfig, get_peft_model

  from jaxprompt import load_prompted
  from jaxprompt.models import load_model

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  transformers.LlamaForCausalLM(cfg).save_pretrained(out / "base")
  base = load_model(out / "base")
  for tt, proj in CASES:
    name = f"{tt}_{'projection' if proj else 'table'}"
    torch.manual_seed(1)
    model = _cls(tt).from_pretrained(out / "base", num_labels=3)
    kw = dict(prefix_projection=True, encoder_hidden_size=24) if proj else {}
    pm = get_peft_model(model, PrefixTuningConfig(task_type=tt, num_virtual_tokens=4, **kw))
    with torch.no_grad():
      for p in pm.parameters():
        if p.requires_grad:
          p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(out / name)
    ours = np.asarray(load_prompted(base, out / name)(IDS, np.ones_like(IDS)))
    np.save(out / f"{name}.npy", ours)


def check(out: Path) -> None:
  import peft
  import transformers
  from peft import PeftModel

  worst = {}
  for tt, proj in CASES:
    name = f"{tt}_{'projection' if proj else 'table'}"
    model = _cls(tt).from_pretrained(out / "base", num_labels=3).eval()
    pm = PeftModel.from_pretrained(model, out / name).eval()
    with torch.no_grad():
      ref = pm(input_ids=torch.tensor(IDS), attention_mask=torch.ones(IDS.shape, dtype=torch.long)).logits.numpy()
    worst[name] = float(np.abs(np.load(out / f"{name}.npy") - ref).max())
  print(json.dumps(dict(transformers=transformers.__version__, peft=peft.__version__, max_abs_diff=worst)))


if __name__ == "__main__":
  {"make": make, "check": check}[sys.argv[1]](Path(sys.argv[2]))
