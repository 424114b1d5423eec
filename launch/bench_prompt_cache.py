"""Measure the serving prompt tiers with many prompts: start-up time, host memory, device cache bytes, hits / misses /
evictions over a round-robin and a Zipf request stream (`jaxprompt serve --prompt-cache-mb`).

  python launch/bench_prompt_cache.py --model ../shared/fixtures/models/tinystories-656k --prompts 10000 \\
    --cache-mb 8 --requests 2000 --json /tmp/prompt_cache.json

Writes `--prompts` random soft prompts (.npy, lengths `--lengths`) under `--folder` (default a temporary folder,
never the repository), builds the server's store and engine as `jaxprompt serve` does (no HTTP: requests go to the
engine's queue), then sends each stream. A benchmark, not a test: the figures are this machine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stream:
  name: str
  requests: int
  seconds: float
  hits: int
  misses: int
  evictions: int
  device_bytes: int
  peak_bytes: int


def rss_mb() -> float:
  """This process's resident memory now (MiB), from /proc (Linux)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_prompts(folder: Path, n: int, lengths: list[int], hidden: int) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    p = lengths[i % len(lengths)]
    np.save(folder / f"p{i:05d}.npy", (0.1 * rng.normal(size=(p, hidden))).astype(np.float32))


def run_stream(engine, name: str, order: list[str], max_tokens: int, text: str) -> Stream:
  """Send requests for the prompts in `order` (at most the queue's size at a time); wait for every answer."""
  from jaxprompt.serve.engine import Request

  store = engine.store
  tokens = engine.encode(text)
  before = store.stats().cache
  start = time.monotonic()
  wave = engine.queue_size // 2
  done = threading.Semaphore(0)
  for i in range(0, len(order), wave):
    chunk = order[i : i + wave]
    engine.submit(
      [Request("complete", store.get(n), text, tokens, lambda _: done.release(), max_tokens=max_tokens) for n in chunk]
    )
    for _ in chunk:
      if not done.acquire(timeout=600):
        raise RuntimeError("a request did not finish in 600 s")
  after = store.stats().cache
  return Stream(
    name=name,
    requests=len(order),
    seconds=time.monotonic() - start,
    hits=after.hits - before.hits,
    misses=after.misses - before.misses,
    evictions=after.evictions - before.evictions,
    device_bytes=after.device_bytes,
    peak_bytes=after.peak_bytes,
  )


def zipf_order(names: list[str], n: int, s: float, seed: int = 0) -> list[str]:
  """`n` prompt names drawn with probability ~ 1 / rank^s (ranks in a random order of `names`)."""
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, len(names) + 1) ** s
  ranked = rng.permutation(names)
  return [str(x) for x in rng.choice(ranked, size=n, p=weights / weights.sum())]


def main(argv: list[str] | None = None) -> dict:
  a = parse(argv)
  from jaxprompt.serve.server import build, load_base

  folder = Path(a.folder or tempfile.mkdtemp(prefix="jaxprompt-prompts-"))
  hidden = load_base(a.model).hidden_size
  if not any(folder.glob("*.npy")):
    write_prompts(folder, a.prompts, a.lengths, hidden)
  app, engine, _ = build(
    a.model,
    name="base",
    prompt_cache_mb=a.cache_mb,
    prompt_slots=max(a.lengths),
    slots=a.slots,
    max_batch=a.slots,
    max_tokens=a.max_tokens,
    max_input_tokens=16,
    queue_size=4 * a.slots,
  )
  store = engine.store
  for p in sorted(a.lengths):  # compile each length's precomputation before measuring
    store.add("warm", next(f for f in sorted(folder.glob("*.npy")) if np.load(f, mmap_mode="r").shape[0] == p))
    store.remove("warm")
  rss0, start = rss_mb(), time.monotonic()
  problems = store.load_dir(folder)
  startup, rss1 = time.monotonic() - start, rss_mb()
  programs, warm = engine.warmup()
  stats = store.stats()
  engine.start()
  names = store.names()
  try:
    streams = [
      run_stream(engine, "round-robin", [names[i % len(names)] for i in range(a.requests)], a.max_tokens, a.text),
      run_stream(engine, f"zipf s={a.zipf}", zipf_order(names, a.requests, a.zipf), a.max_tokens, a.text),
    ]
  finally:
    engine.stop(60)
  out = dict(
    prompts=len(names),
    problems=len(problems),
    startup_seconds=round(startup, 1),
    per_prompt_ms=round(1000 * startup / max(len(names), 1), 2),
    warmup=dict(programs=programs, seconds=round(warm, 1)),
    host_rss_delta_mb=round(rss1 - rss0, 1),
    host_prompt_bytes=stats.host_bytes,
    cache_limit_bytes=store.cache.limits.bytes,
    streams=[dataclasses.asdict(s) for s in streams],
  )
  print(json.dumps(out, indent=2))
  if a.json:
    Path(a.json).write_text(json.dumps(out, indent=2))
  return out


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, help="a causal base model folder (its tokenizer beside it)")
  p.add_argument("--prompts", type=int, default=10_000, help="prompts to write and serve (default 10000)")
  p.add_argument("--lengths", type=int, nargs="+", default=[4, 8, 16, 32], help="prompt lengths (round-robin)")
  p.add_argument("--folder", help="where the prompts are (written there when it has none; default: a temp folder)")
  p.add_argument("--cache-mb", type=float, default=8.0, help="--prompt-cache-mb (default 8)")
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--max-tokens", type=int, default=2, help="tokens per request (default 2)")
  p.add_argument("--requests", type=int, default=2000, help="requests per stream (default 2000)")
  p.add_argument("--zipf", type=float, default=1.1, help="the Zipf stream's exponent (default 1.1)")
  p.add_argument("--text", default="Once upon a time")
  p.add_argument("--json", help="also write the results here")
  return p.parse_args(argv)


if __name__ == "__main__":
  main(sys.argv[1:])
