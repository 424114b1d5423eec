"""A causal model runs a soft prompt shared by every row once per batch (its keys/values then serve all rows,
`Decoder.shared_prompt`): training loss and gradients, rank-classification scores and generations must equal the
per-row computation PEFT does (float32, 1e-5 relative), with padding, an empty input and a sliding window."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprompt.batches import CausalBatch
from jaxprompt.data import encoding
from jaxprompt.inference import generate
from jaxprompt.losses import cross_entropy
from jaxprompt.models import load_model
from jaxprompt.models.interface import Prefix
from tests.helpers_hf import IdTokenizer, write_decoder

P = 4
RTOL = 1e-5


EXAMPLES = [  # unequal lengths (padding) and an empty input, whose first target follows the prompt directly
  {"inputs": "5 9 17 33 8", "targets": "40 41"},
  {"inputs": "7", "targets": "12 13 14"},
  {"inputs": "", "targets": "20"},
  {"inputs": "60 61 62", "targets": "70"},
]


@pytest.fixture(scope="module", params=["llama3-gqa-untied", "gpt2", "mistral-window"])
def base(request, tmp_path_factory):
  return load_model(write_decoder(tmp_path_factory.mktemp("shared") / "m", request.param, seed=3))


def _prompt(base, seed=0):
  return jax.random.normal(jax.random.key(seed), (P, base.hidden_size)) * 0.5


BANK_IDS = jnp.asarray([1, 0, 1, 1])  # rows of a bank of 2 prompts (one per task), for EXAMPLES' 4 rows


def _prefix(value):
  """One prompt [P, H] for every row, or a bank [K, P, H] with a prompt id per row (as `SoftPrompt` makes them)."""
  if value.ndim == 2:
    return Prefix(embeds=value[None])
  return Prefix(embeds=value[BANK_IDS], bank=value, bank_ids=BANK_IDS)


def _value(base, seed, bank: bool):
  return jnp.stack([_prompt(base, seed), _prompt(base, seed + 10)]) if bank else _prompt(base, seed)


BANKS = pytest.mark.parametrize("bank", [False, True], ids=["one prompt", "a bank of 2"])


def _both(base):
  """(the model as loaded: sharing on by default, the same model with sharing off: PEFT's per-row prompt)."""
  assert base.options.share_prompt
  per_row = nnx.clone(base)
  per_row.options = dataclasses.replace(base.options, share_prompt=False)
  return base, per_row


@BANKS
def test_loss_and_gradient_equal_the_per_row_prompt(base, bank):
  batch = jax.tree.map(
    jnp.asarray, encoding.encode(CausalBatch, EXAMPLES, IdTokenizer(), input_length=6, target_length=3, name="t")
  )

  def loss(prompt, model):
    logits, targets, mask = model.score_targets(batch, _prefix(prompt))
    sums = cross_entropy(logits, targets, mask)
    return sums.loss / sums.tokens, (logits, mask)

  step = nnx.jit(lambda m, p: jax.value_and_grad(loss, has_aux=True)(p, m))
  results = [step(m, _value(base, 0, bank)) for m in _both(base)]
  ((l_shared, (lg_shared, mask)), g_shared), ((l_row, (lg_row, mask_row)), g_row) = results
  np.testing.assert_array_equal(mask, mask_row)
  assert float(mask[2, 0]) == 1  # the empty input's target is trained, from the prompt's last position
  np.testing.assert_allclose(l_shared, l_row, rtol=RTOL)
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(lg_shared)[real], np.asarray(lg_row)[real], rtol=RTOL, atol=1e-5)
  assert float(jnp.abs(g_row).max()) > 0 and (not bank or float(jnp.abs(g_row[0]).max()) > 0)  # both prompts learn
  np.testing.assert_allclose(g_shared, g_row, rtol=RTOL, atol=1e-6 * float(jnp.abs(g_row).max()))


@BANKS
def test_rank_classification_scores_equal_the_per_row_prompt(base, bank):
  tok = IdTokenizer()
  batch = jax.tree.map(
    jnp.asarray, encoding.encode(CausalBatch, EXAMPLES, tok, input_length=6, target_length=3, name="e")
  )
  label_ids, label_mask = encoding.encode_labels(CausalBatch, tok, ["40 41", "12", "20 21 22"], 3)
  prefix = _prefix(_value(base, 1, bank))
  scores = nnx.jit(lambda m: m.label_logprobs(batch, jnp.asarray(label_ids), jnp.asarray(label_mask), prefix))
  shared, per_row = (np.asarray(scores(m)) for m in _both(base))
  assert shared.shape == (4, 3)
  np.testing.assert_allclose(shared, per_row, rtol=RTOL)


@BANKS
def test_generation_equals_the_per_row_prompt(base, bank):
  ids, mask = encoding.encode_inputs(CausalBatch, IdTokenizer(), [e["inputs"] for e in EXAMPLES])
  prefix = _prefix(_value(base, 2, bank))
  outs = [
    generate(
      m, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), prefix=prefix, max_new_tokens=6, eos_id=-1
    )
    for m in _both(base)
  ]
  np.testing.assert_array_equal(outs[0]["tokens"], outs[1]["tokens"])
  prefill = nnx.jit(
    lambda m: m.prefill(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), prefix=prefix, max_new_tokens=2)[
      0
    ]
  )
  first = [prefill(m) for m in _both(base)]
  np.testing.assert_allclose(first[0], first[1], rtol=RTOL, atol=1e-5)


def test_falls_back_to_per_row_where_sharing_is_not_exact(base):
  prompt = _prompt(base)
  shared, last = base.shared_prompt(Prefix(embeds=prompt[None]), 4)
  assert shared.embeds is None and shared.keys.shape[1:3] == (1, P) and last.shape == (1, base.hidden_size)
  empty = Prefix(embeds=prompt[None, :0])  # P = 0: nothing to share (the base model alone)
  assert base.shared_prompt(empty, 4) == (empty, None)
  bank_rows = Prefix(embeds=jnp.stack([prompt, -prompt]))  # a prompt per row: each row runs its own
  assert base.shared_prompt(bank_rows, 2) == (bank_rows, None)
  two = jnp.stack([prompt, -prompt])
  every_row = Prefix(embeds=two, bank=two, bank_ids=jnp.asarray([0, 1]))  # a bank as large as the batch: per row
  assert base.shared_prompt(every_row, 2) == (every_row, None)
  shared, last = base.shared_prompt(_prefix(two), 4)  # 2 prompts for 4 rows: each prompt once, its rows read it
  assert shared.keys.shape[1:3] == (4, P) and last.shape == (4, base.hidden_size)
  dropped = nnx.clone(base)
  dropped.config = dataclasses.replace(base.config, dropout_rate=0.1)
  out, last = dropped.shared_prompt(Prefix(embeds=prompt[None]), 4, dropout_rng=jax.random.key(0))
  assert last is None and out.embeds is not None
  assert dropped.shared_prompt(Prefix(embeds=prompt[None]), 4)[1] is not None  # no dropout at eval: shared
