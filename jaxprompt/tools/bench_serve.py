"""`jaxprompt bench --serve`: the server under C concurrent clients over K prompts, against the same requests served
one at a time by jaxprompt and against PEFT's pattern (one PeftModel with K adapters, `set_adapter` and `generate`
per request), all in one invocation on this machine. Localhost only, bounded in requests and time.

Every request is greedy with the same max_tokens, so all three do the same decoding work per request (PEFT's
`generate` stops a row at EOS as ours does). Random soft prompts [P, H] stand in for trained ones.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

INPUTS = [
  "Once upon a time",
  "The little dog",
  "She wanted to",
  "One day, a boy named Tim",
  "The sun was",
  "In the park",
  "Mom said",
  "They played with",
]


def _pct(xs, q):
  return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


async def _drive(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, timeout: float):
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
    p50_s=_pct(latencies, 50),
    p99_s=_pct(latencies, 99),
    errors=errors[0],
  )


def _batch_mean(url: str) -> float:
  import httpx

  vals = {}
  for line in httpx.get(url + "/metrics").text.splitlines():
    if line.startswith("jaxprompt_batch_size_sum") or line.startswith("jaxprompt_batch_size_count"):
      k, v = line.split()
      vals[k] = float(v)
  return vals["jaxprompt_batch_size_sum"] / max(vals["jaxprompt_batch_size_count"], 1)


def _peft(folder: Path, prompts: dict[str, np.ndarray], jobs, max_tokens: int) -> dict:
  import torch
  from peft import PeftModel, PromptTuningConfig, get_peft_model
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.manual_seed(0)
  base = AutoModelForCausalLM.from_pretrained(folder).eval()
  tok = AutoTokenizer.from_pretrained(folder)
  names = list(prompts)
  p, _ = prompts[names[0]].shape
  model: PeftModel | None = None
  for name in names:
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p)
    if model is None:
      model = get_peft_model(base, cfg, adapter_name=name)
    else:
      model.add_adapter(name, cfg)
    with torch.no_grad():
      model.prompt_encoder[name].embedding.weight.copy_(torch.as_tensor(prompts[name]))
  model.eval()
  latencies, tokens = [], 0
  start = time.perf_counter()
  with torch.no_grad():
    for name, text in jobs:
      t = time.perf_counter()
      model.set_adapter(name)
      enc = tok(text, return_tensors="pt")
      out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id or 0)
      tokens += int(out.shape[1] - enc["input_ids"].shape[1])
      latencies.append(time.perf_counter() - t)
  wall = time.perf_counter() - start
  return dict(
    requests=len(jobs),
    seconds=wall,
    requests_per_s=len(jobs) / wall,
    tokens_per_s=tokens / wall,
    p50_s=_pct(latencies, 50),
    p99_s=_pct(latencies, 99),
    errors=0,
  )


def run_serve_bench(
  model: str,
  *,
  tokenizer: str | None = None,
  prompts: int = 8,
  clients: int = 16,
  requests: int = 128,
  max_tokens: int = 16,
  prompt_length: int = 20,
  vs_peft: bool = False,
  timeout: float = 600.0,
) -> dict:
  import torch  # noqa: F401 — fail early under --vs-peft without the torch extra

  from jaxprompt.models.loading import load_model, load_tokenizer

  base = load_model(model)
  tok = load_tokenizer(tokenizer or model)
  values, jobs = _prompts_and_jobs(base, prompts, requests, prompt_length)
  result = dict(
    model=model, prompts=prompts, clients=clients, requests=requests, max_tokens=max_tokens, prompt_length=prompt_length
  )
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / "prompts").mkdir()
    for name, v in values.items():
      np.save(tmp / "prompts" / f"{name}.npy", v)
    opts = dict(
      prompts=str(tmp / "prompts"),
      tokenizer=tokenizer,
      name="base",
      max_tokens=max(max_tokens, 16),
      max_input_tokens=32,
    )  # the inputs are short: length buckets 16 and 32
    for label, max_batch, conc in (("jaxprompt_server", clients, clients), ("jaxprompt_one_at_a_time", 1, 1)):
      _serve_under_load(model, label, result, opts, jobs, max_batch=max_batch, clients=conc, timeout=timeout)
    if vs_peft:
      _peft_per_request(base, tok, tmp / "hf", values, jobs, result)
  _summarise(result, vs_peft)
  return result


def _prompts_and_jobs(base, prompts: int, requests: int, prompt_length: int):
  """({name: random prompt [prompt_length, H] drawn from the embedding table}, [(prompt name, input)] per request)."""
  rng = np.random.default_rng(0)
  table = np.asarray(base.embedding_table(), np.float32)
  values = {f"task{k}": table[rng.integers(0, table.shape[0], prompt_length)] for k in range(prompts)}
  jobs = [(f"task{int(rng.integers(prompts))}", INPUTS[i % len(INPUTS)]) for i in range(requests)]
  return values, jobs


def _serve_under_load(model: str, label: str, result: dict, opts: dict, jobs, *, max_batch, clients, timeout) -> None:
  """Warm up a server batching up to `max_batch` requests, then drive it with `clients` clients: `result[label]`."""
  from jaxprompt.serve.server import build, serving

  app, engine, _ = build(model, max_batch=max_batch, max_wait_ms=5.0, **opts)
  programs, seconds = engine.warmup()  # every batch x length bucket compiled before the clock starts
  result[label + "_warmup"] = dict(programs=programs, seconds=seconds)
  with serving(app) as url:
    result[label] = asyncio.run(_drive(url, jobs, clients, result["max_tokens"], timeout))
    result[label]["mean_batch"] = _batch_mean(url)
  print(
    f"{label}: {result[label]['requests_per_s']:.2f} req/s, {result[label]['tokens_per_s']:.1f} tok/s, "
    f"p50 {result[label]['p50_s'] * 1000:.0f} ms, p99 {result[label]['p99_s'] * 1000:.0f} ms",
    flush=True,
  )


def _peft_per_request(base, tok, folder: Path, values: dict, jobs, result: dict) -> None:
  """The same requests through PEFT (the model saved to `folder` first), against the server."""
  from jaxprompt.models.loading import save_pretrained

  save_pretrained(base, folder, tokenizer=tok)
  result["peft_per_request"] = _peft(folder, values, jobs, result["max_tokens"])
  r = result["peft_per_request"]
  print(
    f"peft_per_request: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, p50 {r['p50_s'] * 1000:.0f} ms",
    flush=True,
  )
  result["speedup_vs_peft"] = result["jaxprompt_server"]["requests_per_s"] / r["requests_per_s"]


def _summarise(result: dict, vs_peft: bool) -> None:
  """The server's speed-up over one-at-a-time serving (and PEFT), into `result` and printed."""
  result["speedup_vs_one_at_a_time"] = (
    result["jaxprompt_server"]["requests_per_s"] / result["jaxprompt_one_at_a_time"]["requests_per_s"]
  )
  print(
    f"server vs one at a time: {result['speedup_vs_one_at_a_time']:.2f}x"
    + (f"; vs PEFT: {result['speedup_vs_peft']:.2f}x" if vs_peft else ""),
    flush=True,
  )
