"""`jaxprompt serve`'s continuous scheduler (decode slots): prompts of every method and length, the base alone and
mixed max_tokens in one step equal `jaxprompt generate --greedy` (decoder and T5); short requests pass a long one
(slots reused); per-row sampling settings share steps and a seeded sample is its own; a client that goes away frees
its slot; calls of several steps stream a request's tokens at once and end it at its stop string, with slots reused
while a call is in flight. Servers bind 127.0.0.1 on a free port and are always stopped; every wait is bounded."""

import asyncio
import contextlib
import io
import json
import math
import threading
import time

import numpy as np
import pytest

import jaxprompt

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from jaxprompt import cli  # noqa: E402
from jaxprompt.inference import text as T  # noqa: E402
from jaxprompt.prompts.io import load_prompt_source  # noqa: E402
from tests.helpers import write_byte_decoder  # noqa: E402

TEXTS = ["max: 3 7 1 8", "hello there", "min: 9 4", "a"]


PTUNING = {"method": "p_tuning", "encoder_reparameterization_type": "MLP"}
PREFIX = {"method": "prefix_tuning", "prefix_projection": False}
TEMPLATES = {"tmpl0": ("[P:1] {text} [P:1]", 2), "tmpl1": ("[P:3] {text}", 3)}  # (template, its virtual tokens)


def _write(folder, name: str, value, spec: dict | None = None, length: int | None = None) -> tuple[str, int]:
  """A .npy prompt (and its record's spec) -> (its name, its length: rows, or `length`)."""
  np.save(folder / f"{name}.npy", np.asarray(value, np.float32))
  if spec is not None:
    (folder / f"{name}.json").write_text(json.dumps({"prompt_spec": spec}))
  return name, np.shape(value)[0] if length is None else length


def _prompts(folder, base_folder) -> dict[str, int]:
  """20 prompts of 5 lengths (1, 2, 3, 4, 6 slots) as files in `folder`: soft prompts (prompt tuning), P-tuning
  outputs, prefix tables, DePT, adaption prompts (a decoder; T5, which takes none, gets more soft prompts) and
  templated prompts (their rows among the input's tokens). -> their lengths by name."""
  from jaxprompt.prompts.adaption import pack

  base = jaxprompt.load_model(base_folder)
  h, s = base.hidden_size, base.prefix_slots()
  rng = np.random.default_rng(0)
  folder.mkdir()
  # few shapes per method: each compiles its reference generation (the 5 lengths come from all methods together)
  names = [_write(folder, f"soft{i}", rng.normal(size=(p, h))) for i, p in enumerate((1, 4, 1, 4, 4, 1))]
  names += [_write(folder, f"ptune{i}", rng.normal(size=(p, h)), PTUNING) for i, p in enumerate((2, 3))]
  kv = lambda p: rng.normal(size=(p, s.layers, 2, s.heads, s.head_dim))  # noqa: E731
  names += [_write(folder, f"pfx{i}", kv(p), PREFIX) for i, p in enumerate((6, 3, 1, 6))]
  r, n = 2, 4  # DePT: m prompt vectors, rank r, offsets for n input positions
  for i, m in enumerate((3, 2)):
    spec = {"method": "dept", "rank": r, "max_length": n}
    names.append(_write(folder, f"dept{i}", rng.normal(size=(m + r + math.ceil(n * r / h), h)), spec, m))
  for i, (layers, a) in enumerate(((2, 2), (1, 4), (2, 1), (2, 3))):
    if base.supports_adaption:  # prompts [L_a, A, H] and gates [L_a] of the top L_a layers
      value = pack(rng.normal(size=(layers, a, h)), rng.uniform(0.5, 1.5, size=layers))
      names.append(_write(folder, f"adapt{i}", value, {"method": "adaption"}, a))
    else:
      names.append(_write(folder, f"extra{i}", rng.normal(size=(4, h))))
  for name, (template, p) in TEMPLATES.items():
    names.append(_write(folder, name, rng.normal(size=(p, h)), {"method": "prompt_tuning", "template": template}))
  return dict(names)


def _greedy(engine, prompts_dir, name, max_new_tokens: int) -> list[list[int]]:
  """What `jaxprompt generate --greedy` makes for every text under prompt `name` (None: the base): tokens."""
  prompt = [] if name is None else [load_prompt_source(prompts_dir / f"{name}.npy")]
  records = T.generate_text(engine.base, engine.tokenizer, TEXTS, prompt, max_new_tokens=max_new_tokens)
  return [r["tokens"] for r in records]


@pytest.mark.parametrize("kind", ["byte_llama", "byte_t5"])
def test_mixed_prompts_lengths_methods_and_max_tokens_each_equal_generate_greedy(kind, request, tmp_path):
  from jaxprompt.serve.server import build, serving

  folder = request.getfixturevalue(kind)
  lengths = _prompts(tmp_path / "prompts", folder)
  names = list(lengths)
  app, engine, problems = build(
    str(folder), prompts=str(tmp_path / "prompts"), name="base", slots=8, max_batch=4, max_tokens=6, max_input_tokens=16
  )
  assert problems == [] and engine.slots is not None  # every method in decode slots (the default scheduler)
  assert len(names) == 20 and sorted(set(lengths.values())) == [1, 2, 3, 4, 6]
  if engine.base.supports_adaption:  # adaption prompts are kept, and travel per slot, as keys/values [Y, N, A, K, D]
    s = engine.base.prefix_slots()
    held = engine.store.get("adapt1").prefix
    assert held.adaption is None and held.adaption_keys.shape == (s.layers, 1, 4, s.heads, s.head_dim)
    keys, values, *_ = engine.slots.state["cache"].adaption
    assert keys.shape == values.shape == (s.layers, 8, 4, s.heads, s.head_dim)
  want = {n: _greedy(engine, tmp_path / "prompts", n, 6) for n in names + [None]}
  # 64 requests over 20 prompts (5 lengths, every method) and the base, max_tokens 1..6, through 8 slots
  jobs = [(n, i % len(TEXTS), 1 + (i * 5) % 6) for i, n in enumerate(((names + [None]) * 4)[:64])]

  def expected(name, text, k):
    tokens = want[name][text][:k]
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)

  async def fire(url):
    async with httpx.AsyncClient(timeout=120) as c:
      bodies = [dict(model=n or "base", prompt=TEXTS[t], max_tokens=k, temperature=0) for n, t, k in jobs]
      return await asyncio.gather(*[c.post(url + "/v1/completions", json=b) for b in bodies])

  with serving(app) as url:
    responses = asyncio.run(asyncio.wait_for(fire(url), 600))
    metrics = httpx.get(url + "/metrics").text
  assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
  got = [r.json()["choices"][0]["text"] for r in responses]
  assert got == [expected(*j) for j in jobs]
  busy = _histogram(metrics, "jaxprompt_step_busy_slots")
  assert busy["count"] > 0 and busy["sum"] / busy["count"] > 1  # steps advanced several requests at once
  assert _histogram(metrics, "jaxprompt_time_to_first_token_seconds")["count"] == len(jobs)
  # and `jaxprompt generate --greedy` itself, for a templated prompt (the adaption one on the decoder)
  name = "adapt1" if "adapt1" in names else "tmpl1"
  args = [
    "generate",
    "--model",
    folder,
    "--prompt",
    tmp_path / "prompts" / f"{name}.npy",
    "--greedy",
    "--max-new-tokens",
    6,
  ]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main([*map(str, args), *[x for t in TEXTS for x in ("--input", t)], "--jsonl"]) == 0
  assert [json.loads(line)["output"] for line in out.getvalue().splitlines()] == [
    expected(name, t, 6) for t in range(len(TEXTS))
  ]


def _histogram(text: str, name: str) -> dict:
  out = {}
  for line in text.splitlines():
    for part in ("sum", "count"):
      if line.startswith(f"{name}_{part} "):
        out[part] = float(line.split()[1])
  return out


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
  """A byte decoder that never ends a completion early (no EOS id): a request runs to its max_tokens."""
  root = tmp_path_factory.mktemp("endless")
  folder = write_byte_decoder(root / "m", "llama3-gqa-untied", seed=5, eos_token_id=None)
  prompts = root / "prompts"
  prompts.mkdir()
  rng = np.random.default_rng(2)
  for name, p in (("one", 3), ("two", 5)):
    np.save(prompts / f"{name}.npy", rng.normal(size=(p, 32)).astype(np.float32))
  return folder, prompts


@pytest.fixture(scope="module")
def endless_server(endless):
  from jaxprompt.serve.server import build, serving

  folder, prompts = endless
  app, engine, _ = build(
    str(folder),
    prompts=str(prompts),
    name="base",
    slots=4,
    max_batch=4,
    max_tokens=1000,
    max_input_tokens=16,
    prompt_cache=4,  # a device cache of 4 prompts (32 served in test_a_device_cache_of_4_prompts_serves_32...)
  )
  engine.warmup()  # no compilation while requests run
  with serving(app) as url:
    yield url, engine


def test_short_requests_sent_while_a_long_one_runs_all_finish_first(endless_server):
  from jaxprompt.serve.engine import Request

  _, engine = endless_server
  order, started, done = [], threading.Event(), threading.Event()

  def finished(name):
    def on_done(result):
      order.append((name, result["completion_tokens"]))
      if len(order) == 21:
        done.set()

    return on_done

  long = Request(
    "complete", engine.store.get("one"), TEXTS[0], engine.encode(TEXTS[0]), finished("long"), max_tokens=200
  )
  long.on_delta = lambda *_: started.set()
  engine.submit([long])
  assert started.wait(120)  # it is decoding
  shorts = [
    Request("complete", engine.store.get("two"), t, engine.encode(t), finished("short"), max_tokens=2)
    for t in TEXTS * 5
  ]
  engine.submit(shorts)
  assert done.wait(300)
  assert order[-1] == ("long", 200) and order[:-1] == [("short", 2)] * 20


def test_sampling_settings_share_steps_and_a_seeded_sample_is_its_own(endless_server, endless):
  import jax

  url, engine = endless_server
  _, prompts = endless
  sampled = dict(model="one", prompt=TEXTS[0], max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
  with httpx.Client(timeout=120) as c:
    alone = c.post(url + "/v1/completions", json=sampled).json()["choices"][0]["text"]

  async def crowd():
    async with httpx.AsyncClient(timeout=120) as ac:
      others = [dict(model="two", prompt=TEXTS[1], max_tokens=12, temperature=1.5, seed=s) for s in range(3)] + [
        dict(model="base", prompt=TEXTS[2], max_tokens=12, temperature=0),
        dict(sampled, top_p=0.5),
      ]
      return await asyncio.gather(*[ac.post(url + "/v1/completions", json=b) for b in [sampled, *others]])

  before = _histogram(httpx.get(url + "/metrics").text, "jaxprompt_step_busy_slots")
  crowded = asyncio.run(asyncio.wait_for(crowd(), 300))
  after = _histogram(httpx.get(url + "/metrics").text, "jaxprompt_step_busy_slots")
  texts = [r.json()["choices"][0]["text"] for r in crowded]
  assert texts[0] == alone and len(set(texts[1:4])) > 1
  assert (after["sum"] - before["sum"]) / (after["count"] - before["count"]) > 2  # the settings shared steps
  # and the seeded sample is what `jaxprompt generate --seed 7` draws for that row alone
  ref = T.generate_text(
    engine.base,
    engine.tokenizer,
    [TEXTS[0]],
    [load_prompt_source(prompts / "one.npy")],
    max_new_tokens=12,
    method="sample",
    temperature=0.8,
    top_p=0.9,
    rng=jax.random.key(7)[None],
  )
  assert ref[0]["output"] == alone


def test_a_free_slot_decodes_greedily_whatever_a_finished_request_left_in_it(endless_server):
  """A free slot keeps the sampling settings its last request left (a never used one: zeros, top_p 0); the step
  decodes it greedily all the same, so a finished sampled request never makes later steps sample (and sort the
  vocabulary) for nobody: the free slots' tokens are the argmax while the live ones sample."""
  import jax.numpy as jnp
  from flax import nnx

  from jaxprompt.serve import slots as S

  _, engine = endless_server
  layout, n = engine.slots.layout, engine.slots.layout.slots
  state = S.empty_slots(engine.graphdef, engine.state, layout, engine.slots._none, engine._pad)
  state = dict(
    state,
    greedy=jnp.zeros(n, bool),
    temperature=jnp.full(n, 50.0),
    top_p=jnp.full(n, 0.999),
    tokens=jnp.arange(n, dtype=jnp.int32) + 3,
  )
  live = np.arange(n) % 2 == 0
  model = nnx.merge(engine.graphdef, engine.state)
  for _ in range(3):
    logits, _ = model.decode_step(state["cache"], state["tokens"], state["t"])
    state, out = S.step(engine.graphdef, engine.state, state, np.zeros(n, bool), live, layout=layout)
    np.testing.assert_array_equal(np.asarray(out[0])[0, ~live], np.argmax(np.asarray(logits), -1)[~live])


def test_several_decode_steps_per_call_while_every_slot_is_busy_give_each_request_its_own_text(endless_server):
  """With every slot busy the scheduler runs several decode steps per device call (`--decode-steps`, default 8,
  no more than any request has left); the texts are those of the same requests sent one at a time (one step per
  call: a slot is free), greedy and seeded sampling alike."""
  url, engine = endless_server
  bodies = [dict(model="base", prompt=t, max_tokens=20, temperature=0) for t in TEXTS[:3]]
  bodies.append(dict(model="one", prompt=TEXTS[3], max_tokens=20, temperature=0.8, top_p=0.9, seed=7))

  async def together():
    async with httpx.AsyncClient(timeout=120) as c:
      return await asyncio.gather(*[c.post(url + "/v1/completions", json=b) for b in bodies])

  alone = [httpx.post(url + "/v1/completions", json=b, timeout=120).json()["choices"][0]["text"] for b in bodies]
  before = _histogram(httpx.get(url + "/metrics").text, "jaxprompt_decode_steps_per_call")
  responses = asyncio.run(asyncio.wait_for(together(), 120))
  after = _histogram(httpx.get(url + "/metrics").text, "jaxprompt_decode_steps_per_call")
  assert [r.json()["choices"][0]["text"] for r in responses] == alone
  calls, steps = after["count"] - before["count"], after["sum"] - before["sum"]
  assert engine.slots.decode_steps == 8 and steps > calls  # some calls ran several steps (4 slots, all busy)


async def _streamed(c, url: str, body: dict) -> dict:
  """A streamed completion: its text, finish reason, usage, log-probabilities (tokens and values, every chunk's)
  and how many events carried text."""
  out = dict(text="", finish=None, usage=None, tokens=[], logprobs=[], events=0)
  async with c.stream("POST", url + "/v1/completions", json=body) as r:
    assert r.status_code == 200
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      event = json.loads(line[6:])
      if event.get("usage"):
        out["usage"] = event["usage"]["completion_tokens"]
        continue
      choice = event["choices"][0]
      out["events"] += bool(choice["text"])
      out["text"] += choice["text"]
      out["finish"] = choice["finish_reason"] or out["finish"]
      if choice.get("logprobs"):
        out["tokens"] += choice["logprobs"]["tokens"]
        out["logprobs"] += choice["logprobs"]["token_logprobs"]
  return out


def test_a_call_of_several_steps_streams_its_tokens_at_once_and_ends_a_request_at_its_stop_string(endless_server):
  """With every slot busy a call of k steps hands each request its k tokens at once: one stream event for them
  (not one per token), and a stop string completed among them ends the request at the token that completes it —
  text, finish reason, usage and log-probabilities are those of the same request alone (one step per call). The
  loop runs a call ahead of the host, so a request that stopped is stepped once more: those tokens are not the next
  request's in its slot."""
  url, _ = endless_server
  plain = [  # 12 requests through 4 slots: a slot whose request stopped early is reused while a call is in flight
    dict(model=m, prompt=t, max_tokens=30, temperature=0, logprobs=1, stream=True, stream_options={"include_usage": 1})
    for m in ("base", "one", "two")
    for t in TEXTS
  ]

  async def alone(bodies):
    async with httpx.AsyncClient(timeout=120) as c:
      return [await _streamed(c, url, b) for b in bodies]

  async def together(bodies):
    async with httpx.AsyncClient(timeout=120) as c:
      return await asyncio.gather(*[_streamed(c, url, b) for b in bodies])

  texts = [r["text"] for r in asyncio.run(asyncio.wait_for(alone(plain), 300))]
  stops = [t[len(t) // 2 : len(t) // 2 + 2] for t in texts]  # each request stops early (its first occurrence)
  assert all(len(s) == 2 and "\ufffd" not in s for s in stops), texts
  bodies = [dict(b, stop=[s]) for b, s in zip(plain, stops, strict=True)]
  one_by_one = asyncio.run(asyncio.wait_for(alone(bodies), 300))
  crowded = asyncio.run(asyncio.wait_for(together(bodies), 300))
  same = ("text", "finish", "usage", "tokens")
  for a, b, stop in zip(one_by_one, crowded, stops, strict=True):
    assert a["finish"] == "stop" and stop not in a["text"] and a["usage"] < 30
    assert [b[k] for k in same] == [a[k] for k in same]
    np.testing.assert_allclose(b["logprobs"], a["logprobs"], atol=1e-5)  # batch rows round differently: 1e-6
  assert sum(b["events"] for b in crowded) < sum(a["events"] for a in one_by_one)  # calls of several tokens


def test_a_client_that_disconnects_mid_stream_frees_its_slot(endless_server):
  url, engine = endless_server
  body = dict(model="one", prompt=TEXTS[0], max_tokens=1000, temperature=0, stream=True)

  async def scenario():
    async with httpx.AsyncClient(timeout=120) as c:
      streams = [c.stream("POST", url + "/v1/completions", json=body) for _ in range(4)]
      responses = [await s.__aenter__() for s in streams]
      readers = [r.aiter_text() for r in responses]  # kept: a reader dropped unread closes its response
      for reader in readers:  # every slot holds a 1000-token request
        await reader.__anext__()
      await streams[0].__aexit__(None, None, None)  # one client goes away
      short = await c.post(url + "/v1/completions", json=dict(body, max_tokens=3, stream=False))
      busy = len(engine.slots.live)
      for s in streams[1:]:
        await s.__aexit__(None, None, None)
      return short, busy

  short, busy = asyncio.run(asyncio.wait_for(scenario(), 300))
  assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
  assert busy == 3, busy  # the other three long requests are still decoding: the short one took the freed slot
  end = time.monotonic() + 60
  while engine.slots.live and time.monotonic() < end:  # the rest go as their clients close
    time.sleep(0.05)
  assert not engine.slots.live


def test_a_stream_asking_for_usage_ends_with_openai_s_usage_chunk(endless_server):
  url, _ = endless_server
  body = dict(model="two", prompt=TEXTS[1], max_tokens=5, temperature=0, stream=True)
  with httpx.Client(timeout=120) as c:
    for options, want in (({"include_usage": True}, 5), (None, None)):
      events = [
        json.loads(line[6:])
        for line in c.post(url + "/v1/completions", json=dict(body, stream_options=options)).text.splitlines()
        if line.startswith("data: {")
      ]
      usage = [e["usage"] for e in events if "usage" in e]
      assert [u["completion_tokens"] for u in usage] == ([want] if want else [])
      assert all(e["choices"] for e in events if "usage" not in e)


def test_a_device_cache_of_4_prompts_serves_32_prompts_round_robin(endless_server, endless, tmp_path):
  """32 prompts (two lengths) through a device cache of 4, twice round-robin over HTTP: every answer is the prompt's
  own `generate_text` greedy result, prompts are evicted and copied in again, the cache never holds more than 4;
  a prompt replaced while its request is queued still answers as the prompt the request asked for."""
  from jaxprompt.serve.cache import tree_bytes
  from jaxprompt.serve.engine import Request
  from jaxprompt.serve.slots import prompt_row

  url, engine = endless_server
  _, prompts = endless
  rng = np.random.default_rng(11)
  lengths = {"one": 3, "two": 5}
  for i in range(30):
    lengths[f"c{i}"] = (3, 5)[i % 2]
    np.save(tmp_path / f"c{i}.npy", rng.normal(size=(lengths[f"c{i}"], 32)).astype(np.float32))
  files = {n: (prompts if n in ("one", "two") else tmp_path) / f"{n}.npy" for n in lengths}
  store = engine.store
  try:
    for n in lengths:
      if n.startswith("c"):
        store.add(n, files[n])
    want = {}
    for p in (3, 5):  # the reference: every prompt of a length in one generate_text call
      names = [n for n, k in lengths.items() if k == p]
      recs = T.generate_text(
        engine.base, engine.tokenizer, TEXTS, [load_prompt_source(files[n]) for n in names], max_new_tokens=4
      )
      want |= {(n, t): recs[j * len(TEXTS) + t]["output"] for j, n in enumerate(names) for t in range(len(TEXTS))}
    before = store.stats().cache
    jobs = [(n, i % len(TEXTS)) for i, n in enumerate(list(lengths) * 2)]

    async def fire():
      async with httpx.AsyncClient(timeout=120) as c:
        bodies = [dict(model=n, prompt=TEXTS[t], max_tokens=4, temperature=0) for n, t in jobs]
        return await asyncio.gather(*[c.post(url + "/v1/completions", json=b) for b in bodies])

    responses = asyncio.run(asyncio.wait_for(fire(), 300))
    assert [r.json()["choices"][0]["text"] for r in responses] == [want[j] for j in jobs]
    after = store.stats().cache
    assert after.evictions - before.evictions >= 32 and after.misses - before.misses >= 32
    assert after.device_prompts <= 4 and len(store.cache.order()) <= 4
    row = tree_bytes(prompt_row(engine.slots.layout, store.get("one").prefix))  # every prompt's padded row
    assert after.peak_bytes == 4 * row and after.device_bytes <= 4 * row
    health = httpx.get(url + "/health").json()["prompt_cache"]
    assert health["evictions"] == after.evictions and health["limit_prompts"] == 4
    metrics = httpx.get(url + "/metrics").text
    assert f"jaxprompt_prompt_cache_evictions_total {float(after.evictions)}" in metrics
    assert "jaxprompt_prompts_host 32.0" in metrics
    # a request queued for c0, then c0 replaced by c2's array: it answers as the c0 it asked for
    asked, done = store.get("c0"), []
    engine.submit([Request("complete", asked, TEXTS[1], engine.encode(TEXTS[1]), done.append, max_tokens=4)])
    store.add("c0", files["c2"], replace=True)
    end = time.monotonic() + 120
    while not done and time.monotonic() < end:
      time.sleep(0.02)
    assert done and done[0]["text"] == want[("c0", 1)] and asked not in store.cache
  finally:
    for n in lengths:
      if n.startswith("c") and store.get(n) is not None:
        store.remove(n)


def test_the_mixed_serving_benchmark_serves_its_workload_with_every_scheduler(byte_llama):
  """`jaxprompt bench --serve --mixed` end to end on a tiny model: the continuous scheduler, the static one and the
  base alone each serve every request of the workload without an error, and the ratios are reported."""
  from jaxprompt.tools.bench_serve import Mixed, run_mixed_bench

  w = Mixed(prompts=2, prompt_lengths=(2, 3), requests=6, max_tokens=(1, 3), clients=3, width=2)
  result = run_mixed_bench(str(byte_llama), w, timeout=120)
  for label in ("continuous", "static", "continuous_no_prompt"):
    r = result[label]
    assert (r["requests"], r["errors"]) == (6, 0), label
    assert r["requests_per_s"] > 0 and r["tokens_per_s"] > 0, label
  assert result["continuous_vs_static"] > 0 and result["prompts_vs_none"] > 0
