"""Token cross-entropy with target masking and z-loss, and the per-kind forward used by train and eval.

Notation: B batch, T target length, P prompt length, L input length, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprompt.models.t5 import shift_right


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0):
  """logits [B, T, V] float32, targets/mask [B, T] -> per-token sums (not yet normalised).

  Returns a dict: loss (CE + z_loss * log_z^2, summed over masked tokens), ce, z_loss, correct, tokens,
  and `seq_correct` [B] (1 where every target token is the argmax).
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = (log_z - gold) * mask
  zl = z_loss * jnp.square(log_z) * mask
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
  seq_correct = (jnp.sum(hit, -1) == jnp.sum(mask, -1)).astype(jnp.float32)
  return dict(loss=jnp.sum(ce + zl), ce=jnp.sum(ce), z_loss=jnp.sum(zl), correct=jnp.sum(hit), tokens=jnp.sum(mask),
              seq_correct=seq_correct)


def forward(model, batch: dict, *, dropout_rng=None, prompt_ids=None):
  """Run a PromptedModel on a training batch -> (logits [B, T, V], targets [B, T], mask [B, T])."""
  if model.kind == "seq2seq":
    dec_in = shift_right(batch["target_ids"], model.base.config.decoder_start_token_id)
    logits = model(batch["input_ids"], batch["input_mask"], dec_in, prompt_ids=prompt_ids, dropout_rng=dropout_rng)
    return logits, batch["target_ids"], batch["target_mask"]
  if "target_index" in batch:
    # Logits only where there is a loss: the LM head over every prompt and input position would cost
    # 2 * B * (P + L) * H * V FLOPs (forward and backward) for nothing.
    h = model.hidden(batch["tokens"], batch["token_mask"], prompt_ids=prompt_ids, dropout_rng=dropout_rng)
    p = h.shape[1] - batch["tokens"].shape[1]
    idx = batch["target_index"]  # [B, T] positions of the target tokens in `tokens`
    # position t predicts t + 1; a target at token 0 (empty input, no BOS) is predicted from the prompt's last
    # position, as in PEFT, and never from its own position (which sees it); without a prompt it has no loss
    at = p + idx - 1
    hs = jnp.take_along_axis(h, jnp.maximum(at, 0)[..., None], axis=1)
    targets = jnp.take_along_axis(batch["tokens"], idx, axis=1)
    return model.base.logits(hs), targets, batch["target_valid"] * (at >= 0).astype(batch["target_valid"].dtype)
  logits = model(batch["tokens"], batch["token_mask"], prompt_ids=prompt_ids, dropout_rng=dropout_rng)
  p = logits.shape[1] - batch["tokens"].shape[1]
  # position t predicts token t + 1; prompt positions carry no loss (as PEFT's -100 labels)
  return logits[:, p:-1], batch["tokens"][:, 1:], batch["target_mask"][:, 1:]
