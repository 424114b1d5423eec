"""Prompt tuning of decoder-only LMs through the same loop and configs as T5 (`model.path` = a HF decoder folder
or a GGUF file): the loss counts target tokens only, rank scores agree with the training loss, the loop /
checkpoints / resume / export / `jaxprompt generate` work unchanged, and on a REAL pretrained model (karpathy's
stories260K) a trained prompt lowers the held-out loss of a style the model never writes on its own.
"""

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprompt
from jaxprompt import config as C
from jaxprompt import prompts as P
from jaxprompt.batches import CausalBatch
from jaxprompt.data import encoding
from jaxprompt.evaluation.evaluator import evaluator_for
from jaxprompt.inference import text as inference
from jaxprompt.losses import cross_entropy
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_trained_prompt
from jaxprompt.run import build_run, task_data
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.step import make_train_step
from jaxprompt.training.trainer import evaluate, train
from tests.helpers import fully_optimized, one_device, run_cli, tiny_cfg
from tests.helpers_hf import IdTokenizer

TOL = 1e-4  # whole-model float32 tolerance (DESIGN.md); never loosened


# -- causal semantics on a tiny random Llama ----------------------------------------------------------

# the last input is empty: with a BOS-less tokenizer (ByT5 here, GPT-2's) its first target token is predicted
# from the prompt's last position, as PEFT does (its labels are -100 on the prompt only)
EXAMPLES = [
  {"inputs": "3 7 1", "targets": "7"},
  {"inputs": "hello world", "targets": "a longer one"},
  {"inputs": "x", "targets": "yz"},
  {"inputs": "", "targets": "q"},
]


@pytest.fixture(scope="module")
def prompted_llama(byte_llama):
  base = jaxprompt.load_model(byte_llama)
  tok = jaxprompt.load_tokenizer(byte_llama)
  prompt = jax.random.normal(jax.random.key(7), (3, base.hidden_size)) * 0.5
  return P.PromptedModel(base, P.SoftPrompt(prompt)), tok


def _explicit_target_logps(model, tok, inputs: str, target_ids: list[int]) -> np.ndarray:
  """log p(target token j) for one unpadded example, from the plain base model fed [prompt, input, target] at
  positions 0..P+L+T-1: the prompt and input positions are only context; each target token is predicted from
  the position before it."""
  a = [i for i in tok(inputs)["input_ids"] if i != tok.eos_token_id]  # input (ByT5 adds no BOS)
  seq = jnp.asarray([a + target_ids])
  prompt = model.prompt.embeddings[...]
  x = jnp.concatenate([prompt[None], model.base.embed(seq)], axis=1)
  logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x: m(inputs_embeds=x))(model.base, x)[0], axis=-1))
  p = prompt.shape[0]
  return np.array([logp[p + len(a) + j - 1, t] for j, t in enumerate(target_ids)])


@jax.jit
def row_ce(logits, targets, mask):
  """Summed cross-entropy of each row [B]."""
  return jax.vmap(lambda row, t, m: cross_entropy(row[None], t[None], m[None]).ce)(logits, targets, mask)


def score_targets(model, batch):
  return nnx.jit(lambda m, b: m.score_targets(b))(model, jax.tree.map(jnp.asarray, batch))


def test_causal_loss_counts_only_target_tokens(prompted_llama):
  model, tok = prompted_llama
  eos = tok.eos_token_id
  explicit = [
    _explicit_target_logps(model, tok, ex["inputs"], tok(ex["targets"], add_special_tokens=False)["input_ids"] + [eos])
    for ex in EXAMPLES
  ]
  want_ce = -sum(e.sum() for e in explicit)
  want_tokens = sum(len(e) for e in explicit)
  for lengths in ((12, 14), (20, 30)):  # more right padding changes nothing
    batch = jax.tree.map(
      jnp.asarray, encoding.encode(CausalBatch, EXAMPLES, tok, input_length=lengths[0], target_length=lengths[1])
    )
    logits, targets, mask = score_targets(model, batch)
    s = jax.jit(cross_entropy)(logits, targets, mask)
    assert float(s.tokens) == want_tokens
    np.testing.assert_allclose(float(s.ce), want_ce, rtol=1e-5)
    np.testing.assert_allclose(row_ce(logits, targets, mask), [-e.sum() for e in explicit], rtol=1e-5)  # row by row
  # the train step reports (and differentiates) the same mean over target tokens
  graphdef, prompt_state, frozen = nnx.split(model, P.PromptParam, ...)
  step = jax.jit(make_train_step(graphdef, build_optimizer(C.OptimizerConfig(), 10), z_loss=0.0))
  _, _, m = step(
    prompt_state.to_pure_dict(),
    build_optimizer(C.OptimizerConfig(), 10).init(prompt_state.to_pure_dict()),
    frozen.to_pure_dict(),
    batch,
    jnp.asarray(0),
  )
  np.testing.assert_allclose(float(m["loss"]), want_ce / want_tokens, rtol=1e-5)
  assert float(m["tokens"]) == want_tokens


def test_causal_rank_scores_equal_the_training_likelihood(prompted_llama):
  """Rank classification ([prompt, left-padded input, label]) scores each label exactly as the training loss
  ([prompt, input, target, right padding]) scores it as the target, an empty input included."""
  model, tok = prompted_llama
  labels = ("7", "a longer one", "no")
  batch = jax.tree.map(jnp.asarray, encoding.encode(CausalBatch, EXAMPLES, tok, input_length=12, target_length=14))
  lab_ids, lab_mask = encoding.encode_labels(CausalBatch, tok, labels, target_length=14)
  scores = np.asarray(
    nnx.jit(lambda m, b, i, k: m.label_logprobs(b, i, k))(model, batch, jnp.asarray(lab_ids), jnp.asarray(lab_mask))
  )
  assert scores.shape == (4, 3)
  for c, label in enumerate(labels):
    as_target = encoding.encode(
      CausalBatch, [dict(ex, targets=label) for ex in EXAMPLES], tok, input_length=12, target_length=14
    )
    logits, targets, mask = score_targets(model, as_target)
    np.testing.assert_allclose(scores[:, c], -row_ce(logits, targets, mask), rtol=1e-5, atol=1e-5)


# -- the loop, checkpoints, export and `jaxprompt generate` with a decoder folder ---------------------


def test_loop_resume_eval_export_and_generate_with_a_decoder_folder(byte_llama, tmp_path, capsys):
  mesh = one_device()
  full = tiny_cfg(byte_llama, **{"eval.at_end": True})
  summary = train(full, tmp_path / "full", progress=False, mesh=mesh)
  assert summary.final_step == 6 and summary.metric == "accuracy"
  evals = [
    json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
  ]
  assert [e["step"] for e in evals] == [6] and summary.best_value == evals[0]["accuracy"]
  train(tiny_cfg(byte_llama, **{"train.steps": 3}), tmp_path / "split", progress=False, mesh=mesh)  # "killed"
  train(full, tmp_path / "split", progress=False, mesh=mesh)  # resumes at step 3
  a, info = load_trained_prompt(tmp_path / "full", "latest")
  b, _ = load_trained_prompt(tmp_path / "split", "latest")
  np.testing.assert_array_equal(a, b)
  assert info["base_architecture"]["kind"] == "causal" and info["base_architecture"]["model_type"] == "llama"
  assert info["step"] == 6
  # rank-classification eval of the saved checkpoint gives the loop's numbers
  ev = evaluate(full, tmp_path / "full", step=6, mesh=mesh)
  np.testing.assert_allclose(ev.metrics["accuracy"], summary.best_value)
  recs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(
    ev.metrics["eval_loss"], [r for r in recs if r["kind"] == "eval"][-1]["eval_loss"], rtol=1e-6
  )
  # exports
  npy = export_prompt(tmp_path / "full", "numpy", tmp_path / "p.npy", step="latest")
  np.testing.assert_array_equal(np.load(npy), a)
  adapter = export_prompt(tmp_path / "full", "peft", tmp_path / "adapter", step="latest")
  acfg = json.loads((adapter / "adapter_config.json").read_text())
  assert acfg["task_type"] == "CAUSAL_LM" and acfg["num_virtual_tokens"] == 4 and acfg["token_dim"] == 32
  # `jaxprompt generate --prompt WORKDIR` (base and tokenizer as recorded), inputs of several lengths
  texts = ["3 7 1 8 2", "9", "hello there, world"]
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  outs = {}
  for src in (tmp_path / "full", adapter, npy):
    lines = run_cli(
      capsys,
      "generate",
      "--prompt",
      src,
      "--step",
      "latest",
      "--input-file",
      tmp_path / "in.txt",
      "--max-new-tokens",
      6,
      "--jsonl",
    )
    outs[src] = [json.loads(line) for line in lines]
  base, tok = jaxprompt.load_model(byte_llama), jaxprompt.load_tokenizer(byte_llama)
  want = inference.generate_text(base, tok, texts, [a], max_new_tokens=6)
  for src, got in outs.items():
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want], src
    assert [r["input"] for r in got] == texts


# -- a REAL pretrained model: stories260K (GGUF) -----------------------------------------------------

NAMES = [
  "Lily",
  "Tom",
  "Ben",
  "Sue",
  "Mia",
  "Max",
  "Anna",
  "Tim",
  "Sam",
  "Lucy",
  "Jack",
  "Kate",
  "Zoe",
  "Bob",
  "Amy",
  "Joe",
  "Mary",
  "Jane",
  "Timmy",
  "Sara",
]
ANIMALS = ["dog", "cat", "bird", "fish", "frog", "bunny", "duck", "bear"]
OPENINGS = [
  "Once upon a time, there was a little girl named {n}. She had a {a}.",
  "One day, a boy named {n} went to the park with his {a}.",
  "{n} was a happy child who loved the {a}.",
]
HELD_OUT = set(NAMES[-5:])  # eval stories use names never seen in training
STYLE = "The {a} said: I love you, {n}!"  # a line the model never writes after such an opening on its own


def _story_files(folder):
  rows = [(n, a, k) for n in NAMES for a in ANIMALS for k in range(len(OPENINGS))]
  np.random.default_rng(0).shuffle(rows)
  splits = {
    "train": [r for r in rows if r[0] not in HELD_OUT],
    "validation": [r for r in rows if r[0] in HELD_OUT][:48],
  }
  files = {}
  for split, rs in splits.items():
    files[split] = folder / f"{split}.jsonl"
    files[split].write_text(
      "".join(
        json.dumps({"opening": OPENINGS[k].format(n=n, a=a), "continuation": STYLE.format(n=n, a=a), "animal": a})
        + "\n"
        for n, a, k in rs
      )
    )
  return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def stories_run(fixtures_dir, tmp_path_factory):
  pytest.importorskip("gguf", reason="GGUF support needs the gguf package")
  gguf = fixtures_dir / "models" / "stories260K" / "stories260K.gguf"
  root = tmp_path_factory.mktemp("stories")
  cfg = C.from_dict(
    {
      "model": {"path": str(gguf)},  # tokenizer: the vocabulary inside the GGUF file
      "prompt": {"length": 8, "init": "sampled_vocab", "vocab_sample_size": 500},
      "data": {
        "task": "stories",
        "files": _story_files(root),
        "custom": {"template": "{opening}", "label_column": "continuation"},
        "input_length": 32,
        "target_length": 20,
      },
      "optimizer": {"name": "adafactor", "learning_rate": 0.3},
      "train": {"steps": 200, "batch_size": 16, "log_every": 50, "plot": False},
      "eval": {"every": 100, "metric": "eval_loss", "batch_size": 48},
      "checkpoint": {"every": 100, "keep": 2, "async_save": False},
    }
  )
  start = time.time()
  with fully_optimized():  # 200 steps
    summary = train(cfg, root / "work", progress=False, mesh=one_device())
  return cfg, root / "work", summary, time.time() - start


@pytest.mark.slow
def test_prompt_tuning_lowers_heldout_loss_on_stories260K(stories_run):
  cfg, work, summary, seconds = stories_run
  assert summary.final_step == 200 and summary.metric == "eval_loss"
  loss_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, mode="loss"))
  run, _ = build_run(loss_cfg, mesh=one_device(), with_train_data=False)
  evaluator = evaluator_for(run)
  initial = evaluator(run.prompt)[0]["eval_loss"]
  trained_value, _ = load_trained_prompt(work)  # the best checkpoint
  trained = evaluator({"prompt": {"embeddings": jnp.asarray(trained_value)}})[0]["eval_loss"]
  no_prompt = evaluator({"prompt": {"embeddings": jnp.zeros((0, run.base.hidden_size))}})[0]["eval_loss"]
  # prompt length 0 is the base model alone
  arrays = evaluator.arrays
  logits = run.base(input_ids=jnp.asarray(arrays.tokens), attention_mask=jnp.asarray(arrays.token_mask))
  target_mask = np.zeros(arrays.tokens.shape, np.int32)  # 1 at every target token
  for b, (idx, valid) in enumerate(zip(arrays.target_index, arrays.target_valid, strict=True)):
    target_mask[b, idx[valid > 0]] = 1
  s = cross_entropy(logits[:, :-1], jnp.asarray(arrays.tokens[:, 1:]), jnp.asarray(target_mask[:, 1:]))
  np.testing.assert_allclose(no_prompt, float(s.ce / s.tokens), rtol=1e-5)
  np.testing.assert_allclose(trained, summary.best_value, rtol=1e-5)
  print(
    f"stories260K held-out target loss (nats/token): base model alone {no_prompt:.4f}, initial prompt "
    f"{initial:.4f}, trained prompt (200 adafactor steps) {trained:.4f}; train+eval {seconds:.1f} s"
  )
  assert trained < no_prompt / 3 and trained < initial / 3  # measured: 3.84 / 3.94 -> 0.63
  # greedy continuations of held-out stories now follow the style (names unseen in training)
  preds = [json.loads(line) for line in (work / "predictions" / "step_200.jsonl").read_text().splitlines()]
  examples = task_data(cfg.data, "validation").examples
  assert len(preds) == len(examples) == 48
  styled = [p["prediction"].startswith(p["targets"].split(",")[0] + ",") for p in preds]
  print(
    f"held-out generations in the style: {sum(styled)}/{len(styled)}; e.g. {preds[0]['inputs']!r} -> "
    f"{preds[0]['prediction']!r}"
  )
  assert np.mean(styled) >= 0.75


@pytest.mark.slow
def test_generate_cli_on_the_gguf_workdir_matches_the_evaluator(stories_run, tmp_path, capsys):
  """`jaxprompt generate --prompt WORKDIR` (model and tokenizer from the recorded GGUF file) batches inputs of
  other lengths, with other padding, than the evaluator did: the same continuations."""
  _, work, _, _ = stories_run
  preds = [json.loads(line) for line in (work / "predictions" / "step_200.jsonl").read_text().splitlines()][:8]
  (tmp_path / "in.txt").write_text("".join(p["inputs"] + "\n" for p in preds))
  lines = run_cli(
    capsys,
    "generate",
    "--prompt",
    work,
    "--step",
    "200",
    "--input-file",
    tmp_path / "in.txt",
    "--max-new-tokens",
    20,
    "--jsonl",
  )
  # JSON lines: a continuation may itself hold a newline
  assert [json.loads(line)["output"].strip() for line in lines] == [p["prediction"] for p in preds]


@pytest.mark.slow
def test_gguf_prompt_exported_with_base_gives_our_logits_in_peft(stories_run, tmp_path):
  """The prompt trained on the GGUF file, exported with --with-base (a HF Llama folder + tokenizer written from the
  GGUF), loads in PyTorch + PEFT and gives our logits on the real model."""
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM, AutoTokenizer

  cfg, work, _, _ = stories_run
  out = export_prompt(work, "peft", tmp_path / "adapter", with_base=True)
  value, _ = load_trained_prompt(out)
  hf_tok = AutoTokenizer.from_pretrained(out / "base")
  run, _ = build_run(cfg, mesh=one_device(), with_train_data=False)
  texts = [p["opening"] for p in map(json.loads, Path(cfg.data.files["validation"]).read_text().splitlines())][:4]
  for t in texts:
    assert hf_tok(t)["input_ids"] == run.tokenizer(t)["input_ids"]
  arrays = run.encode([{"inputs": t, "targets": STYLE.format(n="Zoe", a="cat")} for t in texts], "x")
  ids, mask = arrays.tokens, arrays.token_mask  # training layout: right padding
  peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base").eval(), out).eval()
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
  model = nnx.merge(run.graphdef, {"prompt": {"embeddings": jnp.asarray(value)}}, run.frozen)
  ours = np.asarray(model.full_logits(jnp.asarray(ids), jnp.asarray(mask)))  # PEFT: prompt positions too
  assert ours.shape == ref.shape == (4, 8 + ids.shape[1], 512)
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), ours[:, 8:])  # real ones
  print(f"stories260K + trained prompt, PEFT vs ours: max |logit diff| {np.abs(ours - ref).max():.2e}")
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


def test_a_long_target_is_cut_as_rank_evaluation_cuts_the_label():
  """A target longer than data.target_length keeps its EOS, as `label_rows` keeps it in the labels that rank
  classification scores: training and evaluation then score the same tokens (a label cut differently got an
  unlearned EOS term in every score: SST-2 on TinyStories' tokenizer at target_length 4 ranked every row alike)."""
  tok = IdTokenizer()
  batch = encoding.encode(
    CausalBatch, [{"inputs": "5 6", "targets": "40 41 42 43"}], tok, input_length=4, target_length=3
  )
  target = np.asarray(batch.tokens)[0, np.asarray(batch.target_index)[0]]
  ids, mask = encoding.encode_labels(CausalBatch, tok, ["40 41 42 43"], target_length=3)
  np.testing.assert_array_equal(target, [40, 41, tok.eos_token_id])
  np.testing.assert_array_equal(target, ids[0][mask[0] > 0])
