"""The loss: token cross-entropy on target tokens only (+ z-loss), checked against explicit computations."""

import jax
import jax.numpy as jnp
import numpy as np
from transformers import ByT5Tokenizer

from jaxprompt import prompts as P
from jaxprompt.batches import CausalBatch
from jaxprompt.data import encoding
from jaxprompt.losses import cross_entropy
from jaxprompt.models import load_model
from tests.helpers_hf import write_decoder


def test_cross_entropy_and_z_loss_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3))
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  s = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-4)
  log_z = np.log(np.exp(logits).sum(-1))
  ce = (log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]) * mask
  np.testing.assert_allclose(float(s.ce), ce.sum(), rtol=1e-6)
  np.testing.assert_allclose(float(s.z_loss), (1e-4 * log_z**2 * mask).sum(), rtol=1e-5)
  assert float(s.tokens) == 3


def test_causal_loss_is_on_target_tokens_only_and_the_window_equals_full_logits(tmp_path):
  """Prompt and input positions carry no loss; computing logits only at target positions changes nothing."""
  base = load_model(write_decoder(tmp_path / "llama", "llama3-gqa-untied", vocab_size=384))
  model = P.PromptedModel(base, P.SoftPrompt(jax.random.normal(jax.random.key(1), (3, base.hidden_size))))
  tok = ByT5Tokenizer()
  batch = encoding.encode(
    CausalBatch,
    [{"inputs": "abc", "targets": "xy"}, {"inputs": "a longer input", "targets": "z"}],
    tok,
    input_length=16,
    target_length=4,
  )
  batch = jax.tree.map(jnp.asarray, batch)
  logits_w, targets_w, mask_w = model.score_targets(batch)
  loss_w = cross_entropy(logits_w, targets_w, mask_w).ce
  # the full logits [B, P + L + T, V]: position t predicts token t + 1, the loss on target tokens only
  logits = model.full_logits(batch.tokens, batch.token_mask)
  p = logits.shape[1] - batch.tokens.shape[1]
  target_mask = np.zeros(batch.tokens.shape, np.int32)
  for b, (idx, valid) in enumerate(zip(np.asarray(batch.target_index), np.asarray(batch.target_valid), strict=True)):
    target_mask[b, idx[valid > 0]] = 1
  loss_f = cross_entropy(logits[:, p:-1], batch.tokens[:, 1:], jnp.asarray(target_mask[:, 1:])).ce
  np.testing.assert_allclose(float(loss_w), float(loss_f), rtol=1e-5)
  # explicitly: -sum log p(target token | prompt, input, earlier target tokens), one row at a time
  want = 0.0
  for inp, tgt in [("abc", "xy"), ("a longer input", "z")]:
    seq = tok(inp)["input_ids"][:-1] + tok(tgt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_in = len(tok(inp)["input_ids"]) - 1
    logp = jax.nn.log_softmax(model.full_logits(jnp.asarray([seq]), jnp.ones((1, len(seq)), jnp.int32))[0], -1)
    want -= sum(float(logp[3 + t - 1, seq[t]]) for t in range(n_in, len(seq)))
  np.testing.assert_allclose(float(loss_w), want, rtol=1e-5)
  assert float(mask_w.sum()) == 3 + 2  # "xy" + EOS, "z" + EOS
