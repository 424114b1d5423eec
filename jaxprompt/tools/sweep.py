"""`jaxprompt sweep`: hyper-parameter variants of one config, trained one after another on one loaded frozen model.

  jaxprompt sweep CONFIG --grid optimizer.learning_rate=0.3,0.01 --grid prompt.length=20,100 --workdir runs/sweep

Every combination of the grid (a cartesian product) is a variant with its own workdir (WORKDIR/<key=value,...>,
resumable like any run); the base model is loaded once and shared (variants differing in the model section load
theirs once each), and XLA's persistent compilation cache (WORKDIR/xla_cache) hands a variant every program an
earlier one compiled with the same shapes (the eval programs across learning rates, everything across seeds).
Written at the end: WORKDIR/sweep.json and sweep.md (one row per variant: the best dev metric, its step, time) and
sweep.png (the dev metric per variant).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

from jaxprompt import config as C
from jaxprompt.errors import ConfigError
from jaxprompt.fileio import write_file_atomically

log = logging.getLogger(__name__)


def _value(text: str) -> Any:
  """A number (1e-2 too, which YAML 1.1 reads as a string), else the YAML value (true, null, a word)."""
  import yaml

  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return yaml.safe_load(text)


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
  """["section.key=v1,v2", ...] -> [(key, [v1, v2]), ...] (values as --set reads them; numbers always numbers)."""
  grid = []
  for item in items:
    if "=" not in item:
      raise ConfigError(f"--grid {item!r} is not of the form section.key=value1,value2")
    key, values = item.split("=", 1)
    parsed = [_value(v.strip()) for v in values.split(",") if v.strip() != ""]
    if "." not in key or not parsed:
      raise ConfigError(f"--grid {item!r}: give a section.key and at least one value")
    C.override_type(key.strip(), f"--grid {key.strip()}: ")
    grid.append((key.strip(), parsed))
  keys = [k for k, _ in grid]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"--grid names a key twice: {keys}")
  return grid


def variants(grid: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
  return [dict(zip([k for k, _ in grid], combo, strict=False)) for combo in itertools.product(*[v for _, v in grid])]


def variant_name(overrides: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in overrides.items()).replace("/", "_") or "base"


def _plot(rows: list[dict], metric: str, out: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(max(6, 1.2 * len(rows)), 4))
  ax = fig.subplots()
  values = [r["best_value"] if r["best_value"] is not None else 0.0 for r in rows]
  ax.bar(range(len(rows)), values, color="C0")
  ax.set_xticks(range(len(rows)), [r["variant"].replace(",", "\n") for r in rows], fontsize=7)
  ax.set_ylabel(f"best dev {metric}")
  ax.set_title("sweep")
  fig.tight_layout()
  write_file_atomically(out, lambda t: fig.savefig(t, dpi=110, format="png"), overwrite=True)


def _table(rows: list[dict], metric: str) -> str:
  lines = [f"| variant | best {metric} | best step | final step | seconds |", "|---|---|---|---|---|"]
  for r in rows:
    best = "-" if r["best_value"] is None else f"{r['best_value']:.4f}"
    lines.append(f"| {r['variant']} | {best} | {r['best_step']} | {r['final_step']} | {r['train_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def sweep(
  config: str | Path,
  workdir: str | Path,
  grid: list[tuple[str, list[Any]]],
  *,
  overrides=(),
  progress: bool = True,
  mesh=None,
) -> list[dict]:
  """Train every variant (checked up front, all of them, before the first trains) -> one summary row each."""
  import jax

  from jaxprompt import api
  from jaxprompt.training import trainer

  workdir = Path(workdir)
  base = C.load(config, list(overrides))
  planned = [(variant_name(v), v, api.load_config(base, v)) for v in variants(grid)]  # a bad value fails now
  for _, _, cfg in planned:
    trainer.check_trainable(cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # (a process that has a cache keeps it)
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
  bases: dict = {}
  rows = []
  for i, (name, over, cfg) in enumerate(planned, 1):
    log.info("sweep variant %d/%d: %s", i, len(planned), name)
    if progress:
      print(f"jaxprompt: sweep variant {i}/{len(planned)}: {name}", flush=True)
    s = trainer.train(cfg, workdir / name, progress=progress, mesh=mesh, bases=bases).summary()
    rows.append(
      dict(
        variant=name,
        overrides=over,
        **{k: s[k] for k in ("best_value", "best_step", "final_step", "metric", "train_seconds")},
      )
    )
  metric = planned[0][2].eval.metric
  write_file_atomically(
    workdir / "sweep.json",
    lambda t: t.write_text(
      json.dumps(
        dict(config=str(config), grid=[list(g) for g in grid], metric=metric, variants=rows, bases_loaded=len(bases)),
        indent=2,
        default=str,
      )
    ),
    overwrite=True,
  )
  write_file_atomically(workdir / "sweep.md", lambda t: t.write_text(_table(rows, metric)), overwrite=True)
  _plot(rows, metric, workdir / "sweep.png")
  return rows
