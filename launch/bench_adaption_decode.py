"""Decode-step time with an adaption prompt (LLaMA-Adapter) in every slot, side by side: this checkout against
another one (`--before`, e.g. the commit before adaption keys/values were projected once per prompt), in one run.

  git worktree add /tmp/jaxprompt-before COMMIT
  python launch/bench_adaption_decode.py --before /tmp/jaxprompt-before --preset llama-small --json /tmp/a.json
  python launch/bench_adaption_decode.py --before /tmp/jaxprompt-before \\
    --model ../shared/fixtures/models/tinystories-656k

Each tree runs in its own process (PYTHONPATH set to it), the trees alternating `--rounds` times; a process
prefills `--slots` rows under one adaption prompt (`--adapter-len` slots in every layer) and times `--steps` jitted
`decode_step` calls over every row (the continuous scheduler's step without sampling), and the same rows with no
prompt, in a cache with room for `--max-new-tokens` tokens after the input (a server's `--max-tokens`; default
`--steps`). Reported: each tree's median step time (median over rounds) and its fastest step, and before / after
(with the adaption prompt and with none); and each step program's FLOPs and bytes accessed as XLA counts them
(`cost_analysis`: independent of the machine's load). With no adaption prompt it is also the plain decode step's
benchmark (e.g. the cache written in place: `--max-new-tokens 256 --input-length 512`, a server's defaults).
A benchmark, not a test: the figures are this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(args) -> dict:
  """In the tree on PYTHONPATH: median seconds per decode step, with the adaption prompt and with none."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxprompt.models import load_model
  from jaxprompt.prompts.adaption import AdaptionPrompt
  from jaxprompt.tools.bench import PRESETS, random_base

  base = load_model(args.model) if args.model else random_base(PRESETS[args.preset])
  layers, h = base.prefix_slots().layers, base.hidden_size
  rng = np.random.default_rng(0)
  prompt = AdaptionPrompt(
    0.1 * rng.normal(size=(layers, args.adapter_len, h)), np.full((layers,), 0.5), layers=layers
  ).prefix(1)
  graphdef, state = nnx.split(base)
  room = max(args.max_new_tokens or 0, args.steps + 1)
  ids = jnp.asarray(rng.integers(3, min(base.config.vocab_size, 1000), (args.slots, args.input_length)), jnp.int32)
  mask = jnp.ones_like(ids)
  prefill = jax.jit(
    lambda state, prefix: nnx.merge(graphdef, state).prefill(ids, mask, prefix=prefix, max_new_tokens=room)
  )
  step = jax.jit(lambda state, cache, tok, t: nnx.merge(graphdef, state).decode_step(cache, tok, t), donate_argnums=1)
  out = {}
  for name, prefix in (("adaption", prompt), ("none", None)):
    logits, cache = prefill(state, prefix)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    cost = step.lower(state, cache, tok, jnp.int32(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out[f"{name}_flops"] = cost.get("flops", float("nan"))
    out[f"{name}_bytes"] = cost.get("bytes accessed", float("nan"))
    logits, cache = step(state, cache, tok, jnp.int32(0))  # compile
    jax.block_until_ready(logits)
    times = []
    for t in range(1, args.steps):
      start = time.perf_counter()
      logits, cache = step(state, cache, tok, jnp.int32(t))
      jax.block_until_ready(logits)
      times.append(time.perf_counter() - start)
    out[name], out[f"{name}_min"] = statistics.median(times), min(times)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--before", required=True, help="the other checkout's root (its jaxprompt/ is imported)")
  p.add_argument("--model", help="a HF folder (default: --preset's random weights)")
  p.add_argument("--preset", default="llama-small")
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--adapter-len", type=int, default=10)
  p.add_argument("--input-length", type=int, default=32)
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--max-new-tokens", type=int, help="the cache's room after the input (default: --steps)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--json", help="write the figures here too")
  p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.measure:
    print(json.dumps(measure(args)))
    return 0
  trees = {"before": Path(args.before).resolve(), "after": HERE}
  runs: dict[str, list[dict]] = {k: [] for k in trees}
  forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
  for _ in range(args.rounds):
    for name, root in trees.items():
      env = dict(os.environ, PYTHONPATH=str(root))
      res = subprocess.run(
        [sys.executable, __file__, *forwarded, "--measure"], env=env, capture_output=True, text=True, check=True
      )
      runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
  # the median over rounds of each process's median step; and the fastest step seen (a shared machine's noise
  # only ever adds time)
  keys = ("adaption", "none", "adaption_min", "none_min")
  fig = {name: {k: statistics.median(r[k] for r in rs) for k in keys} for name, rs in runs.items()}
  fastest = {name: {k: min(r[k] for r in rs) for k in keys[2:]} for name, rs in runs.items()}
  report = dict(
    model=args.model or args.preset,
    slots=args.slots,
    adapter_len=args.adapter_len,
    input_length=args.input_length,
    device=_device(),
    step_seconds=fig,
    before_over_after=fig["before"]["adaption"] / fig["after"]["adaption"],
    before_over_after_fastest=fastest["before"]["adaption_min"] / fastest["after"]["adaption_min"],
    before_over_after_no_prompt=fig["before"]["none"] / fig["after"]["none"],
    before_over_after_no_prompt_fastest=fastest["before"]["none_min"] / fastest["after"]["none_min"],
    max_new_tokens=args.max_new_tokens,
    step_flops={name: {k: rs[0][f"{k}_flops"] for k in ("adaption", "none")} for name, rs in runs.items()},
    step_bytes={name: {k: rs[0].get(f"{k}_bytes") for k in ("adaption", "none")} for name, rs in runs.items()},
    after_adaption_over_none=fig["after"]["adaption"] / fig["after"]["none"],
    before_adaption_over_none=fig["before"]["adaption"] / fig["before"]["none"],
    rounds=runs,
  )
  text = json.dumps(report, indent=1)
  print(text)
  if args.json:
    Path(args.json).write_text(text)
  return 0


def _device() -> str:
  import jax

  d = jax.devices()[0]
  return f"{d.platform} {getattr(d, 'device_kind', '')} x{jax.device_count()}"


if __name__ == "__main__":
  sys.exit(main())
