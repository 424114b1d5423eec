"""The server's contract off the happy path (issue 28): a prompt is served the inputs it was trained on (its task's
input format), lm-evaluation-harness's loglikelihood requests (echo + logprobs, max_tokens 0 or 1, token ids) score
as `jaxprompt eval` does, and every limit or unsupported parameter is a 4xx naming the field. One server in this
process on a free 127.0.0.1 port, always stopped."""

import csv
import json
import math

import jax
import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from jaxprompt import config as C  # noqa: E402
from tests.helpers import write_byte_decoder  # noqa: E402

TEMPLATE = "review: {text} sentiment:"
ROWS = [("a gripping, wonderful film", "pos"), ("dull", "neg"), ("I loved it", "pos"), ("no", "neg"), ("ok", "pos")]
TOKEN = "s3cret"


def _config(folder, data, prompt_file=None):
  sets = [
    f"model.path={folder}",
    "prompt.length=4",
    "data.task=reviews",
    f"data.custom.template={TEMPLATE}",
    "data.custom.labels=[neg, pos]",
    f"data.files.validation={data}",
    "data.input_length=48",
    "data.target_length=4",
    "eval.batch_size=8",
  ]
  if prompt_file is not None:
    sets += ["prompt.init=file", f"prompt.init_file={prompt_file}"]
  return C.load(None, sets)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
  """A tiny byte-level Llama, a custom task's dev file, and a prompt whose record is the one a run of that task
  writes (`Run.task_record`: name, labels, input format)."""
  from jaxprompt import sharding as shd
  from jaxprompt.run import build_run

  root = tmp_path_factory.mktemp("contract")
  folder = write_byte_decoder(root / "llama", "llama3-gqa-untied", seed=5)
  data = root / "dev.csv"
  with data.open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    w.writerows(ROWS)
  prompts = root / "prompts"
  prompts.mkdir()
  np.save(prompts / "reviews.npy", np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32))
  run, _ = build_run(
    _config(folder, data, prompts / "reviews.npy"), mesh=shd.make_mesh(devices=jax.devices()[:1]), with_train_data=False
  )
  (prompts / "reviews.json").write_text(json.dumps({"task": run.task_record().to_json()}))
  return folder, data, prompts, run


@pytest.fixture(scope="module")
def server(material):
  from jaxprompt.serve.server import build, serving

  folder, _, prompts, _ = material
  app, engine, problems = build(
    str(folder),
    prompts=str(prompts),
    name="base",
    admin_token=TOKEN,
    max_batch=8,
    max_wait_ms=5,
    max_tokens=16,
    max_input_tokens=64,
    queue_size=16,
    max_request_bytes=20_000,
  )
  assert not problems
  with serving(app) as url:
    yield url, engine


@pytest.fixture(scope="module")
def evaluated(material):
  """`jaxprompt eval`'s records of the dev rows (inputs in the template, per-label rank scores)."""
  from jaxprompt.evaluation.evaluator import evaluator_for

  _, _, _, run = material
  _, records = evaluator_for(run)(run.prompt)
  assert [r["inputs"] for r in records] == [TEMPLATE.format(text=t) for t, _ in ROWS]
  return records


def test_served_classify_of_raw_fields_equals_eval_on_the_same_rows(server, material, evaluated):
  url, _ = server
  *_, run = material
  assert run.task_record().input.custom is not None
  with httpx.Client(timeout=120) as c:
    r = c.post(url + "/v1/classify", json={"model": "reviews", "input": [t for t, _ in ROWS]})
    assert r.status_code == 200, r.text
    fields = c.post(url + "/v1/classify", json={"model": "reviews", "input": [{"text": t} for t, _ in ROWS]})
    typed = c.post(
      url + "/v1/classify", json={"model": "reviews", "input": [x["inputs"] for x in evaluated], "raw": True}
    )
    bare = c.post(url + "/v1/classify", json={"model": "reviews", "input": ROWS[0][0], "raw": True})
  for rec, row, by_field, as_typed in zip(
    evaluated, r.json()["data"], fields.json()["data"], typed.json()["data"], strict=True
  ):
    np.testing.assert_allclose([row["scores"][lab] for lab in ("neg", "pos")], rec["scores"], atol=1e-4)
    assert row["label"] == rec["prediction"]
    assert by_field["scores"] == row["scores"] and as_typed["scores"] == row["scores"]
  assert bare.json()["data"][0]["scores"] != r.json()["data"][0]["scores"]  # raw mode: the template is not applied


def test_generate_applies_the_recorded_format_unless_raw(server, material):
  from jaxprompt.inference import text as T
  from jaxprompt.prompts.io import load_prompt_source

  _, engine = server
  _, _, prompts, _ = material
  p = [load_prompt_source(prompts / "reviews.npy")]
  got = T.generate_text(engine.base, engine.tokenizer, ["great"], p, max_new_tokens=2)
  raw = T.generate_text(engine.base, engine.tokenizer, ["great"], p, max_new_tokens=2, raw=True)
  assert got[0]["model_input"] == "review: great sentiment:" and raw[0]["model_input"] == "great"


def _harness_requests(engine, evaluated, labels):
  """lm-evaluation-harness's loglikelihood requests: (context tokens, continuation tokens) per (row, label), the
  continuation being the label as eval scores it (the text + EOS)."""
  from jaxprompt.data import encoding

  ctx = encoding.input_rows(engine.base.batch_type, engine.tokenizer, [r["inputs"] for r in evaluated])
  conts = [ids + [engine.tokenizer.eos_token_id] for ids in encoding.ids_of(engine.tokenizer, labels, False)]
  return [(c, k) for c in ctx for k in conts]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_loglikelihoods_equal_eval_label_scores(server, evaluated, max_tokens):
  url, engine = server
  labels = ["neg", "pos"]
  reqs = _harness_requests(engine, evaluated, labels)
  body = dict(model="reviews", prompt=[c + k for c, k in reqs], echo=True, logprobs=1, max_tokens=max_tokens)
  r = httpx.post(url + "/v1/completions", json=dict(body, temperature=0.0, seed=1234), timeout=120)
  assert r.status_code == 200, r.text
  choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
  end = -1 if max_tokens else None  # the harness drops the generated token
  got = [sum(ch["logprobs"]["token_logprobs"][len(c) : end]) for ch, (c, _) in zip(choices, reqs, strict=True)]
  np.testing.assert_allclose(np.reshape(got, (len(evaluated), 2)), [x["scores"] for x in evaluated], atol=1e-4)
  lp = choices[0]["logprobs"]
  assert len(lp["tokens"]) == len(reqs[0][0]) + len(reqs[0][1]) + max_tokens == len(lp["text_offset"])
  assert lp["token_logprobs"][0] is None and len(lp["top_logprobs"][1]) == 1


def test_limits_and_unsupported_parameters_are_4xx_naming_the_field(server):
  url, _ = server
  good = dict(model="reviews", prompt="fine", max_tokens=2, temperature=0)
  cases = [
    (dict(good, prompt=["x"] * 17), 400, "prompt", "limit of 16 per request"),
    (dict(good, prompt=["x"] * 9, n=2), 400, "prompt", "limit of 16 per request"),
    (dict(good, temperature=math.nan), 400, "temperature", "finite"),
    (dict(good, presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    (dict(good, logit_bias={"5": 1}), 400, "logit_bias", "not supported"),
    (dict(good, best_of=3), 400, "best_of", "best_of = n"),
    (dict(good, frobnicate=1), 400, "frobnicate", "unknown parameter"),
    (dict(good, logprobs=6, max_tokens=4), 400, "logprobs", "at most 5 alternatives per generated token"),
    (dict(good, logprobs=1, max_tokens=4, echo=True), 400, "echo", "max_tokens 0, or 1 at temperature 0"),
    (dict(good, prompt=[52, 999]), 400, "prompt", "vocabulary"),
    (dict(good, prompt={"txt": "x"}), 400, "prompt", "field 'text': missing"),
    (dict(good, n=17), 400, "n", ""),
  ]
  with httpx.Client(timeout=120) as c:
    for body, status, param, words in cases:  # (Python's json writes NaN as the client would send it)
      r = c.post(url + "/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
      err = r.json()["error"]
      assert r.status_code == status and err["param"] == param and words in err["message"], (body, r.text)
    for ok in (
      dict(good, presence_penalty=0, user="me", best_of=1),
      dict(good, prompt=[52, 53]),
      dict(good, prompt=[[52, 53], [54]]),
      dict(good, n=2, temperature=1.0, seed=3),
    ):
      r = c.post(url + "/v1/completions", json=ok)
      assert r.status_code == 200, (ok, r.text)
    assert len(r.json()["choices"]) == 2 and [ch["index"] for ch in r.json()["choices"]] == [0, 1]
    big = c.post(url + "/v1/completions", json=dict(good, prompt="x" * 30_000))
    assert big.status_code == 413 and "20000 bytes" in big.json()["error"]["message"]
    r = c.post(url + "/v1/classify", json={"model": "reviews", "input": "x", "labels": []})
    assert r.status_code == 400 and "at least one label" in r.json()["error"]["message"]
    r = c.post(url + "/v1/classify", json={"model": "reviews", "input": "x", "labels": ["neg", "p" * 100]})
    assert r.status_code == 400 and "labels[1]" in r.json()["error"]["message"] and "limit of 64" in r.text
    r = c.post(url + "/v1/chat/completions", json=good)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post(url + "/v1/prompts", json={"name": "reviews", "path": "/nowhere.npy"}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    r = c.post(url + "/v1/prompts", json={"name": "fresh", "path": "/nowhere.npy"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    assert c.post(url + "/v1/completions", json=good).status_code == 200


# -- log-probabilities of generated tokens -----------------------------------------------------------------------

IDS = [52, 53, 40, 70, 33]  # a token-id prompt: exactly these tokens reach the model


def _reference(folder, prompt_file, ids, steps: int, chosen=None):
  """transformers' PyTorch model as the oracle: per step the log-softmax of the raw logits -> (chosen ids, their
  log-probabilities, top-5 values, top-5 ids); greedy, or teacher-forced on `chosen`. A soft prompt (a .npy
  [P, H]) goes before the tokens' embeddings at positions 0..P-1, as PEFT puts it."""
  import torch

  from tests.helpers_hf import load_decoder

  model = load_decoder(folder)
  seq, out = list(ids), []
  with torch.no_grad():
    for j in range(steps):
      embeds = model.get_input_embeddings()(torch.tensor([seq]))
      if prompt_file is not None:
        embeds = torch.cat([torch.from_numpy(np.load(prompt_file))[None], embeds], dim=1)
      logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0, -1].double(), -1).numpy()
      tok = int(np.argmax(logp)) if chosen is None else chosen[j]
      top = np.argsort(-logp)[:5]
      out.append((tok, logp[tok], logp[top], top))
      seq.append(tok)
  return out


def _check_against_reference(lp: dict, text: str, ref, tok, k: int) -> None:
  n = len(lp["tokens"])
  assert 0 < n <= len(ref)
  ids = [r[0] for r in ref[:n]]
  assert lp["tokens"] == [tok.decode([i]) for i in ids]
  np.testing.assert_allclose(lp["token_logprobs"], [r[1] for r in ref[:n]], atol=1e-4)
  for top, (i, value, top_v, top_i) in zip(lp["top_logprobs"], ref, strict=False):
    want: dict = {}
    for j, v in [*zip(top_i[:k].tolist(), top_v[:k], strict=True), (i, value)]:
      want.setdefault(tok.decode([j]), v)  # two ids may decode alike (a lone byte of a multi-byte character)
    assert list(top) == list(want) and list(top.values()) == sorted(top.values(), reverse=True)
    np.testing.assert_allclose(list(top.values()), list(want.values()), atol=1e-4)
  text_ids = ids[:-1] if ids[-1] == tok.eos_token_id else ids
  assert text == tok.decode(text_ids, skip_special_tokens=True)
  assert lp["text_offset"] == [len(tok.decode(ids[:j], skip_special_tokens=True)) for j in range(n)]


@pytest.mark.parametrize("model", ["base", "reviews"])
def test_generated_token_logprobs_equal_transformers_greedy(server, material, model):
  """Greedy with logprobs: each token's log-probability and its alternatives equal log_softmax of transformers'
  logits (1e-4), with the soft prompt on the decoder too; the openai client parses them; a stream's chunks
  concatenate to the same answer."""
  import openai

  url, engine = server
  folder, _, prompts, _ = material
  tok = engine.tokenizer
  body = dict(model=model, prompt=IDS, max_tokens=6, temperature=0, logprobs=3)
  r = httpx.post(url + "/v1/completions", json=body, timeout=120)
  assert r.status_code == 200, r.text
  choice = r.json()["choices"][0]
  ref = _reference(folder, prompts / "reviews.npy" if model == "reviews" else None, IDS, 6)
  _check_against_reference(choice["logprobs"], choice["text"], ref, tok, 3)
  assert all(len(t) <= 4 for t in choice["logprobs"]["top_logprobs"])  # k, + the chosen token where not among them

  client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
  parsed = client.completions.create(**body).choices[0].logprobs
  assert parsed.token_logprobs == choice["logprobs"]["token_logprobs"] and parsed.tokens == choice["logprobs"]["tokens"]
  text, joined = "", {f: [] for f in choice["logprobs"]}
  for chunk in client.completions.create(**body, stream=True):
    for c in chunk.choices:
      text += c.text
      for f in joined:
        joined[f] += getattr(c.logprobs, f) if c.logprobs is not None else []
  assert text == choice["text"] and joined == choice["logprobs"]


def _ask(engine, **kw) -> dict:
  """One completion submitted to an engine directly (its result, with TokenLogprobs)."""
  import queue

  from jaxprompt.serve.engine import Request

  got: queue.Queue = queue.Queue()
  engine.submit([Request("complete", on_done=got.put, **kw)])
  result = got.get(timeout=120)
  assert not isinstance(result, Exception), result
  return result


def test_sampled_logprobs_are_the_models_in_both_schedulers(server, material):
  """A sampled token's log-probability is the model's (raw logits: not its temperature's), teacher-forced in
  transformers on the tokens drawn, in the continuous and the static scheduler; greedy agrees across them; a
  request without logprobs gets none."""
  from jaxprompt.serve.engine import Engine, Sampling

  url, engine = server
  folder, _, prompts, _ = material
  static = Engine(
    engine.base, engine.tokenizer, engine.store, scheduler="static", max_batch=1, max_tokens=8, max_input_tokens=16
  )
  static.start()
  try:
    prompt = engine.store.get("reviews")
    hot = Sampling("sample", temperature=0.7, top_p=0.9)
    for eng in (engine, static):
      for sampling, k in ((hot, 2), (Sampling("greedy"), 0)):
        got = _ask(eng, prompt=prompt, text="", tokens=IDS, max_tokens=5, sampling=sampling, seed=7, logprobs=k)
        drawn = [x.token for x in got["logprobs"]]
        assert len(drawn) == got["completion_tokens"] > 0
        ref = _reference(folder, prompts / "reviews.npy", IDS, len(drawn), chosen=drawn)
        np.testing.assert_allclose([x.logprob for x in got["logprobs"]], [r[1] for r in ref], atol=1e-4)
        for x, (_, _, top_v, top_i) in zip(got["logprobs"], ref, strict=True):
          assert [i for i, _ in x.top] == top_i[:k].tolist()
          np.testing.assert_allclose([v for _, v in x.top], top_v[:k], atol=1e-4)
      plain = _ask(eng, prompt=prompt, text="", tokens=IDS, max_tokens=3, sampling=Sampling("greedy"))
      assert plain.get("logprobs") is None
  finally:
    static.stop()


def test_t5_generated_logprobs_equal_transformers(byte_t5):
  """T5 (the continuous scheduler; the static one shares the decoder's loop): each sampled token's log-probability
  and alternatives equal log_softmax of transformers' decoder logits, teacher-forced on the tokens drawn."""
  import torch

  from jaxprompt.models.loading import load_tokenizer
  from jaxprompt.serve.engine import Engine, PromptStore, Sampling
  from jaxprompt.serve.server import load_base
  from tests.helpers_hf import load_t5

  base, tok = load_base(str(byte_t5)), load_tokenizer(str(byte_t5))
  engine = Engine(base, tok, PromptStore(base), slots=2, max_batch=1, max_tokens=8, max_input_tokens=16)
  engine.start()
  try:
    sampling = Sampling("sample", temperature=0.7)
    got = _ask(engine, prompt=None, text="", tokens=IDS + [1], max_tokens=6, sampling=sampling, seed=3, logprobs=2)
  finally:
    engine.stop()
  drawn = [x.token for x in got["logprobs"]]
  with torch.no_grad():
    logits = load_t5(byte_t5)(input_ids=torch.tensor([IDS + [1]]), decoder_input_ids=torch.tensor([[0] + drawn[:-1]]))
  logp = torch.log_softmax(logits.logits[0].double(), -1).numpy()
  np.testing.assert_allclose([x.logprob for x in got["logprobs"]], logp[np.arange(len(drawn)), drawn], atol=1e-4)
  for j, x in enumerate(got["logprobs"]):
    assert [i for i, _ in x.top] == np.argsort(-logp[j])[:2].tolist()
    np.testing.assert_allclose([v for _, v in x.top], np.sort(logp[j])[::-1][:2], atol=1e-4)
