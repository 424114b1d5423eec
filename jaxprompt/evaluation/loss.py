"""Evaluation mode "loss": the eval split's loss and sequence accuracy only (`eval.mode: loss`)."""

from __future__ import annotations

from jaxprompt.evaluation.steps import EvalContext, make_eval_fns


class LossEval:
  """The loss of every batch; nothing per example."""

  name = "loss"

  def __init__(self, ctx: EvalContext, labels, examples):
    self._loss = ctx.jit(make_eval_fns(ctx.graphdef, z_loss=ctx.z_loss, data_parallel=ctx.data_parallel)[0])
    self.ctx = ctx

  def start(self, n: int) -> None:
    """A new pass over n examples."""

  def batch(self, prompt, dev, weights, index):
    """One device batch -> its loss sums (what it needs per example it keeps by `index`; -1: padding)."""
    return self._loss(prompt, self.ctx.frozen, dev, weights)

  def predictions(self):
    """Predicted classes [N] for classification metrics (None: this mode predicts none), and generated texts."""
    return None, None

  def record(self, i: int, gold: int | None) -> dict:
    """What this mode adds to example i's prediction record."""
    return {}
