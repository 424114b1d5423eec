"""Evaluation mode "rank": rank classification (`eval.mode: rank`) — every label string scored under the model with
the prompt, the most likely one predicted; the loss comes from the same pass (`steps.make_eval_fns`' rank step).

Notation: B batch, C classes, T label length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.data import encoding
from jaxprompt.evaluation.steps import EvalContext, make_eval_fns


class RankEval:
  """Label scores [C] per example, the argmax its prediction."""

  name = "rank"

  def __init__(self, ctx: EvalContext, labels, examples):
    self.ctx, self.labels = ctx, labels
    self._rank = ctx.jit(make_eval_fns(ctx.graphdef, z_loss=ctx.z_loss, data_parallel=ctx.data_parallel)[1])
    self.label_ids, self.label_mask = self.encode_labels(ctx, labels)

  @staticmethod
  def encode_labels(ctx: EvalContext, labels) -> tuple[jax.Array, jax.Array]:
    """The label strings as the model scores them: (ids, mask) [C, T]."""
    ids, mask = encoding.encode_labels(ctx.batch_type, ctx.tokenizer, labels, ctx.target_length)
    return jnp.asarray(ids), jnp.asarray(mask)

  def start(self, n: int) -> None:
    self.preds, self.scores = np.full(n, -1), {}

  def batch(self, prompt, dev, weights, index):
    sums, scores = jax.device_get(self._rank(prompt, self.ctx.frozen, dev, weights, self.label_ids, self.label_mask))
    for i, row in zip(index, np.asarray(scores), strict=True):
      if i >= 0:
        self.preds[i], self.scores[int(i)] = int(np.argmax(row)), [round(float(v), 5) for v in row]
    return sums

  def predictions(self):
    return self.preds, None

  def record(self, i: int, gold: int | None) -> dict:
    return dict(prediction=self.labels[self.preds[i]], correct=bool(self.preds[i] == gold), scores=self.scores.get(i))
