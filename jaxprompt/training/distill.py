"""Distilling a long context into a cartridge (`prompts.cartridge`), in the simplest form of the paper's
self-study: the queries are the context's own chunks, not conversations the teacher generates.

Teacher: the frozen model with the whole context in front of a chunk; student: the same model with the cartridge
in front of that chunk. The loss is KL(teacher || student) between their next-token distributions at every
position of the chunk, averaged over positions and chunks; only the cartridge's trainable slots move (its sink:
no gradient, learning rate 0). The teacher's distributions are computed once.

  from jaxprompt.training.distill import distill_cartridge
  cartridge, kls = distill_cartridge(base, cartridge, context_ids, chunk=64, steps=200, learning_rate=1e-2)

`kls[0]` is the KL before any step, `kls[i]` after step i (every chunk in each step's batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.config import OptimizerConfig
from jaxprompt.errors import PromptError
from jaxprompt.prompts.params import PromptParam
from jaxprompt.training.optim import build_optimizer


def context_chunks(context_ids, chunk: int) -> np.ndarray:
  """The context's non-overlapping chunks of `chunk` tokens [C, chunk] (a shorter tail dropped)."""
  ids = np.asarray(context_ids, np.int32).reshape(-1)
  if chunk < 1 or ids.size < chunk:
    raise PromptError(f"distillation needs a context of at least one chunk ({chunk} tokens), got {ids.size}")
  c = ids.size // chunk
  return ids[: c * chunk].reshape(c, chunk)


def teacher_logprobs(base, context_ids, chunks: np.ndarray) -> jax.Array:
  """[C, chunk, V] float32: the frozen model's next-token log-probabilities at each chunk token, with the whole
  context in front of the chunk."""
  ctx = jnp.broadcast_to(jnp.asarray(context_ids, jnp.int32).reshape(1, -1), (chunks.shape[0], np.size(context_ids)))
  ids = jnp.concatenate([ctx, jnp.asarray(chunks)], axis=1)
  logits = base.forward(ids, jnp.ones_like(ids))[:, ctx.shape[1] :]
  return jax.nn.log_softmax(logits, axis=-1)


def _kl(base, cartridge, chunks: jax.Array, teacher: jax.Array) -> jax.Array:
  logits = base.forward(chunks, jnp.ones_like(chunks), prefix=cartridge.prefix(chunks.shape[0]))
  student = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))


def distill_cartridge(
  base, cartridge, context_ids, *, chunk: int, steps: int, learning_rate: float, optimizer: str = "adam"
):
  """Train `cartridge` (a `prompts.cartridge.Cartridge` on `base`, changed in place) for `steps` full-batch steps
  over the context's chunks -> (the cartridge, [KL before, KL after each step])."""
  chunks = context_chunks(context_ids, chunk)
  teacher = teacher_logprobs(base, context_ids, chunks)
  chunks = jnp.asarray(chunks)
  cfg = OptimizerConfig(name=optimizer, learning_rate=learning_rate, weight_decay=0.0)
  tx = build_optimizer(cfg, steps, {"sink": 0.0} if cartridge.sink is not None else {})
  graph, params, rest = nnx.split(cartridge, PromptParam, ...)
  bgraph, bstate = nnx.split(base)
  opt = tx.init(params)

  def loss(params, bstate):
    return _kl(nnx.merge(bgraph, bstate), nnx.merge(graph, params, rest), chunks, teacher)

  @jax.jit
  def step(params, opt, bstate):
    value, grads = jax.value_and_grad(loss)(params, bstate)
    updates, opt = tx.update(grads, opt, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt, value

  kls = []
  for _ in range(steps):
    params, opt, value = step(params, opt, bstate)
    kls.append(float(value))
  kls.append(float(jax.jit(loss)(params, bstate)))
  nnx.update(cartridge, params)
  return cartridge, kls
