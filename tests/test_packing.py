"""Packing (`data.pack`): several seq2seq examples per row, each with its own prompt, attention kept inside each
example. Every example's loss, gradient and accuracy equal its unpacked row's; each host packs its own share into
one shape shared by all hosts; the same examples are trained on in the same order, and resuming stays exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.batches import PackedSeq2SeqBatch, Seq2SeqBatch, pack_bins, pack_seq2seq
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.data import encoding
from jaxprompt.data.pipeline import BatchStream, Packing
from jaxprompt.losses import cross_entropy
from jaxprompt.models import load_model
from jaxprompt.models.cpu import auto_microbatches
from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt
from jaxprompt.prompts.encoders import PTuning
from jaxprompt.run import build_run
from jaxprompt.training.step import packed_rows
from tests.helpers import BUCKET_EXAMPLES, tiny_cfg, train_interrupted
from tests.helpers_hf import IdTokenizer, write_t5

P = 3


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
  return load_model(write_t5(tmp_path_factory.mktemp("pack") / "t5", "t5v11-gated-untied", vocab_size=96))


def _sums(model, batch):
  logits, targets, mask = model.score_targets(jax.tree.map(jnp.asarray, batch))
  return cross_entropy(logits, targets, mask, 1e-4, segments=batch.loss_segments)


def _prompt(kind, hidden):
  key = jax.random.key(0)
  if kind == "one":
    return SoftPrompt(jax.random.normal(key, (P, hidden)) * 0.5)
  if kind == "bank":
    return SoftPrompt(jax.random.normal(key, (2, P, hidden)) * 0.5)
  return PTuning(
    jax.random.normal(key, (P, hidden)), encoder="MLP", hidden_size=16, num_layers=2, dropout=0.0, rng=jax.random.key(1)
  )


@pytest.mark.parametrize("kind", ["one", "bank", "p_tuning"])
def test_packed_rows_give_every_example_its_unpacked_loss_and_gradient(t5, kind):
  model = PromptedModel(t5, _prompt(kind, t5.hidden_size))
  full = encoding.encode(Seq2SeqBatch, BUCKET_EXAMPLES, IdTokenizer(), input_length=32, target_length=3, name="t")
  if kind == "bank":
    full = full.with_task_ids(np.arange(8) % 2)
  bins = pack_bins([P + int(n) for n in full.input_lengths()], 14)
  assert len(bins) == 4 and sorted(i for b in bins for i in b) == list(range(8))  # 8 examples in 4 rows
  packed = pack_seq2seq(full, bins, P, 5, 14, 8, t5.config.decoder_start_token_id)  # a fifth row of padding
  assert isinstance(packed, PackedSeq2SeqBatch) and int(packed.num_examples) == 8

  def loss(b):
    return lambda m: _sums(m, b).loss

  for field in ("loss", "ce", "z_loss", "correct", "tokens", "seq_correct"):
    np.testing.assert_allclose(getattr(_sums(model, packed), field), getattr(_sums(model, full), field), rtol=1e-5)

  def grad(b):
    return nnx.grad(loss(b), argnums=nnx.DiffState(0, PromptParam))(model)

  grads = [jax.tree.leaves(nnx.state(grad(b), PromptParam)) for b in (full, packed)]
  assert grads[0] and len(grads[0]) == len(grads[1])
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_packed_layout_prompt_slots_decoder_inputs_and_padding_rows():
  full = encoding.encode(Seq2SeqBatch, BUCKET_EXAMPLES[:3], IdTokenizer(), input_length=32, target_length=3, name="t")
  full = full.with_task_ids([0, 1, 1])
  lens, tl = full.input_lengths(), np.asarray(full.target_mask).sum(1)  # inputs 5, 1, 0 tokens
  p = pack_seq2seq(full, [[0, 2], [1]], P, 3, 16, 8, start_id=0)
  np.testing.assert_array_equal(p.input_segments[0, : P + lens[0] + P], [1] * (P + lens[0]) + [2] * P)
  np.testing.assert_array_equal(p.prompt_slots[0, :P], [0, 1, 2])  # example 0: prompt 0
  np.testing.assert_array_equal(p.prompt_slots[0, P + lens[0] : 2 * P + lens[0]], [3, 4, 5])  # example 2: prompt 1
  np.testing.assert_array_equal(p.input_ids[0, P : P + lens[0]], full.input_ids[0, : lens[0]])
  assert (p.prompt_slots[0, P : P + lens[0]] == -1).all() and (p.input_segments[2] == 0).all()
  t0 = int(tl[0])
  np.testing.assert_array_equal(p.target_ids[0, :t0], full.target_ids[0, :t0])
  np.testing.assert_array_equal(p.decoder_input_ids[0, :t0], [0, *full.target_ids[0, : t0 - 1]])  # shifted right
  assert p.decoder_input_ids[0, t0] == 0 and p.target_segments[0, t0] == 2  # example 2 starts anew
  assert int(p.num_examples) == 3 and p.tokens_per_row(P) == 16 + 8
  assert p.input_lengths().tolist() == [lens[0] + lens[2], lens[1], 0]  # prompts not counted
  with pytest.raises(Exception, match="does not fit row 0"):
    pack_seq2seq(full, [[0, 1, 2]], P, 1, 12, 8, start_id=0)


def test_sequence_accuracy_counts_packed_examples_not_rows():
  targets = jnp.asarray([[5, 6, 7, 8, 0], [5, 6, 0, 0, 0]])
  segments = jnp.asarray([[1, 1, 2, 2, 0], [1, 1, 0, 0, 0]])
  hit = jnp.asarray([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1]])  # example (0, 2) misses a token
  logits = jax.nn.one_hot(jnp.where(hit > 0, targets, 9), 10) * 10.0
  sums = cross_entropy(logits, targets, segments > 0, segments=segments)
  assert float(sums.seq_correct) == 2.0 and float(sums.correct) == 5.0 and float(sums.tokens) == 6.0


def test_pack_bins_is_first_fit_decreasing_and_deterministic():
  assert pack_bins([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
  assert pack_bins([4, 4, 4], 12) == [[0, 1, 2]]
  assert pack_bins([], 8) == []


def test_packed_rows_split_over_devices_and_microbatches():
  assert packed_rows(5, 20, microbatches="auto") == 8  # the row grid: a few shapes per bucket
  assert packed_rows(9, 20, microbatches=1, data_parallel=8) == 16
  assert packed_rows(9, 20, microbatches=3, data_parallel=2) == 12
  assert packed_rows(1, 20, microbatches=16) == 16  # every microbatch gets a row, however few are needed
  assert packed_rows(3, 20, microbatches=1, data_parallel=8, processes=2) == 4  # 8 rows over 2 hosts
  for needed in range(1, 40):  # CPU chunks: never down to one-row chunks of short rows
    n = packed_rows(needed, 364, microbatches="auto")
    m = auto_microbatches(n, 364)
    assert n >= needed and n % 4 == 0 and (m == 1 or (n // m) * 364 * 2 >= 4096)


def test_every_host_packs_its_share_into_one_shape_in_the_unpacked_order():
  rows = encoding.encode(Seq2SeqBatch, BUCKET_EXAMPLES, IdTokenizer(), input_length=32, target_length=3, name="t")
  packing = Packing(P, 0)
  plain = BatchStream(rows, 8, seed=1, buckets=(8, 32))
  hosts = [
    BatchStream(rows, 8, seed=1, buckets=(8, 32), process_index=i, process_count=2, packing=packing) for i in range(2)
  ]
  fewer = 0
  for _ in range(6):
    every = plain.global_indices(plain.position)
    a, shares = next(plain), [next(h) for h in hosts]
    assert {jax.tree.map(np.shape, s) for s in shares} == {jax.tree.map(np.shape, shares[0])}
    assert shares[0].input_length == P + a.input_length  # a row is as long as the unpacked one
    fewer += shares[0].size < 4
    for h, s in enumerate(shares):  # each host's rows hold its share of the global batch, every token once
      got = sorted(
        tuple(s.input_ids[r, s.input_segments[r] == g][P:])
        for r in range(s.size)
        for g in range(1, s.input_segments[r].max() + 1)
      )
      want = sorted(tuple(rows.input_ids[i, : rows.input_lengths()[i]]) for i in every[4 * h : 4 * h + 4])
      assert got == want
    assert hosts[0].last_pad_fraction <= plain.last_pad_fraction + 1e-9
  assert fewer  # some shares fit in one row


def test_packing_is_on_for_t5_with_an_input_prompt_and_refused_elsewhere(byte_t5, byte_llama):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  assert build_run(tiny_cfg(byte_t5), mesh=mesh, with_train_data=False)[0].packs
  assert not build_run(tiny_cfg(byte_t5, **{"data.pack": False}), mesh=mesh, with_train_data=False)[0].packs
  prefix = {"prompt.method": "prefix_tuning", "prompt.init": "random_uniform"}
  assert not build_run(tiny_cfg(byte_t5, **prefix), mesh=mesh, with_train_data=False)[0].packs
  with pytest.raises(C.ConfigError, match="data.pack needs a prompt before the input"):
    build_run(tiny_cfg(byte_t5, **prefix, **{"data.pack": True}), mesh=mesh, with_train_data=False)
  assert not build_run(tiny_cfg(byte_llama), mesh=mesh, with_train_data=False)[0].packs
  with pytest.raises(C.ConfigError, match="data.pack packs seq2seq"):
    build_run(tiny_cfg(byte_llama, **{"data.pack": True}), mesh=mesh, with_train_data=False)


def test_packed_training_equals_unpacked_and_resumes_exactly(byte_t5, tmp_path):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  over = {"data.input_length": 32, "model.dropout": 0.0}  # digits: 1-11 bytes, 2-4 examples per 36-slot row
  train_interrupted(tiny_cfg(byte_t5, **over), tiny_cfg(byte_t5, **over, **{"train.steps": 3}), tmp_path, mesh)

  def final(w, s=6):
    return Checkpointer.reader(w / "checkpoints").restore_prompt(s)[0]

  for x, y in zip(jax.tree.leaves(final(tmp_path / "full")), jax.tree.leaves(final(tmp_path / "split")), strict=True):
    np.testing.assert_array_equal(x, y)
  recs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  train_recs = [r for r in recs if r["kind"] == "train"]
  assert all(r["rows"] < 8 for r in train_recs)  # 8 examples a step in fewer rows
  from jaxprompt.training.trainer import train

  train(tiny_cfg(byte_t5, **over, **{"data.pack": False}), tmp_path / "plain", progress=False, mesh=mesh)
  plain = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
  plain = [r for r in plain if r["kind"] == "train"]
  assert all(r["rows"] == 8 for r in plain)
  for a, b in zip(train_recs, plain, strict=True):  # the same examples, the same losses
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["seq_accuracy"] == b["seq_accuracy"]
    assert a["pad_fraction"] < b["pad_fraction"]
  for x, y in zip(jax.tree.leaves(final(tmp_path / "full")), jax.tree.leaves(final(tmp_path / "plain")), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
