"""Length buckets (`data.length_buckets`): each batch's input is padded only to the smallest bucket holding its
longest input. The padding dropped changes no example's loss or score, the order of examples is the unbucketed
one, every host picks the same bucket, and resuming mid-epoch stays exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import config as C
from jaxprompt import sharding as shd
from jaxprompt.batches import CausalBatch, Seq2SeqBatch
from jaxprompt.checkpoint import Checkpointer
from jaxprompt.data import encoding
from jaxprompt.data.pipeline import BatchStream, bucket_lengths, eval_batches
from jaxprompt.models import layers as L
from jaxprompt.models import load_model
from jaxprompt.prompts import PromptedModel, SoftPrompt
from jaxprompt.training.trainer import evaluate
from tests.helpers import BUCKET_EXAMPLES, tiny_cfg, train_interrupted
from tests.helpers_hf import IdTokenizer, write_decoder, write_t5


def test_bucket_lengths_and_their_config():
  assert bucket_lengths("auto", 512) == (64, 96, 128, 192, 256, 384, 512)
  assert bucket_lengths("auto", 100) == (64, 96, 100)
  assert bucket_lengths("auto", 12) == (12,) and bucket_lengths("none", 512) == (512,)
  assert bucket_lengths((100, 300, 100), 512) == (100, 300, 512)  # the limit always closes the list
  assert C.load(None, ["data.length_buckets=[64, 200]"]).data.buckets() == (64, 200, 512)
  with pytest.raises(C.ConfigError, match=r"data.length_buckets: \[600\] must be lengths in 1..data.input_length"):
    C.load(None, ["data.length_buckets=[600]"])


@pytest.mark.parametrize("batch_type", [Seq2SeqBatch, CausalBatch])
def test_the_stream_pads_to_the_bucket_of_the_longest_input_in_the_unbucketed_order(batch_type):
  rows = encoding.encode(batch_type, BUCKET_EXAMPLES, IdTokenizer(), input_length=32, target_length=3, name="t")
  plain = BatchStream(rows, 2, seed=1)
  bucketed = BatchStream(rows, 2, seed=1, buckets=(4, 8, 32))
  hosts = [BatchStream(rows, 2, seed=1, buckets=(4, 8, 32), process_index=i, process_count=2) for i in range(2)]
  lengths = set()
  for _ in range(10):  # 2.5 epochs
    a, b, shares = next(plain), next(bucketed), [next(h) for h in hosts]
    need = int(a.input_lengths().max())
    assert b.input_length == min(x for x in (4, 8, 32) if x >= need)
    lengths.add(b.input_length)
    np.testing.assert_array_equal(a.input_lengths(), b.input_lengths())  # same rows, same order, no token lost
    assert bucketed.last_pad_fraction == pytest.approx(1 - a.input_lengths().sum() / (2 * b.input_length))
    # every host takes the global batch's bucket, and the shares are the global batch
    assert {s.input_length for s in shares} == {b.input_length}
    for field in ("input_ids", "input_mask"):
      np.testing.assert_array_equal(np.concatenate([getattr(s, field) for s in shares]), getattr(b, field))
  assert lengths == {4, 8}
  evals = list(eval_batches(rows, 3, buckets=(4, 8, 32)))
  assert [e[0].input_length for e in evals] == [8, 8, 8]  # rows 0-2 (lengths 5, 1, 0), 3-5 (7, 3, 2), 6-7 (6, 4)
  evals = list(eval_batches(rows, 2, buckets=(4, 8, 32)))
  assert [e[0].input_length for e in evals] == [8, 8, 4, 8]


def test_grouping_by_length_pads_less_and_stays_a_resumable_permutation():
  examples = [{"inputs": " ".join(["7"] * (i * 5 % 31)), "targets": "9"} for i in range(64)]
  rows = encoding.encode(Seq2SeqBatch, examples, IdTokenizer(), input_length=32, target_length=2, name="t")
  plain, grouped = BatchStream(rows, 4, seed=2), BatchStream(rows, 4, seed=2, group_by_length=4)
  epoch = [next(grouped) for _ in range(16)]  # one epoch: 64 examples
  seen = np.concatenate([grouped.global_indices(k) for k in range(16)])
  assert sorted(seen.tolist()) == list(range(64))  # every example once

  def pad(bs):
    return sum(b.input_length * 4 - b.input_lengths().sum() for b in bs)

  assert pad([b.cropped(int(b.input_lengths().max())) for b in epoch]) < 0.5 * pad(
    [b.cropped(int(b.input_lengths().max())) for b in (next(plain) for _ in range(16))]
  )
  resumed = BatchStream(rows, 4, seed=2, group_by_length=4, position=7)
  for k in range(7, 20):  # into the next epoch
    np.testing.assert_array_equal(
      resumed.global_indices(k), BatchStream(rows, 4, seed=2, group_by_length=4).global_indices(k)
    )
  assert not np.array_equal(grouped.global_indices(16), grouped.global_indices(0))  # epochs differ


@pytest.fixture(scope="module", params=["t5", "llama"])
def base(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("buckets")
  if request.param == "t5":
    return load_model(write_t5(root / "t5", "t5v11-gated-untied", vocab_size=96))
  return load_model(write_decoder(root / "llama", "llama3-gqa-untied"))


def test_cropped_batches_give_every_example_the_same_loss_and_scores(base):
  model = PromptedModel(base, SoftPrompt(jax.random.normal(jax.random.key(0), (3, base.hidden_size)) * 0.5))
  tok = IdTokenizer()
  full = encoding.encode(base.batch_type, BUCKET_EXAMPLES, tok, input_length=32, target_length=3, name="t")
  cropped = full.cropped(8)
  assert cropped.input_length == 8 and (cropped.input_lengths() == full.input_lengths()).all()

  def per_example(batch):
    logits, targets, mask = model.score_targets(jax.tree.map(jnp.asarray, batch))
    return np.asarray(L.sequence_logprob(logits, targets, mask))

  np.testing.assert_allclose(per_example(cropped), per_example(full), rtol=1e-5)
  labels = [jnp.asarray(a) for a in encoding.encode_labels(base.batch_type, tok, ["10 20", "11", "40 41"], 3)]
  scores = [np.asarray(model.label_logprobs(jax.tree.map(jnp.asarray, b), *labels)) for b in (cropped, full)]
  np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)


def test_resuming_mid_epoch_with_buckets_is_exact_and_eval_is_unchanged(byte_t5, tmp_path):
  mesh = shd.make_mesh(devices=jax.devices()[:1])
  over = {"data.length_buckets": [6, 9]}  # the taskless digit inputs are 1-11 bytes of a limit of 12
  train_interrupted(tiny_cfg(byte_t5, **over), tiny_cfg(byte_t5, **over, **{"train.steps": 3}), tmp_path, mesh)

  def final(w):
    return Checkpointer.reader(w / "checkpoints").restore_prompt(6)[0]

  for x, y in zip(jax.tree.leaves(final(tmp_path / "full")), jax.tree.leaves(final(tmp_path / "split")), strict=True):
    np.testing.assert_array_equal(x, y)
  recs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert all(0 <= r["pad_fraction"] < 1 and r["input_length"] <= 12 for r in recs if r["kind"] == "train")
  # evaluation of the same checkpoint: bucketed (two compiled shapes) = padded to the limit
  ev = [
    evaluate(tiny_cfg(byte_t5, **{"data.length_buckets": b}), tmp_path / "full", step=6, mesh=mesh)
    for b in ("none", [4, 8])
  ]
  assert ev[0].metrics["accuracy"] == ev[1].metrics["accuracy"]
  assert ev[0].metrics["eval_loss"] == pytest.approx(ev[1].metrics["eval_loss"], rel=1e-5)
