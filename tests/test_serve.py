"""`jaxprompt serve`: the OpenAI client against the server, batching across prompts, classify vs eval, admin, bad
input, overload and SIGTERM. Servers bind 127.0.0.1 on a free port and are always stopped; every load loop is
bounded in count and time."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxprompt

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from jaxprompt import config as C  # noqa: E402
from jaxprompt.inference import text as T  # noqa: E402
from jaxprompt.prompts.io import load_prompt_source  # noqa: E402
from tests.helpers import write_byte_decoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["max: 3 7 1 8 2", "hello there", "min: 9 4", "a"]
TOKEN = "s3cret"


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 240.0) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.2)
  raise AssertionError(f"server at {url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def material(tmp_path_factory):
  """A tiny byte-level Llama and a folder of prompts: three soft prompts (.npy), a prefix-tuning export and a
  broken file (skipped at load)."""
  root = tmp_path_factory.mktemp("serve")
  folder = write_byte_decoder(root / "llama", "llama3-gqa-untied", seed=5)
  prompts = root / "prompts"
  prompts.mkdir()
  rng = np.random.default_rng(0)
  for name in ("alpha", "beta", "gamma"):
    np.save(prompts / f"{name}.npy", rng.normal(size=(4, 32)).astype(np.float32))
  # a prefix-tuning prompt: keys/values [P, Y, 2, K, D] for every layer (its method in the provenance file beside it)
  slots = jaxprompt.load_model(folder).prefix_slots()
  np.save(
    prompts / "prefixed.npy", rng.normal(size=(4, slots.layers, 2, slots.heads, slots.head_dim)).astype(np.float32)
  )
  (prompts / "prefixed.json").write_text(
    json.dumps({"prompt_spec": {"method": "prefix_tuning", "prefix_projection": False}})
  )
  (prompts / "broken.npy").write_bytes(b"not an array")
  spare = root / "spare.npy"
  np.save(spare, rng.normal(size=(4, 32)).astype(np.float32))
  return folder, prompts, spare


@pytest.fixture(scope="module")
def server(material):
  """The server in this process (a uvicorn thread), so its compiled programs are this session's."""
  from jaxprompt.serve.server import build, serving

  folder, prompts, _ = material
  app, engine, problems = build(
    str(folder),
    prompts=str(prompts),
    name="base",
    admin_token=TOKEN,
    max_batch=16,
    max_wait_ms=20,
    max_tokens=32,
    max_input_tokens=64,
  )
  with serving(app) as url:
    yield url, engine, problems


def _reference(engine, prompts_dir: Path, name: str, texts, max_new_tokens: int) -> list[str]:
  """What `jaxprompt generate --greedy --prompt NAME.npy` prints for these inputs (the function it calls)."""
  prompt = [load_prompt_source(prompts_dir / f"{name}.npy")]
  records = T.generate_text(engine.base, engine.tokenizer, texts, prompt, max_new_tokens=max_new_tokens)
  return [r["output"] for r in records]


def test_openai_client_gets_generate_greedy_text_for_each_prompt_and_streams_it(server, material):
  url, engine, problems = server
  _, prompts, _ = material
  assert len(problems) == 1 and "broken.npy" in problems[0]  # skipped with one line, not a crash
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
  assert {m.id for m in client.models.list().data} == {"base", "alpha", "beta", "gamma", "prefixed"}
  for name in ("alpha", "prefixed"):
    want = _reference(engine, prompts, name, TEXTS, 8)
    got = client.completions.create(model=name, prompt=TEXTS, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    assert got.usage.completion_tokens > 0 and got.usage.prompt_tokens > 0
    pieces = [
      c.choices[0].text
      for c in client.completions.create(model=name, prompt=TEXTS[0], max_tokens=8, temperature=0, stream=True)
    ]
    assert "".join(pieces) == want[0] and len(pieces) >= 2
  # a long completion streams in more than one piece of text (decoding runs in chunks of 8 tokens)
  long = [
    (m, t)
    for m in ("alpha", "beta", "gamma")
    for t in TEXTS
    if client.completions.create(model=m, prompt=t, max_tokens=24, temperature=0).usage.completion_tokens > 17
  ]
  assert long
  m, t = long[0]
  pieces = [
    c.choices[0].text for c in client.completions.create(model=m, prompt=t, max_tokens=24, temperature=0, stream=True)
  ]
  whole = client.completions.create(model=m, prompt=t, max_tokens=24, temperature=0).choices[0].text
  assert "".join(pieces) == whole and sum(1 for p in pieces if p) >= 2, pieces
  # a stop string cuts the text (and is not part of it)
  pairs = [(m, t) for m in ("alpha", "beta", "gamma") for t in TEXTS]
  texts = [client.completions.create(model=m, prompt=t, max_tokens=8, temperature=0).choices[0].text for m, t in pairs]
  full = max(texts, key=len)
  assert len(full) >= 3, texts
  m, t = pairs[texts.index(full)]
  cut = client.completions.create(model=m, prompt=t, max_tokens=8, temperature=0, stop=full[2]).choices[0]
  assert cut.text == full[: full.index(full[2])] and cut.finish_reason == "stop"


def test_concurrent_requests_over_three_prompts_batch_and_each_equals_its_single_result(server):
  url, engine, _ = server
  # soft prompts and a prefix-tuning prompt of the same length share batches (on a decoder both are keys/values)
  jobs = [(name, TEXTS[i % len(TEXTS)]) for i, name in enumerate(["alpha", "beta", "prefixed"] * 21 + ["base"])]

  def body(name, text, **kw):
    return dict(model=name, prompt=text, max_tokens=6, temperature=0, **kw)

  single = {}
  with httpx.Client(timeout=120) as c:
    for job in sorted(set(jobs)):
      r = c.post(url + "/v1/completions", json=body(*job))
      assert r.status_code == 200, r.text
      single[job] = r.json()["choices"][0]["text"]
    before = _batch_stats(c.get(url + "/metrics").text)

  async def fire():
    async with httpx.AsyncClient(timeout=120) as c:
      return await asyncio.gather(*[c.post(url + "/v1/completions", json=body(*job)) for job in jobs])

  responses = asyncio.run(asyncio.wait_for(fire(), 300))
  assert len(responses) == 64 and all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
  assert [r.json()["choices"][0]["text"] for r in responses] == [single[j] for j in jobs]
  assert len({r.json()["id"] for r in responses}) == 64
  with httpx.Client(timeout=60) as c:
    after = _batch_stats(c.get(url + "/metrics").text)
    requests, batches = after[0] - before[0], after[1] - before[1]
    assert requests == 64 and requests / batches > 1, (requests, batches)
    # a seeded sample is the same alone and inside a batch of other requests
    sampled = dict(model="beta", prompt=TEXTS[0], max_tokens=8, temperature=1.0, seed=7)
    alone = c.post(url + "/v1/completions", json=sampled).json()["choices"][0]["text"]

    async def crowd():
      async with httpx.AsyncClient(timeout=120) as ac:
        others = [ac.post(url + "/v1/completions", json=dict(sampled, seed=s)) for s in range(8)]
        return await asyncio.gather(ac.post(url + "/v1/completions", json=sampled), *others)

    crowded = asyncio.run(asyncio.wait_for(crowd(), 300))
    assert crowded[0].json()["choices"][0]["text"] == alone
    assert len({r.json()["choices"][0]["text"] for r in crowded}) > 1  # different seeds, different samples


def _batch_stats(text: str) -> tuple[float, float]:
  """(requests batched, batches) from the Prometheus text."""
  values = {}
  for line in text.splitlines():
    if line.startswith("jaxprompt_batch_size_sum") or line.startswith("jaxprompt_batch_size_count"):
      name, value = line.split()
      values[name] = float(value)
  return values["jaxprompt_batch_size_sum"], values["jaxprompt_batch_size_count"]


def test_classify_scores_equal_jaxprompt_eval_rank_scores(server, material):
  from jaxprompt import sharding as shd
  from jaxprompt.evaluation.evaluator import evaluator_for
  from jaxprompt.run import build_run

  url, _, _ = server
  folder, prompts, _ = material
  cfg = C.load(
    None,
    [
      f"model.path={folder}",
      "prompt.init=file",
      f"prompt.init_file={prompts / 'gamma.npy'}",
      "prompt.length=4",
      "data.task=quickstart",
      "data.taskless=true",
      "data.input_length=16",
      "data.target_length=2",
      "eval.max_examples=6",
      "eval.batch_size=6",
    ],
  )
  run, _ = build_run(cfg, mesh=shd.make_mesh(devices=jax.devices()[:1]), with_train_data=False)
  evaluator = evaluator_for(run)
  _, records = evaluator(run.prompt)
  r = httpx.post(
    url + "/v1/classify",
    json={"model": "gamma", "input": [x["inputs"] for x in records], "labels": list(run.labels)},
    timeout=120,
  )
  assert r.status_code == 200, r.text
  got = r.json()["data"]
  for rec, row in zip(records, got, strict=True):
    np.testing.assert_allclose([row["scores"][lab] for lab in run.labels], rec["scores"], atol=1e-4)
    assert row["label"] == rec["prediction"]
  assert httpx.post(url + "/v1/classify", json={"model": "gamma", "input": "1 2"}).status_code == 400  # no labels


def test_bad_requests_get_4xx_naming_the_field_and_the_next_good_one_is_answered(server):
  url, _, _ = server
  good = dict(model="alpha", prompt="1 2 3", max_tokens=4, temperature=0)
  cases = [
    (dict(good, model="nope"), 404, "model"),
    (dict(good, prompt=5), 400, "prompt"),
    (dict(good, max_tokens="4"), 400, "max_tokens"),
    (dict(good, max_tokens=10_000), 400, "max_tokens"),
    (dict(good, temperature=-1), 400, "temperature"),
    (dict(good, prompt="x" * 200), 400, "prompt"),
    (dict(good, n=0), 400, "n"),
    (dict(good, seed=-1), 400, "seed"),
    (dict(good, prompt=[]), 400, "prompt"),
    ({"prompt": "1"}, 400, "model"),
  ]
  with httpx.Client(timeout=120) as c:
    for body, status, param in cases:
      r = c.post(url + "/v1/completions", json=body)
      assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
      assert c.post(url + "/v1/completions", json=good).status_code == 200
    r = c.post(
      url + "/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    async def mixed():  # bad ones arriving with good ones never fail the good ones
      async with httpx.AsyncClient(timeout=120) as ac:
        return await asyncio.gather(
          *[ac.post(url + "/v1/completions", json=good if i % 2 else dict(good, prompt=5)) for i in range(8)]
        )

    rs = asyncio.run(asyncio.wait_for(mixed(), 300))
    assert [r.status_code for r in rs] == [400, 200] * 4


def test_prompts_are_added_and_removed_over_the_api_only_with_the_admin_token(server, material):
  url, _, _ = server
  _, _, spare = material
  with httpx.Client(timeout=120) as c:
    add = dict(name="delta", path=str(spare))
    assert c.post(url + "/v1/prompts", json=add).status_code == 401
    assert c.post(url + "/v1/prompts", json=add, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post(url + "/v1/prompts", json=add, headers=auth)
    assert r.status_code == 201 and r.json()["length"] == 4
    assert (
      c.post(url + "/v1/prompts", json=dict(name="bad", path=str(spare) + ".missing"), headers=auth).status_code == 400
    )
    done = c.post(url + "/v1/completions", json=dict(model="delta", prompt="1 2", max_tokens=4, temperature=0))
    assert done.status_code == 200
    assert "delta" in {m["id"] for m in c.get(url + "/v1/models").json()["data"]}
    assert c.delete(url + "/v1/prompts/delta").status_code == 401
    assert c.delete(url + "/v1/prompts/delta", headers=auth).status_code == 200
    assert c.post(url + "/v1/completions", json=dict(model="delta", prompt="1")).status_code == 404


def test_overload_gives_503s_and_sigterm_answers_requests_in_flight_then_exits_0(material, tmp_path):
  folder, prompts, _ = material
  from jaxprompt.serve.server import free_port

  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "jaxprompt.cli",
      "serve",
      "--model",
      str(folder),
      "--prompts",
      str(prompts),
      "--port",
      str(port),
      "--queue-size",
      "4",
      "--max-batch",
      "2",
      "--max-wait-ms",
      "1",
      "--max-tokens",
      "16",
      "--max-input-tokens",
      "16",
      "--warmup",
    ],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  url = f"http://127.0.0.1:{port}"
  try:
    _wait_healthy(url, proc)
    body = dict(model="alpha", prompt="1 2 3", max_tokens=16, temperature=0)
    want = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    async def flood(n):
      async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*[c.post(url + "/v1/completions", json=body) for _ in range(n)])

    rs = asyncio.run(asyncio.wait_for(flood(40), 300))
    codes = [r.status_code for r in rs]
    assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
    assert all(r.headers.get("retry-after") for r in rs if r.status_code == 503)
    ok = [r.json() for r in rs if r.status_code == 200]
    assert all(o["choices"][0]["text"] == want for o in ok) and len({o["id"] for o in ok}) == len(ok)

    async def in_flight():
      async with httpx.AsyncClient(timeout=120) as c:
        tasks = [asyncio.create_task(c.post(url + "/v1/completions", json=body)) for _ in range(3)]
        await asyncio.sleep(0.3)  # sent, being answered
        proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks)

    rs = asyncio.run(asyncio.wait_for(in_flight(), 300))
    assert [r.status_code for r in rs] == [200] * 3 and all(r.json()["choices"][0]["text"] == want for r in rs)
    assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
    err = proc.stderr.read()
    # warm-up (the continuous scheduler): a prefill for batch buckets 1, 2 x length bucket 16, whatever the prompts,
    # and the generate step at 1, 2, 4 and 8 steps per call (--decode-steps 8)
    assert "warmed up 6 shapes" in err and "server stopped" in err, err[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(30)


def test_t5_prompts_and_prefixes_are_served_with_generate_s_text(byte_t5, tmp_path):
  """The encoder-decoder kind: soft prompts (input embeddings, a bank per batch) and a prefix (keys/values for the
  decoder layers) of T5, through the OpenAI client, equal `jaxprompt generate --greedy`."""
  from jaxprompt.serve.server import build, serving

  prompts = tmp_path / "prompts"
  prompts.mkdir()
  rng = np.random.default_rng(1)
  np.save(prompts / "soft.npy", rng.normal(size=(4, 32)).astype(np.float32))
  slots = jaxprompt.load_model(byte_t5).prefix_slots()
  np.save(prompts / "pfx.npy", rng.normal(size=(4, slots.layers, 2, slots.heads, slots.head_dim)).astype(np.float32))
  (prompts / "pfx.json").write_text(
    json.dumps({"prompt_spec": {"method": "prefix_tuning", "prefix_projection": False}})
  )
  app, engine, problems = build(
    str(byte_t5), prompts=str(prompts), name="t5", max_batch=4, max_tokens=16, max_input_tokens=32
  )
  assert problems == []
  with serving(app) as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for name in ("soft", "pfx"):
      want = _reference(engine, prompts, name, TEXTS[:3], 6)
      got = client.completions.create(model=name, prompt=TEXTS[:3], max_tokens=6, temperature=0)
      assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
