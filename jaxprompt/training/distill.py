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
import optax
from flax import nnx

from jaxprompt.config import OptimizerConfig
from jaxprompt.errors import PromptError
from jaxprompt.models.decoder import Decoder
from jaxprompt.prompts import PromptedModel
from jaxprompt.prompts.params import PromptParam
from jaxprompt.training.optim import build_optimizer


def check_distillable(base) -> None:
  """The teacher reads the context and a query as one token sequence: a decoder-only model (T5 refused)."""
  if not isinstance(base, Decoder):
    raise PromptError(
      f"cartridge distillation needs a decoder-only model: its teacher reads the context and each query as one "
      f"token sequence, which this {base.kind} model has no place for (train a {base.kind} cartridge with "
      "jaxprompt train)"
    )


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


def teacher_samples(base, context_ids, n: int, length: int, *, seed: int, temperature: float = 1.0) -> np.ndarray:
  """[n, length]: continuations the frozen model samples after the whole context (no early stop at EOS) — the
  queries of the paper's self-study, written by the teacher."""
  from jaxprompt.inference.decoding import generate

  ctx = np.broadcast_to(np.asarray(context_ids, np.int32).reshape(1, -1), (n, np.size(context_ids)))
  out = generate(
    base,
    input_ids=jnp.asarray(ctx),
    method="sample",
    max_new_tokens=length,
    temperature=temperature,
    eos_id=-1,
    seed=seed,
  )
  return np.asarray(out["tokens"])[:, :length].astype(np.int32)


def kl_to_teacher(student_logits: jax.Array, teacher: jax.Array) -> jax.Array:
  """KL(teacher || student) per position [C, chunk], from the student's logits and the teacher's log-probs."""
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


def make_distill_step(graphdef, tx):
  """(step, loss) jitted over a `PromptedModel` split as (graphdef, prompt, frozen): loss(prompt, frozen, queries,
  teacher) is the mean KL; step(prompt, opt_state, frozen, queries, teacher) -> (prompt, opt_state, KL before it).
  Only the prompt and the optimizer state are donated; the frozen weights never are."""

  def loss(prompt, frozen, queries, teacher):
    model = nnx.merge(graphdef, prompt, frozen)
    return jnp.mean(kl_to_teacher(model(queries, jnp.ones_like(queries)), teacher))

  def step(prompt, opt_state, frozen, queries, teacher):
    value, grads = jax.value_and_grad(loss)(prompt, frozen, queries, teacher)
    updates, opt_state = tx.update(grads, opt_state, prompt)
    return optax.apply_updates(prompt, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1)), jax.jit(loss)


def distill_cartridge(
  base, cartridge, context_ids, *, chunk: int, steps: int, learning_rate: float, optimizer: str = "adam"
):
  """Train `cartridge` (a `prompts.cartridge.Cartridge` on `base`, changed in place) for `steps` full-batch steps
  over the context's chunks -> (the cartridge, [KL before, KL after each step])."""
  check_distillable(base)
  chunks = context_chunks(context_ids, chunk)
  teacher = teacher_logprobs(base, context_ids, chunks)
  chunks = jnp.asarray(chunks)
  cfg = OptimizerConfig(name=optimizer, learning_rate=learning_rate, weight_decay=0.0)
  tx = build_optimizer(cfg, steps, {"sink": 0.0} if cartridge.sink is not None else {})
  graphdef, params, frozen = nnx.split(PromptedModel(base, cartridge), PromptParam, ...)
  step, loss = make_distill_step(graphdef, tx)
  opt = tx.init(params)
  kls = []
  for _ in range(steps):
    params, opt, value = step(params, opt, frozen, chunks, teacher)
    kls.append(float(value))
  kls.append(float(loss(params, frozen, chunks, teacher)))
  nnx.update(cartridge, params["prompt"])
  return cartridge, kls
