"""DePT (decomposed prompt tuning): the offset against a PyTorch transcription of the authors' code, logits against
hand-built inputs on T5 and Llama (right and left padding, generation), the two learning-rate groups, resuming,
exports and the PEFT refusal."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxprompt import config as C
from jaxprompt import load_prompted
from jaxprompt.batches import CausalBatch
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.cli import main
from jaxprompt.errors import ExportError, PromptError
from jaxprompt.inference import generate
from jaxprompt.models import load_model
from jaxprompt.prompts import PromptedModel
from jaxprompt.prompts.dept import DePT, DePTSpec, init_offset_a, pack, unpack
from jaxprompt.prompts.export import export_prompt
from jaxprompt.prompts.io import load_prompt_source
from jaxprompt.prompts.methods import bank
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from tests.helpers import jit_train_step, one_device, tiny_cfg, train_interrupted

M, S, R = 3, 5, 2  # prompt length m, offset positions s, rank r
DEPT = {"prompt.method": "dept", "prompt.length": M, "prompt.dept_rank": R, "prompt.dept_max_length": S}


def _random_dept(hidden: int, seed: int, alpha: float = 8.0) -> DePT:
  """A DePT module with every factor random (B too: a fresh B is zero, which would hide the offset)."""
  k = jax.random.split(jax.random.key(seed), 3)
  return DePT(
    jax.random.normal(k[0], (M, hidden)),
    jax.random.normal(k[1], (S, R)),
    jax.random.normal(k[2], (R, hidden)) * 0.3,
    alpha=alpha,
  )


def _ids(seed: int, shape=(3, 7)):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 90, shape), jnp.int32)


# -- (a) the authors' computation -----------------------------------------------------------------------------


def test_the_input_embeddings_equal_the_authors_pytorch_forward(byte_t5):
  """github.com/ZhengxiangShi/DePT f0266a774a45c62ce32f159e2182583f1878546c, peft/peft_model.py
  (PeftModelForSeq2SeqLM.forward, PROMPT_TUNING_LORA) and peft/tuners/prompt_tuning_lora.py: their inputs are
  padded to max_length, so the offset covers every position (padding too)."""
  base = load_model(byte_t5)
  dept = _random_dept(base.hidden_size, 0)
  ids = _ids(1, (2, S))
  mask = jnp.asarray([[1] * S, [1, 1, 1, 0, 0]])  # a right-padded row, as their tokenizer pads

  # -- transcribed: word_embeddings, lora_embedding_A/B, scaling = lora_alpha / math.sqrt(r), the prompt in front
  word_embeddings = torch.nn.Embedding.from_pretrained(torch.tensor(np.asarray(base.embedding_table())))
  input_ids = torch.tensor(np.asarray(ids), dtype=torch.long)
  lora_embedding_A = torch.tensor(np.asarray(dept.offset_a[...]))
  lora_embedding_B = torch.tensor(np.asarray(dept.offset_b[...]))
  scaling = 8.0 / math.sqrt(R)
  batch_size = input_ids.shape[0]
  inputs_embeds = word_embeddings(input_ids)
  inputs_embeds += scaling * (lora_embedding_A @ lora_embedding_B).repeat(batch_size, 1, 1)
  prompts = torch.tensor(np.asarray(dept.embeddings[...]))[None].repeat(batch_size, 1, 1)
  want = torch.cat((prompts, inputs_embeds), dim=1).numpy()

  x, m = base.input_embeddings(ids, mask, prefix=dept.prefix(2))
  np.testing.assert_allclose(np.asarray(x), want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(m[:, :M]), 1)


def test_a_fresh_offset_is_initialised_as_theirs():
  """kaiming_uniform_(A, a=sqrt(5)) on [s, r]: U(-1/sqrt(r), 1/sqrt(r)); B zeros: the offset starts at zero."""
  s, r = 256, 30
  a_torch = torch.zeros((s, r))
  torch.nn.init.kaiming_uniform_(a_torch, a=math.sqrt(5))
  a = np.asarray(init_offset_a(jax.random.key(0), s, r))
  bound = 1 / math.sqrt(r)
  for x in (a, a_torch.numpy()):
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.99 * bound and abs(x.mean()) < 0.02


# -- (b) logits and generation --------------------------------------------------------------------------------


def _hand_built(base, dept: DePT, ids, mask):
  """[prompt; token embeddings with offset row i on each row's i-th real token (i < s)], by loops."""
  emb = np.array(base.embed(ids), np.float32)
  offset = np.asarray(dept.offset())
  for b in range(ids.shape[0]):
    first = int(np.argmax(np.asarray(mask[b]) > 0))
    for i in range(min(S, ids.shape[1] - first)):
      emb[b, first + i] += offset[i]
  prompt = np.broadcast_to(np.asarray(dept.embeddings[...]), (ids.shape[0], M, base.hidden_size))
  x = jnp.asarray(np.concatenate([prompt, emb], axis=1))
  return x, jnp.concatenate([jnp.ones((ids.shape[0], M), mask.dtype), mask], axis=1)


@pytest.mark.parametrize("model", ["byte_t5", "byte_llama"])
def test_logits_equal_a_hand_built_input_right_and_left_padded(model, request):
  base = load_model(request.getfixturevalue(model))
  seq2seq = base.kind == "seq2seq"
  dept = _random_dept(base.hidden_size, 2)
  prompted = PromptedModel(base, dept)
  ids = _ids(3)
  right = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
  left = right[:, ::-1]
  dec = _ids(4, (3, 4)) if seq2seq else None
  for mask in (right, left):
    x, m = _hand_built(base, dept, ids, mask)
    got = prompted.full_logits(ids, mask, dec)
    want = base.forward(None, m, dec, inputs_embeds=x)
    real = np.asarray(m).astype(bool)[..., None] if not seq2seq else True
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5, rtol=1e-5)
  without = PromptedModel(base, DePT(dept.embeddings[...], dept.offset_a[...], dept.offset_b[...] * 0, alpha=8.0))
  assert not np.allclose(prompted.full_logits(ids, right, dec), without.full_logits(ids, right, dec), atol=1e-3)


@pytest.mark.parametrize("model", ["byte_t5", "byte_llama"])
def test_padded_generation_equals_the_unpadded_row(model, request):
  """Decoders pad generation inputs on the left (the offset then starts at the first real token); T5 on the right
  (its relative position bias is not invariant to left padding between a prompt and the input, offset or not)."""
  base = load_model(request.getfixturevalue(model))
  dept = _random_dept(base.hidden_size, 5)
  ids = _ids(6, (2, 6))
  mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]])  # row 1: four tokens after two pads
  if base.kind == "seq2seq":
    ids, mask = ids.at[1].set(jnp.roll(ids[1], -2)), mask[:, ::-1]

  def greedy(ids, mask):
    out = generate(base, input_ids=ids, attention_mask=mask, prefix=dept.prefix(len(ids)), max_new_tokens=6)
    return np.asarray(out["tokens"])

  padded = greedy(ids, mask)
  alone = (slice(1, 2), slice(0, 4) if base.kind == "seq2seq" else slice(2, 6))
  np.testing.assert_array_equal(padded[1], greedy(ids[alone], mask[alone])[0])
  np.testing.assert_array_equal(padded[0], greedy(ids[:1], mask[:1])[0])


def test_a_causal_models_targets_get_no_offset(byte_llama):
  """Training (`score_targets`, input + target in one row, the offset stopped at the target) scores the target as
  evaluation does (input prefilled with the offset, the target continued from the cache without it)."""
  base = load_model(byte_llama)
  dept = _random_dept(base.hidden_size, 7)
  ins, tgts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]], [[20, 21, 1], [22, 1], [23, 24, 1]]
  batch = CausalBatch._layout(ins, tgts, 0, 8, 3)
  batch = jax.tree.map(jnp.asarray, batch)
  logits, targets, mask = nnx.jit(lambda m: m.score_targets(batch, dept.prefix(3)))(base)
  label_ids, label_mask = jnp.asarray([[20, 1]]), jnp.asarray([[1, 1]])
  (e_logits, _, e_mask), _ = nnx.jit(lambda m: m.eval_scores(batch, label_ids, label_mask, dept.prefix(3)))(base)
  keep = np.asarray(mask * e_mask).astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[keep], np.asarray(e_logits)[keep], atol=1e-4, rtol=1e-4)


def test_a_bank_of_dept_prompts_equals_each_alone(byte_llama):
  base = load_model(byte_llama)
  modules = [_random_dept(base.hidden_size, k) for k in range(3)]
  spec = modules[0].spec()
  mixed = PromptedModel(base, bank([np.asarray(m.inference_value()) for m in modules], [spec] * 3))
  ids, mask, which = _ids(8), jnp.ones((3, 7), jnp.int32), jnp.asarray([2, 0, 1])
  got = np.asarray(mixed(ids, mask, prompt_ids=which))
  for k in range(3):
    alone = np.asarray(PromptedModel(base, modules[k])(ids, mask))
    rows = np.flatnonzero(np.asarray(which) == k)
    np.testing.assert_allclose(got[rows], alone[rows], atol=1e-5, rtol=1e-5)


def test_packed_rows_refuse_the_offset(byte_t5):
  dept = _random_dept(load_model(byte_t5).hidden_size, 0)
  with pytest.raises(PromptError, match="packed rows cannot carry"):
    dept.packed_table()
  with pytest.raises(C.ConfigError, match="prompt.dept_rank applies to method dept"):
    C.load(None, ["prompt.dept_rank=4"])


# -- (c) training ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_each_group_moves_with_its_own_learning_rate(name):
  params = {"prompt": {"embeddings": jnp.ones((M, 4)), "offset_a": jnp.ones((S, R)), "offset_b": jnp.ones((R, 4))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  cfg = C.OptimizerConfig(name=name, learning_rate=0.3)
  tx = build_optimizer(cfg, 10, {"offset_a": 0.01, "offset_b": 0.01})
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  # sgd: -lr * g; adam's first step: -lr * sign(g)
  scale = 0.5 if name == "sgd" else 1.0
  np.testing.assert_allclose(updates["prompt"]["embeddings"], -0.3 * scale, rtol=1e-5)
  np.testing.assert_allclose(updates["prompt"]["offset_a"], -0.01 * scale, rtol=1e-5)
  np.testing.assert_allclose(updates["prompt"]["offset_b"], -0.01 * scale, rtol=1e-5)
  shapes = {x.shape for x in jax.tree.leaves(params)}
  assert all(x.shape in shapes or x.size <= 1 for x in jax.tree.leaves(state))  # state for the prompt's leaves only


def test_training_moves_only_the_two_groups_with_their_rates(byte_t5):
  from jaxprompt.data.pipeline import BatchStream

  over = {**DEPT, "optimizer.name": "sgd", "optimizer.learning_rate": 0.5, "prompt.dept_offset_learning_rate": 0.02}
  over["model.dropout"] = 0.0  # the step draws dropout; the reference gradient below does not
  cfg = tiny_cfg(byte_t5, **over)
  run, (data,) = build_run(cfg, mesh=one_device())
  assert set(run.prompt["prompt"]) == {"embeddings", "offset_a", "offset_b"}
  tx = build_optimizer(cfg.optimizer, cfg.train.steps, {"offset_a": 0.02, "offset_b": 0.02})
  step, opt = jit_train_step(run, tx, z_loss=0.0, microbatches=1)
  frozen_before = jax.tree.map(np.asarray, run.frozen)
  batch = run.device_batch(next(BatchStream(run.encode(data.examples, "train"), cfg.train.batch_size)))

  def loss(prompt):
    logits, targets, mask = nnx.merge(run.graphdef, prompt, run.frozen).score_targets(batch)
    from jaxprompt.losses import cross_entropy

    sums = cross_entropy(logits, targets, mask, 0.0)
    return sums.loss / jnp.maximum(jnp.sum(batch.loss_mask), 1.0)

  grads = jax.jit(jax.grad(loss))(run.prompt)
  prompt, opt, _ = step(run.prompt, opt, run.frozen, batch, jnp.asarray(0))
  p0, p1, g = run.prompt["prompt"], prompt["prompt"], grads["prompt"]
  np.testing.assert_allclose(p1["embeddings"] - p0["embeddings"], -0.5 * g["embeddings"], atol=1e-6)
  np.testing.assert_allclose(p1["offset_b"] - p0["offset_b"], -0.02 * g["offset_b"], atol=1e-7)
  assert np.abs(g["offset_b"]).max() > 0 and np.abs(g["embeddings"]).max() > 0
  np.testing.assert_array_equal(p1["offset_a"], p0["offset_a"])  # B starts at 0: no gradient reaches A yet
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.tree.map(np.asarray, run.frozen)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def trained(byte_t5, tmp_path_factory):
  """A DePT run interrupted at step 3 and resumed, and the same run without the interruption."""
  root = tmp_path_factory.mktemp("dept")
  over = {**DEPT, "optimizer.name": "adam", "optimizer.learning_rate": 0.05, "prompt.dept_offset_learning_rate": 0.01}
  train_interrupted(tiny_cfg(byte_t5, **over), tiny_cfg(byte_t5, **over, **{"train.steps": 3}), root, one_device())
  return root


def test_resuming_is_exact_and_every_group_trained(trained):
  a, b = (Checkpointer.reader(trained / w / "checkpoints").restore_prompt(6)[0] for w in ("full", "split"))
  first = Checkpointer.reader(trained / "full" / "checkpoints").restore_prompt(3)[0]
  assert set(a["prompt"]) == {"embeddings", "offset_a", "offset_b"}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(first), strict=True):
    assert not np.array_equal(x, y)


# -- (d) export -----------------------------------------------------------------------------------------------


def test_exports_round_trip_and_peft_refuses(byte_t5, trained, tmp_path, capsys):
  work = trained / "full"
  src = load_prompt_source(work)
  assert src.spec == DePTSpec(rank=R, max_length=S, alpha=8.0)
  emb, a, b = unpack(src.value, src.spec)
  h = load_model(byte_t5).hidden_size
  assert src.value.shape == (M + R + math.ceil(S * R / h), h) and emb.shape == (M, h)
  np.testing.assert_array_equal(a, src.params["offset_a"])
  np.testing.assert_array_equal(b, src.params["offset_b"])
  np.testing.assert_array_equal(pack(emb, a, b), src.value)
  ids, mask, dec = _ids(9), jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 7]), _ids(10, (3, 4))
  want = np.asarray(load_prompted(byte_t5, work)(ids, mask, dec))
  for fmt, name in (("numpy", "p.npy"), ("safetensors", "p.safetensors")):
    out = export_prompt(work, fmt, tmp_path / name)
    got = load_prompt_source(out)
    assert got.spec == src.spec and got.record.to_json()["prompt_spec"]["method"] == "dept"
    np.testing.assert_array_equal(got.value, src.value)
    np.testing.assert_array_equal(np.asarray(load_prompted(byte_t5, out)(ids, mask, dec)), want)
  with pytest.raises(ExportError, match="PEFT has no DePT"):
    export_prompt(work, "peft", tmp_path / "adapter")
  capsys.readouterr()
  code = main(["export", str(work), "--format", "peft", "--out", str(tmp_path / "adapter")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "PEFT has no DePT" in err[0]
  assert not (tmp_path / "adapter").exists()
