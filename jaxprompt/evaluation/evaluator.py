"""Evaluating a prompt on the eval split: the loss, plus rank classification (score every label string, pick the
most likely) or generation (greedy decoding, post-processed: an unknown string is class -1, counted wrong),
the task's metrics, a confusion matrix, and one prediction record per example.

Notation: B batch, C classes, T label length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt import metrics as M
from jaxprompt import sharding as shd
from jaxprompt.data import encoding
from jaxprompt.data.pipeline import eval_batches
from jaxprompt.errors import DataError
from jaxprompt.inference.decoding import generate
from jaxprompt.losses import TokenSums, cross_entropy
from jaxprompt.models.cpu import auto_microbatches
from jaxprompt.run import task_data

MAX_UNROLLED_CHUNKS = 8


def make_eval_fns(graphdef, *, z_loss: float, data_parallel: int = 1):
  """(loss_step, rank_step), pure: (prompt, frozen, batch, weights[, label ids, label mask]) -> loss sums /
  (loss sums, [B, C] label scores), the second from one pass over what the two share (`eval_scores`). On the CPU a
  large batch runs in chunks of rows (`models.cpu.auto_microbatches`, as the train step does: the same
  results, faster once activations outgrow the caches)."""

  def loss_step(prompt, frozen, batch, weights):
    logits, targets, mask = nnx.merge(graphdef, prompt, frozen).score_targets(batch)
    return cross_entropy(logits, targets, mask, z_loss, weights=weights)

  def rank_step(prompt, frozen, batch, weights, label_ids, label_mask):
    (logits, targets, mask), scores = nnx.merge(graphdef, prompt, frozen).eval_scores(batch, label_ids, label_mask)
    return cross_entropy(logits, targets, mask, z_loss, weights=weights), scores

  def chunked(fn):
    def run(prompt, frozen, batch, weights, *labels):
      prompt_length = nnx.merge(graphdef, prompt, frozen).prompt.length  # static: trace time
      n = auto_microbatches(batch.size, batch.tokens_per_row(prompt_length), data_parallel)
      if n == 1:
        return fn(prompt, frozen, batch, weights, *labels)
      k = batch.size // n
      # chunks unrolled (independent: XLA overlaps them; a scan over them measured no faster than one piece), up
      # to MAX_UNROLLED_CHUNKS of them, then a scan (compile time grows with the unrolled count)
      if n <= MAX_UNROLLED_CHUNKS:
        outs = [fn(prompt, frozen, jax.tree.map(lambda x: x[i * k:(i + 1) * k], batch), weights[i * k:(i + 1) * k],
                   *labels) for i in range(n)]
        out = jax.tree.map(lambda *a: jnp.stack(a), *outs)
      else:
        split = lambda x: x.reshape((n, k) + x.shape[1:])  # noqa: E731
        out = jax.lax.map(lambda xs: fn(prompt, frozen, *xs, *labels), (jax.tree.map(split, batch), split(weights)))
      if isinstance(out, TokenSums):
        return jax.tree.map(lambda a: a.sum(0), out)
      sums, scores = out
      return jax.tree.map(lambda a: a.sum(0), sums), scores.reshape((-1,) + scores.shape[2:])
    return run

  return chunked(loss_step), chunked(rank_step)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


class Evaluator:
  """Evaluates prompts of one `run.Run` on the eval split of one of its tasks (`member`; default: its only one),
  or on `examples`. `prompt_id`: the prompt of a bank every row uses (a per-task run's member)."""

  def __init__(self, run, examples: list[dict] | None = None, *, member=None, prompt_id: int | None = None):
    cfg = run.cfg
    self.run = run
    self.member = member if member is not None else run.members[0]
    if member is None and len(run.members) != 1:
      raise ValueError("a mixture is evaluated task by task: give the member (or use `evaluator_for`)")
    self.task, self.labels = self.member.task, self.member.labels
    if examples is None:
      examples = task_data(self.member.data, cfg.data.eval_split).examples
    self.examples = examples[:cfg.eval.max_examples] if cfg.eval.max_examples else examples
    self.arrays = run.encode(self.examples, f"{self.member.name}/{cfg.data.eval_split}")
    if prompt_id is not None:
      self.arrays = self.arrays.with_task_ids(prompt_id)
    # every host gets the same number of rows, and the batch splits evenly over the (data, fsdp) axes
    shards = math.lcm(jax.process_count(), run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    self.batch_size = _round_up(min(cfg.eval.batch_size, len(self.examples)), shards)
    loss_step, rank_step = make_eval_fns(run.graphdef, z_loss=cfg.train.z_loss,
                                         data_parallel=run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    rep = shd.replicated(run.mesh)  # replicated outputs: every process reads every example's result
    self._loss = jax.jit(loss_step, out_shardings=rep)
    self._rank = jax.jit(rank_step, out_shardings=rep)
    # a generative task has no label strings to rank
    self.mode = "generate" if cfg.eval.mode == "rank" and not self.labels else cfg.eval.mode
    if self.labels:
      ids, mask = encoding.encode_labels(run.base.batch_type, run.tokenizer, self.labels, cfg.data.target_length)
      self.label_ids, self.label_mask = jnp.asarray(ids), jnp.asarray(mask)
      self.gold = np.array([ex["label"] if "label" in ex else _label_index(self.labels, ex["targets"])
                            for ex in self.examples])
    self.confusion: list[list[int]] | None = None

  def _generate(self, prompt, dev) -> np.ndarray:
    run = self.run
    model = nnx.merge(run.graphdef, prompt, run.frozen)
    # the config's generate: settings (greedy by default), as many new tokens as a target may have
    out = generate(model.base, input_ids=dev.input_ids, attention_mask=dev.input_mask,
                   prefix=model.prefix(dev.size, dev.task_ids),
                   config=run.cfg.generate, max_new_tokens=run.cfg.data.target_length)
    tokens = out["tokens"]
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      tokens = multihost_utils.process_allgather(tokens, tiled=True)
    return np.asarray(jax.device_get(tokens))

  def _decode(self, row: np.ndarray) -> str:
    row, eos = row.tolist(), self.run.tokenizer.eos_token_id
    row = row[:row.index(eos)] if eos in row else row
    return self.run.tokenizer.decode(row, skip_special_tokens=True).strip()

  def _predict(self, prompt):
    """One pass over the split -> (loss sums, predicted class per example, generated text, label scores)."""
    run, n = self.run, len(self.examples)
    ce = tokens = seq = 0.0
    preds, texts, scores = np.full(n, -1), [None] * n, {}
    for batch, w, index in eval_batches(self.arrays, self.batch_size, process_index=jax.process_index(),
                                        process_count=jax.process_count(), buckets=run.cfg.data.buckets()):
      dev, weights = run.device_batch((batch, w))
      if self.mode == "rank":  # the loss and every label's score from one pass
        s, sc = jax.device_get(self._rank(prompt, run.frozen, dev, weights, self.label_ids, self.label_mask))
        for i, row in zip(index, np.asarray(sc)):
          if i >= 0:
            preds[i], scores[int(i)] = int(np.argmax(row)), [round(float(v), 5) for v in row]
      else:
        s = jax.device_get(self._loss(prompt, run.frozen, dev, weights))
      ce, tokens, seq = ce + float(s.ce), tokens + float(s.tokens), seq + float(s.seq_correct)
      if self.mode == "generate":
        for i, row in zip(index, self._generate(prompt, dev)):
          if i >= 0:
            texts[i] = self._decode(row)
            preds[i] = M.postprocess(self.labels, texts[i]) if self.labels else -1
    return dict(eval_loss=ce / max(tokens, 1.0), eval_seq_accuracy=seq / n), preds, texts, scores

  def classification_metrics(self, preds: np.ndarray) -> dict:
    """The task's classification metrics of predicted classes [N] (-1: no valid class) against the gold labels;
    the confusion matrix goes to `self.confusion`."""
    scored = self.gold >= 0  # test splits carry no labels
    groups = [ex.get("group") for ex in self.examples] if any("group" in ex for ex in self.examples) else None
    names = [m for m in self.task.metrics if m in M.CLASSIFICATION]
    self.confusion = M.confusion_matrix(self.gold[scored], preds[scored], len(self.labels)).tolist()
    return M.classification_metrics(names, self.gold[scored], preds[scored], self.labels,
                                    None if groups is None else [g for g, k in zip(groups, scored) if k])

  def _task_metrics(self, preds: np.ndarray, texts: list) -> dict:
    if self.labels and self.mode in ("rank", "generate"):
      return self.classification_metrics(preds)
    if self.mode == "generate":
      names = [m for m in self.task.metrics if m in M.GENERATION]
      return M.generation_metrics(names, [t or "" for t in texts], self.examples)
    return {}

  def _records(self, preds, texts, scores) -> list[dict]:
    labels, out = self.labels, []
    for i, ex in enumerate(self.examples):
      rec = dict(index=i, inputs=ex["inputs"], targets=ex["targets"])
      if self.mode == "rank":
        rec.update(prediction=labels[preds[i]], correct=bool(preds[i] == self.gold[i]), scores=scores.get(i))
      elif self.mode == "generate":
        rec.update(prediction=texts[i], correct=(bool(preds[i] == self.gold[i]) if labels
                                                 else texts[i] == ex["targets"]))
      out.append(rec)
    return out

  def __call__(self, prompt) -> tuple[dict, list[dict]]:
    """-> (metrics, one record per example)."""
    metrics, preds, texts, scores = self._predict(prompt)
    metrics.update(self._task_metrics(preds, texts))
    return metrics, self._records(preds, texts, scores)

  def confusion_record(self) -> dict | None:
    """The last classification's confusion matrix as written to confusion_<name>.json (None: none yet)."""
    if self.confusion is None:
      return None
    labels = list(self.labels)
    return {"labels": labels, "rows": "gold", "columns": labels + ["<invalid>"], "counts": self.confusion}

  def write_report(self, directory: Path, name: str, records: list[dict]) -> None:
    """predictions/<name>.jsonl and, for classification, predictions/confusion_<name>.json (process 0)."""
    _write_report(directory, name, records, self.confusion_record())


def _write_report(directory: Path, name: str, records: list[dict], confusion: dict | None) -> None:
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

  def __init__(self, run):
    self.run = run
    self.members = [Evaluator(run, member=m, prompt_id=k if run.per_task else None)
                    for k, m in enumerate(run.members)]

  def __call__(self, prompt) -> tuple[dict, list[dict]]:
    each, records = [], []
    for ev in self.members:
      metrics, recs = ev(prompt)
      each.append(metrics)
      records += [dict(r, task=ev.member.name) for r in recs]
    out = {k: float(np.mean([m[k] for m in each])) for k in each[0] if all(k in m for m in each)}
    for ev, metrics in zip(self.members, each):
      out.update({f"{ev.member.name}/{k}": v for k, v in metrics.items()})
    return out, records

  def write_report(self, directory: Path, name: str, records: list[dict]) -> None:
    """predictions/<name>.jsonl (every task's records, each naming its task) and, for classification tasks,
    predictions/confusion_<name>.json with one matrix per task (process 0)."""
    confusion = {ev.member.name: ev.confusion_record() for ev in self.members if ev.confusion is not None}
    _write_report(directory, name, records, {"tasks": confusion} if confusion else None)


def evaluator_for(run):
  """The evaluator of a run's eval split(s): one task, or a mixture's tasks."""
  return Evaluator(run) if len(run.members) == 1 else MixtureEvaluator(run)
