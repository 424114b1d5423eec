"""Evaluating a prompt on the eval split: the loss, plus what the evaluation mode adds — rank classification
(`rank.RankEval`), generation (`generate.GenerateEval`) or nothing (`loss.LossEval`) — the task's metrics, a
confusion matrix, and one prediction record per example.

An `Evaluator` holds one task's split, encoded once, and an `EvalContext` (what it needs from a run); the mode
does the per-batch work and says what it predicted. Modes are chosen by name (`MODES`); a task without label
strings is evaluated by generation whatever `eval.mode` asks (there is nothing to rank).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np

from jaxprompt import metrics as M
from jaxprompt.data.pipeline import eval_batches
from jaxprompt.data.sources import task_examples
from jaxprompt.errors import DataError
from jaxprompt.evaluation.generate import GenerateEval
from jaxprompt.evaluation.head import HeadEval
from jaxprompt.evaluation.loss import LossEval
from jaxprompt.evaluation.rank import RankEval
from jaxprompt.evaluation.steps import EvalContext, make_eval_fns

__all__ = ["MODES", "EvalContext", "Evaluator", "MixtureEvaluator", "evaluator_for", "make_eval_fns"]

MODES = {m.name: m for m in (LossEval, RankEval, GenerateEval)}


def mode_for(requested: str, labels, head=None) -> type:
  """The evaluation mode class for `eval.mode` on a task with (or without) label strings; a classification head
  (`head`: its `HeadSpec`) is evaluated by its predictions whatever the mode."""
  if head is not None:
    return HeadEval
  return MODES["generate" if requested == "rank" and not labels else requested]


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


class Evaluator:
  """Evaluates prompts on the eval split of one task (`member`: a `run.Member`), or on `examples`, in `ctx`.
  `prompt_id`: the prompt of a bank every row uses (a per-task run's member)."""

  def __init__(self, ctx: EvalContext, member, examples: list[dict] | None = None, *, prompt_id: int | None = None):
    self.ctx, self.member = ctx, member
    self.task, self.labels = member.task, member.labels
    if examples is None:
      examples = task_examples(member.data, ctx.eval_split).examples
    self.examples = examples[: ctx.max_examples] if ctx.max_examples else examples
    self.arrays = ctx.encode(self.examples, f"{member.name}/{ctx.eval_split}")
    if prompt_id is not None:
      self.arrays = self.arrays.with_task_ids(prompt_id)
    # every host gets the same number of rows, and the batch splits evenly over the (data, fsdp) axes
    shards = math.lcm(jax.process_count(), ctx.data_parallel)
    self.batch_size = _round_up(min(ctx.batch_size, len(self.examples)), shards)
    self.mode = mode_for(ctx.mode, self.labels, ctx.head)(ctx, self.labels, self.examples)
    if self.labels and not self.task.per_token:
      if ctx.head is None:  # the label strings as the model scores them [C, T] (ensembles rank with them too)
        self.label_ids, self.label_mask = RankEval.encode_labels(ctx, self.labels)
      self.gold = np.array(
        [ex["label"] if "label" in ex else _label_index(self.labels, ex["targets"]) for ex in self.examples]
      )
    self.confusion: list[list[int]] | None = None

  def _pass(self, prompt) -> dict:
    """One pass over the split (the mode keeps what it predicts) -> the loss metrics."""
    ctx, n = self.ctx, len(self.examples)
    self.mode.start(n)
    ce = tokens = seq = 0.0
    for batch, w, index in eval_batches(
      self.arrays,
      self.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      buckets=ctx.buckets,
    ):
      dev, weights = ctx.device_batch((batch, w))
      s = jax.device_get(self.mode.batch(prompt, dev, weights, index))
      ce, tokens, seq = ce + float(s.ce), tokens + float(s.tokens), seq + float(s.seq_correct)
    return dict(eval_loss=ce / max(tokens, 1.0), eval_seq_accuracy=seq / n)

  def classification_metrics(self, preds: np.ndarray) -> dict:
    """The task's classification metrics of predicted classes [N] (-1: no valid class) against the gold labels;
    the confusion matrix goes to `self.confusion`."""
    scored = self.gold >= 0  # test splits carry no labels
    groups = [ex.get("group") for ex in self.examples] if any("group" in ex for ex in self.examples) else None
    names = [m for m in self.task.metrics if m in M.CLASSIFICATION]
    if self.ctx.head is not None:
      names = list(dict.fromkeys(M.SEQUENCE_HEAD + tuple(names)))
    self.confusion = M.confusion_matrix(self.gold[scored], preds[scored], len(self.labels)).tolist()
    return M.classification_metrics(
      names,
      self.gold[scored],
      preds[scored],
      self.labels,
      None if groups is None else [g for g, k in zip(groups, scored, strict=True) if k],
    )

  def _task_metrics(self) -> dict:
    if self.task.per_token:  # a token head (`run.validate`)
      return self.mode.entity_metrics()
    preds, texts = self.mode.predictions()
    if preds is not None:
      return self.classification_metrics(preds)
    if texts is not None:
      names = [m for m in self.task.metrics if m in M.GENERATION]
      return M.generation_metrics(names, texts, self.examples)
    return {}

  def __call__(self, prompt) -> tuple[dict, list[dict]]:
    """-> (metrics, one record per example)."""
    metrics = self._pass(prompt)
    metrics.update(self._task_metrics())
    gold = self.gold if self.labels and not self.task.per_token else [None] * len(self.examples)
    records = [
      dict(index=i, inputs=ex["inputs"], targets=ex["targets"], **self.mode.record(i, gold[i]))
      for i, ex in enumerate(self.examples)
    ]
    return metrics, records

  def confusion_record(self) -> dict | None:
    """The last classification's confusion matrix as written to confusion_<name>.json (None: none yet)."""
    if self.confusion is None:
      return None
    labels = list(self.labels)
    return {"labels": labels, "rows": "gold", "columns": labels + ["<invalid>"], "counts": self.confusion}

  def write_report(self, directory: Path, name: str, records: list[dict]) -> None:
    """predictions/<name>.jsonl and, for classification, predictions/confusion_<name>.json (process 0)."""
    write_report(directory, name, records, self.confusion_record())


def write_report(directory: Path, name: str, records: list[dict], confusion: dict | None) -> None:
  if jax.process_index() != 0:
    return
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / f"{name}.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if confusion:
    (directory / f"confusion_{name}.json").write_text(json.dumps(confusion))


def _label_index(labels, target: str) -> int:
  try:
    return list(labels).index(target)
  except ValueError:
    raise DataError(f"target {target!r} is not one of the task's labels {list(labels)}") from None


class MixtureEvaluator:
  """A mixture's tasks evaluated one after another (each under its own prompt when the run has one per task):
  every member's metrics as NAME/metric, and the mean over the members of each metric they all compute under its
  plain name (`run.mixture_metrics`)."""

  def __init__(self, ctx: EvalContext, members, *, per_task: bool):
    self.members = [Evaluator(ctx, m, prompt_id=k if per_task else None) for k, m in enumerate(members)]

  def __call__(self, prompt) -> tuple[dict, list[dict]]:
    each, records = [], []
    for ev in self.members:
      metrics, recs = ev(prompt)
      each.append(metrics)
      records += [dict(r, task=ev.member.name) for r in recs]
    out = {k: float(np.mean([m[k] for m in each])) for k in each[0] if all(k in m for m in each)}
    for ev, metrics in zip(self.members, each, strict=True):
      out.update({f"{ev.member.name}/{k}": v for k, v in metrics.items()})
    return out, records

  def write_report(self, directory: Path, name: str, records: list[dict]) -> None:
    """predictions/<name>.jsonl (every task's records, each naming its task) and, for classification tasks,
    predictions/confusion_<name>.json with one matrix per task (process 0)."""
    confusion = {ev.member.name: ev.confusion_record() for ev in self.members if ev.confusion is not None}
    write_report(directory, name, records, {"tasks": confusion} if confusion else None)


def evaluator_for(run, examples: list[dict] | None = None):
  """The evaluator of a run's eval split(s): one task (or `examples` for it), or a mixture's tasks."""
  ctx = EvalContext.of(run)
  if len(run.members) == 1:
    return Evaluator(ctx, run.members[0], examples)
  if examples is not None:
    raise ValueError("a mixture is evaluated on its tasks' own eval splits")
  return MixtureEvaluator(ctx, run.members, per_task=run.per_task)
