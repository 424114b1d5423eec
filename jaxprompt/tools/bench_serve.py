"""`jaxprompt bench --serve`: the server under C concurrent clients over K prompts, against the same requests served
one at a time by jaxprompt and against PEFT's pattern (one PeftModel with K adapters, `set_adapter` and `generate`
per request), all in one invocation on this machine. Localhost only, bounded in requests and time. The clients run
in a process of their own (`loadgen`), so they do not take the server's interpreter lock.

Every request is greedy with the same max_tokens, so all three do the same decoding work per request (PEFT's
`generate` stops a row at EOS as ours does). Random soft prompts [P, H] stand in for trained ones.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxprompt.tools import loadgen

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
    p50_s=loadgen.pct(latencies, 50),
    p99_s=loadgen.pct(latencies, 99),
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
    spec = dict(kind="closed", url=url, jobs=jobs, clients=clients, max_tokens=result["max_tokens"], timeout=timeout)
    result[label] = loadgen.run(spec)
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


# -- the mixed workload: continuous vs static scheduling, with and without prompts ----------------------------------


@dataclasses.dataclass(frozen=True)
class Mixed:
  """A mixed workload: K prompts whose lengths cycle through `prompt_lengths`, `requests` requests each for a random
  prompt and input with max_tokens uniform in `max_tokens` (inclusive); arrivals open-loop Poisson at `rate`
  requests/s, or (rate 0) closed-loop from `clients` clients. `width`: decode slots (continuous) = batch size
  (static)."""

  prompts: int = 8
  prompt_lengths: tuple[int, ...] = (4, 8, 12, 16, 20)
  requests: int = 128
  max_tokens: tuple[int, int] = (1, 64)
  rate: float = 0.0
  clients: int = 16
  width: int = 8
  seed: int = 0
  decode_steps: int = 8  # continuous: decode steps per call at most (`serve --decode-steps`)


def run_mixed_bench(model: str, workload: Mixed, *, tokenizer: str | None = None, timeout: float = 1800.0) -> dict:
  """The same requests served by the continuous scheduler, the static one, and the continuous one without their
  prompts (the base alone), one after the other in this process -> {label: measurements}, ratios printed.
  `model` "preset:NAME": a `bench` preset's random weights (`tokenizer`: a folder with a vocabulary that fits)."""
  from jaxprompt.models.loading import load_model

  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if model.startswith("preset:"):
      model, tokenizer = _preset_folder(model.split(":", 1)[1], tokenizer, tmp / "model"), None
    base = load_model(model)
    values, jobs = _mixed_jobs(base, workload)
    (tmp / "prompts").mkdir()
    for name, v in values.items():
      np.save(tmp / "prompts" / f"{name}.npy", v)
    del base
    result: dict = dict(model=model, workload=dataclasses.asdict(workload))
    for label, scheduler, prompted in (
      ("continuous", "continuous", True),
      ("static", "static", True),
      ("continuous_no_prompt", "continuous", False),
    ):
      run = jobs if prompted else [("base", text, k) for _, text, k in jobs]
      opts = dict(prompts=str(tmp / "prompts"), tokenizer=tokenizer, scheduler=scheduler)
      result[label] = _mixed_run(model, opts, run, workload, timeout)
      _print_run(label, result[label])
  result["continuous_vs_static"] = result["continuous"]["requests_per_s"] / result["static"]["requests_per_s"]
  result["prompts_vs_none"] = result["continuous"]["requests_per_s"] / result["continuous_no_prompt"]["requests_per_s"]
  print(
    f"continuous vs static: {result['continuous_vs_static']:.2f}x requests/s; with {workload.prompts} prompts vs "
    f"none: {result['prompts_vs_none']:.2f}x",
    flush=True,
  )
  return result


def _preset_folder(name: str, tokenizer: str | None, folder: Path) -> str:
  from transformers import AutoTokenizer

  from jaxprompt.errors import UsageError
  from jaxprompt.models.loading import save_pretrained
  from jaxprompt.tools.bench import PRESETS, random_base

  if name not in PRESETS or tokenizer is None:
    raise UsageError(f"--model preset:NAME needs a known preset ({', '.join(PRESETS)}) and --tokenizer FOLDER")
  try:
    tok = AutoTokenizer.from_pretrained(tokenizer)
  except (OSError, ValueError):  # a bare SentencePiece folder (tokenizer.model only)
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(tokenizer)
  save_pretrained(random_base(PRESETS[name]), folder, tokenizer=tok)
  return str(folder)


def _mixed_jobs(base, w: Mixed):
  """({name: random prompt [P, H]}, [(prompt name, input, max_tokens)])."""
  rng = np.random.default_rng(w.seed)
  table = np.asarray(base.embedding_table(), np.float32)
  lengths = [w.prompt_lengths[k % len(w.prompt_lengths)] for k in range(w.prompts)]
  values = {f"task{k}": table[rng.integers(0, table.shape[0], p)] for k, p in enumerate(lengths)}
  lo, hi = w.max_tokens
  jobs = [
    (f"task{int(rng.integers(w.prompts))}", INPUTS[int(rng.integers(len(INPUTS)))], int(rng.integers(lo, hi + 1)))
    for _ in range(w.requests)
  ]
  return values, jobs


REHEARSALS = 3  # untimed passes at most, until one compiles nothing new


def _mixed_run(model: str, opts: dict, jobs, w: Mixed, timeout: float) -> dict:
  """Build, warm up and drive one server; untimed passes compile what warm-up does not (the static scheduler's
  new-token buckets, and the batch shapes its grouping happens to form), repeated until one compiles nothing new
  (REHEARSALS at most)."""
  from jaxprompt.serve.server import build, serving

  _count_compiles()
  app, engine, _ = build(
    model,
    name="base",
    max_batch=w.width,
    slots=w.width,
    decode_steps=w.decode_steps,
    max_wait_ms=5.0,
    max_tokens=w.max_tokens[1],
    max_input_tokens=16,
    queue_size=len(jobs) + 1,
    **opts,
  )
  programs, seconds = engine.warmup()
  with serving(app) as url:
    spec = dict(kind="stream", url=url, jobs=jobs, rate=w.rate, clients=w.clients, seed=w.seed, timeout=timeout)
    for _ in range(REHEARSALS):  # rehearsals: the shapes the workload needs compiled
      seen = len(_COMPILES)
      loadgen.run(spec)
      if len(_COMPILES) == seen:
        break
    counters = ("jaxprompt_generated_tokens_total", "jaxprompt_step_busy_slots_sum", "jaxprompt_step_busy_slots_count")
    before, compiled = [_counter(url, n) for n in counters], list(_COMPILES)
    out = loadgen.run(spec)
    tokens, busy, steps = (_counter(url, n) - b for n, b in zip(counters, before, strict=True))
    out.update(tokens_per_s=tokens / out["seconds"], mean_busy_slots=busy / steps if steps else None)
  late = _COMPILES[len(compiled) :]  # a batch of a new shape still compiles in the timed pass (static)
  out.update(warmup=dict(programs=programs, seconds=seconds), timed_compiles=len(late), timed_compile_s=sum(late))
  return out


_COMPILES: list[float] = []  # every XLA compilation's seconds in this process (a benchmark's late compiles)


def _count_compiles() -> None:
  import jax

  if not getattr(_count_compiles, "done", False):
    _count_compiles.done = True
    jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: _COMPILES.append(secs) if name == "/jax/core/compile/backend_compile_duration" else None
    )


def _counter(url: str, name: str) -> float:
  import httpx

  for line in httpx.get(url + "/metrics").text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[1])
  return 0.0


def _print_run(label: str, r: dict) -> None:
  print(
    f"{label}: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} "
    f"ms p99 {r['ttft_p99_s'] * 1e3:.0f} ms, ITL p50 {r['itl_p50_s'] * 1e3:.1f} ms p99 {r['itl_p99_s'] * 1e3:.1f} ms"
    f" (warm-up {r['warmup']['programs']} programs, {r['warmup']['seconds']:.0f} s; {r['timed_compiles']} compiles"
    f" in the timed pass, {r['timed_compile_s']:.1f} s; errors {r['errors']})",
    flush=True,
  )
