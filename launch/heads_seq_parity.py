"""The SST-2 P-tuning (`--method prompt_tuning`: prompt-tuning) recipe of `launch/heads_compare.py` (sequence head,
TinyStories-656K) run by jaxprompt and by PyTorch + PEFT from the SAME start (prompt, P-tuning's encoder and head
copied from jaxprompt's initial state) on the SAME batches (jaxprompt's stream, recorded), with the same AdamW and
linear decay: per-step losses and dev accuracy side by side.

PEFT is run two ways on those batches:
- `right`: right-padded rows, the head's output read at each row's last real token (P + n - 1, a hook on `score`):
  what jaxprompt computes (and transformers would pick from input_ids);
- `left`: left-padded rows, transformers' pooled last position, as `launch/heads_peft_baseline.py` runs PEFT (it
  is given `inputs_embeds`, so it cannot find the last real token): the pads then sit between the prompt and the
  text and move the text's RoPE positions away from the prompt by the row's padding.

    python launch/heads_seq_parity.py --seeds 0,1,2 --out runs/heads-seq-parity.json
    python launch/heads_seq_parity.py --method prompt_tuning --lr 3e-2 --seeds 0,1,2 --out ...

Prints one JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "methods" / "p_tuning_v2_sst2.yaml"
BASE = ROOT.parent / "shared" / "fixtures" / "models" / "tinystories-656k"
# method -> our prompt.* settings (as launch/heads_compare.py)
PROMPTS = {
  "p_tuning": {"method": "p_tuning", "init": "random_normal", "encoder_reparameterization_type": "MLP"},
  "prompt_tuning": {"method": "prompt_tuning", "init": "sampled_vocab"},
}


def ours(args, seed: int, workdir: Path):
  """jaxprompt's run -> (initial state's prompt tree, per-step losses, batches, dev accuracy)."""
  import jax

  from jaxprompt import api, sharding
  from jaxprompt.run import build_run
  from jaxprompt.training.trainer import fit_recorded

  overrides = {f"prompt.{k}": v for k, v in PROMPTS[args.method].items()}
  overrides |= {
    "optimizer.learning_rate": args.lr,
    "train.steps": args.steps,
    "train.batch_size": args.batch,
    "train.seed": seed,
    "train.log_every": 1,
    "eval.every": args.steps,
    "checkpoint.every": args.steps,
    "checkpoint.keep": 1,
  }
  cfg = api.load_config(CONFIG, overrides)
  run, data = build_run(cfg, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  fit = fit_recorded(run, workdir, data)
  return fit.initial, fit.losses, fit.batches, float(fit.state.best.value)


def peft_model(initial: dict, length: int):
  """LlamaForSequenceClassification + PEFT prompt tuning or P-tuning (MLP) holding jaxprompt's initial head and
  prompt (encoder)."""
  from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
  from safetensors.numpy import load_file
  from transformers import LlamaForSequenceClassification

  base = LlamaForSequenceClassification.from_pretrained(BASE, num_labels=2, pad_token_id=0, dtype=torch.float32)
  p = initial["prompt"]
  with torch.no_grad():
    base.model.embed_tokens.weight.copy_(torch.from_numpy(load_file(BASE / "model.safetensors")["lm_head.weight"]))
    base.score.weight.copy_(torch.tensor(initial["head"]["out"].T))
  if "embeddings" in p:  # prompt tuning
    model = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=length))
    with torch.no_grad():
      model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(p["embeddings"]))
    return model
  e = p["mlp"]["l0"]["w"].shape[1]
  cfg = PromptEncoderConfig(
    task_type="SEQ_CLS", num_virtual_tokens=length, encoder_reparameterization_type="MLP", encoder_hidden_size=e
  )
  model = get_peft_model(base, cfg)
  enc = model.prompt_encoder["default"]
  with torch.no_grad():
    enc.embedding.weight.copy_(torch.tensor(p["embedding"]))
    for i, layer in enumerate((0, 2, 4)):
      enc.mlp_head[layer].weight.copy_(torch.tensor(p["mlp"][f"l{i}"]["w"].T))
      enc.mlp_head[layer].bias.copy_(torch.tensor(p["mlp"][f"l{i}"]["b"]))
  return model


def logits(model, ids: np.ndarray, mask: np.ndarray, pad: str, length: int) -> torch.Tensor:
  """Right-padded rows [B, L] -> [B, C]: `right` reads the head at P + n - 1; `left` left-pads (to the longest row)
  and takes transformers' pooled last position."""
  n = mask.sum(axis=1)
  ids, mask = ids[:, : n.max()], mask[:, : n.max()]
  if pad == "left":
    shift = ids.shape[1] - n
    ids = np.stack([np.roll(r, s) for r, s in zip(ids, shift, strict=True)])
    mask = np.stack([np.roll(r, s) for r, s in zip(mask, shift, strict=True)])
    return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
  seen = []
  hook = model.base_model.score.register_forward_hook(lambda mod, a, out: seen.append(out))
  try:
    model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  finally:
    hook.remove()
  return seen[0][torch.arange(len(n)), torch.from_numpy(length + n - 1)]


def peft_run(model, batches, dev, args, pad: str) -> tuple[list[float], float]:
  """AdamW (no weight decay) + linear decay over jaxprompt's batches -> (per-step losses, dev accuracy)."""
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / args.steps)
  losses = []
  model.train()
  for b in batches:
    y = torch.from_numpy(np.asarray(b.labels)[:, 0]).long()
    loss = torch.nn.functional.cross_entropy(
      logits(model, np.asarray(b.input_ids), np.asarray(b.input_mask), pad, 16), y
    )
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    losses.append(loss.item())
  model.eval()
  right = 0
  with torch.no_grad():
    for i in range(0, dev.size, 128):
      ids, mask = np.asarray(dev.input_ids[i : i + 128]), np.asarray(dev.input_mask[i : i + 128])
      pred = logits(model, ids, mask, pad, 16).argmax(-1).numpy()
      right += int((pred == np.asarray(dev.labels[i : i + 128])[:, 0]).sum())
  return losses, right / dev.size


def dev_batch():
  """SST-2's dev split as jaxprompt encodes it for a sequence head (right-padded to 128)."""
  from transformers import AutoTokenizer

  from jaxprompt.data import encoding
  from jaxprompt.data.sources import load_split

  fx = ROOT.parent / "shared" / "fixtures" / "data" / "sst2"
  dev = load_split("sst2", "validation", files={"train": fx / "train.txt", "validation": fx / "dev.txt"})
  return encoding.encode_sequence_labels(dev, AutoTokenizer.from_pretrained(BASE), input_length=128, name="dev")


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser()
  ap.add_argument("--method", choices=list(PROMPTS), default="p_tuning")
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--lr", type=float, default=3e-3, help="heads_compare's: 3e-3 P-tuning, 3e-2 prompt tuning")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "heads-seq-parity")
  ap.add_argument("--out", type=Path, default=None)
  args = ap.parse_args(argv)
  torch.set_num_threads(1)
  dev, out = dev_batch(), []
  for seed in [int(s) for s in args.seeds.split(",")]:
    initial, losses, batches, acc = ours(args, seed, args.workdir / f"seed{seed}")
    row = dict(method=args.method, seed=seed, jaxprompt=dict(accuracy=acc, first_loss=losses[0], last_loss=losses[-1]))
    for pad in ("right", "left"):
      theirs, pacc = peft_run(peft_model(initial, 16), batches, dev, args, pad)
      rel = np.abs(np.asarray(losses) - np.asarray(theirs)) / np.abs(np.asarray(theirs))
      row[f"peft_{pad}"] = dict(
        accuracy=pacc, max_rel_loss_diff=float(rel.max()), first_step_rel_diff=float(rel[0]), last_loss=theirs[-1]
      )
    out.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    args.out.write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  main()
