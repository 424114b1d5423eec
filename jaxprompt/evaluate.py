"""Evaluation: rank classification (score every label string, pick the most likely) and loss.

Notation: B batch, C classes, T label length, L input length, P prompt length, S = P + L.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.models.t5 import shift_right


def encode_labels(tokenizer, labels: Sequence[str], *, kind: str, target_length: int) -> dict[str, np.ndarray]:
  """Label strings -> ids/mask [C, T] as the model's targets (seq2seq: with EOS; causal: text + EOS)."""
  from jaxprompt.data.pipeline import _pad, _trim

  eos = tokenizer.eos_token_id
  rows = []
  for lab in labels:
    if kind == "seq2seq":
      ids = list(tokenizer(lab)["input_ids"])
    else:
      ids = list(tokenizer(lab, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
    rows.append(_trim(ids, target_length, eos)[0])
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids, mask = _pad(rows, target_length, pad)
  return dict(ids=ids, mask=mask)


def _token_logp(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(gold * mask, axis=-1)


def rank_scores(model, batch: dict, label_ids: jax.Array, label_mask: jax.Array, prompt_ids=None) -> jax.Array:
  """Sum of label-token log-likelihoods for every (example, label): [B, C]."""
  b = batch["input_ids"].shape[0]
  c, t = label_ids.shape
  x, m = model.embed_inputs(batch["input_ids"], batch["input_mask"], prompt_ids)  # [B, S, H], [B, S]
  if model.kind == "seq2seq":
    base = model.base
    enc = base.encode(inputs_embeds=x, attention_mask=m)  # encode once, decode every label
    enc = jnp.repeat(enc, c, axis=0)
    mm = jnp.repeat(m, c, axis=0)
    tgt = jnp.tile(label_ids, (b, 1))
    tmask = jnp.tile(label_mask, (b, 1))
    logits = base.decode(shift_right(tgt, base.config.decoder_start_token_id), enc, mm)
    return _token_logp(logits, tgt, tmask).reshape(b, c)
  # causal: [prompt, input (left-padded), label] per (example, label)
  lab_emb = model.base.embed(label_ids)  # [C, T, H]
  xs = jnp.concatenate([jnp.repeat(x, c, axis=0), jnp.tile(lab_emb, (b, 1, 1))], axis=1)
  ms = jnp.concatenate([jnp.repeat(m, c, axis=0), jnp.tile(label_mask, (b, 1))], axis=1)
  logits = model.base(inputs_embeds=xs, attention_mask=ms)
  s = x.shape[1]
  tgt = jnp.tile(label_ids, (b, 1))
  return _token_logp(logits[:, s - 1:s + t - 1], tgt, jnp.tile(label_mask, (b, 1))).reshape(b, c)
