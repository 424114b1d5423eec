"""The pure train step, jitted once with explicit in/out shardings:

    train_step(prompt, opt_state, frozen, batch, step) -> (prompt, opt_state, metrics)

`prompt` and `opt_state` are donated; the frozen weights never are (they are inputs, not state: no gradients
are kept for them, so XLA drops every weight-gradient matmul). The model's kind is in `graphdef`: the step only
calls `score_targets` (`models.interface`), so one step serves every model kind and batch type.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprompt.data.pipeline import Packing
from jaxprompt.losses import TokenSums, cross_entropy
from jaxprompt.models.cpu import CPU_CHUNK_TOKENS, auto_microbatches

PACKED_ROW_GRID = 4


def packed_rows(
  needed: int, tokens_per_row: int, *, microbatches: int | str, data_parallel: int = 1, processes: int = 1
) -> int:
  """Rows per host for a packed batch (`data.pack`) that needs `needed`: the fewest >= needed on a grid of
  max(PACKED_ROW_GRID, the host's data-parallel devices) rows (a few compiled shapes per length bucket, not one per
  row count) whose global count splits evenly over the data-parallel devices and into the step's microbatches
  (`auto`: chunks of at least half CPU_CHUNK_TOKENS, so an awkward row count does not become one-row chunks)."""
  local = max(data_parallel // processes, 1)
  grid = -(-max(PACKED_ROW_GRID, local) // local) * local
  n = -(-needed // grid) * grid
  while True:
    rows = n * processes
    if microbatches == "auto":
      m = auto_microbatches(rows, tokens_per_row, data_parallel)
      if m == 1 or (rows // m) * tokens_per_row * 2 >= CPU_CHUNK_TOKENS or rows // m <= data_parallel:
        return n
      if n >= 2 * needed + grid:  # no better split nearby: take the fewest chunks auto finds
        return n
    elif rows % (microbatches * data_parallel) == 0:
      return n
    n += grid


def make_packing(
  prompt_length: int, start_id: int, *, microbatches: int | str, data_parallel: int = 1, processes: int = 1
) -> Packing:
  """`data.pack`'s `data.pipeline.Packing` for a step with these microbatches on this many devices and hosts."""
  return Packing(
    prompt_length,
    start_id,
    functools.partial(packed_rows, microbatches=microbatches, data_parallel=data_parallel, processes=processes),
  )


def make_train_step(
  graphdef, tx, *, z_loss: float, microbatches: int | str = 1, seed: int = 0, data_parallel: int = 1
) -> Callable:
  """-> train_step(prompt, opt_state, frozen, batch, step) -> (prompt, opt_state, metrics). `microbatches`: a
  number, or "auto" (`auto_microbatches`, decided per batch shape when the step is traced)."""

  def loss_fn(prompt, frozen, mb, rng, tokens):
    logits, targets, mask = nnx.merge(graphdef, prompt, frozen).score_targets(mb, dropout_rng=rng)
    sums = cross_entropy(logits, targets, mask, z_loss, segments=mb.loss_segments)
    # normalised by the whole batch's token count, so microbatch gradients add up exactly
    return sums.loss / tokens, sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def chunks(prompt, frozen, batch) -> int:
    if microbatches != "auto":
      return microbatches
    prompt_length = nnx.merge(graphdef, prompt, frozen).prompt.length  # static: trace time
    return auto_microbatches(batch.size, batch.tokens_per_row(prompt_length), data_parallel)

  def gradients(prompt, frozen, batch, rng):
    tokens = jnp.maximum(jnp.sum(batch.loss_mask).astype(jnp.float32), 1.0)
    n = chunks(prompt, frozen, batch)
    if n == 1:
      (_, sums), grads = grad_fn(prompt, frozen, batch, rng, tokens)
      return grads, sums
    split = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)

    def body(carry, xs):
      mb, i = xs
      (_, s), g = grad_fn(prompt, frozen, mb, jax.random.fold_in(rng, i), tokens)
      return jax.tree.map(jnp.add, carry, (g, s)), None

    zeros = (jax.tree.map(jnp.zeros_like, prompt), TokenSums.zeros())
    (grads, sums), _ = jax.lax.scan(body, zeros, (split, jnp.arange(n)))
    return grads, sums

  def train_step(prompt, opt_state, frozen, batch, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    grads, sums = gradients(prompt, frozen, batch, rng)
    updates, new_opt = tx.update(grads, opt_state, prompt)
    new_prompt = jax.tree.map(lambda p, u: p + u, prompt, updates)
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(sums.loss) & jnp.isfinite(gnorm)
    finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_prompt)]))

    # a non-finite step never reaches the state: the loop then stops (nan_policy error) or goes on (skip)
    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    return keep(new_prompt, prompt), keep(new_opt, opt_state), _metrics(sums, gnorm, finite, batch.num_examples)

  return train_step


def _metrics(sums: TokenSums, grad_norm, finite, rows: int) -> dict:
  n = jnp.maximum(sums.tokens, 1.0)
  return dict(
    loss=sums.ce / n,
    z_loss=sums.z_loss / n,
    token_accuracy=sums.correct / n,
    seq_accuracy=sums.seq_correct / rows,
    tokens=sums.tokens,
    grad_norm=grad_norm,
    finite=finite.astype(jnp.float32),
  )
