"""Cartridges on the real TinyStories-656K: how close a cartridge of P slots comes to the model with a whole
context in front, and what serving it saves.

The context is configs/methods/cartridge_context.txt (three stories TinyStories-656K sampled itself, 391 tokens with
BOS; the model's window is 512 positions, so context + query stays inside it). For each cartridge length P:

- a cartridge initialised from the context's first P tokens (one frozen sink slot) is distilled for --steps full-batch
  Adam steps on the context's 64-token chunks plus 32 continuations the model sampled after the context
  (`jaxprompt distill`'s queries: `training.distill`);
- KL(teacher || student) per token on HELD-OUT queries: 16 other sampled continuations (another seed), where the
  teacher is the model with the whole context in front. Before distillation the cartridge *is* the first P tokens in
  front (exactly), so "before" is that truncation; also shown: the last P tokens (BOS + the last P - 1) and no
  context at all;
- serving: the key/value bytes a cartridge holds against the whole context's (float32), and greedy generation
  tokens/s (8 rows, a 16-token query, 64 new tokens, prefill included) with the cartridge against the same queries
  with the whole context in front, timed side by side in this process.

    python launch/cartridge_report.py --out docs/images/cartridge-tinystories

Writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.config import OptimizerConfig
from jaxprompt.inference.decoding import generate
from jaxprompt.models.loading import load_model, load_tokenizer
from jaxprompt.prompts import PromptedModel
from jaxprompt.prompts.cartridge import Cartridge, text_table
from jaxprompt.prompts.params import PromptParam
from jaxprompt.training.distill import (
  context_chunks,
  kl_to_teacher,
  make_distill_step,
  teacher_logprobs,
  teacher_samples,
)
from jaxprompt.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT.parent / "shared" / "fixtures" / "models" / "tinystories-656k"
CONTEXT = ROOT / "configs" / "methods" / "cartridge_context.txt"


def held_out_kl(base, prefix_ids, queries, teacher) -> float:
  """Mean KL(teacher || the model with `prefix_ids` in front) over the queries' tokens."""
  return float(jnp.mean(kl_to_teacher(_logits_after(base, prefix_ids, queries), teacher)))


def _logits_after(base, prefix_ids, queries):
  q = jnp.asarray(queries)
  if len(prefix_ids) == 0:
    return base.forward(q, jnp.ones_like(q))
  ctx = jnp.broadcast_to(jnp.asarray(prefix_ids, jnp.int32)[None], (q.shape[0], len(prefix_ids)))
  ids = jnp.concatenate([ctx, q], axis=1)
  return base.forward(ids, jnp.ones_like(ids))[:, len(prefix_ids) :]


def distil(base, tok, text, length: int, train, held, *, steps: int, lr: float) -> dict:
  """One cartridge of `length` slots: the KL on the training queries along the way, held-out KL before and after."""
  cartridge = Cartridge(base.prefix_slots(), table=text_table(base, tok, text, length), frozen_tokens=1)
  graphdef, prompt, frozen = nnx.split(PromptedModel(base, cartridge), PromptParam, ...)
  tx = build_optimizer(OptimizerConfig(name="adam", learning_rate=lr, weight_decay=0.0), steps, {"sink": 0.0})
  step, loss = make_distill_step(graphdef, tx)
  opt = tx.init(prompt)
  held_before = float(loss(prompt, frozen, *held))
  curve, t0 = [], time.time()
  for i in range(steps):
    prompt, opt, kl = step(prompt, opt, frozen, *train)
    if i % 10 == 0:
      curve.append([i, float(kl)])
  curve.append([steps, float(loss(prompt, frozen, *train))])
  seconds = time.time() - t0
  nnx.update(cartridge, prompt["prompt"])
  return dict(
    length=length,
    train_kl=curve,
    held_out_kl_before=held_before,
    held_out_kl_after=float(loss(prompt, frozen, *held)),
    distill_seconds=round(seconds, 1),
    cartridge=cartridge,
  )


def tokens_per_second(base, ids, prefix=None, *, new: int, repeats: int = 3) -> float:
  """Greedy generation of `new` tokens for every row (no early stop), prefill included; the best of `repeats`
  after one warm-up call."""
  run = lambda: generate(base, input_ids=ids, prefix=prefix, max_new_tokens=new, eos_id=-1)["tokens"]  # noqa: E731
  jax.block_until_ready(run())
  best = min(_timed(run) for _ in range(repeats))
  return ids.shape[0] * new / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def serving(base, cartridge, context_ids, queries, *, new: int) -> dict:
  """Key/value bytes and generation tokens/s: the cartridge in front against the whole context in front."""
  slots = base.prefix_slots()
  per_token = slots.layers * 2 * slots.heads * slots.head_dim * 4  # float32 keys and values of one position
  q = jnp.asarray(queries)
  whole = jnp.concatenate([jnp.broadcast_to(jnp.asarray(context_ids)[None], (q.shape[0], len(context_ids))), q], 1)
  prefix = PromptedModel(base, cartridge).prefix(q.shape[0])
  with_cartridge = tokens_per_second(base, q, prefix, new=new)
  with_context = tokens_per_second(base, whole, new=new)
  return dict(
    cartridge_kv_bytes=cartridge.length * per_token,
    context_kv_bytes=len(context_ids) * per_token,
    memory_ratio=len(context_ids) / cartridge.length,
    tokens_per_second_cartridge=round(with_cartridge, 1),
    tokens_per_second_context=round(with_context, 1),
    throughput_ratio=round(with_cartridge / with_context, 3),
  )


def material(base, tok, text: str, chunk: int, samples: int, held_out: int):
  """(context ids, training (queries, teacher), held-out (queries, teacher)): the context's chunks plus sampled
  continuations to train on; continuations of another seed to measure on."""
  ids = tok(text)["input_ids"]
  train_q = np.concatenate([context_chunks(ids, chunk), teacher_samples(base, ids, samples, chunk, seed=0)])
  held_q = teacher_samples(base, ids, held_out, chunk, seed=1)
  train = (jnp.asarray(train_q), teacher_logprobs(base, ids, train_q))
  held = (jnp.asarray(held_q), teacher_logprobs(base, ids, held_q))
  return ids, train, held


def baselines(base, ids, held, length: int) -> dict:
  """Held-out KL with a truncated context of `length` tokens in front: its first tokens (what the cartridge starts
  as), BOS and its last length - 1 tokens."""
  q, teacher = held
  return dict(
    held_out_kl_first_tokens=held_out_kl(base, ids[:length], q, teacher),
    held_out_kl_last_tokens=held_out_kl(base, ids[:1] + ids[len(ids) - length + 1 :], q, teacher),
  )


def plot(report: dict, out: Path) -> None:
  from matplotlib.figure import Figure

  rows = report["lengths"]
  ps = [r["length"] for r in rows]
  fig = Figure(figsize=(12, 4.2))
  a, b = fig.subplots(1, 2)
  a.plot(ps, [r["held_out_kl_after"] for r in rows], "o-", label="cartridge, distilled")
  a.plot(ps, [r["held_out_kl_first_tokens"] for r in rows], "s--", label="first P tokens (= cartridge before)")
  a.plot(ps, [r["held_out_kl_last_tokens"] for r in rows], "^--", label="BOS + last P - 1 tokens")
  a.axhline(report["held_out_kl_no_context"], color="gray", ls=":", label="no context (BOS only)")
  a.set_xscale("log", base=2)
  a.set_xticks(ps, [str(p) for p in ps])
  a.set_xlabel(f"cartridge / truncated context length P (context: {report['context_tokens']} tokens)")
  a.set_ylabel("KL(model with the whole context || ...) per token")
  a.set_title("held-out continuations")
  a.legend(fontsize=8)
  x = np.arange(len(ps))
  b.bar(x - 0.2, [r["memory_ratio"] for r in rows], 0.4, label="KV memory saved (context / cartridge)")
  b.bar(x + 0.2, [r["throughput_ratio"] for r in rows], 0.4, label="tokens/s, cartridge / context in front")
  b.set_xticks(x, [str(p) for p in ps])
  b.set_xlabel("cartridge length P")
  b.set_ylabel("ratio")
  b.set_title(f"serving ({report['device']})")
  b.legend(fontsize=8)
  fig.suptitle("Cartridges on TinyStories-656K")
  fig.tight_layout()
  fig.savefig(out, dpi=100)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=str(MODEL))
  ap.add_argument("--context", default=str(CONTEXT))
  ap.add_argument("--lengths", default="16,32,64,128")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--lr", type=float, default=1e-2)
  ap.add_argument("--samples", type=int, default=32, help="sampled continuations to train on")
  ap.add_argument("--held-out", type=int, default=16, help="sampled continuations (another seed) to measure on")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "cartridge-tinystories"))
  args = ap.parse_args()
  base, tok = load_model(args.model), load_tokenizer(args.model)
  text = Path(args.context).read_text()
  ids, train, held = material(base, tok, text, 64, args.samples, args.held_out)
  report = dict(
    model=Path(args.model).name,
    device=f"{jax.devices()[0].platform}, {jax.device_count()} device(s)",
    context_tokens=len(ids),
    chunk=64,
    train_queries=int(train[0].shape[0]),
    held_out_queries=int(held[0].shape[0]),
    steps=args.steps,
    learning_rate=args.lr,
    held_out_kl_no_context=held_out_kl(base, ids[:1], *held),
    lengths=[],
  )
  for length in map(int, args.lengths.split(",")):
    row = distil(base, tok, text, length, train, held, steps=args.steps, lr=args.lr)
    row.update(baselines(base, ids, held, length))
    row.update(serving(base, row.pop("cartridge"), ids, held[0][:8, :16], new=args.new_tokens))
    report["lengths"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "train_kl"}), flush=True)
  out = Path(args.out)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out.with_suffix(".png"))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
