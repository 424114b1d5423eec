"""Prompt templates (P-tuning v1): virtual tokens between parts of the input. Logits, rank scores and greedy
generation against hand-built input embeddings (the k-th virtual token of each row, counted in order, holds prompt
row k, as THUDM/P-tuning's `embed_input` writes them) on T5 and Llama for prompt tuning and P-tuning (MLP, LSTM);
training and exact resume; exports; serving; the config errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import ByT5Tokenizer

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.data.templates import Template, fit_lengths, special_tokens
from jaxprompt.errors import DataError, ExportError
from jaxprompt.inference import generate
from jaxprompt.inference import text as T
from jaxprompt.models import load_model
from jaxprompt.prompts.encoders import PTuning
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.soft import SoftPrompt
from jaxprompt.run import members_of, validate
from jaxprompt.training.trainer import train
from tests.helpers import one_device, tiny_cfg

TEMPLATE = "[P:2] {premise} [P:1] ? {hypothesis} [P]"
P = 4
FIELDS = [
  {"premise": "it rains", "hypothesis": "wet"},
  {"premise": "a much longer premise here", "hypothesis": "the ground is wet"},
  {"premise": "", "hypothesis": "x"},
]
TOK = ByT5Tokenizer()


def _module(kind: str, hidden: int, template: str = TEMPLATE):
  """A templated prompt of method `kind` with random (nonzero) rows."""
  if kind == "prompt_tuning":
    return SoftPrompt(np.random.default_rng(0).normal(size=(P, hidden)).astype(np.float32), template=template)
  encoder = kind.split("_")[-1]
  embedding = jax.random.normal(jax.random.key(1), (P, hidden))
  return PTuning(
    embedding, encoder=encoder, hidden_size=16, num_layers=2, dropout=0.0, rng=jax.random.key(2), template=template
  )


def _by_hand(base, ids: np.ndarray, rows: np.ndarray) -> jnp.ndarray:
  """Token embeddings with the k-th virtual token of each row (in order, whatever its id) replaced by rows[k]."""
  emb = np.array(base.embed(jnp.maximum(jnp.asarray(ids), 0)), np.float32)
  for b in range(ids.shape[0]):
    for k, at in enumerate(np.flatnonzero(ids[b] < 0)):
      emb[b, at] = rows[k]
  return jnp.asarray(emb)


def _inputs(base, examples=FIELDS, length: int | None = None):
  rows, _ = Template.parse(TEMPLATE).token_rows(
    TOK, [{"fields": f} for f in examples], length=length, drop_eos=base.batch_type.INPUT_DROP_EOS
  )
  ids, mask = base.batch_type.layout_inputs(rows, max(map(len, rows)), 0)
  return ids, mask


# -- the template's tokens ---------------------------------------------------------------------------------------


def test_a_template_lays_out_fields_text_and_virtual_tokens_and_cuts_fields_only():
  t = Template.parse(TEMPLATE)
  assert t.fields == ("premise", "hypothesis") and t.length == P
  before, after = special_tokens(TOK)
  assert (before, after) == ([], [TOK.eos_token_id])

  def plain(s):
    return TOK(s, add_special_tokens=False)["input_ids"]

  (row,), cut = t.token_rows(TOK, [{"fields": FIELDS[0]}])
  assert cut == 0
  assert row == [-1, -2] + plain("it rains") + [-3] + plain("?") + plain("wet") + [-4] + after
  # 20 tokens: 6 fixed (4 virtual, "?", EOS), fields 26 and 17 bytes cut longest-first to 7 + 7
  (row,), cut = t.token_rows(TOK, [{"fields": FIELDS[1]}], length=20)
  assert cut == 1 and len(row) == 20
  assert row == [-1, -2] + plain("a much ") + [-3] + plain("?") + plain("the gro") + [-4] + after
  assert fit_lengths([26, 17, 3], 20) == [9, 8, 3] and fit_lengths([5, 2], 10) == [5, 2]
  with pytest.raises(C.ConfigError, match=r"needs 6 tokens before any field.* more than the 5 input tokens"):
    t.token_rows(TOK, [{"fields": FIELDS[0]}], length=5)


def test_request_inputs_fill_the_fields():
  one = Template.parse("[P:2] {text} [P:2]")
  assert one.values("hello") == {"text": "hello"}
  t = Template.parse(TEMPLATE)
  assert t.values({"premise": "a", "hypothesis": "b"}) == {"premise": "a", "hypothesis": "b"}
  with pytest.raises(DataError, match=r"input: the prompt's template .* reads fields premise, hypothesis"):
    t.values("just text")
  with pytest.raises(DataError, match=r"prompt lacks field 'hypothesis'"):
    t.values({"premise": "a"}, "prompt")
  with pytest.raises(DataError, match=r"has unknown field 'extra'"):
    t.values({"premise": "a", "hypothesis": "b", "extra": "c"})


# -- logits, rank scores, generation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(byte_t5, byte_llama):
  return {"byte_t5": load_model(byte_t5), "byte_llama": load_model(byte_llama)}


@pytest.mark.parametrize("model", ["byte_t5", "byte_llama"])
@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_MLP", "p_tuning_LSTM"])
def test_logits_equal_the_hand_built_sequence(bases, model, kind):
  base = bases[model]
  seq2seq = base.kind == "seq2seq"
  module = _module(kind, base.hidden_size)
  ids, mask = _inputs(base)
  dec = jnp.asarray(np.random.default_rng(3).integers(3, 90, (3, 4))) if seq2seq else None
  rows = np.asarray(module.inference_value())
  got = _jit(base, "forward")(jnp.asarray(ids), jnp.asarray(mask), dec, prefix=module.prefix(3))
  want = _jit(base, "forward")(None, jnp.asarray(mask), dec, inputs_embeds=_by_hand(base, ids, rows))
  assert got.shape == want.shape  # no positions added: the virtual tokens are the input's own
  real = True if seq2seq else mask.astype(bool)[..., None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5, rtol=1e-5)
  shuffled = SoftPrompt(rows[::-1].copy(), template=TEMPLATE).prefix(3)  # the order matters: not a set of slots
  assert not np.allclose(_jit(base, "forward")(jnp.asarray(ids), jnp.asarray(mask), dec, prefix=shuffled), got)


@pytest.mark.parametrize("model", ["byte_t5", "byte_llama"])
def test_training_loss_and_rank_scores_equal_the_hand_built_sequence(bases, model):
  """`score_targets` (a causal row is input + target, right-padded) and `label_logprobs` (a causal input is
  left-padded, prefilled, then each label) against the hand-built input followed by each label."""
  from jaxprompt.data import encoding

  base = bases[model]
  module = _module("prompt_tuning", base.hidden_size)
  labels = ["yes", "no way"]
  examples = [{"fields": f, "targets": labels[i % 2]} for i, f in enumerate(FIELDS)]
  batch = encoding.encode(
    base.batch_type, examples, TOK, input_length=24, target_length=8, template=Template.parse(TEMPLATE)
  )
  batch = jax.tree.map(jnp.asarray, batch)
  label_ids, label_mask = encoding.encode_labels(base.batch_type, TOK, labels, 8)
  prefix = module.prefix(3)
  scores = np.asarray(_jit(base, "label_logprobs")(batch, jnp.asarray(label_ids), jnp.asarray(label_mask), prefix))
  logits, targets, loss_mask = _jit(base, "score_targets")(batch, prefix)
  ids, mask = _inputs(base, length=24)
  rows = np.asarray(module.inference_value())
  for c, (lab, lmask) in enumerate(zip(label_ids, label_mask, strict=True)):
    n = int(lmask.sum())
    want = _hand_scored(base, ids, mask, rows, lab[:n])
    np.testing.assert_allclose(scores[:, c], want.sum(axis=1), atol=1e-4, rtol=1e-5)
    for b in range(c, 3, 2):  # rows whose target is label c: training's log-likelihoods of their targets
      lp = np.asarray(jax.nn.log_softmax(logits[b]))[np.arange(8), np.asarray(targets[b])]
      np.testing.assert_allclose(lp[np.asarray(loss_mask[b]) > 0], want[b], atol=1e-4, rtol=1e-5)


def _hand_scored(base, ids, mask, rows, label) -> np.ndarray:
  """[B, n] log-likelihoods of `label` (n tokens) after each hand-built input (right-padded: each row's real
  tokens at positions 0.., as alone)."""
  b, n = ids.shape[0], len(label)
  if base.kind == "seq2seq":
    dec = jnp.asarray(np.tile(np.concatenate([[0], label[:-1]]), (b, 1)))
    logits = _jit(base, "forward")(None, jnp.asarray(mask), dec, inputs_embeds=_by_hand(base, ids, rows))
  else:  # each row's real tokens, then the label, then padding; position t predicts t + 1
    lens = mask.sum(axis=1)
    x = np.zeros((b, ids.shape[1] + n, base.hidden_size), np.float32)
    m = np.zeros((b, ids.shape[1] + n), np.int32)
    lab = np.asarray(base.embed(jnp.asarray(label)))
    for i in range(b):
      real = ids[i][mask[i] > 0][None]
      x[i, : lens[i]], x[i, lens[i] : lens[i] + n] = np.asarray(_by_hand(base, real, rows))[0], lab
      m[i, : lens[i] + n] = 1
    h = _jit(base, "forward")(None, jnp.asarray(m), inputs_embeds=jnp.asarray(x))
    logits = jnp.stack([h[i, lens[i] - 1 : lens[i] - 1 + n] for i in range(b)])
  lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return np.take_along_axis(lp, np.tile(label, (b, 1))[..., None], axis=-1)[..., 0]


_JITTED: dict = {}


def _jit(base, name: str):
  """base.<name>(...) jitted once per base and method (eager runs of the layer scan are slow)."""
  key = (id(base), name)
  if key not in _JITTED:
    graphdef, state = nnx.split(base)
    _JITTED[key] = jax.jit(lambda state, *a, **kw: getattr(nnx.merge(graphdef, state), name)(*a, **kw))
    _JITTED[key + ("state",)] = state
  return functools.partial(_JITTED[key], _JITTED[key + ("state",)])


# -- training, resuming, exports --------------------------------------------------------------------------------

DIGITS = "[P:2] {digits} = [P:2]"
TEMPLATED = {"prompt.template": DIGITS, "prompt.length": 4, "data.input_length": 16}


@pytest.fixture(scope="module")
def trained(byte_t5, tmp_path_factory):
  """A templated T5 prompt interrupted at step 3 and resumed, and the same run without the interruption (evaluated
  at its end by rank classification)."""
  root = tmp_path_factory.mktemp("templated")
  mesh = one_device()
  train(tiny_cfg(byte_t5, **TEMPLATED, **{"eval.at_end": True}), root / "full", progress=False, mesh=mesh)
  train(tiny_cfg(byte_t5, **TEMPLATED, **{"train.steps": 3}), root / "split", progress=False, mesh=mesh)
  train(tiny_cfg(byte_t5, **TEMPLATED), root / "split", progress=False, mesh=mesh)
  return root


def test_training_resumes_exactly_and_evaluates(trained):
  a, b = (Checkpointer.reader(trained / w / "checkpoints").restore_prompt(6)[0] for w in ("full", "split"))
  first = Checkpointer.reader(trained / "full" / "checkpoints").restore_prompt(3)[0]
  np.testing.assert_array_equal(a["prompt"]["embeddings"], b["prompt"]["embeddings"])
  assert not np.array_equal(a["prompt"]["embeddings"], first["prompt"]["embeddings"])
  evals = [json.loads(line) for line in (trained / "full" / "metrics.jsonl").read_text().splitlines()]
  assert any("accuracy" in r and "eval_loss" in r for r in evals)


def test_exports_record_the_template_and_peft_refuses(byte_t5, trained, tmp_path, capsys):
  work = trained / "full"
  src = load_prompt_source(work)
  assert src.spec.template == DIGITS and src.record.prompt_config["template"] == DIGITS
  for fmt, name in (("numpy", "p.npy"), ("safetensors", "p.safetensors")):
    out = export_prompt(work, fmt, tmp_path / name)
    got = load_prompt_source(out)
    assert got.spec == src.spec and got.record.to_json()["prompt_spec"]["template"] == DIGITS
    np.testing.assert_array_equal(got.value, src.value)
    # loaded back, it places its rows (the logits of a placed prompt: test_logits_equal_the_hand_built_sequence)
    prefix = load_prompted(byte_t5, out).prompt.prefix(1)
    assert prefix.at_slots and np.array_equal(np.asarray(prefix.embeds[0]), src.value)
  with pytest.raises(ExportError, match="PEFT only prepends prompts"):
    export_prompt(work, "peft", tmp_path / "adapter")
  capsys.readouterr()
  code = main(["export", str(work), "--format", "peft", "--out", str(tmp_path / "adapter")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "PEFT only prepends prompts" in err[0]
  assert not (tmp_path / "adapter").exists()


# -- generation and serving -------------------------------------------------------------------------------------


def _write_prompt(folder, name: str, rows: np.ndarray, template: str | None, method: str = "prompt_tuning"):
  """A .npy prompt with its record beside it (method and template)."""
  np.save(folder / f"{name}.npy", rows.astype(np.float32))
  spec = {"method": method, **({"template": template} if template else {})}
  (folder / f"{name}.json").write_text(json.dumps({"prompt_spec": spec}))
  return folder / f"{name}.npy"


def _greedy_by_hand(base, texts, rows, new: int) -> list[list[int]]:
  """Greedy tokens after the hand-built inputs (padded as each kind pads a generation input)."""
  examples = [{"fields": {"digits": t}} for t in texts]
  tokens, _ = Template.parse(DIGITS).token_rows(TOK, examples, drop_eos=base.batch_type.INPUT_DROP_EOS)
  ids, mask = base.batch_type.layout_inputs(tokens, max(map(len, tokens)), 0)
  out = generate(base, inputs_embeds=_by_hand(base, ids, rows), attention_mask=mask, max_new_tokens=new, eos_id=-1)
  return np.asarray(out["tokens"]).tolist()


@pytest.mark.parametrize("model", ["byte_t5", "byte_llama"])
def test_generate_equals_the_hand_built_inputs_greedy_output(bases, model, tmp_path):
  base = bases[model]
  rows = np.asarray(_module("p_tuning_LSTM", base.hidden_size, DIGITS).inference_value())
  path = _write_prompt(tmp_path, "tmpl", rows, DIGITS)
  texts = ["3 1 4", "9 2 6 5 3 5 8"]
  got = T.generate_text(base, TOK, texts, [load_prompt_source(path)], max_new_tokens=5, eos_id=-1)
  assert [r["tokens"] for r in got] == _greedy_by_hand(base, texts, rows, 5)
  by_name = T.generate_text(
    base, TOK, [{"digits": t} for t in texts], [load_prompt_source(path)], max_new_tokens=5, eos_id=-1
  )
  assert [r["tokens"] for r in by_name] == [r["tokens"] for r in got]


def test_generate_on_the_command_line_takes_fields(byte_llama, bases, tmp_path, capsys):
  base = bases["byte_llama"]
  rows = np.asarray(_module("prompt_tuning", base.hidden_size, DIGITS).inference_value())
  path = _write_prompt(tmp_path, "tmpl", rows, DIGITS)
  texts = ["3 1 4", "9 2 6 5 3 5 8"]
  want = [r[: r.index(TOK.eos_token_id)] if TOK.eos_token_id in r else r for r in _greedy_by_hand(base, texts, rows, 5)]
  argv = ["generate", "--model", str(byte_llama), "--prompt", str(path), "--greedy", "--max-new-tokens", "5"]
  capsys.readouterr()
  assert main([*argv, "--jsonl", "--fields", *[f"--input={json.dumps({'digits': t})}" for t in texts]]) == 0
  got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["tokens"][: len(w)] for r, w in zip(got, want, strict=True)] == want
  assert got[0]["input"] == {"digits": texts[0]}
  assert main([*argv, "--fields", "--input", "3 1 4"]) == 2
  assert "--fields: input 0 is not a JSON object" in capsys.readouterr().err


def test_a_file_whose_rows_do_not_fill_its_template_is_refused_at_load(tmp_path):
  """A .npy (its record beside it) or .safetensors (its record inside) of 3 rows for a template of 4 virtual tokens:
  one line naming the file and both counts, when it is loaded (not a shape error later, nor rows placed wrong)."""
  from jaxprompt.errors import PromptError
  from jaxprompt.models import hf

  rows = np.zeros((3, 8), np.float32)
  npy = _write_prompt(tmp_path, "short", rows, DIGITS)
  st = tmp_path / "short.safetensors"
  record = json.dumps({"prompt_spec": {"method": "prompt_tuning", "template": DIGITS}})
  hf.save_safetensors({"prompt_embeddings": rows}, st, metadata={"format": "pt", "jaxprompt": record})
  for path in (npy, st):
    with pytest.raises(PromptError) as e:
      load_prompt_source(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    assert f"holds 3 prompt rows, but its template {DIGITS!r} has 4 virtual token slots" in message
  np.save(npy, np.zeros((4, 8), np.float32))  # one row per slot loads
  assert load_prompt_source(npy).value.shape == (4, 8)


def test_a_prompt_trained_in_front_starts_a_templated_run(bases, tmp_path):
  from jaxprompt.prompts import methods

  base = bases["byte_t5"]
  rows = np.random.default_rng(5).normal(size=(P, base.hidden_size)).astype(np.float32)
  path = _write_prompt(tmp_path, "front", rows, None)
  pcfg = C.PromptConfig(length=P, init="file", init_file=str(path), template=TEMPLATE, allow_other_base=True)
  module = methods.build(pcfg, base, TOK, None, jax.random.key(0))
  assert module.spec().template == TEMPLATE and module.prefix(1).at_slots
  np.testing.assert_array_equal(np.asarray(module.inference_value()), rows)


def test_a_served_templated_prompt_lays_out_each_requests_fields(byte_llama, bases, tmp_path):
  """Completions (a string: the template's one field; or the fields by name) equal `generate_text`, whose greedy
  output equals the hand-built input's (above); classify's scores equal rank classification of the templated batch;
  fields that do not fit the template, or fields for a prompt without one, are 400s naming them."""
  import httpx

  from jaxprompt.data import encoding
  from jaxprompt.serve.server import build, serving

  base = bases["byte_llama"]
  rows = np.asarray(_module("p_tuning_LSTM", base.hidden_size, DIGITS).inference_value())
  _write_prompt(tmp_path, "tmpl", rows, DIGITS)
  _write_prompt(tmp_path, "plain", rows, None)
  texts = ["3 1 4", "9 2 6 5 3 5 8"]
  cut = [r[: r.index(TOK.eos_token_id)] if TOK.eos_token_id in r else r for r in _greedy_by_hand(base, texts, rows, 5)]
  want = [TOK.decode(r, skip_special_tokens=True) for r in cut]
  app, engine, problems = build(
    str(byte_llama), prompts=str(tmp_path), name="base", max_tokens=16, max_input_tokens=64, admin_token="t"
  )
  assert problems == []
  # a file whose rows do not fill its template: skipped from a prompts folder, a 400 over the admin API, both
  # naming the file and the counts
  (tmp_path / "bad").mkdir()
  short = _write_prompt(tmp_path / "bad", "short", rows[:3], DIGITS)
  why = f"{short}: holds 3 prompt rows, but its template {DIGITS!r} has 4 virtual token slots"
  assert [why in line for line in engine.store.load_dir(tmp_path / "bad")] == [True]
  with serving(app) as url:

    def post(endpoint, **body):
      return httpx.post(f"{url}/v1/{endpoint}", json=body, timeout=120)

    added = httpx.post(
      f"{url}/v1/prompts", json={"name": "short", "path": str(short)}, headers={"Authorization": "Bearer t"}
    )
    assert added.status_code == 400 and why in added.json()["error"]["message"]
    assert added.json()["error"]["param"] == "path" and "short" not in engine.store.names()

    got = post("completions", model="tmpl", prompt=[texts[0], {"digits": texts[1]}], max_tokens=5, temperature=0)
    assert [c["text"] for c in sorted(got.json()["choices"], key=lambda c: c["index"])] == want
    scores = post("classify", model="tmpl", input=texts, labels=["1", "8"]).json()["data"]
    examples = [{"fields": {"digits": t}, "targets": "1"} for t in texts]
    batch = encoding.encode(
      base.batch_type, examples, TOK, input_length=64, target_length=2, template=Template.parse(DIGITS)
    )
    ids, mask = encoding.encode_labels(base.batch_type, TOK, ["1", "8"], 2)
    prefix = SoftPrompt(rows, template=DIGITS).prefix(2)
    ref = np.asarray(
      _jit(base, "label_logprobs")(jax.tree.map(jnp.asarray, batch), jnp.asarray(ids), jnp.asarray(mask), prefix)
    )
    np.testing.assert_allclose([[d["scores"][k] for k in ("1", "8")] for d in scores], ref, atol=1e-4, rtol=1e-5)
    bad = post("completions", model="tmpl", prompt={"digitz": "1"}, max_tokens=2)
    assert bad.status_code == 400 and "lacks field 'digits'" in bad.json()["error"]["message"]
    bad = post("completions", model="plain", prompt={"digits": "1"}, max_tokens=2)
    assert bad.status_code == 400 and "needs a prompt with a template" in bad.json()["error"]["message"]


# -- config errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "over, message",
  [
    ({"prompt.template": "[P:4] review: {text}"}, r"unknown field \{text\}; task quickstart has digits"),
    ({"prompt.template": "[P:4] review"}, r"no input field"),
    ({"prompt.template": "review: {digits}"}, r"no prompt slot"),
    ({"prompt.template": "[P:3] {digits}"}, r"its slots hold 3 virtual tokens, prompt.length is 4"),
    ({"prompt.template": "[P:1] {digits} [P:2]"}, r"its slots hold 1 \+ 2 = 3 virtual tokens"),
    ({"prompt.template": "[P:4] {digits", "data.task": "rte"}, r"a brace outside a field"),
    (
      {"prompt.template": "[P:4] {idx}", "data.task": "super_glue/record", "eval.metric": "exact_match"},
      r"task super_glue/record has no named",
    ),
    ({"prompt.method": "prefix_tuning", "prompt.init": "random_uniform"}, r"prefix_tuning cannot sit at its slots"),
    ({"prompt.method": "dept"}, r"dept cannot sit at its slots"),
    ({"data.pack": True}, r"data.pack puts each prompt in front"),
  ],
)
def test_bad_templates_are_one_line_config_errors(over, message):
  over = {"prompt.template": "[P:2] {digits} [P:2]", **over}
  with pytest.raises(C.ConfigError, match=message) as e:
    cfg = tiny_cfg("unused", **over)
    validate(cfg, members_of(cfg.data), one_device())
  assert "\n" not in str(e.value)


def test_the_cli_names_a_bad_template_in_one_line(capsys, tmp_path):
  config = tmp_path / "c.yaml"
  config.write_text("prompt:\n  length: 4\n  template: '[P:4]'\n")
  code = main(["train", str(config), "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "no input field" in err[0]


@pytest.mark.parametrize("variant", ["bert", "roberta"])
def test_encoder_models_place_the_rows_as_transformers_runs_hand_built_embeddings(variant, tmp_path):
  """BERT / RoBERTa: the hidden states of a templated input equal transformers' model run on the hand-built input
  embeddings (real positions; RoBERTa's positions come from the ids, where a virtual token is a real token)."""
  import torch

  from tests.helpers_hf import load_encoder, write_encoder

  folder = write_encoder(tmp_path / variant, variant, seed=7)
  ref, base = load_encoder(folder), load_model(folder)
  pad = base.config.pad_token_id
  ids = np.random.default_rng(8).integers(3, 99, (2, 9))
  ids[:, [0, 1, 4, 7]] = [-1, -2, -3, -4]  # "[P:2] {a} [P] {b} [P]"-shaped rows
  mask = np.ones_like(ids)
  mask[1, 8:], ids[1, 8:] = 0, pad
  rows = np.random.default_rng(9).normal(size=(P, base.hidden_size)).astype(np.float32)
  prefix = SoftPrompt(rows, template="[P:2] {a} [P] {b} [P]").prefix(2)
  got = np.asarray(base.encode(jnp.asarray(ids), jnp.asarray(mask), prefix=prefix).hidden)
  emb = ref.get_input_embeddings()(torch.tensor(np.maximum(ids, 0))).detach().numpy()
  emb[ids < 0] = np.concatenate([rows] * 2)  # each row's virtual tokens in order: rows 0..3
  with torch.no_grad():
    want = ref(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
