"""The pure evaluation steps, and the context an evaluation runs in (what it needs from a run, not the run).

    loss_step(prompt, frozen, batch, weights) -> loss sums
    rank_step(prompt, frozen, batch, weights, label_ids, label_mask) -> (loss sums, label scores [B, C])

The rank step is one pass over what the loss and the label scores share (`models.interface` `eval_scores`).
On the CPU a large batch runs in chunks of rows (`models.cpu.auto_microbatches`, as the train step does: the same
results, faster once activations outgrow the caches).

Notation: B batch, C classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprompt import sharding as shd
from jaxprompt.config import GenerateConfig
from jaxprompt.data import encoding
from jaxprompt.losses import TokenSums, cross_entropy
from jaxprompt.models.cpu import auto_microbatches

MAX_UNROLLED_CHUNKS = 8


def _chunked(fn, graphdef, data_parallel: int):
  def run(prompt, frozen, batch, weights, *labels):
    prompt_length = nnx.merge(graphdef, prompt, frozen).prompt.length  # static: trace time
    n = auto_microbatches(batch.size, batch.tokens_per_row(prompt_length), data_parallel)
    if n == 1:
      return fn(prompt, frozen, batch, weights, *labels)
    k = batch.size // n
    # chunks unrolled (independent: XLA overlaps them; a scan over them measured no faster than one piece), up to
    # MAX_UNROLLED_CHUNKS of them, then a scan (compile time grows with the unrolled count)
    if n <= MAX_UNROLLED_CHUNKS:
      outs = [
        fn(
          prompt,
          frozen,
          jax.tree.map(lambda x, i=i: x[i * k : (i + 1) * k], batch),
          weights[i * k : (i + 1) * k],
          *labels,
        )
        for i in range(n)
      ]
      out = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:

      def split(x):
        return x.reshape((n, k) + x.shape[1:])

      out = jax.lax.map(lambda xs: fn(prompt, frozen, *xs, *labels), (jax.tree.map(split, batch), split(weights)))
    if isinstance(out, TokenSums):
      return jax.tree.map(lambda a: a.sum(0), out)
    sums, scores = out
    return jax.tree.map(lambda a: a.sum(0), sums), scores.reshape((-1,) + scores.shape[2:])

  return run


def make_eval_fns(graphdef, *, z_loss: float, data_parallel: int = 1):
  """(loss_step, rank_step), pure (see the module docstring)."""

  def loss_step(prompt, frozen, batch, weights):
    logits, targets, mask = nnx.merge(graphdef, prompt, frozen).score_targets(batch)
    return cross_entropy(logits, targets, mask, z_loss, weights=weights)

  def rank_step(prompt, frozen, batch, weights, label_ids, label_mask):
    (logits, targets, mask), scores = nnx.merge(graphdef, prompt, frozen).eval_scores(batch, label_ids, label_mask)
    return cross_entropy(logits, targets, mask, z_loss, weights=weights), scores

  return _chunked(loss_step, graphdef, data_parallel), _chunked(rank_step, graphdef, data_parallel)


def make_head_fn(graphdef, *, z_loss: float, data_parallel: int = 1):
  """head_step(prompt, frozen, batch, weights) -> (loss sums, predicted classes [B, T]) of a classification head
  (`prompts.heads`; a `batches.ClassBatch`)."""

  def head_step(prompt, frozen, batch, weights):
    logits, targets, mask = nnx.merge(graphdef, prompt, frozen).score_targets(batch)
    return cross_entropy(logits, targets, mask, z_loss, weights=weights), jnp.argmax(logits, axis=-1)

  return _chunked(head_step, graphdef, data_parallel)


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluation needs from a run: the split model (graphdef + frozen weights; the prompt comes with each
  call), where batches go (mesh), how text becomes batches (tokenizer, batch type, lengths) and the settings of
  the config's eval / generate sections."""

  graphdef: Any
  frozen: Any
  mesh: Any
  tokenizer: Any
  batch_type: type
  input_length: int
  target_length: int
  buckets: tuple[int, ...]
  eval_split: str
  batch_size: int
  max_examples: int | None
  mode: str  # the configured eval.mode (`evaluation.evaluator.MODES`)
  z_loss: float
  generate: GenerateConfig
  head: Any = None  # the run's classification head (`prompts.heads.HeadSpec`), None: the LM head
  template: Any = None  # `data.templates.Template`: where the prompt's rows go in each input (None: in front)

  @classmethod
  def of(cls, run) -> "EvalContext":
    cfg = run.cfg
    return cls(
      graphdef=run.graphdef,
      frozen=run.frozen,
      mesh=run.mesh,
      tokenizer=run.tokenizer,
      batch_type=run.base.batch_type,
      input_length=cfg.data.input_length,
      target_length=cfg.data.target_length,
      buckets=cfg.data.buckets(),
      eval_split=cfg.data.eval_split,
      batch_size=cfg.eval.batch_size,
      max_examples=cfg.eval.max_examples,
      mode=cfg.eval.mode,
      z_loss=cfg.train.z_loss,
      generate=cfg.generate,
      head=run.head_spec,
      template=run.template,
    )

  def encode(self, examples: list[dict], name: str):
    """Examples -> one numpy batch of every row, as training lays them out for this model and head."""
    if self.head is not None:
      return self.head.encode(examples, self.tokenizer, input_length=self.input_length, name=name)
    return encoding.encode(
      self.batch_type,
      examples,
      self.tokenizer,
      input_length=self.input_length,
      target_length=self.target_length,
      name=name,
      template=self.template,
    )

  @property
  def data_parallel(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def device_batch(self, local):
    return shd.device_batch(self.mesh, local)

  def jit(self, fn):
    """`fn` jitted with replicated outputs: every process reads every example's result."""
    return jax.jit(fn, out_shardings=shd.replicated(self.mesh))

  def model(self, prompt):
    return nnx.merge(self.graphdef, prompt, self.frozen)
