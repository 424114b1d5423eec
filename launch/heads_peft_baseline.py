"""The PyTorch + PEFT side of the head configs (`configs/methods/p_tuning_v2_sst2.yaml`, `wnut17_token.yaml`) and
of `launch/heads_compare.py`: the same base (TinyStories-656K), data, batch size, steps, AdamW and linear schedule,
with transformers' LlamaForSequenceClassification / LlamaForTokenClassification and a PEFT adapter (SEQ_CLS /
TOKEN_CLS): `--method prompt_tuning` (SAMPLE_VOCAB init), `p_tuning` (its MLP encoder) or `prefix_tuning` (deep
prompts without projection: P-tuning v2). Prefix tuning with these task types does not run on transformers 5 +
PEFT 0.21 ("Model does not support past key values which are required for prefix tuning"); run it with a Python
that has transformers 4.57 + PEFT 0.17, where PEFT's forward runs it. Prints one JSON line: trained parameters,
median step time (batching, forward, backward, update; the first 5 steps left out) and the dev metric (accuracy;
entity F1 with jaxprompt's seqeval-equivalent `metrics.entity_metrics`).

    python launch/heads_peft_baseline.py --task sst2 --method prompt_tuning --steps 300 --lr 0.03 --seed 0
    OLD_VENV/bin/python launch/heads_peft_baseline.py --method prefix_tuning --lr 0.01

PEFT reads a sequence classifier's last position when it is given inputs_embeds (the prompt in front), so SST-2
rows are left-padded for prompt tuning and P-tuning (the last position is then each row's last real token, as
jaxprompt reads it). That is not the model jaxprompt trains: the pads then sit between the prompt and the
text, so the text's RoPE positions move away from the prompt by the row's padding (jaxprompt right-pads: the
prompt is next to the text). From the same start on the same batches this alone moved P-tuning's dev accuracy by
+1.8 to +4.6 points and prompt tuning's by -2.1 to +0.7 (`launch/heads_seq_parity.py`). Prefix tuning passes
input_ids (right-padded), and transformers finds the last real token.

TinyStories-656K stores its tied embedding as `lm_head.weight` with a safetensors alias, which a classification
model (no lm_head) does not read, in transformers 5.25 ("model.embed_tokens.weight | MISSING") as in 4.x: the
table is copied in (`_tie_embedding`).
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


def _batch(tok, examples, task: str, length: int, word_token: str = "first", left: bool = True):
  """(input_ids, attention_mask, labels) tensors; token labels on each word's first (or last) sub-token, -100
  elsewhere."""
  if task == "sst2":
    tok.padding_side = "left" if left else "right"
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


METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def _args(argv):
  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=["sst2", "wnut17"], default="sst2")
  ap.add_argument("--method", choices=METHODS, default="prompt_tuning", help="prefix_tuning: transformers 4.x only")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--lr", type=float, default=0.03)
  ap.add_argument("--length", type=int, default=16, help="virtual tokens")
  ap.add_argument("--max-length", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--word-token", choices=["first", "last"], default="last", help="token heads (as the config)")
  return ap.parse_args(argv)


def _peft_config(method: str, task_type, length: int):
  """PEFT's config of `method`: prompt tuning from sampled vocabulary rows, P-tuning with its MLP encoder, prefix
  tuning without projection (P-tuning v2's deep prompts; PEFT inits both tables N(0, 1), nn.Embedding's)."""
  import peft

  if method == "prompt_tuning":
    init = peft.PromptTuningInit.SAMPLE_VOCAB
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=length, prompt_tuning_init=init)
  if method == "p_tuning":
    return peft.PromptEncoderConfig(
      task_type=task_type, num_virtual_tokens=length, encoder_reparameterization_type="MLP"
    )
  return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=length, prefix_projection=False)


def _model(args):
  from peft import TaskType, get_peft_model
  from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

  seq = args.task == "sst2"
  cls, tt = (
    (LlamaForSequenceClassification, TaskType.SEQ_CLS) if seq else (LlamaForTokenClassification, TaskType.TOKEN_CLS)
  )
  model = cls.from_pretrained(BASE, num_labels=2 if seq else 13, pad_token_id=0)
  _tie_embedding(model)
  return get_peft_model(model, _peft_config(args.method, tt, args.length))


def _tie_embedding(model) -> None:
  """TinyStories-656K stores its tied embedding once, as `lm_head.weight` (safetensors alias metadata): a
  classification model has no lm_head to tie it to, so transformers (5.25 as 4.x) leaves `embed_tokens` random."""
  from safetensors.numpy import load_file

  table = torch.from_numpy(load_file(BASE / "model.safetensors")["lm_head.weight"])
  with torch.no_grad():
    model.model.embed_tokens.weight.copy_(table)


def _train(pm, tok, train, args) -> list[float]:
  """AdamW + linear decay over the steps -> each step's wall seconds (batching, forward, backward, update)."""
  from transformers import get_linear_schedule_with_warmup

  opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
  sched = get_linear_schedule_with_warmup(opt, 0, args.steps)
  rng = np.random.default_rng(args.seed)
  order, times, skip = rng.permutation(len(train)), [], _virtual(args)
  pm.train()
  for step in range(args.steps):
    t = time.perf_counter()
    idx = [order[(step * args.batch + i) % len(train)] for i in range(args.batch)]
    ids, mask, y = _batch(tok, [train[i] for i in idx], args.task, args.max_length, args.word_token, _left(args))
    logits = pm(input_ids=ids, attention_mask=mask).logits
    logits = logits if args.task == "sst2" else logits[:, skip:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
  return times


def _left(args) -> bool:
  """Left padding where PEFT feeds inputs_embeds to a sequence classifier (it then reads the last position; the pads
  sit between the prompt and the text); prefix tuning passes input_ids, and transformers finds the last real
  token."""
  return args.task == "sst2" and args.method != "prefix_tuning"


def _virtual(args) -> int:
  """Token logits PEFT returns in front of the real ones (embedding prompts: P; a prefix takes no positions)."""
  return 0 if args.method == "prefix_tuning" else args.length


def _evaluate(pm, tok, dev, args) -> dict:
  from jaxprompt import metrics as M

  pm.eval()
  preds = []
  with torch.no_grad():
    for i in range(0, len(dev), 128):
      chunk = dev[i : i + 128]
      ids, mask, y = _batch(tok, chunk, args.task, args.max_length, args.word_token, _left(args))
      logits = pm(input_ids=ids, attention_mask=mask).logits
      if args.task == "sst2":
        preds += logits.argmax(-1).tolist()
        continue
      p = logits[:, _virtual(args) :].argmax(-1)
      for j, e in enumerate(chunk):
        got = p[j][y[j] != -100].tolist()[: len(e["words"])]
        preds.append(got + [0] * (len(e["words"]) - len(got)))
  if args.task == "sst2":
    return {"accuracy": M.accuracy([e["label"] for e in dev], preds)}
  from jaxprompt.data.tasks import WNUT17_TAGS

  gold = [[WNUT17_TAGS[t] for t in e["tags"]] for e in dev]
  return M.entity_metrics(gold, [[WNUT17_TAGS[t] for t in p] for p in preds])


def main(argv=None) -> dict:
  import peft
  import transformers
  from transformers import AutoTokenizer

  args = _args(argv)
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  train, dev = _data(args.task)
  tok = AutoTokenizer.from_pretrained(BASE)
  pm = _model(args)
  trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
  times = _train(pm, tok, train, args)
  metric = _evaluate(pm, tok, dev, args)
  result = dict(
    task=args.task,
    method=args.method,
    seed=args.seed,
    transformers=transformers.__version__,
    peft=peft.__version__,
    trainable_parameters=trainable,
    step_seconds=float(np.median(times[5:])),
    **{k: round(v, 4) for k, v in metric.items()},
  )
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
