"""Evaluation mode "head": a classification head's predictions (`head.type` sequence / token; chosen whatever
`eval.mode` says). A sequence head predicts a class per example (the task's classification metrics); a token head a
tag per word — its first sub-token's argmax, "O" (class 0) for words cut off by `data.input_length` — scored at
the entity level (`metrics.entity_metrics`).

Notation: B batch, T the head's positions (1, or L per token).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxprompt import metrics as M
from jaxprompt.evaluation.steps import EvalContext, make_head_fn


class HeadEval:
  name = "head"

  def __init__(self, ctx: EvalContext, labels, examples):
    self.ctx, self.labels, self.examples = ctx, labels, examples
    self.per_token = ctx.head.kind.per_token
    self._step = ctx.jit(make_head_fn(ctx.graphdef, z_loss=ctx.z_loss, data_parallel=ctx.data_parallel))

  def start(self, n: int) -> None:
    self.preds = np.full(n, -1)
    self.tags: dict[int, list[int]] = {}

  def batch(self, prompt, dev, weights, index):
    sums, preds = jax.device_get(self._step(prompt, self.ctx.frozen, dev, weights))
    mask = np.asarray(jax.device_get(dev.label_mask))
    for i, row, m in zip(index, np.asarray(preds), mask, strict=True):
      if i < 0:
        continue
      if self.per_token:  # the words' first sub-tokens, in order; words past the cut get class 0 ("O")
        words = len(self.examples[i]["words"])
        got = [int(c) for c in row[m > 0]][:words]
        self.tags[int(i)] = got + [0] * (words - len(got))
      else:
        self.preds[i] = int(row[0])
    return sums

  def predictions(self):
    return (None, None) if self.per_token else (self.preds, None)

  def entity_metrics(self) -> dict:
    """Entity precision / recall / F1 and tag accuracy of the predicted tags (token heads)."""
    gold = [[self.labels[t] for t in ex["tags"]] for ex in self.examples]
    pred = [[self.labels[t] for t in self.tags[i]] for i in range(len(self.examples))]
    return M.entity_metrics(gold, pred)

  def record(self, i: int, gold: int | None) -> dict:
    if self.per_token:
      return dict(prediction=" ".join(self.labels[t] for t in self.tags[i]))
    return dict(prediction=self.labels[self.preds[i]], correct=bool(self.preds[i] == gold))
