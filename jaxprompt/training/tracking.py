"""Where metrics go: a JSONL file, TensorBoard event files, and a PNG of the curves (process 0 only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax


class MetricsLog:
  def __init__(self, workdir: Path, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(workdir / "tb"))

  def write(self, step: int, metrics: dict, kind: str = "train") -> None:
    if not self.enabled:
      return
    rec = {"step": step, "kind": kind, **{k: _num(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    for k, v in rec.items():
      if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{kind}/{k}", v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _num(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(path: Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(workdir: Path, out: Path | None = None, metric: str = "accuracy") -> Path | None:
  """Training loss and eval curves from metrics.jsonl -> curves.png."""
  # A Figure without pyplot: no global backend switch, so a notebook's inline plots keep working.
  from matplotlib.figure import Figure

  recs = read_metrics(workdir / "metrics.jsonl")
  train = [r for r in recs if r.get("kind") == "train" and "loss" in r]
  evals = [r for r in recs if r.get("kind") == "eval"]
  if not train and not evals:
    return None
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  if train:
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
  if evals and "eval_loss" in evals[0]:
    axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("cross-entropy per target token")
  axes[0].set_yscale("log")
  axes[0].legend()
  axes[0].set_title("loss")
  tasks = [k for k in (evals[0] if evals else {}) if k.endswith(f"/{metric}")]  # a mixture: each task's too
  if evals and metric in evals[0]:
    axes[1].plot(
      [r["step"] for r in evals],
      [r[metric] for r in evals],
      "o-",
      color="C2",
      label=f"eval {metric}" + (" (mean over tasks)" if tasks else ""),
    )
  for i, key in enumerate(tasks):
    axes[1].plot(
      [r["step"] for r in evals],
      [r.get(key) for r in evals],
      "s--",
      color=f"C{3 + i % 7}",
      alpha=0.8,
      label=key.rsplit("/", 1)[0],
    )
  if train and "token_accuracy" in train[0]:
    axes[1].plot(
      [r["step"] for r in train],
      [r["token_accuracy"] for r in train],
      color="C1",
      alpha=0.6,
      label="train token accuracy",
    )
  axes[1].set_xlabel("step")
  axes[1].set_ylim(0, 1.02)
  axes[1].legend()
  axes[1].set_title("accuracy")
  fig.suptitle(workdir.name)
  fig.tight_layout()
  out = out or workdir / "curves.png"
  fig.savefig(out, dpi=100)
  return out
