"""`jaxprompt ...`: wiring only. User errors (`errors.UserError`) print one line and exit 2; any other exception
is a bug and shows its traceback; --debug shows the traceback of user errors too."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


# -- commands ----------------------------------------------------------------------------------------


def _init_distributed(args) -> None:
  from jaxprompt import distributed

  distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)


def _run_args(p, fn) -> None:
  """train / distill: CONFIG and --set, --workdir, --no-progress."""
  _common(p)
  p.add_argument("--workdir", help="output directory (default: runs/<config name>)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.set_defaults(fn=fn)


def _run_to_workdir(args, run) -> int:
  """train / distill: a config (+ --set), a workdir (default runs/<config name>), the summary as one JSON line."""
  import jax

  from jaxprompt import config as C

  cfg = C.load(args.config, args.overrides)
  _init_distributed(args)
  workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
  summary = run(cfg, workdir, progress=not args.no_progress).summary()
  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, **summary}))
  return 0


def cmd_train(args) -> int:
  from jaxprompt.training.trainer import train

  return _run_to_workdir(args, train)


def cmd_distill(args) -> int:
  from jaxprompt.training.distill_run import distill

  return _run_to_workdir(args, distill)


def cmd_eval(args) -> int:
  from jaxprompt import config as C
  from jaxprompt.errors import UsageError
  from jaxprompt.training.trainer import evaluate

  config, workdir = _eval_config_and_workdir(args)
  cfg = C.load(config, args.overrides)
  if args.ensemble:
    if workdir:
      raise UsageError("give --workdir (one run) or --ensemble (several prompts), not both")
    from jaxprompt.evaluation.ensemble import evaluate_ensemble

    _init_distributed(args)
    result = evaluate_ensemble(
      cfg, args.ensemble, how=args.combine, step=args.step, allow_other_base=args.allow_other_base
    )
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}))
    return 0
  if not workdir:
    raise UsageError("eval needs --workdir (the training run) or --ensemble PROMPT PROMPT ...")
  _init_distributed(args)
  result = evaluate(cfg, workdir, step=args.step)
  print(json.dumps({"step": result.step, **result.metrics}))
  return 0


def _eval_config_and_workdir(args) -> tuple[str | None, str | None]:
  """(config, workdir) for eval: `eval CONFIG --workdir W` as ever; `eval W` or `eval --workdir W`: W's recorded
  config.yaml (what it trained with), --set laid over it."""
  from jaxprompt.errors import UsageError

  config, workdir = args.config, args.workdir
  if config is not None and Path(config).is_dir():
    if workdir:
      raise UsageError(f"eval: {config} is a folder; give CONFIG --workdir WORKDIR, or WORKDIR alone")
    workdir, config = config, None
  if config is None:
    if args.ensemble:
      raise UsageError("eval --ensemble needs CONFIG (the task and base model to score on)")
    if not workdir:
      raise UsageError("eval needs WORKDIR (the training run), CONFIG --workdir WORKDIR, or CONFIG --ensemble ...")
    recorded = Path(workdir) / "config.yaml"
    if not recorded.is_file():
      raise UsageError(f"eval: {recorded} does not exist (not a training workdir?); give the run's CONFIG too")
    config = str(recorded)
  return config, workdir


def cmd_export(args) -> int:
  from jaxprompt.prompts.export import export_prompt

  print(
    export_prompt(
      args.source, args.format, args.out, step=args.step, with_base=args.with_base, overwrite=args.overwrite
    )
  )
  return 0


def cmd_inspect(args) -> int:
  import numpy as np

  from jaxprompt.models.loading import load_model, load_tokenizer
  from jaxprompt.prompts.io import load_prompt_source
  from jaxprompt.tools.inspection import inspect_kv_table, inspect_prompt, similarity_heatmap

  tp = load_prompt_source(args.source, args.step)
  if tp.kv_table:  # keys and values: no vocabulary near them
    for rec in inspect_kv_table(np.asarray(tp.value, np.float32)):
      print(json.dumps(rec))
    value = np.asarray(tp.value, np.float32).reshape(tp.value.shape[0], -1)
    out = Path(args.heatmap) if args.heatmap else _inspect_out(args.source)
    print(f"heatmap: {similarity_heatmap(value, out, title=tp.method)}", file=sys.stderr)
    return 0
  value, record = tp.embeddings(args.source), tp.record
  table = tokenizer = None
  model_path = args.model or (record.base.path if record.base is not None else None)
  if model_path:
    table = np.asarray(load_model(model_path).embedding_table(), np.float32)
    tokenizer = load_tokenizer(record.tokenizer or model_path)
  for rec in inspect_prompt(value, table, tokenizer, top_k=args.top_k):
    print(json.dumps(rec, ensure_ascii=False))
  out = Path(args.heatmap) if args.heatmap else _inspect_out(args.source)
  print(f"heatmap: {similarity_heatmap(value, out)}", file=sys.stderr)
  return 0


def _inspect_out(source: str) -> Path:
  """inspect's default heatmap: inside a workdir or export folder (a checkpoint step's: its workdir's), beside a
  prompt file."""
  from jaxprompt.prompts.io import split_task

  path, task = split_task(source)
  stem = "similarity" + (f"_{task}" if task else "")
  if path.is_file():
    return path.with_name(f"{path.stem}_{stem}.png")
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent / f"{stem}_step_{path.name}.png"
  if path.name == "checkpoints":
    return path.parent / f"{stem}.png"
  return path / f"{stem}.png"


def _plan_meshes(spec: str | None, cfg) -> list[dict] | None:
  """--mesh: None (search), "config" (the config's mesh section), or data=N,fsdp=N,model=N."""
  from jaxprompt.errors import UsageError

  if spec is None:
    return None
  if spec == "config":
    return [dict(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, model=cfg.mesh.model)]
  from jaxprompt.sharding import mesh_sizes

  m = mesh_sizes(spec)
  if m is None:
    raise UsageError(f"--mesh {spec!r}: expected config, or data=N,fsdp=N,model=N")
  return [m]


def cmd_plan(args) -> int:
  from jaxprompt.errors import UsageError

  devices, budget = args.devices, args.budget_gib
  if args.topology:
    from jaxprompt.tools.plan import TOPOLOGIES

    if args.topology not in TOPOLOGIES:
      raise UsageError(f"unknown topology {args.topology!r}; known: {', '.join(sorted(TOPOLOGIES))}")
    devices, mem = TOPOLOGIES[args.topology]
    budget = budget or mem
  if devices:
    # simulated devices: must be set before JAX initialises its backends
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from jaxprompt import config as C
  from jaxprompt.tools import plan as PL

  cfg = C.load(args.config, args.overrides)
  meshes = _plan_meshes(args.mesh, cfg)
  remats = (cfg.model.remat,) if args.mesh else tuple(dict.fromkeys([cfg.model.remat, "full"]))
  where = "given"
  if not budget and not devices:  # the real devices: their own memory, where the backend reports it
    budget, kind = PL.detected_budget_gib()
    where = f"detected on {kind}"
  print(
    f"plan for {cfg.model.path}: batch {cfg.train.batch_size}, inputs {cfg.data.input_length} + prompt "
    f"{cfg.prompt.length}, targets {cfg.data.target_length}, weights {cfg.model.dtype}, compute "
    f"{cfg.model.compute_dtype}, {devices or 'all'} devices"
    + (f", budget {budget:.1f} GiB/device ({where})" if budget else "")
  )
  rows, best = PL.plan(cfg, devices=devices, meshes=meshes, budget_gib=budget, remats=remats)
  if not budget:
    print(
      "no memory budget: none was given (--budget-gib or --topology) and these devices report none, so no mesh "
      "is recommended; the rows above are each mesh's memory per device"
    )
    _write_plan_json(args.json, rows, None, None)
    return 0
  if best is None:
    print("no candidate mesh fits")
    return 1
  m = best.mesh
  print(
    f"recommended: --set mesh.data={m['data']} --set mesh.fsdp={m['fsdp']} --set mesh.model={m['model']} "
    f"--set model.remat={best.remat}  ({best.total_gib:.2f} GiB per device, "
    f"{best.flops_per_device / 1e12:.2f} TFLOP per device per step)"
  )
  _write_plan_json(args.json, rows, best, budget)
  return 0


def _write_plan_json(path, rows, best, budget) -> None:
  if path:
    from jaxprompt.fileio import write_file_atomically

    table = {
      "rows": [dataclasses.asdict(r) for r in rows],
      "budget_gib": budget,
      "recommended": None if best is None else dataclasses.asdict(best),
    }
    write_file_atomically(path, lambda t: t.write_text(json.dumps(table, indent=2)), overwrite=True)


def _bench_serve(args) -> dict:
  from jaxprompt.errors import UsageError
  from jaxprompt.tools.bench_serve import Mixed, run_mixed_bench, run_serve_bench

  if not args.mixed:
    if not args.model:
      raise UsageError("bench --serve needs --model (a causal base model with its tokenizer)")
    return run_serve_bench(
      args.model,
      tokenizer=args.tokenizer,
      prompts=args.num_prompts,
      clients=args.clients,
      requests=args.requests,
      max_tokens=args.max_tokens,
      vs_peft=args.vs_peft,
    )
  if not args.model:
    raise UsageError("bench --serve --mixed needs --model (a base model folder, or preset:NAME with --tokenizer)")
  try:
    lengths = tuple(int(x) for x in args.prompt_lengths.split(","))
    lo, hi = (int(x) for x in args.max_tokens_range.split(","))
  except ValueError:
    raise UsageError("--prompt-lengths takes N,N,... and --max-tokens-range LO,HI (integers)") from None
  workload = Mixed(
    prompts=args.num_prompts,
    prompt_lengths=lengths,
    requests=args.requests,
    max_tokens=(lo, hi),
    rate=args.rate,
    clients=args.clients,
    width=args.width,
    decode_steps=args.decode_steps,
  )
  return run_mixed_bench(args.model, workload, tokenizer=args.tokenizer)


def _bench_apart(args):
  """`bench --attention / --serve / --configs`: their own benchmarks' results (None: none of them)."""
  if args.attention:
    from jaxprompt.tools.bench_attention import bench_attention, report

    result = bench_attention(length=args.attention_length, dtype=args.dtype, iters=args.iters)
    print(report(result))
    return result
  if args.serve:
    return _bench_serve(args)
  if args.configs:
    from jaxprompt.tools.bench_methods import run_methods_bench

    return run_methods_bench(args.configs, iters=args.iters)
  return None


def _bench_preset(args):
  """`bench --preset` (random weights of a shape), with --data on real rows."""
  from jaxprompt.errors import UsageError
  from jaxprompt.tools import bench as BN

  if args.eval and not args.data:
    raise UsageError("bench --eval times evaluation on real rows: give --data FILE --task TASK --tokenizer DIR")
  if args.preset not in BN.PRESETS:
    raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(sorted(BN.PRESETS))}")
  if args.data:
    from jaxprompt.tools.bench_data import run_data_bench

    if not (args.task and args.tokenizer):
      raise UsageError("bench --data needs --task (how to read the file) and --tokenizer (a tokenizer folder)")
    return run_data_bench(
      args.preset,
      args.data,
      args.task,
      args.tokenizer,
      vs_peft=args.vs_peft,
      steps=args.iters,
      buckets=args.length_buckets,
      group_by_length=args.group_by_length,
      pack=args.pack,
      evaluate=args.eval,
    )
  return BN.run_bench(
    args.preset,
    vs_peft=args.vs_peft,
    dtype=args.dtype,
    iters=args.iters,
    structural=not args.no_structural,
    generation=not args.no_generation,
    layer_loop=args.layer_loop,
  )


def cmd_bench(args) -> int:
  result = _bench_apart(args)
  if result is None:
    result = _bench_preset(args)
  if args.json:
    from jaxprompt.fileio import write_file_atomically

    write_file_atomically(args.json, lambda t: t.write_text(json.dumps(result, indent=2)), overwrite=True)
  return 0


def _buckets_arg(text: str):
  if text in ("auto", "none"):
    return text
  try:
    return tuple(int(x) for x in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"--length-buckets: {text!r} is not auto, none or comma-separated lengths"
    ) from None


def _generate_config(args):
  """The `generate:` section of --config (or its defaults), with every flag given laid over it."""
  from jaxprompt import config as C

  base = C.load(args.config, args.overrides).generate if args.config or args.overrides else C.GenerateConfig()
  method = args.method or (
    "beam" if args.beams else "greedy" if args.greedy else "sample" if args.temperature is not None else None
  )
  given = dict(
    method=method,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    num_beams=args.beams,
    alpha=args.alpha,
    seed=args.seed,
  )
  return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _read_inputs(args) -> list:
  from jaxprompt.errors import MissingPathError, UsageError

  if not args.input_file:
    texts, where = args.input or [""], lambda i: "--input"
  else:
    path = Path(args.input_file)
    if not path.is_file():
      raise MissingPathError(f"--input-file {path} does not exist")
    texts = path.read_text().splitlines()
    if not texts:
      raise UsageError(f"{path}: no inputs")
    where = lambda i: f"{path} line {i}"  # noqa: E731
  inputs = [_fields(x, where(i)) for i, x in enumerate(texts, 1)]
  if args.fields:
    for i, x in enumerate(inputs):
      if not isinstance(x, dict):
        raise UsageError(f'--fields: input {i} is not a JSON object of field texts ({{"premise": "...", ...}})')
  return inputs


def _fields(text: str, where: str) -> str | dict:
  """An input: a JSON object of fields when it is one ("{...}"), else the text."""
  from jaxprompt.errors import UsageError

  if not text.lstrip().startswith("{"):
    return text
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return text
  if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
    raise UsageError(f"{where}: a JSON object of fields maps names to text")
  return value


def cmd_generate(args) -> int:
  from jaxprompt.errors import UsageError
  from jaxprompt.inference import text
  from jaxprompt.models.interface import require_lm_head
  from jaxprompt.models.loading import load_model, load_tokenizer

  gen_cfg, texts = _generate_config(args), _read_inputs(args)
  loaded = text.load_prompts(args.prompt, step=args.step)
  model_path, tok = args.model, args.tokenizer
  if model_path is None:
    model_path, recorded_tok = text.recorded_base([p.record for p in loaded])
    if model_path is None:
      raise UsageError("--model is needed: no --prompt records its base model")
    tok = tok or recorded_tok
  base = load_model(model_path)
  require_lm_head(base, "generate")
  tokenizer = load_tokenizer(tok or model_path)
  for p, src in zip(loaded, args.prompt, strict=False):
    for warning in p.check(base, src, strict=not args.allow_other_base):
      print(f"jaxprompt: warning: {warning}", file=sys.stderr)
  for r in text.generate_text(base, tokenizer, texts, loaded, gen_cfg, raw=args.raw):
    if args.prompt:
      r["prompt"] = args.prompt[r["prompt"]]
    print(json.dumps(r, ensure_ascii=False) if args.jsonl else r["output"])
  return 0


def cmd_sweep(args) -> int:
  from jaxprompt.tools.sweep import parse_grid, sweep

  grid = parse_grid(args.grid)
  _init_distributed(args)
  workdir = args.workdir or str(Path("runs") / (Path(args.config).stem + "_sweep"))
  rows = sweep(args.config, workdir, grid, overrides=args.overrides, progress=not args.no_progress)
  print((Path(workdir) / "sweep.md").read_text(), end="")
  print(json.dumps({"workdir": workdir, "variants": len(rows)}))
  return 0


def cmd_similarity(args) -> int:
  from jaxprompt.prompts.io import load_prompt_source
  from jaxprompt.prompts.similarity import rank

  target = load_prompt_source(args.target, args.step).embeddings(args.target)
  sources = {s: load_prompt_source(s, args.step).embeddings(s) for s in args.sources}
  ranked = rank(target, sources, args.metric)
  if args.json:
    print(
      json.dumps(
        {
          "target": args.target,
          "metric": args.metric,
          "ranking": [{"source": s, "similarity": round(v, 6)} for s, v in ranked],
        }
      )
    )
  else:
    for i, (s, v) in enumerate(ranked, 1):
      print(f"{i:3d}  {v:+.4f}  {s}")
  return 0


def cmd_serve(args) -> int:
  from jaxprompt.serve.server import run

  return run(args)


def cmd_preview(args) -> int:
  from jaxprompt import config as C
  from jaxprompt.run import members_of, task_data

  cfg = C.load(args.config, args.overrides)
  members = members_of(cfg.data)
  for m in members:  # a mixture: each task's first examples, named
    for ex in task_data(m.data, args.split or cfg.data.train_split).examples[: args.n]:
      record = {"inputs": ex["inputs"], "targets": ex["targets"]}
      print(json.dumps({"task": m.name, **record} if len(members) > 1 else record, ensure_ascii=False))
  return 0


# -- the parser ----------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, config_help: str | None = None) -> None:
  if config_help:  # optional
    p.add_argument("config", nargs="?", help=config_help)
  else:
    p.add_argument("config", help="YAML config file (see configs/)")
  g = p.add_argument_group("multi-host (run the same command on every host)")
  g.add_argument(
    "--distributed", choices=["auto", "none"], default=None, help="auto: let JAX find the coordinator (TPU VMs, SLURM)"
  )
  g.add_argument("--coordinator", help="HOST:PORT of process 0, for any other cluster")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  p.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="SECTION.KEY=VALUE",
    help="override a config value (repeatable), e.g. --set train.steps=100",
  )
  _debug(p)


def _debug(p: argparse.ArgumentParser) -> None:
  p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _add_train_eval(sub) -> None:
  p = sub.add_parser(
    "train",
    help="train a soft prompt",
    description=(
      "Train a soft prompt as CONFIG says. Resumes from the latest checkpoint in --workdir (refused, naming the "
      "keys, where CONFIG changes the prompt or optimizer state it holds: prompt.length, optimizer.name...). "
      "Exit code 75 after a SIGTERM/SIGINT checkpoint (run the same command again to resume)."
    ),
  )
  _run_args(p, cmd_train)
  p = sub.add_parser(
    "eval",
    help="evaluate a trained prompt (or an ensemble of prompts) on the eval split",
    description="Evaluate a checkpoint of --workdir on the config's eval split, or (--ensemble) "
    "several prompts at once, combined by majority vote or mean log-probability. "
    "`jaxprompt eval WORKDIR` (or --workdir WORKDIR without CONFIG) uses the config the run recorded "
    "(WORKDIR/config.yaml), --set laid over it.",
  )
  _common(p, "YAML config file; optional with a workdir (default: WORKDIR/config.yaml), or the WORKDIR itself")
  p.add_argument("--workdir", help="the training run's directory")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.add_argument(
    "--ensemble",
    nargs="+",
    metavar="PROMPT",
    help="instead of --workdir: score every example under "
    "each prompt (workdirs, exports, PEFT adapters; SOURCE@TASK for a per-task run's) in one mixed batch "
    "and combine them (--combine)",
  )
  p.add_argument(
    "--combine",
    choices=["vote", "mean"],
    default="vote",
    help="ensemble: majority vote (ties: summed log-probability; default) or mean log-probability",
  )
  p.add_argument("--allow-other-base", action="store_true", help="ensemble: prompts recorded for another base")
  p.set_defaults(fn=cmd_eval)
  p = sub.add_parser(
    "preview",
    help="print preprocessed examples (what the model is fed, before tokenising)",
    description="Print a split's examples as JSON lines with `inputs` and `targets` exactly as "
    "the task's preprocessor makes them, before tokenisation.",
  )
  _common(p)
  p.add_argument("--split", help="split (default: data.train_split)")
  p.add_argument("--n", type=int, default=5, help="how many examples")
  p.set_defaults(fn=cmd_preview)


def _add_distill(sub) -> None:
  p = sub.add_parser(
    "distill",
    help="distil a long context (a text file) into a cartridge",
    description=(
      "Train a cartridge (prompt.method cartridge) so that the model with it in front answers like the model with "
      "the whole of distill.context_file in front: KL between their next-token distributions on the context's "
      "chunks (distill.chunk tokens) and on distill.samples continuations the model samples after the context. "
      "Writes --workdir as `train` does (checkpoints, metrics.jsonl, summary.json); export, inspect, generate "
      "and serve take it. Resumes from the latest checkpoint. Decoder-only models (T5 refused: its teacher would "
      "need the context and a query in one sequence)."
    ),
  )
  _run_args(p, cmd_distill)


def _add_export_inspect(sub) -> None:
  p = sub.add_parser(
    "export",
    help="export a trained prompt (PEFT adapter, .npy, safetensors)",
    description=(
      "Export a prompt from a training workdir, a checkpoint step folder, or another export. "
      "--format peft writes a HF PEFT prompt-tuning adapter folder (peft.PeftModel.from_pretrained(base, DIR)); "
      "numpy writes the original repo's .npy [P, H] float32; safetensors one tensor 'prompt_embeddings'. "
      "A run with one prompt per task (prompt.per_task) exports every task into the folder --out, named after it, "
      "plus bank.safetensors; SOURCE@TASK exports one. "
      "Written atomically; an existing output is kept unless --overwrite."
    ),
  )
  p.add_argument(
    "source",
    help="WORKDIR, WORKDIR/checkpoints/STEP, or an exported prompt (SOURCE@TASK: one task's prompt of a per-task run)",
  )
  p.add_argument("--format", required=True, choices=["peft", "numpy", "safetensors"])
  p.add_argument("--out", required=True, help="output folder (peft) or file (.npy / .safetensors)")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.add_argument(
    "--with-base",
    action="store_true",
    help="also write the frozen base model as a HF folder under OUT/base (peft format)",
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing output")
  _debug(p)
  p.set_defaults(fn=cmd_export)
  p = sub.add_parser(
    "inspect",
    help="norms and nearest tokens of each prompt vector, plus a similarity heatmap",
    description="Print, per prompt vector, its norm and nearest vocabulary tokens (cosine "
    "similarity, JSON lines), and write a PNG heatmap of prompt-to-prompt similarity. A key/value table (prefix "
    "tuning, a cartridge) prints each slot's norm and its key and value norms per layer (no tokens are near keys "
    "and values).",
  )
  p.add_argument("source", help="WORKDIR, a checkpoint step folder, or an exported prompt")
  p.add_argument("--model", help="base model (default: the one recorded with the prompt)")
  p.add_argument("--step", default="best", help="best (default), latest, or a step number")
  p.add_argument("--top-k", type=int, default=5)
  p.add_argument(
    "--heatmap",
    "--out",
    dest="heatmap",
    help="PNG path (default: similarity.png inside a workdir or export folder; NAME_similarity.png beside a file)",
  )
  _debug(p)
  p.set_defaults(fn=cmd_inspect)


def _add_plan(sub) -> None:
  p = sub.add_parser(
    "plan",
    help="ahead-of-time memory/FLOPs plan for a config on N devices",
    description=(
      "Compile the train step ahead of time on abstract shapes (no weights are loaded; devices are simulated "
      "on the CPU) and report per-device memory (arguments, temporaries, total) and FLOPs per step for "
      "candidate meshes, recommending the most data-parallel one that fits the budget."
    ),
  )
  _common(p)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--devices", type=int, help="number of (simulated) devices")
  g.add_argument("--topology", help="a slice name, e.g. v3-8, v4-32, v5e-8, h100-8 (sets devices and budget)")
  p.add_argument("--mesh", help="only this mesh: data=N,fsdp=N,model=N, or 'config' for the config's mesh and remat")
  p.add_argument(
    "--budget-gib",
    type=float,
    help="memory per device (default: the topology's, else what the devices report; CPU reports none)",
  )
  p.add_argument("--json", help="also write the table as JSON")
  p.set_defaults(fn=cmd_plan)


def _add_bench(sub) -> None:
  p = sub.add_parser(
    "bench",
    help="measure the train step (optionally against PyTorch + PEFT)",
    description=(
      "After warm-up: median train-step time, tokens/s, XLA FLOPs, achieved FLOP/s and utilisation of the "
      "device's peak (on CPU a matmul peak measured in the same run), compile time and device memory. "
      "--vs-peft runs the same shapes through PyTorch + PEFT in the same invocation. Presets use random weights."
    ),
  )
  p.add_argument("--preset", default="t5-v1_1-small", help="shape preset (default t5-v1_1-small)")
  p.add_argument("--vs-peft", action="store_true", help="also run PyTorch + PEFT on the same shapes")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  p.add_argument("--iters", type=int, default=5, help="timed steps after warm-up")
  p.add_argument(
    "--layer-loop",
    choices=["auto", "scan", "unroll"],
    default="auto",
    help="layers in a scan or unrolled (model.layer_loop; auto: unrolled on the CPU, the presets being wide enough)",
  )
  p.add_argument(
    "--attention",
    action="store_true",
    help="time the attention implementations (models.attention: xla, cpu, cudnn, pallas) side by side instead",
  )
  p.add_argument("--attention-length", type=int, default=1024, help="with --attention: the sequence length")
  p.add_argument("--no-structural", action="store_true", help="skip the FLOPs-ratio and compile-time checks")
  p.add_argument("--no-generation", action="store_true", help="skip the mixed-prompt generation benchmark")
  p.add_argument(
    "--configs",
    nargs="+",
    metavar="CONFIG",
    help="instead: these configs' train steps side by side (each its own model, data, method and optimizer): "
    "step time and XLA memory, as ratios to the first (e.g. prompt tuning vs residual vs DePT)",
  )
  _add_bench_data_flags(p)
  _add_bench_serve_flags(p)
  p.add_argument("--json", help="write the results as JSON")
  _debug(p)
  p.set_defaults(fn=cmd_bench)


def _add_bench_data_flags(p: argparse.ArgumentParser) -> None:
  """The `bench --data` flags: train (with --eval, also rank) on a file's real rows; --tokenizer serves --serve too."""
  p.add_argument(
    "--data",
    help="real rows: train on this file (the recipe shape: prompt 100, batch 32, inputs up "
    "to 512), --iters steps, against PEFT with per-batch dynamic padding under --vs-peft",
  )
  p.add_argument("--task", help="with --data: the task that reads the file (e.g. rte, cb, boolq)")
  p.add_argument(
    "--tokenizer", help="with --data / --serve: a tokenizer folder (with --data its vocabulary must fit the preset's)"
  )
  p.add_argument(
    "--length-buckets",
    default="auto",
    type=_buckets_arg,
    help="with --data: auto (default), none, or comma-separated lengths",
  )
  p.add_argument(
    "--pack",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="with --data: pack several examples per row, each with its prompt (data.pack; default: for seq2seq presets)",
  )
  p.add_argument(
    "--group-by-length",
    type=int,
    default=0,
    help="with --data: batches of similar lengths, windows of N batches (data.group_by_length)",
  )
  p.add_argument(
    "--eval",
    action="store_true",
    help="with --data: also time rank classification (the eval loss and every label's score) on the "
    "same batches; under --vs-peft against PEFT scoring each (example, label) pair",
  )


def _add_bench_serve_flags(p: argparse.ArgumentParser) -> None:
  """`bench --serve`: the HTTP server under concurrent load."""
  g = p.add_argument_group("--serve: the HTTP server under load (127.0.0.1 only)")
  g.add_argument(
    "--serve",
    action="store_true",
    help="drive `jaxprompt serve` with concurrent clients over K "
    "prompts, against one-at-a-time serving and (--vs-peft) PEFT's one-adapter-per-request pattern",
  )
  g.add_argument("--model", help="with --serve: a causal base model (its tokenizer beside it, or --tokenizer)")
  g.add_argument("--num-prompts", type=int, default=8, help="with --serve: K prompts (default 8)")
  g.add_argument("--clients", type=int, default=16, help="with --serve: C concurrent clients (default 16)")
  g.add_argument("--requests", type=int, default=128, help="with --serve: requests in all (default 128)")
  g.add_argument("--max-tokens", type=int, default=16, help="with --serve: tokens per completion (default 16)")
  g.add_argument(
    "--mixed",
    action="store_true",
    help="with --serve: the mixed workload (prompts of several lengths, max_tokens drawn from a range), served by the "
    "continuous scheduler, the static one and without prompts, in one run; --model preset:NAME for a preset's "
    "random weights (with --tokenizer)",
  )
  g.add_argument(
    "--prompt-lengths", default="4,8,12,16,20", help="with --mixed: the prompts' lengths, cycled (default 4,8,12,16,20)"
  )
  g.add_argument("--max-tokens-range", default="1,64", help="with --mixed: max_tokens uniform in LO,HI (default 1,64)")
  g.add_argument(
    "--rate", type=float, default=0.0, help="with --mixed: open-loop Poisson arrivals per second (0: --clients)"
  )
  g.add_argument("--width", type=int, default=8, help="with --mixed: decode slots = static batch size (default 8)")
  g.add_argument(
    "--decode-steps",
    type=int,
    default=8,
    help="with --mixed: the continuous scheduler's decode steps per call at most (serve --decode-steps; default 8)",
  )


# generation flags: each left out keeps config.GenerateConfig's default
_GENERATE_FLAGS = (
  ("--max-new-tokens", int, "tokens to generate at most"),
  ("--temperature", float, "sample with this temperature"),
  ("--top-k", int, "sampling: keep the k most likely tokens; 0 keeps all"),
  ("--top-p", float, "sampling: nucleus probability mass; 1.0 is off"),
  ("--beams", int, "beam search with this many beams"),
  ("--alpha", float, "beam search length-penalty alpha (T5X)"),
  ("--seed", int, "sampling seed"),
)


def _add_generate(sub) -> None:
  p = sub.add_parser(
    "generate",
    help="generate text with a frozen model and soft prompt(s)",
    description=(
      "Generate one output per input (per prompt, with several --prompt: they run as one mixed-prompt batch). "
      "Without --model the base model recorded with the prompt is used. Empty input means: start from BOS. "
      "Settings left out come from the generate: section of --config (or its defaults)."
    ),
  )
  p.add_argument("--config", help="a YAML config whose generate: section sets the defaults")
  p.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="generate.KEY=VALUE",
    help="override a value of --config (repeatable)",
  )
  p.add_argument("--model", help="base model: HF folder, hub id, .gguf, builtin:quickstart (default: recorded)")
  p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
  p.add_argument(
    "--prompt",
    action="append",
    default=[],
    metavar="WORKDIR_OR_EXPORT",
    help="a trained prompt: workdir, checkpoint step, PEFT folder, .npy or .safetensors (repeatable); "
    "WORKDIR@TASK: one task's prompt of a per-task run",
  )
  p.add_argument("--step", default="best", help="checkpoint of a workdir prompt: best, latest or a step")
  _add_generate_inputs(p)
  _add_generate_decoding(p)
  p.add_argument("--jsonl", action="store_true", help="JSON lines with input, output, tokens, score")
  p.add_argument("--allow-other-base", action="store_true", help="use a prompt recorded for another base model")
  _debug(p)
  p.set_defaults(fn=cmd_generate)


def _add_generate_inputs(p) -> None:
  g = p.add_mutually_exclusive_group()
  g.add_argument(
    "--input",
    action="append",
    help="an input (repeatable: one output per --input, in order; default: empty): text for the task's single "
    'field, or a JSON object of fields (\'{"premise": ..., "hypothesis": ...}\'); a prompt gets it in the input '
    "format its task was trained with (T5 prefix, custom template) unless --raw",
  )
  g.add_argument("--input-file", help="a file with one input per line (as --input)")
  p.add_argument(
    "--raw", action="store_true", help="give the prompts the input text as it is, not in their task's input format"
  )
  p.add_argument(
    "--fields",
    action="store_true",
    help='inputs are JSON objects naming a templated prompt\'s fields ({"premise": "...", "hypothesis": "..."}); '
    "without it, a templated prompt with one field takes each input as that field",
  )


def _add_generate_decoding(p) -> None:
  from jaxprompt.config import GenerateConfig

  p.add_argument(
    "--method",
    choices=["greedy", "sample", "beam"],
    help="decoding (default: generate.method; --temperature alone means sample, --beams beam)",
  )
  p.add_argument("--greedy", action="store_true", help="greedy decoding (the same as --method greedy)")
  defaults = GenerateConfig()
  for flag, tp, what in _GENERATE_FLAGS:
    field = {"--beams": "num_beams"}.get(flag, flag[2:].replace("-", "_"))
    p.add_argument(flag, type=tp, help=f"{what} (default: generate.{field}, {getattr(defaults, field)})")


def _add_sweep(sub) -> None:
  p = sub.add_parser(
    "sweep",
    help="train hyper-parameter variants of a config on one loaded model",
    description=(
      "Every combination of the --grid values, trained one after another on one loaded frozen model (one workdir "
      "each, resumable), then a summary: WORKDIR/sweep.md, sweep.json and sweep.png (best dev metric per variant)."
    ),
  )
  _common(p)
  p.add_argument(
    "--grid",
    action="append",
    required=True,
    metavar="SECTION.KEY=V1,V2",
    help="values to try for one key (repeatable: the variants are every combination)",
  )
  p.add_argument("--workdir", help="the sweep's directory (default: runs/<config name>_sweep)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.set_defaults(fn=cmd_sweep)


def _add_similarity(sub) -> None:
  p = sub.add_parser(
    "similarity",
    help="rank source prompts by similarity to a target prompt (SPoT transfer)",
    description=(
      "Prompt transfer (SPoT): rank trained source prompts by how alike they are to a target task's prompt (e.g. one "
      "trained briefly on the target), to pick the source that initialises the target (prompt.init: file). "
      "Metrics: average (cosine of the average tokens), per_token (mean cosine over token pairs), max (each target "
      "token's best source token)."
    ),
  )
  p.add_argument("target", help="the target task's prompt (workdir, export, PEFT adapter, .npy)")
  p.add_argument("sources", nargs="+", help="candidate source prompts")
  p.add_argument("--metric", choices=["average", "per_token", "max"], default="average")
  p.add_argument("--step", default="best", help="checkpoint of workdir prompts: best, latest or a step")
  p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
  _debug(p)
  p.set_defaults(fn=cmd_similarity)


def _add_serve(sub) -> None:
  p = sub.add_parser(
    "serve",
    help="serve a frozen model with many prompts over HTTP (OpenAI-compatible)",
    description=(
      "One frozen base model, every prompt in --prompts (workdirs, exports, PEFT adapters, .npy) by name (a per-task "
      "run: one per task, NAME.TASK), one HTTP "
      "server: POST /v1/completions (OpenAI), /v1/classify, /v1/prompts (admin); GET /v1/models, /health, /metrics, "
      "and GET / a playground page. Requests for different prompts are batched together; --mesh shards the frozen "
      "weights over devices. Each prompt gets its inputs in the input format its task was trained with (a string "
      'for the task\'s one field, an object of fields; "raw": true for text as it is); logprobs (k <= 5) gives each '
      "generated token's log-probability and alternatives; echo + logprobs with max_tokens 0 score a prompt's "
      "tokens (lm-evaluation-harness). Needs the serve extra."
    ),
  )
  p.add_argument("--model", required=True, help="base model: HF folder, hub id, .gguf, builtin:quickstart")
  p.add_argument("--tokenizer", help="tokenizer (default: the model's)")
  p.add_argument(
    "--prompts",
    help="a folder of prompts, each served under its file or folder name; or one workdir / export, served under "
    "its folder's name",
  )
  p.add_argument("--name", help="the base model's own name in the API (default: the model folder's name)")
  p.add_argument(
    "--mesh",
    help="shard the frozen weights over devices: data=N,fsdp=N,model=N (as a config's mesh section; default: one "
    "device)",
  )
  p.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16"), help="the frozen weights' dtype (default float32)"
  )
  p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=8000)
  _add_serve_batching(p)
  p.add_argument("--admin-token", help="enables POST/DELETE /v1/prompts (or env JAXPROMPT_ADMIN_TOKEN)")
  p.add_argument("--drain-seconds", type=int, default=60, help="on SIGTERM, how long in-flight requests may take")
  p.add_argument("--allow-other-base", action="store_true", help="serve prompts recorded for another base model")
  _debug(p)
  p.set_defaults(fn=cmd_serve)


def _add_serve_batching(p) -> None:
  """serve's scheduler, batching, limits and warm-up flags."""
  p.add_argument(
    "--scheduler",
    choices=("auto", "continuous", "static"),
    default="auto",
    help="continuous: decode slots, a request joins as soon as one is free, every prompt method in one step; static: "
    "a batch runs until its longest request ends; auto (default): continuous",
  )
  p.add_argument(
    "--slots", type=int, default=16, help="continuous: decode slots, requests decoded at once (default 16)"
  )
  p.add_argument(
    "--decode-steps",
    type=int,
    default=8,
    help="continuous: decode steps per device call at most, taken only while every slot is busy and no request "
    "would pass its max_tokens inside the call (fewer calls and host round trips; 1: one step per call; default 8)",
  )
  p.add_argument(
    "--prompt-slots",
    type=int,
    default=0,
    help="continuous: room for prompts of this length added later over the API (default: the longest in --prompts)",
  )
  p.add_argument(
    "--prompt-cache",
    type=int,
    help="prompts held on the device at most (least recently used evicted; every prompt stays on the host and "
    "is copied in when a request needs it; default: no limit)",
  )
  p.add_argument("--prompt-cache-mb", type=float, help="MiB of prompts held on the device at most (default: no limit)")
  p.add_argument(
    "--max-batch", type=int, default=16, help="requests per model call (continuous: per prefill; default 16)"
  )
  p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others (default 5)")
  p.add_argument(
    "--queue-size",
    type=int,
    default=256,
    help="queued requests before 503s (default 256); also the most inputs x n one request may hold (more: 400)",
  )
  p.add_argument(
    "--max-request-bytes", type=int, default=2_000_000, help="largest request body (default 2000000; more: 413)"
  )
  p.add_argument("--max-input-tokens", type=int, default=512, help="longest input (default 512)")
  p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask (default 256)")
  p.add_argument(
    "--warmup",
    action="store_true",
    help="compile every program before serving (continuous: a prefill per batch x length bucket and the step)",
  )


def build_parser() -> argparse.ArgumentParser:
  from jaxprompt.version import __version__

  parser = argparse.ArgumentParser(prog="jaxprompt", description="Prompt tuning for frozen language models in JAX.")
  parser.add_argument("--version", action="version", version=f"jaxprompt {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  _add_train_eval(sub)
  _add_distill(sub)
  _add_export_inspect(sub)
  _add_plan(sub)
  _add_bench(sub)
  _add_generate(sub)
  _add_serve(sub)
  _add_similarity(sub)
  _add_sweep(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(
    level=logging.INFO if getattr(args, "debug", False) else logging.WARNING,
    format="%(levelname)s %(name)s: %(message)s",
  )
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from jaxprompt.errors import UserError

  try:
    return args.fn(args)
  except KeyboardInterrupt:
    print("jaxprompt: interrupted", file=sys.stderr)
    return 130
  except UserError as e:
    if args.debug:
      raise
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"jaxprompt: error: {msg}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
