"""Evaluation in one pass (`eval_scores`): the loss and every label's rank-classification score of a batch, with
the work they share done once (T5: one encoder pass, cross-attention keys/values projected once per example;
decoders: the input runs once into a cache, then the target and every label from it). Each label's score must be
its training likelihood as the target (what `score_targets`, checked against PEFT, gives), and the loss must be
`score_targets`' loss, for every kind of prefix: none, one prompt, a prompt per row, a bank, a key/value prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprompt.batches import CausalBatch, Seq2SeqBatch
from jaxprompt.data import encoding
from jaxprompt.models import load_model
from jaxprompt.models.interface import Prefix
from tests.helpers_hf import IdTokenizer, write_decoder, write_t5

P = 3
EXAMPLES = [  # unequal lengths (padding) and an empty input
  {"inputs": "5 9 17 33 8", "targets": "40 41"},
  {"inputs": "7", "targets": "12 13 14"},
  {"inputs": "", "targets": "20"},
  {"inputs": "60 61 62", "targets": "70"},
]
LABELS = ["40 41", "12", "20 21"]  # with EOS: 3, 2 and 3 tokens (as targets, not truncated)
BANK_IDS = jnp.asarray([1, 0, 1, 1])
PREFIXES = ["none", "one", "per-row", "bank", "kv"]


@pytest.fixture(scope="module", params=["t5v11-gated-untied", "llama3-gqa-untied", "gpt2"])
def base(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp("evalscores") / "m"
  if request.param.startswith("t5"):
    return load_model(write_t5(folder, request.param, seed=4, vocab_size=96))
  return load_model(write_decoder(folder, request.param, seed=4))


def _prefix(base, kind: str) -> Prefix | None:
  key, h = jax.random.key(7), base.hidden_size
  if kind == "none":
    return None
  if kind == "one":
    return Prefix(embeds=jax.random.normal(key, (1, P, h)) * 0.5)
  if kind == "per-row":  # a different prompt in every row: nothing to share
    return Prefix(embeds=jax.random.normal(key, (len(EXAMPLES), P, h)) * 0.5)
  if kind == "bank":
    bank = jax.random.normal(key, (2, P, h)) * 0.5
    return Prefix(embeds=bank[BANK_IDS], bank=bank, bank_ids=BANK_IDS)
  s = base.prefix_slots()  # prefix tuning's key/value slots
  shape = (len(s.layer_of), 1, P, s.heads, s.head_dim)
  return Prefix(keys=jax.random.normal(key, shape) * 0.5, values=jax.random.normal(jax.random.key(8), shape) * 0.5)


def _encode(base, examples):
  return jax.tree.map(
    jnp.asarray, encoding.encode(base.batch_type, examples, IdTokenizer(), input_length=6, target_length=3, name="e")
  )


def _row_loglik(logits, targets, mask):
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  gold = np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], axis=-1)[..., 0]
  return (gold * np.asarray(mask)).sum(-1)


@pytest.mark.parametrize("kind", PREFIXES)
def test_one_pass_gives_the_training_loss_and_every_labels_training_likelihood(base, kind):
  prefix = _prefix(base, kind)
  batch = _encode(base, EXAMPLES)
  label_ids, label_mask = (jnp.asarray(a) for a in encoding.encode_labels(base.batch_type, IdTokenizer(), LABELS, 3))
  (logits, targets, mask), scores = nnx.jit(lambda m: m.eval_scores(batch, label_ids, label_mask, prefix))(base)
  score_targets = nnx.jit(lambda m, b: m.score_targets(b, prefix))  # one program for every batch below
  want_logits, want_targets, want_mask = score_targets(base, batch)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_array_equal(
    np.asarray(targets)[np.asarray(mask) > 0], np.asarray(want_targets)[np.asarray(want_mask) > 0]
  )
  real = np.asarray(mask) > 0
  assert real.sum() >= 6
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(want_logits)[real], rtol=1e-5, atol=1e-5)

  scores = np.asarray(scores)
  assert scores.shape == (len(EXAMPLES), len(LABELS)) and np.isfinite(scores).all()
  np.testing.assert_allclose(
    np.asarray(nnx.jit(lambda m: m.label_logprobs(batch, label_ids, label_mask, prefix))(base)),
    scores,
    rtol=1e-5,
    atol=1e-5,
  )
  for c, label in enumerate(LABELS):
    as_target = _encode(base, [dict(ex, targets=label) for ex in EXAMPLES])
    lg, tg, mk = score_targets(base, as_target)
    # a target right after an empty input has no training loss without a soft prompt before it (nothing predicts
    # it); such a row's rank score is not a likelihood and is not compared
    scored = np.asarray(mk).sum(-1) == np.asarray(label_mask[c]).sum()
    assert scored.sum() >= 3
    np.testing.assert_allclose(scores[scored, c], _row_loglik(lg, tg, mk)[scored], rtol=1e-5, atol=1e-5)


def test_eval_steps_in_chunks_equal_one_piece(base, monkeypatch):
  """On the CPU a large eval batch runs in chunks of rows (`auto_microbatches`): loss sums and label scores must
  equal the batch in one piece, rows in order, for 2 chunks unrolled and 4 in a scan (one piece computed once)."""
  import jaxprompt.evaluation.steps as E
  from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt

  model = PromptedModel(base, SoftPrompt(jax.random.normal(jax.random.key(3), (P, base.hidden_size)) * 0.5))
  graphdef, ps, fs = nnx.split(model, PromptParam, ...)
  batch = _encode(base, EXAMPLES)
  weights = jnp.asarray([1.0, 1.0, 0.0, 1.0])  # a padding row: no loss
  labels = [jnp.asarray(a) for a in encoding.encode_labels(base.batch_type, IdTokenizer(), LABELS, 3)]

  def run(n, unrolled):
    monkeypatch.setattr(E, "auto_microbatches", lambda *a, **k: n)
    monkeypatch.setattr(E, "MAX_UNROLLED_CHUNKS", unrolled)
    loss_step, rank_step = E.make_eval_fns(graphdef, z_loss=1e-4)
    args = (ps.to_pure_dict(), fs.to_pure_dict(), batch, weights)
    return jax.jit(loss_step)(*args), jax.jit(rank_step)(*args, *labels)

  loss1, (sums1, scores1) = run(1, 8)
  assert float(loss1.tokens) < float(jnp.sum(batch.loss_mask))  # the padding row's targets are not counted
  for chunks, unrolled in ((2, 8), (4, 1)):  # 2 chunks unrolled, 4 in a scan
    loss_n, (sums_n, scores_n) = run(chunks, unrolled)
    assert scores_n.shape == (len(EXAMPLES), len(LABELS))
    np.testing.assert_allclose(scores_n, scores1, rtol=1e-5, atol=1e-5, err_msg=f"{chunks} chunks")
    for a, b in ((loss_n, loss1), (sums_n, sums1), (sums1, loss1)):
      for field in ("ce", "z_loss", "correct", "tokens", "seq_correct"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, err_msg=f"{chunks} chunks")


@pytest.mark.parametrize("batch_type", [Seq2SeqBatch, CausalBatch], ids=["seq2seq", "causal"])
def test_hf_rows_with_a_label_as_target_are_the_training_rows_of_that_target(batch_type):
  """`bench --eval` scores PEFT on `hf_with_target` rows: they must be the rows training would give PEFT with the
  label as every example's target (after trimming the padding every row has)."""
  tok = IdTokenizer()
  batch = encoding.encode(batch_type, EXAMPLES, tok, input_length=6, target_length=3, name="e")
  ids, mask = encoding.encode_labels(batch_type, tok, ["40 41"], 3)
  got = batch.hf_with_target([int(t) for t, m in zip(ids[0], mask[0], strict=True) if m])
  want = encoding.encode(
    batch_type, [dict(ex, targets="40 41") for ex in EXAMPLES], tok, input_length=6, target_length=3, name="e"
  ).hf_inputs()
  for k in want:
    n = got[k].shape[1]
    np.testing.assert_array_equal(got[k], want[k][:, :n], err_msg=k)
    assert (want[k][:, n:] == (-100 if k == "labels" else 0)).all(), k  # beyond: padding in every row
