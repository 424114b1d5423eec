"""Prompt ensembles (Lester et al. 2021, §7): K prompts for one task on one frozen model, scored in one mixed batch
(a bank of the K prompts, every example repeated under each), combined by majority vote or mean log-probability.

Notation: K prompts, B batch, N examples, C classes.

vote: each prompt's rank-classification prediction is a vote; the most votes win, a tie goes to the tied class
  with the largest log-probability summed over the K prompts (the paper's majority vote, made deterministic).
mean: the class with the largest mean log-probability over the K prompts.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxprompt.data.pipeline import eval_batches
from jaxprompt.errors import UsageError
from jaxprompt.evaluation.evaluator import Evaluator, evaluator_for
from jaxprompt.prompts import PromptedModel, methods
from jaxprompt.prompts.io import load_prompt_source

COMBINE = ("vote", "mean")


def combine(scores: np.ndarray, how: str = "vote") -> np.ndarray:
  """scores [K, N, C] (log-probabilities) -> the ensemble's class per example [N]."""
  if how == "mean":
    return np.argmax(scores.mean(axis=0), axis=-1)
  if how != "vote":
    raise UsageError(f"unknown ensemble combination {how!r}; choose one of {', '.join(COMBINE)}")
  k, n, c = scores.shape
  votes = np.zeros((n, c), np.int64)
  np.add.at(votes, (np.arange(n)[None].repeat(k, 0), np.argmax(scores, axis=-1)), 1)
  tied = votes == votes.max(axis=1, keepdims=True)
  return np.argmax(np.where(tied, scores.sum(axis=0), -np.inf), axis=-1)


def member_scores(run, evaluator: Evaluator, values, specs) -> np.ndarray:
  """Rank scores [K, N, C] of every eval example under each of K prompts, in mixed batches of K x B rows."""
  if not evaluator.labels:
    raise UsageError(f"an ensemble needs a classification task (label strings to rank); {evaluator.task.name} has none")
  k = len(values)
  model = PromptedModel(run.base, methods.bank(values, specs, run.base.prefix_slots()))
  graphdef, state = nnx.split(model)
  rank = jax.jit(
    lambda state, batch, ids, label_ids, label_mask: nnx.merge(graphdef, state).label_logprobs(
      batch, label_ids, label_mask, prompt_ids=ids
    )
  )
  hosts, local = jax.process_count(), evaluator.batch_size // jax.process_count()
  out = np.zeros((k, len(evaluator.examples), len(evaluator.labels)), np.float32)
  for batch, w, index in eval_batches(
    evaluator.arrays,
    evaluator.batch_size,
    process_index=jax.process_index(),
    process_count=hosts,
    buckets=run.cfg.data.buckets(),
  ):
    tiled = jax.tree.map(lambda a: np.concatenate([a] * k), (batch, w))
    ids = np.repeat(np.arange(k, dtype=np.int32), local)
    dev, _ = run.device_batch(tiled)
    scores = rank(state, dev, run.device_batch(ids), evaluator.label_ids, evaluator.label_mask)
    # rows are (host, prompt, local row): back to [K, B, C]
    scores = (
      np.asarray(jax.device_get(scores))
      .reshape(hosts, k, local, -1)
      .transpose(1, 0, 2, 3)
      .reshape(k, hosts * local, -1)
    )
    keep = index >= 0
    out[:, index[keep]] = scores[:, keep]
  return out


def evaluate_ensemble(
  cfg, sources, *, how: str = "vote", step: str | int = "best", mesh=None, allow_other_base: bool = False
) -> dict:
  """Each prompt's metrics and the ensemble's on the eval split: {"members": [{source, ...metrics}],
  "ensemble": {...metrics}, "predictions": [class per example], "combine": how}."""
  from jaxprompt.run import build_run

  if how not in COMBINE:
    raise UsageError(f"unknown ensemble combination {how!r}; choose one of {', '.join(COMBINE)}")
  if len(sources) < 2:
    raise UsageError("an ensemble needs at least two prompts")
  if cfg.data.mixture:
    raise UsageError("an ensemble scores one task: give a config with data.task, not a data.mixture")
  run, _ = build_run(cfg, mesh=mesh, with_train_data=False)
  prompts = [load_prompt_source(s, step) for s in sources]
  for p, s in zip(prompts, sources, strict=False):
    p.check(run.base, str(s), strict=not allow_other_base)
  evaluator = evaluator_for(run)
  scores = member_scores(run, evaluator, [p.value for p in prompts], [p.spec for p in prompts])
  members = [
    dict(source=str(s), **evaluator.classification_metrics(np.argmax(sc, -1)))
    for s, sc in zip(sources, scores, strict=False)
  ]
  preds = combine(scores, how)
  return dict(
    combine=how,
    members=members,
    ensemble=evaluator.classification_metrics(preds),
    predictions=[evaluator.labels[i] for i in preds],
  )
