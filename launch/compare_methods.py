"""Plain prompt tuning vs residual prompt tuning vs DePT on the offline quickstart task, several seeds and learning
rates: each method's shipped config (`configs/quickstart.yaml`, `configs/methods/residual.yaml`,
`configs/methods/dept.yaml`) swept with `jaxprompt sweep` over `optimizer.learning_rate` x `train.seed`, then one
table (dev accuracy mean +- std over the seeds, steps to reach a target accuracy) and one plot (accuracy against
the learning rate, one line per method).

    python launch/compare_methods.py --workdir runs/compare --lrs 0.01,0.1,0.3,1.0 --seeds 0,1,2
    python launch/compare_methods.py --suite sst2 --workdir runs/compare-sst2 --lrs 0.01,0.03,0.1,0.3 --target 0.6

`--suite sst2`: the real pretrained TinyStories-656K on SST-2 (configs/compare/), the three methods at one
trainable-parameter budget (2,560: 20 prompt tokens; DePT 8 tokens + a rank-8 offset over 64 positions; residual
prompt tuning 20 tokens, its MLP trained alongside and dropped at export).

Writes WORKDIR/<method>/ (the sweeps, resumable), WORKDIR/compare.md, WORKDIR/compare.json and WORKDIR/compare.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SUITES = {  # suite -> (method -> config, the plot's title)
  "quickstart": (
    {
      "prompt_tuning": ROOT / "configs" / "quickstart.yaml",
      "residual": ROOT / "configs" / "methods" / "residual.yaml",
      "dept": ROOT / "configs" / "methods" / "dept.yaml",
    },
    "quickstart (taskless)",
  ),
  "sst2": (  # the real pretrained TinyStories-656K on SST-2, 2,560 parameters each (the configs say how)
    {
      "prompt_tuning": ROOT / "configs" / "compare" / "sst2.yaml",
      "residual": ROOT / "configs" / "compare" / "sst2-residual.yaml",
      "dept": ROOT / "configs" / "compare" / "sst2-dept.yaml",
    },
    "SST-2 on TinyStories-656K",
  ),
}


def steps_to(workdir: Path, metric: str, target: float) -> int | None:
  """The first evaluated step whose `metric` reaches `target` (None: never)."""
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r.get("kind") == "eval" and r.get(metric, -1) >= target:
      return int(r["step"])
  return None


def run(
  workdir: Path,
  lrs: list[float],
  seeds: list[int],
  target: float,
  every: int,
  suite: str = "quickstart",
  methods: list[str] | None = None,
) -> dict:
  from jaxprompt.tools.sweep import sweep

  out = {}
  for method, config in SUITES[suite][0].items():
    if methods and method not in methods:
      continue
    grid = [("optimizer.learning_rate", lrs), ("train.seed", seeds)]
    rows = sweep(config, workdir / method, grid, overrides=[f"eval.every={every}"], progress=False)
    per_lr = {}
    for row in rows:
      lr = row["overrides"]["optimizer.learning_rate"]
      reach = steps_to(workdir / method / row["variant"], row["metric"], target)
      per_lr.setdefault(lr, []).append((row["best_value"], reach, row["train_seconds"]))
    out[method] = {
      str(lr): dict(
        accuracy=[a for a, _, _ in v], steps_to_target=[s for _, s, _ in v], train_seconds=[t for _, _, t in v]
      )
      for lr, v in per_lr.items()
    }
  return out


def table(results: dict, target: float) -> str:
  lrs = sorted({float(lr) for r in results.values() for lr in r})
  head = "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | mean over lrs |"
  lines = [head, "|---" * (len(lrs) + 2) + "|"]
  for method, r in results.items():
    cells, means = [], []
    for lr in lrs:
      acc = np.asarray(r[str(lr)]["accuracy"], float)
      reach = [s for s in r[str(lr)]["steps_to_target"] if s is not None]
      cells.append(
        f"{acc.mean():.3f} ± {acc.std():.3f} ({len(reach)}/{len(acc)} reach {target:g}"
        + (f", step {int(np.median(reach))}" if reach else "")
        + ")"
      )
      means.append(acc.mean())
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(means):.3f} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, title: str = "quickstart (taskless)") -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for method, r in results.items():
    lrs = sorted(float(lr) for lr in r)
    acc = [np.asarray(r[str(lr)]["accuracy"], float) for lr in lrs]
    ax.errorbar(lrs, [a.mean() for a in acc], yerr=[a.std() for a in acc], marker="o", capsize=3, label=method)
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("best dev accuracy (mean ± std over seeds)")
  ax.set_title(f"{title}: sensitivity to the learning rate")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="runs/compare")
  p.add_argument("--suite", choices=sorted(SUITES), default="quickstart", help="the task and configs compared")
  p.add_argument("--methods", default="", help="comma-separated subset of the suite's methods (default: all)")
  p.add_argument("--lrs", default="0.01,0.1,0.3,1.0")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--target", type=float, default=0.9, help="accuracy whose first evaluated step is reported")
  p.add_argument("--eval-every", type=int, default=50)
  args = p.parse_args()
  workdir = Path(args.workdir)
  results = run(
    workdir,
    [float(x) for x in args.lrs.split(",")],
    [int(x) for x in args.seeds.split(",")],
    args.target,
    args.eval_every,
    args.suite,
    [m for m in args.methods.split(",") if m],
  )
  (workdir / "compare.json").write_text(json.dumps(results, indent=2))
  (workdir / "compare.md").write_text(table(results, args.target))
  plot(results, workdir / "compare.png", SUITES[args.suite][1])
  print(table(results, args.target))


if __name__ == "__main__":
  main()
