"""The PyTorch + PEFT side of the head configs (`configs/methods/p_tuning_v2_sst2.yaml`, `wnut17_token.yaml`):
the same base (TinyStories-656K), data, batch size, steps, AdamW and linear schedule, with transformers'
LlamaForSequenceClassification / LlamaForTokenClassification and a PEFT prompt-tuning adapter (SEQ_CLS /
TOKEN_CLS). Prefix tuning (deep prompts) with these task types does not run on transformers 5 + PEFT 0.21
("Model does not support past key values which are required for prefix tuning"), so the PEFT side is prompt
tuning only. Prints trained parameters, mean step time and the dev metric (accuracy; entity F1 with jaxprompt's
seqeval-equivalent `metrics.entity_metrics`).

    python launch/heads_peft_baseline.py --task sst2 --steps 300 --lr 0.03 --seed 0

PEFT reads a sequence classifier's last position when it is given inputs_embeds (the prompt in front), so SST-2
rows are left-padded here (the last position is then each row's last real token, as jaxprompt reads it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT.parent / "shared" / "fixtures"
BASE = FIX / "models" / "tinystories-656k"


def _data(task: str):
  from jaxprompt.data.sources import load_split

  if task == "sst2":
    files = {"train": FIX / "data/sst2/train.txt", "validation": FIX / "data/sst2/dev.txt"}
  else:
    d = FIX / "data/wnut17"
    files = {"train": d / "wnut17train.conll", "validation": d / "emerging.dev.conll"}
  return [load_split(task, s, files=files) for s in ("train", "validation")]


def _batch(tok, examples, task: str, length: int, word_token: str = "first"):
  """(input_ids, attention_mask, labels) tensors; token labels on each word's first (or last) sub-token, -100
  elsewhere."""
  if task == "sst2":
    tok.padding_side = "left"
    enc = tok([e["inputs"] for e in examples], padding=True, truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([e["label"] for e in examples])
  tok.padding_side = "right"
  enc = tok([e["words"] for e in examples], is_split_into_words=True, padding=True, truncation=True, max_length=length)
  labels = []
  for i, e in enumerate(examples):
    words = enc.word_ids(i) if word_token == "first" else enc.word_ids(i)[::-1]
    prev, row = None, []
    for w in words:
      row.append(-100 if w is None or w == prev else e["tags"][w])
      prev = w
    labels.append(row if word_token == "first" else row[::-1])
  return torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]), torch.tensor(labels)


def main(argv=None) -> dict:
  from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
  from transformers import (
    AutoTokenizer,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    get_linear_schedule_with_warmup,
  )

  from jaxprompt import metrics as M

  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=["sst2", "wnut17"], default="sst2")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=0.03)
  ap.add_argument("--length", type=int, default=16, help="virtual tokens")
  ap.add_argument("--max-length", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--word-token", choices=["first", "last"], default="last", help="token heads (as the config)")
  args = ap.parse_args(argv)
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  train, dev = _data(args.task)
  tok = AutoTokenizer.from_pretrained(BASE)
  labels = 2 if args.task == "sst2" else 13
  cls, tt = (
    (LlamaForSequenceClassification, TaskType.SEQ_CLS)
    if args.task == "sst2"
    else (LlamaForTokenClassification, TaskType.TOKEN_CLS)
  )
  model = cls.from_pretrained(BASE, num_labels=labels, pad_token_id=0)
  cfg = PromptTuningConfig(
    task_type=tt, num_virtual_tokens=args.length, prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB
  )
  pm = get_peft_model(model, cfg)
  trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
  sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
  rng = np.random.default_rng(args.seed)
  order, times = rng.permutation(len(train)), []
  pm.train()
  for step in range(args.steps):
    idx = [order[(step * args.batch + i) % len(train)] for i in range(args.batch)]
    ids, mask, y = _batch(tok, [train[i] for i in idx], args.task, args.max_length, args.word_token)
    t = time.perf_counter()
    out = pm(input_ids=ids, attention_mask=mask)
    logits = out.logits if args.task == "sst2" else out.logits[:, args.length :]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, labels), y.reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
  pm.eval()
  preds = []
  with torch.no_grad():
    for i in range(0, len(dev), 128):
      chunk = dev[i : i + 128]
      ids, mask, y = _batch(tok, chunk, args.task, args.max_length, args.word_token)
      logits = pm(input_ids=ids, attention_mask=mask).logits
      if args.task == "sst2":
        preds += logits.argmax(-1).tolist()
      else:
        p = logits[:, args.length :].argmax(-1)
        for j, e in enumerate(chunk):
          got = p[j][y[j] != -100].tolist()[: len(e["words"])]
          preds.append(got + [0] * (len(e["words"]) - len(got)))
  if args.task == "sst2":
    metric = {"accuracy": M.accuracy([e["label"] for e in dev], preds)}
  else:
    from jaxprompt.data.tasks import WNUT17_TAGS

    gold = [[WNUT17_TAGS[t] for t in e["tags"]] for e in dev]
    metric = M.entity_metrics(gold, [[WNUT17_TAGS[t] for t in p] for p in preds])
  result = dict(
    task=args.task,
    seed=args.seed,
    trainable_parameters=trainable,
    step_seconds=float(np.mean(times[5:])),
    **{k: round(v, 4) for k, v in metric.items()},
  )
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
