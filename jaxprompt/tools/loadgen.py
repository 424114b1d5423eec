"""The load generator of `jaxprompt bench --serve`: HTTP clients driving a server, run in a process of its own.

A serving benchmark's clients must not share the server's interpreter: in one process they would take the server's
GIL for every event they parse, and the benchmark would measure both at once (on TinyStories-656K the clients took
a third of the server process's CPU). `run(spec)` starts `python loadgen.py` (this file, not the package: it imports
only the standard library, numpy and httpx, never JAX) with the spec as JSON on its standard input and returns the
measurements it prints; it is bounded by the spec's timeout. Localhost only: the benchmark passes the server's URL.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np


def run(spec: dict) -> dict:
  """Drive a server from a fresh process -> its measurements. spec: {"kind": "closed" (non-streamed completions,
  `max_tokens` each, `clients` clients) or "stream" (streamed, each job's own max_tokens; Poisson arrivals at
  `rate` requests/s, or closed loop from `clients` clients), "url", "jobs", "timeout", ...}."""
  try:
    done = subprocess.run(
      [sys.executable, __file__],
      input=json.dumps(spec),
      capture_output=True,
      text=True,
      timeout=spec["timeout"] + 30,
      check=False,
    )
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"the load generator ran past its {spec['timeout']:.0f} s") from e
  if done.returncode != 0:
    raise RuntimeError(f"the load generator failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
  return json.loads(done.stdout)


def pct(xs, q) -> float:
  """The q-th percentile of `xs` (NaN when empty)."""
  return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def closed(url: str, jobs: list, clients: int, max_tokens: int, timeout: float) -> dict:
  """`clients` clients each sending its next non-streamed completion (greedy, `max_tokens`) when the last returns."""
  import httpx

  queue: asyncio.Queue = asyncio.Queue()
  for j in jobs:
    queue.put_nowait(j)
  latencies, tokens, errors = [], [0], [0]

  async def client(c):
    while not queue.empty():
      name, text = queue.get_nowait()
      t = time.perf_counter()
      r = await c.post(
        url + "/v1/completions", json=dict(model=name, prompt=text, max_tokens=max_tokens, temperature=0)
      )
      latencies.append(time.perf_counter() - t)
      if r.status_code == 200:
        tokens[0] += r.json()["usage"]["completion_tokens"]
      else:
        errors[0] += 1

  async with httpx.AsyncClient(timeout=timeout) as c:
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[client(c) for _ in range(clients)]), timeout)
    wall = time.perf_counter() - start
  return dict(
    requests=len(jobs),
    seconds=wall,
    requests_per_s=len(jobs) / wall,
    tokens_per_s=tokens[0] / wall,
    p50_s=pct(latencies, 50),
    p99_s=pct(latencies, 99),
    errors=errors[0],
  )


async def _stream_one(c, url: str, job, stats: dict) -> None:
  """One streamed completion: its time to first text and mean gap between its tokens after that."""
  name, text, k = job
  body = dict(model=name, prompt=text, max_tokens=k, temperature=0, stream=True, stream_options={"include_usage": True})
  sent, first, last, tokens = time.perf_counter(), None, None, 0
  async with c.stream("POST", url + "/v1/completions", json=body) as r:
    if r.status_code != 200:
      stats["errors"] += 1
      return
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      event = json.loads(line[6:])
      if event.get("usage"):
        tokens = event["usage"]["completion_tokens"]
        continue
      now = time.perf_counter()
      if first is None and (event["choices"][0]["text"] or event["choices"][0]["finish_reason"]):
        first = now
      last = now
  stats["ttft"].append(first - sent)
  if tokens > 1:
    stats["itl"].append((last - first) / (tokens - 1))


async def stream(url: str, jobs: list, *, rate: float, clients: int, seed: int, timeout: float) -> dict:
  """Streamed completions [(prompt, input, max_tokens)]: open-loop Poisson arrivals at `rate` requests/s, or (rate
  0) closed loop from `clients` clients -> requests/s, time to first token and inter-token p50 / p99."""
  import httpx

  stats: dict = dict(ttft=[], itl=[], errors=0)
  limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
  async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
    start = time.perf_counter()
    if rate > 0:  # open loop: Poisson arrivals, whatever the server's pace
      gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(jobs))

      async def arrive(job, at):
        await asyncio.sleep(max(at - (time.perf_counter() - start), 0.0))
        await _stream_one(c, url, job, stats)

      runs = [arrive(j, t) for j, t in zip(jobs, np.cumsum(gaps), strict=True)]
    else:  # closed loop: each client sends its next request when the last one is answered
      queue = list(jobs)[::-1]

      async def client():
        while queue:
          await _stream_one(c, url, queue.pop(), stats)

      runs = [client() for _ in range(clients)]
    await asyncio.wait_for(asyncio.gather(*runs), timeout)
    wall = time.perf_counter() - start
  return dict(
    requests=len(jobs),
    seconds=wall,
    requests_per_s=len(jobs) / wall,
    ttft_p50_s=pct(stats["ttft"], 50),
    ttft_p99_s=pct(stats["ttft"], 99),
    itl_p50_s=pct(stats["itl"], 50),
    itl_p99_s=pct(stats["itl"], 99),
    errors=stats["errors"],
  )


def main() -> None:
  spec = json.load(sys.stdin)
  url, jobs, timeout = spec["url"], [tuple(j) for j in spec["jobs"]], spec["timeout"]
  if not url.startswith("http://127.0.0.1:"):
    raise SystemExit(f"loadgen: {url!r}: only a server on 127.0.0.1 is driven")
  if spec["kind"] == "closed":
    out = asyncio.run(closed(url, jobs, spec["clients"], spec["max_tokens"], timeout))
  else:
    out = asyncio.run(stream(url, jobs, rate=spec["rate"], clients=spec["clients"], seed=spec["seed"], timeout=timeout))
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
