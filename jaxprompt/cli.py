"""`jaxprompt ...`: wiring only. User errors print one line and exit non-zero; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
  if config_required:
    p.add_argument("config", help="YAML config file (see configs/)")
  g = p.add_argument_group("multi-host (run the same command on every host)")
  g.add_argument("--distributed", choices=["auto", "none"], default=None,
                 help="auto: let JAX find the coordinator (TPU VMs, SLURM)")
  g.add_argument("--coordinator", help="HOST:PORT of process 0, for any other cluster")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="override a config value (repeatable), e.g. --set train.steps=100")
  p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _default_workdir(config: str) -> str:
  return str(Path("runs") / Path(config).stem)


def _init_distributed(args) -> None:
  from jaxprompt import distributed

  distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)


def cmd_train(args) -> int:
  from jaxprompt import config as C
  from jaxprompt.loop import train

  cfg = C.load(args.config, args.overrides)
  _init_distributed(args)
  workdir = args.workdir or _default_workdir(args.config)
  summary = train(cfg, workdir, progress=not args.no_progress)
  import jax

  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, **summary}))
  return 0


def cmd_eval(args) -> int:
  from jaxprompt import config as C
  from jaxprompt.loop import evaluate

  cfg = C.load(args.config, args.overrides)
  _init_distributed(args)
  print(json.dumps(evaluate(cfg, args.workdir, step=args.step)))
  return 0


def cmd_export(args) -> int:
  from jaxprompt.export import export_prompt

  out = export_prompt(args.source, args.format, args.out, step=args.step, with_base=args.with_base,
                      overwrite=args.overwrite)
  print(out)
  return 0


def cmd_inspect(args) -> int:
  import numpy as np

  from jaxprompt.export import load_trained_prompt
  from jaxprompt.inspection import inspect_prompt, similarity_heatmap

  value, info = load_trained_prompt(args.source, args.step)
  table = tokenizer = None
  base = (info.get("base_model") or {}).get("path")
  model_path = args.model or base
  if model_path:
    import jaxprompt
    from jaxprompt.prompts import input_embedding_table
    from jaxprompt.train import resolve_model_path

    path = resolve_model_path(model_path)
    model = jaxprompt.load_model(path)
    table = np.asarray(input_embedding_table(model), np.float32)
    tokenizer = jaxprompt.load_tokenizer(info.get("tokenizer") or path)
  for rec in inspect_prompt(value, table, tokenizer, top_k=args.top_k):
    print(json.dumps(rec, ensure_ascii=False))
  out = Path(args.heatmap) if args.heatmap else Path(args.source).with_name(Path(args.source).name + "_similarity.png")
  print(f"heatmap: {similarity_heatmap(value, out)}", file=sys.stderr)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprompt", description="Prompt tuning for frozen language models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train a soft prompt", description=(
      "Train a soft prompt as CONFIG says. Resumes from the latest checkpoint in --workdir. "
      "Exit code 75 after a SIGTERM/SIGINT checkpoint (run the same command again to resume)."))
  _common(p)
  p.add_argument("--workdir", help="output directory (default: runs/<config name>)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(fn=cmd_train)

  p = sub.add_parser("eval", help="evaluate a trained prompt on the eval split",
                     description="Evaluate a checkpoint of --workdir on the config's eval split.")
  _common(p)
  p.add_argument("--workdir", required=True, help="the training run's directory")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.set_defaults(fn=cmd_eval)

  p = sub.add_parser("export", help="export a trained prompt (PEFT adapter, .npy, safetensors)", description=(
      "Export a prompt from a training workdir, a checkpoint step folder, or another export. "
      "--format peft writes a HF PEFT prompt-tuning adapter folder (peft.PeftModel.from_pretrained(base, DIR)); "
      "numpy writes the original repo's .npy [P, H] float32; safetensors one tensor 'prompt_embeddings'. "
      "Written atomically; an existing output is kept unless --overwrite."))
  p.add_argument("source", help="WORKDIR, WORKDIR/checkpoints/STEP, or an exported prompt")
  p.add_argument("--format", required=True, choices=["peft", "numpy", "safetensors"])
  p.add_argument("--out", required=True, help="output folder (peft) or file (.npy / .safetensors)")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.add_argument("--with-base", action="store_true",
                 help="also write the frozen base model as a HF folder under OUT/base (peft format)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  p.add_argument("--debug", action="store_true", help="show full tracebacks")
  p.set_defaults(fn=cmd_export)

  p = sub.add_parser("inspect", help="norms and nearest tokens of each prompt vector, plus a similarity heatmap",
                     description="Print, per prompt vector, its norm and nearest vocabulary tokens (cosine "
                                 "similarity, JSON lines), and write a PNG heatmap of prompt-to-prompt similarity.")
  p.add_argument("source", help="WORKDIR, a checkpoint step folder, or an exported prompt")
  p.add_argument("--model", help="base model (default: the one recorded with the prompt)")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument("--heatmap", help="PNG path (default: SOURCE_similarity.png beside the source)")
  p.add_argument("--debug", action="store_true", help="show full tracebacks")
  p.set_defaults(fn=cmd_inspect)
  return parser


def _user_errors() -> tuple[type[BaseException], ...]:
  from jaxprompt.checkpoint import CheckpointError
  from jaxprompt.export import ExportError
  from jaxprompt.config import ConfigError
  from jaxprompt.data.pipeline import DataError
  from jaxprompt.models.hf import WeightError
  from jaxprompt.prompts import PromptError
  from jaxprompt.train import NonFiniteError

  return (ConfigError, CheckpointError, ExportError, DataError, WeightError, PromptError, NonFiniteError, FileNotFoundError,
          FileExistsError, NotADirectoryError, PermissionError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO if getattr(args, "debug", False) else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    return args.fn(args)
  except KeyboardInterrupt:
    print("jaxprompt: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 — user-facing errors are one line; --debug shows the traceback
    if args.debug or not isinstance(e, _user_errors()):
      raise
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"jaxprompt: error: {msg}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
