"""jaxprompt and PyTorch + PEFT side by side on one head recipe: SST-2 with a sequence head on TinyStories-656K
(a real pretrained Llama, `../shared/fixtures`), the same steps, batch size, AdamW (no weight decay), linear decay
and prompt length, several seeds, runs interleaved (seed by seed, method by method) so both sides see the same
machine load. Each side gets one CPU thread (torch.set_num_threads(1); XLA's Eigen pool off), so the step-time
ratio is per core and does not swing with other jobs taking the second core.

    python launch/heads_compare.py --workdir runs/heads-compare --steps 150 --batch 16 --seeds 0,1,2 \\
        --old-python /path/to/venv-transformers-4.57/bin/python

Methods (prompt length 16): prompt tuning (init from sampled vocabulary rows; PEFT SAMPLE_VOCAB), P-tuning with
its MLP encoder (init N(0, 1), PEFT's nn.Embedding), and P-tuning v2 = prefix tuning without projection + the head
(init N(0, 1)). PEFT 0.21 on transformers 5 cannot run prefix tuning with a classification head ("Model does not
support past key values ..."): its side runs in `--old-python` (transformers 4.57 + PEFT 0.17, where PEFT's forward
runs it); without one that row has no PEFT numbers. The PEFT side is `launch/heads_peft_baseline.py`, one process
per run. Step time: the median wall time of a training step, batching included (jaxprompt: of its 10-step log
windows, the first, which compiles, left out; PEFT: of its steps, the first 5 left out). jaxprompt pads to length
buckets (64, 96, 128), PEFT to each batch's longest row.

`--task wnut17`: the same with a token head (`configs/methods/wnut17_token.yaml`, `word_token: last` on both sides;
PEFT TOKEN_CLS), scored by entity F1 (and per-word tag accuracy), written to WORKDIR/heads-compare-wnut17.json.

Writes WORKDIR/<method>-<side>-seed<N>/ (jaxprompt's runs) and WORKDIR/heads-compare.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# task -> (config, dev metric)
TASKS = {
  "sst2": (ROOT / "configs" / "methods" / "p_tuning_v2_sst2.yaml", "accuracy"),
  "wnut17": (ROOT / "configs" / "methods" / "wnut17_token.yaml", "entity_f1"),
}
# method -> (our prompt.* overrides, learning rate)
METHODS = {
  "prompt_tuning": ({"method": "prompt_tuning", "init": "sampled_vocab"}, 3e-2),
  "p_tuning": ({"method": "p_tuning", "init": "random_normal", "encoder_reparameterization_type": "MLP"}, 3e-3),
  "prefix_tuning": ({"method": "prefix_tuning", "init": "random_uniform"}, 1e-2),
}


def ours(method: str, seed: int, args, workdir: Path) -> dict:
  """One jaxprompt run -> {trainable_parameters, step_seconds, metric}."""
  import jax

  from jaxprompt import api
  from jaxprompt.prompts.io import load_prompt_source

  prompt, lr = METHODS[method]
  overrides = {f"prompt.{k}": v for k, v in prompt.items()}
  overrides.update(
    {
      "prompt.length": args.length,
      "optimizer.learning_rate": lr,
      "train.steps": args.steps,
      "train.batch_size": args.batch,
      "train.seed": seed,
      "train.log_every": 10,
      "eval.every": args.steps,
      "checkpoint.every": args.steps,
      "checkpoint.keep": 1,
    }
  )
  result = api.train(TASKS[args.task][0], workdir, **overrides)
  src = load_prompt_source(str(workdir), "latest")
  trained = sum(np.size(x) for x in jax.tree_util.tree_leaves(src.params))  # the prompt (encoders included)
  params = int(trained + sum(np.size(v) for v in (src.head or {}).values()))
  rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
  times = [r["step_time"] for r in rows if "step_time" in r][1:]
  extra = {k: v for k, v in [r for r in rows if r.get("kind") == "eval"][-1].items() if k == "tag_accuracy"}
  return dict(trainable_parameters=params, step_seconds=float(np.median(times)), metric=result.best_value, **extra)


def peft(method: str, seed: int, args) -> dict | None:
  """One PEFT run in a subprocess (prefix tuning in `--old-python`) -> its JSON line, or None when it cannot run."""
  python = args.old_python if method == "prefix_tuning" else sys.executable
  if not python:
    return None
  lr = METHODS[method][1]
  cmd = [python, str(ROOT / "launch" / "heads_peft_baseline.py"), "--task", args.task, "--method", method]
  cmd += ["--seed", str(seed)]
  cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(lr), "--length", str(args.length)]
  cmd += ["--threads", "1"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  r = json.loads(out.strip().splitlines()[-1])
  return dict(r, metric=r[TASKS[args.task][1]])


def summary(runs: list[dict]) -> dict:
  """Per method and side: parameters, step time and the dev metric (mean, sd over seeds); the PEFT / jaxprompt step-time
  ratio per seed (one pair, same load), then its mean."""
  out = {}
  for method in METHODS:
    row = {}
    for side in ("jaxprompt", "peft"):
      rs = [r for r in runs if r["method"] == method and r["side"] == side]
      if not rs:
        continue
      acc = [r["metric"] for r in rs]
      row[side] = dict(
        trainable_parameters=rs[0]["trainable_parameters"],
        step_seconds=float(np.mean([r["step_seconds"] for r in rs])),
        metric=acc,
        metric_mean=float(np.mean(acc)),
        metric_sd=float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
        stack=rs[0].get("stack", "jaxprompt"),
      )
      if all("tag_accuracy" in r for r in rs):  # token heads: per-word accuracy beside entity F1
        row[side]["tag_accuracy_mean"] = float(np.mean([r["tag_accuracy"] for r in rs]))
    pairs = {}
    for r in runs:
      if r["method"] == method:
        pairs.setdefault(r["seed"], {})[r["side"]] = r["step_seconds"]
    ratios = [p["peft"] / p["jaxprompt"] for p in pairs.values() if len(p) == 2]
    if ratios:
      row["peft_over_jaxprompt_step_time"] = float(np.mean(ratios))
    out[method] = row
  return out


def table(s: dict, metric: str) -> str:
  lines = [
    f"| method | side | trainable parameters | step time (ms) | PEFT / jaxprompt step time | dev {metric} |",
    "|---|---|---|---|---|---|",
  ]
  for method, row in s.items():
    for side in ("jaxprompt", "peft"):
      if side not in row:
        continue
      r = row[side]
      ratio = (
        f"{row['peft_over_jaxprompt_step_time']:.2f}x"
        if side == "peft" and "peft_over_jaxprompt_step_time" in row
        else ""
      )
      acc = f"{100 * r['metric_mean']:.1f} ± {100 * r['metric_sd']:.1f}%"
      acc += f" (tag accuracy {100 * r['tag_accuracy_mean']:.1f}%)" if "tag_accuracy_mean" in r else ""
      ms = 1000 * r["step_seconds"]
      lines.append(f"| {method} | {r['stack']} | {r['trainable_parameters']:,} | {ms:.0f} | {ratio} | {acc} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--task", choices=list(TASKS), default="sst2", help="sst2: a sequence head; wnut17: a token head")
  ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "heads-compare")
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--length", type=int, default=16)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--old-python", default=None, help="a Python with transformers 4.x + PEFT 0.17 (prefix tuning)")
  args = ap.parse_args(argv)
  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for method in args.methods.split(","):
      r = ours(method, seed, args, args.workdir / f"{method}-jaxprompt-seed{seed}")
      runs.append(dict(r, method=method, seed=seed, side="jaxprompt"))
      p = peft(method, seed, args)
      if p is not None:
        stack = f"PEFT {p['peft']} + transformers {p['transformers']}"
        runs.append(dict(p, method=method, seed=seed, side="peft", stack=stack))
      print(json.dumps(runs[-2:]), flush=True)
  result = dict(
    setup=dict(
      task=args.task,
      metric=TASKS[args.task][1],
      steps=args.steps,
      batch=args.batch,
      length=args.length,
      lrs={m: METHODS[m][1] for m in METHODS},
    ),
    runs=runs,
    summary=summary(runs),
  )
  args.workdir.mkdir(parents=True, exist_ok=True)
  name = "heads-compare.json" if args.task == "sst2" else f"heads-compare-{args.task}.json"
  tmp = args.workdir / f"{name}.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  tmp.rename(args.workdir / name)
  print(table(result["summary"], TASKS[args.task][1]))
  return result


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  main()
