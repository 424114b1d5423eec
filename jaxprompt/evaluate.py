"""Evaluation: rank classification (score every label string, pick the most likely) and loss.

Notation: B batch, C classes, T label length, L input length, P prompt length, S = P + L.
"""

from __future__ import annotations

import math
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
  # positions count real tokens only (left padding sits between prompt and input), as in training, where
  # [prompt, input, target] start at position 0 and padding comes last
  positions = jnp.maximum(jnp.cumsum(ms, axis=1) - 1, 0)
  logits = model.base(inputs_embeds=xs, attention_mask=ms, positions=positions)
  s = x.shape[1]
  pred = logits[:, s - 1:s + t - 1]
  p = s - batch["input_ids"].shape[1]
  if p:  # an empty input (all padding, no BOS): its first label token follows the prompt's last slot, as in training
    empty = jnp.repeat(jnp.sum(batch["input_mask"], axis=1) == 0, c)
    pred = pred.at[:, 0].set(jnp.where(empty[:, None], logits[:, p - 1], pred[:, 0]))
  tgt = jnp.tile(label_ids, (b, 1))
  return _token_logp(pred, tgt, jnp.tile(label_mask, (b, 1))).reshape(b, c)


def make_eval_fns(graphdef, *, z_loss: float):
  """(loss_step, rank_step), pure: (prompt, frozen, batch, ...) -> sums / [B, C] label scores."""
  from flax import nnx

  from jaxprompt.losses import cross_entropy, forward

  def loss_step(prompt, frozen, batch, weights):
    model = nnx.merge(graphdef, prompt, frozen)
    logits, targets, mask = forward(model, batch)
    s = cross_entropy(logits, targets, mask * weights[:, None].astype(mask.dtype), z_loss)
    return dict(ce=s["ce"], tokens=s["tokens"], seq_correct=jnp.sum(s["seq_correct"] * weights))

  def rank_step(prompt, frozen, batch, label_ids, label_mask):
    model = nnx.merge(graphdef, prompt, frozen)
    return rank_scores(model, batch, label_ids, label_mask)

  return loss_step, rank_step


class Evaluator:
  """Evaluates a prompt on the eval split: loss, plus rank classification (score every label string, pick
  the most likely) or generation (greedy decoding, post-processed: an unknown string is class -1, counted
  wrong), the task's metrics, a confusion matrix, and one prediction record per example."""

  def __init__(self, run, examples: list[dict] | None = None):
    from jaxprompt import sharding as shd
    from jaxprompt.train import _round_up, encode_split, task_data

    cfg = run.cfg
    self.run = run
    data = examples if examples is not None else task_data(cfg.data, cfg.data.eval_split).examples
    if cfg.eval.max_examples:
      data = data[:cfg.eval.max_examples]
    self.examples = data
    self.arrays = encode_split(run, data, f"{cfg.data.task}/{cfg.data.eval_split}")
    # every host gets the same number of rows, and the batch splits evenly over the (data, fsdp) axes
    shards = math.lcm(jax.process_count(), run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    self.batch_size = _round_up(min(cfg.eval.batch_size, len(data)), shards)
    loss_step, rank_step = make_eval_fns(run.graphdef, z_loss=cfg.train.z_loss)
    rep = shd.replicated(run.mesh)  # replicated outputs: every process reads every example's result
    self._loss = jax.jit(loss_step, out_shardings=rep)
    self._rank = jax.jit(rank_step, out_shardings=rep)
    self.mode = cfg.eval.mode
    if self.mode == "rank" and not run.labels:
      self.mode = "generate"  # a generative task has no label strings to rank
    if run.labels:
      lab = encode_labels(run.tokenizer, run.labels, kind=run.kind, target_length=cfg.data.target_length)
      self.label_ids, self.label_mask = jnp.asarray(lab["ids"]), jnp.asarray(lab["mask"])
      self.gold = np.array([ex["label"] if "label" in ex else _label_index(run.labels, ex["targets"])
                            for ex in data])
    self.confusion: list[list[int]] | None = None

  def _generate(self, prompt, dev) -> np.ndarray:
    from flax import nnx

    from jaxprompt.generate import generate

    run = self.run
    model = nnx.merge(run.graphdef, prompt, run.frozen)
    x, m = model.embed_inputs(dev["input_ids"], dev["input_mask"])
    out = generate(model.base, inputs_embeds=x, attention_mask=m, max_new_tokens=run.cfg.data.target_length)
    tokens = out["tokens"]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(jax.device_get(tokens))

  def __call__(self, prompt) -> tuple[dict, list[dict]]:
    from jaxprompt import metrics as M
    from jaxprompt.data.pipeline import eval_batches
    from jaxprompt.train import _device_batch

    run = self.run
    ce = tokens = seq = 0.0
    n = len(self.examples)
    preds = np.full(n, -1)
    texts: list[str | None] = [None] * n
    scores_all: dict[int, list[float]] = {}
    eos = run.tokenizer.eos_token_id
    for batch, w, index in eval_batches(self.arrays, self.batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count()):
      dev = _device_batch(run, {**batch, "weights": w})
      weights = dev.pop("weights")
      s = jax.device_get(self._loss(prompt, run.frozen, dev, weights))
      ce, tokens, seq = ce + float(s["ce"]), tokens + float(s["tokens"]), seq + float(s["seq_correct"])
      if self.mode == "rank":
        sc = np.asarray(jax.device_get(self._rank(prompt, run.frozen, dev, self.label_ids, self.label_mask)))
        for i, row in zip(index, sc):
          if i >= 0:
            preds[i] = int(np.argmax(row))
            scores_all[int(i)] = [round(float(v), 5) for v in row]
      elif self.mode == "generate":
        for i, row in zip(index, self._generate(prompt, dev)):
          if i >= 0:
            row = row.tolist()
            row = row[:row.index(eos)] if eos in row else row
            texts[i] = run.tokenizer.decode(row, skip_special_tokens=True).strip()
            if run.labels:
              preds[i] = M.postprocess(run.labels, texts[i])
    metrics = dict(eval_loss=ce / max(tokens, 1.0), eval_seq_accuracy=seq / n)
    records = []
    groups = [ex.get("group") for ex in self.examples] if any("group" in ex for ex in self.examples) else None
    if run.labels and self.mode in ("rank", "generate"):
      scored = self.gold >= 0  # test splits carry no labels
      names = [m for m in run.metric_names if m in M.CLASSIFICATION]
      metrics.update(M.classification_metrics(names, self.gold[scored], preds[scored], run.labels,
                                              None if groups is None else [g for g, k in zip(groups, scored) if k]))
      self.confusion = M.confusion_matrix(self.gold[scored], preds[scored], len(run.labels)).tolist()
    elif self.mode == "generate":
      names = [m for m in run.metric_names if m in M.GENERATION]
      metrics.update(M.generation_metrics(names, [t or "" for t in texts], self.examples))
    for i, ex in enumerate(self.examples):
      rec = dict(index=i, inputs=ex["inputs"], targets=ex["targets"])
      if self.mode == "rank":
        rec.update(prediction=run.labels[preds[i]], correct=bool(preds[i] == self.gold[i]), scores=scores_all.get(i))
      elif self.mode == "generate":
        rec.update(prediction=texts[i], correct=(bool(preds[i] == self.gold[i]) if run.labels
                                                 else texts[i] == ex["targets"]))
      records.append(rec)
    return metrics, records


def _label_index(labels, target: str) -> int:
  from jaxprompt.data.pipeline import DataError

  try:
    return list(labels).index(target)
  except ValueError:
    raise DataError(f"target {target!r} is not one of the task's labels {list(labels)}") from None
