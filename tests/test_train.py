"""The training core: optimizer only on the prompt, frozen weights untouched, sharding-invariant results,
exact resumption, and the loop's outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprompt import sharding as shd
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.data import encoding
from jaxprompt.data.pipeline import BatchStream
from jaxprompt.run import build_run
from jaxprompt.training.optim import build_optimizer
from jaxprompt.training.step import make_train_step
from jaxprompt.training.trainer import train
from tests.helpers import small_cfg, train_interrupted


def _steps(cfg, mesh, n):
  run, (data,) = build_run(cfg, mesh=mesh)
  tx = build_optimizer(cfg.optimizer, cfg.train.steps)
  step = jax.jit(make_train_step(run.graphdef, tx, z_loss=cfg.train.z_loss, microbatches=cfg.train.microbatches))
  stream = BatchStream(run.encode(data.examples, "train"), cfg.train.batch_size, seed=0)
  prompt, opt = run.prompt, tx.init(run.prompt)
  losses = []
  for i in range(n):
    prompt, opt, m = step(prompt, opt, run.frozen, run.device_batch(next(stream)), jnp.asarray(i))
    losses.append(float(m["loss"]))
  return run, prompt, opt, losses


def test_optimizer_state_is_prompt_shaped_and_frozen_weights_are_untouched(byte_t5):
  cfg = small_cfg(byte_t5)
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  run, (data,) = build_run(cfg, mesh=mesh)
  before = jax.tree.map(lambda x: np.array(x), run.frozen)
  tx = build_optimizer(cfg.optimizer, 10)
  opt = tx.init(run.prompt)
  p_shape = run.prompt["prompt"]["embeddings"].shape
  for leaf in jax.tree.leaves(opt):
    assert leaf.size <= 1 or leaf.shape == p_shape, leaf.shape  # counters, unfactored placeholders, or [P, H]
  assert sum(leaf.size for leaf in jax.tree.leaves(opt)) <= 2 * np.prod(p_shape) + 8
  step = jax.jit(make_train_step(run.graphdef, tx, z_loss=1e-4), donate_argnums=(0, 1))
  stream = BatchStream(run.encode(data.examples, "train"), 8)
  prompt = jax.tree.map(jnp.copy, run.prompt)
  for i in range(5):
    prompt, opt, _ = step(prompt, opt, run.frozen, run.device_batch(next(stream)), jnp.asarray(i))
  after = jax.tree.map(np.asarray, run.frozen)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)  # bitwise unchanged
  assert not np.allclose(np.asarray(prompt["prompt"]["embeddings"]), np.asarray(run.prompt["prompt"]["embeddings"]))
  # the prompt is the only thing the split calls trainable
  assert list(jax.tree.leaves(run.prompt))[0].shape == p_shape and len(jax.tree.leaves(run.prompt)) == 1


def test_loss_falls_and_one_device_equals_a_2x4_mesh(byte_t5):
  cfg = small_cfg(byte_t5, **{"model.dropout": 0.0, "train.batch_size": 16})
  _, p1, _, losses = _steps(cfg, shd.make_mesh(devices=jax.devices()[:1]), 25)
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses  # measured: 5.93 -> 5.17
  _, p8, _, losses8 = _steps(cfg, shd.make_mesh(data=2, model=4), 25)
  np.testing.assert_allclose(
    np.asarray(p8["prompt"]["embeddings"]), np.asarray(p1["prompt"]["embeddings"]), atol=2e-5, rtol=2e-5
  )
  np.testing.assert_allclose(losses8, losses, rtol=1e-4)


def test_gradient_accumulation_matches_the_full_batch(byte_t5):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  a = _steps(small_cfg(byte_t5, **{"model.dropout": 0.0}), mesh, 3)
  b = _steps(small_cfg(byte_t5, **{"model.dropout": 0.0, "train.microbatches": 4}), mesh, 3)
  np.testing.assert_allclose(
    np.asarray(b[1]["prompt"]["embeddings"]), np.asarray(a[1]["prompt"]["embeddings"]), atol=1e-5
  )
  np.testing.assert_allclose(b[3], a[3], rtol=1e-5)


def test_auto_microbatches_chunk_big_batches_on_the_cpu_and_change_nothing_else(byte_t5):
  from jaxprompt.models.cpu import auto_microbatches

  # the fewest chunks of <= 4096 tokens, whole rows on every data-parallel device, the same for 1 and 8 devices
  assert [auto_microbatches(32, 364), auto_microbatches(32, 236), auto_microbatches(8, 236)] == [4, 2, 1]
  assert auto_microbatches(32, 364, data_parallel=8) == 4 and auto_microbatches(6, 5000) == 6
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  big = {"model.dropout": 0.0, "train.batch_size": 32, "data.input_length": 125}  # 32 x (4 + 125 + 3) tokens
  assert auto_microbatches(32, 4 + 125 + 3) == 2
  auto = _steps(small_cfg(byte_t5, **big), mesh, 2)  # train.microbatches: auto (the default) -> 2 chunks
  one = _steps(small_cfg(byte_t5, **big, **{"train.microbatches": 1}), mesh, 2)
  np.testing.assert_allclose(
    np.asarray(auto[1]["prompt"]["embeddings"]), np.asarray(one[1]["prompt"]["embeddings"]), atol=1e-5
  )
  np.testing.assert_allclose(auto[3], one[3], rtol=1e-5)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_unrolled_layers_compute_what_the_scan_computes(byte_t5, tmp_path, kind):
  """model.layer_loop: the CPU's unrolled stack and the accelerators' scan give the same loss and prompt gradient,
  and generation (cached steps) the same tokens."""
  from flax import nnx

  from jaxprompt.batches import CausalBatch, Seq2SeqBatch
  from jaxprompt.inference import generate
  from jaxprompt.models.interface import Prefix
  from jaxprompt.models.layers import unrolls
  from jaxprompt.models.loading import load_model
  from tests.helpers_hf import IdTokenizer, write_decoder

  assert unrolls("auto", 512) and not unrolls("auto", 64) and unrolls("unroll", 64) and not unrolls("scan", 512)
  folder = byte_t5 if kind == "t5" else write_decoder(tmp_path / "m", "llama3-gqa-untied", seed=1)
  models = [load_model(folder, layer_loop=loop) for loop in ("scan", "unroll")]
  batch_type = Seq2SeqBatch if kind == "t5" else CausalBatch
  examples = [{"inputs": "5 9 17 33", "targets": "40 41"}, {"inputs": "7", "targets": "12 13 14"}]
  batch = jax.tree.map(
    jnp.asarray, encoding.encode(batch_type, examples, IdTokenizer(), input_length=6, target_length=3, name="t")
  )
  prompt = jax.random.normal(jax.random.key(0), (4, models[0].hidden_size)) * 0.5

  def loss(p, m):
    logits, targets, mask = m.score_targets(batch, Prefix(embeds=p[None]))
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask)

  (l_scan, g_scan), (l_unrolled, g_unrolled) = [
    nnx.jit(lambda m, p: jax.value_and_grad(loss)(p, m))(m, prompt) for m in models
  ]
  np.testing.assert_allclose(l_unrolled, l_scan, rtol=1e-5)
  np.testing.assert_allclose(g_unrolled, g_scan, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_scan).max()))
  ids, mask = encoding.encode_inputs(batch_type, IdTokenizer(), [e["inputs"] for e in examples])
  outs = [
    generate(
      m,
      input_ids=jnp.asarray(ids),
      attention_mask=jnp.asarray(mask),
      prefix=Prefix(embeds=prompt[None]),
      max_new_tokens=4,
      eos_id=-1,
    )["tokens"]
    for m in models
  ]
  np.testing.assert_array_equal(outs[0], outs[1])


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(byte_t5, tmp_path):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  full = small_cfg(byte_t5)
  train_interrupted(full, small_cfg(byte_t5, **{"train.steps": 3}), tmp_path, mesh)

  def final(workdir):
    c = Checkpointer(workdir / "checkpoints")
    meta = c.read_meta(6)
    run, _ = build_run(full, mesh=mesh, with_train_data=False)
    p, _, _ = c.restore(6, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run.prompt), None)
    return np.asarray(p["prompt"]["embeddings"]), meta

  a, meta_a = final(tmp_path / "full")
  b, meta_b = final(tmp_path / "split")
  np.testing.assert_array_equal(a, b)
  assert meta_a["position"] == meta_b["position"] == 6
  # what resuming and provenance need, beside the arrays: data position, RNG seed, best eval, the base's identity
  assert {"step", "position", "seed", "best", "stale_evals", "base_model", "base_architecture", "config"} <= set(meta_a)
  assert meta_a["base_model"]["fingerprint"] and meta_a["config"]["model"]["path"] == str(byte_t5)
  # a checkpoint holds only the prompt, the optimizer state and metadata: never the base model
  size = sum(f.stat().st_size for f in (tmp_path / "full" / "checkpoints").rglob("*") if f.is_file())
  base = sum(f.stat().st_size for f in byte_t5.glob("*.safetensors"))
  assert size < base / 2


def test_loop_writes_logs_plot_predictions_and_keeps_the_best(byte_t5, tmp_path):
  cfg = small_cfg(byte_t5, **{"train.steps": 4, "train.plot": True, "eval.every": 2, "checkpoint.keep": 1})
  summary = train(cfg, tmp_path, progress=False, mesh=shd.make_mesh(devices=jax.devices()[:1]))
  recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_recs = [r for r in recs if r["kind"] == "train"]
  evals = [r for r in recs if r["kind"] == "eval"]
  assert [r["step"] for r in train_recs] == [2, 4] and [r["step"] for r in evals] == [2, 4]
  assert all(r["tokens_per_second"] > 0 and r["step_time"] > 0 for r in train_recs)
  assert (tmp_path / "curves.png").stat().st_size > 10_000
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
  preds = [json.loads(line) for line in (tmp_path / "predictions" / "step_4.jsonl").read_text().splitlines()]
  assert len(preds) == 16 and {"inputs", "prediction", "correct"} <= set(preds[0])
  # the logged accuracy is the fraction of those predictions that are right
  assert evals[-1]["accuracy"] == np.mean([p["correct"] for p in preds])
  assert all(p["correct"] == (p["prediction"] == p["targets"]) for p in preds)
  kept = Checkpointer(tmp_path / "checkpoints").steps()
  best = summary.best_step
  assert 4 in kept and best in kept and len(kept) <= 2  # the last one plus the best


def test_dropout_draws_jax_random_bits_exactly_jitted_and_sharded():
  """Dropout's keys and masks come from our unrolled Threefry (cheap to compile on CPU): bitwise those of
  `jax.random.split` / `jax.random.bernoulli`, also with the rows sharded over 8 devices; other key types fall
  back to `jax.random` itself."""
  from jaxprompt.models import layers as L

  mesh = shd.make_mesh(devices=jax.devices()[:8], data=8)
  split = jax.jit(lambda k: [L.split_keys(k, n) for n in (1, 2, 5, 24)])
  for seed in (0, 2**31 + 5):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    for ours, n in zip(split(key), (1, 2, 5, 24), strict=True):
      assert np.array_equal(jax.random.key_data(ours), jax.random.key_data(jax.random.split(key, n)))
    for shape, p in (((7,), 0.9), ((3, 5), 0.5), ((8, 20, 64), 0.9), ((16, 4, 12, 12), 0.999)):
      want = np.asarray(jax.random.bernoulli(key, p, shape))
      assert 0 < want.sum() < want.size
      sharding = shd.batch_sharding(mesh, len(shape)) if shape[0] % 8 == 0 else None  # rows over 8 devices
      draw = jax.jit(lambda k, x, p=p: L.bernoulli(k, p, x.shape) & (x > -1), in_shardings=(None, sharding))
      assert np.array_equal(draw(key, jnp.zeros(shape)), want)
  other = jax.random.key(1, impl="rbg")
  assert np.array_equal(L.bernoulli(other, 0.5, (4, 6)), jax.random.bernoulli(other, 0.5, (4, 6)))
  assert np.array_equal(jax.random.key_data(L.split_keys(other, 3)), jax.random.key_data(jax.random.split(other, 3)))


@pytest.mark.parametrize(
  "heads, kv_heads, bias_shape, rate",
  [
    (6, 6, (2, 1, 5, 7), 0.0),
    (8, 4, (1, 1, 5, 7), 0.0),
    (4, 2, (2, 4, 5, 7), 0.3),
    (4, 4, None, 0.2),
    (4, 1, (5, 7), 0.0),
  ],
)
def test_attention_and_its_own_backward_pass_equal_the_plain_formula(heads, kv_heads, bias_shape, rate):
  """`dot_product_attention` (its own backward pass) against autodiff of the textbook formula with the K/V heads
  repeated: outputs and the gradients of queries, keys, values and bias, with GQA, dropout and broadcast biases."""
  from jaxprompt.models import layers as L

  r = np.random.default_rng(0)
  q = jnp.asarray(r.standard_normal((2, 5, heads, 8)), jnp.float32)
  k, v = (jnp.asarray(r.standard_normal((2, 7, kv_heads, 8)), jnp.float32) for _ in range(2))
  bias = None if bias_shape is None else jnp.asarray(r.standard_normal(bias_shape), jnp.float32)
  rng = jax.random.key(3) if rate else None

  def plain(q, k, v, bias=None):
    g = heads // kv_heads
    scores = jnp.einsum("blnd,bsnd->bnls", q, jnp.repeat(k, g, axis=2)) * 0.35 + (0.0 if bias is None else bias)
    p = jax.nn.softmax(scores, -1)
    if rate:
      p = jnp.where(L.bernoulli(rng, 1 - rate, p.shape), p / (1 - rate), 0.0)
    return jnp.einsum("bnls,bsnd->blnd", p, jnp.repeat(v, g, axis=2))

  def ours(q, k, v, bias=None):
    return L.dot_product_attention(q, k, v, bias, scale=0.35, dropout_rate=rate, dropout_rng=rng)

  args = (q, k, v) if bias is None else (q, k, v, bias)
  np.testing.assert_allclose(ours(*args), plain(*args), rtol=1e-5, atol=1e-6)
  grads = [
    jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args))))(*args) for f in (ours, plain)
  ]
  for a, b in zip(*grads, strict=True):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
