"""Evaluation mode "generate" (`eval.mode: generate`, and any task without label strings): decode every example
with the config's generate settings, as many new tokens as a target may have. A classification task's text is
post-processed into a class (an unknown string is class -1, counted wrong); a generative task is scored on the text.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxprompt import metrics as M
from jaxprompt.evaluation.steps import EvalContext, make_eval_fns
from jaxprompt.inference.decoding import generate


class GenerateEval:
  """Greedy (by default) decoding per example, plus the loss."""

  name = "generate"

  def __init__(self, ctx: EvalContext, labels, examples):
    self.ctx, self.labels, self.examples = ctx, labels, examples
    self._loss = ctx.jit(make_eval_fns(ctx.graphdef, z_loss=ctx.z_loss, data_parallel=ctx.data_parallel)[0])

  def start(self, n: int) -> None:
    self.preds, self.texts = np.full(n, -1), [None] * n

  def batch(self, prompt, dev, weights, index):
    sums = self._loss(prompt, self.ctx.frozen, dev, weights)
    for i, row in zip(index, self._generate(prompt, dev), strict=True):
      if i >= 0:
        self.texts[i] = self._decode(row)
        self.preds[i] = M.postprocess(self.labels, self.texts[i]) if self.labels else -1
    return sums

  def _generate(self, prompt, dev) -> np.ndarray:
    model = self.ctx.model(prompt)
    out = generate(
      model.base,
      input_ids=dev.input_ids,
      attention_mask=dev.input_mask,
      prefix=model.prefix(dev.size, dev.task_ids),
      config=self.ctx.generate,
      max_new_tokens=self.ctx.target_length,
    )
    tokens = out["tokens"]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(jax.device_get(tokens))

  def _decode(self, row: np.ndarray) -> str:
    row, eos = row.tolist(), self.ctx.tokenizer.eos_token_id
    row = row[: row.index(eos)] if eos in row else row
    return self.ctx.tokenizer.decode(row, skip_special_tokens=True).strip()

  def predictions(self):
    return (self.preds if self.labels else None), [t or "" for t in self.texts]

  def record(self, i: int, gold: int | None) -> dict:
    correct = bool(self.preds[i] == gold) if self.labels else self.texts[i] == self.examples[i]["targets"]
    return dict(prediction=self.texts[i], correct=correct)
