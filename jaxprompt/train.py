"""Prompt tuning: setup from a Config, the pure train step, evaluation, and the training loop.

The step is a pure function
    train_step(prompt, opt_state, frozen, batch, step) -> (prompt, opt_state, metrics)
jitted once with explicit in/out shardings; `prompt` and `opt_state` are donated, the frozen weights never
are (they are inputs, not state: no gradients are kept for them, so XLA drops every weight-gradient matmul).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt import config as C
from jaxprompt import prompts as P
from jaxprompt import sharding as shd
from jaxprompt.data.pipeline import DataError, encode_examples
from jaxprompt.losses import cross_entropy, forward

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # documented exit code after a SIGTERM/SIGINT checkpoint (EX_TEMPFAIL: run again to resume)


class NonFiniteError(RuntimeError):
  pass


# -- setup -------------------------------------------------------------------------------------------


def load_base(mcfg: C.ModelConfig, mesh=None):
  """(frozen base model, tokenizer) as the model section says."""
  from jaxprompt.models import load_model, load_tokenizer

  base = load_model(mcfg.path, dtype=jnp.dtype(mcfg.dtype), mesh=mesh, compute_dtype=jnp.dtype(mcfg.compute_dtype),
                    remat=mcfg.remat, revision=mcfg.revision, allow_pytorch_bin=mcfg.allow_pytorch_bin)
  if mcfg.dropout is not None and hasattr(base.config, "dropout_rate"):
    base.config = dataclasses.replace(base.config, dropout_rate=mcfg.dropout)
  tok_path = mcfg.tokenizer or mcfg.path
  tokenizer = load_tokenizer(tok_path)
  if len(tokenizer) > base.config.vocab_size:
    raise DataError(f"tokenizer {tok_path!r} has {len(tokenizer)} tokens but the model's vocabulary "
                    f"has {base.config.vocab_size} rows: they do not belong together")
  return base, tokenizer


def architecture(base) -> dict:
  """What an exported prompt must say about its base (PEFT's adapter_config fields among them)."""
  c = base.config
  first = lambda *names: next((getattr(c, n) for n in names if getattr(c, n, None) is not None), None)
  return dict(kind=base.kind, model_type=c.model_type, hidden_size=base.hidden_size, vocab_size=c.vocab_size,
              num_layers=first("num_layers", "num_hidden_layers", "n_layer"),
              num_attention_heads=first("num_heads", "num_attention_heads", "n_head"))


@dataclasses.dataclass
class TaskData:
  examples: list[dict]
  labels: tuple[str, ...] | None  # None: a generative task
  metrics: tuple[str, ...] = ("accuracy",)


def task_data(dcfg: C.DataConfig, split: str) -> TaskData:
  """Text-to-text examples of one split of the configured task."""
  if dcfg.task == "quickstart" or dcfg.task.startswith("quickstart:"):
    from jaxprompt import quickstart

    name = dcfg.task.partition(":")[2] or "max"
    if name not in quickstart.TASKS:
      raise DataError(f"data.task {dcfg.task!r}: the quickstart tasks are " +
                      ", ".join(f"quickstart:{t}" for t in quickstart.TASKS))
    return TaskData(quickstart.task_split(split, taskless=dcfg.taskless, task=name), quickstart.LABELS,
                    ("accuracy",))  # digits 0-9 are far from balanced for min/max: accuracy only
  from jaxprompt.data import sources

  sd = sources.task_examples(dcfg, split)
  return TaskData(sd.examples, tuple(sd.labels) if sd.labels else None, tuple(sd.task.metrics))


def initial_prompt(pcfg: C.PromptConfig, base, tokenizer, labels, rng) -> jax.Array:
  table = P.input_embedding_table(base)
  hidden = table.shape[1]
  if pcfg.init == "random_uniform":
    return P.random_uniform(rng, pcfg.length, hidden, *pcfg.init_range)
  if pcfg.init == "sampled_vocab":
    return P.sampled_vocab(rng, table, pcfg.length, pcfg.vocab_sample_size)
  if pcfg.init == "class_labels":
    if not labels:
      raise P.PromptError("prompt.init class_labels needs a task with label strings")
    ids = [tokenizer(lab, add_special_tokens=False)["input_ids"] for lab in labels]
    return P.class_labels(rng, table, pcfg.length, ids, pcfg.vocab_sample_size)
  if pcfg.init == "text":
    if not pcfg.init_text:
      raise P.PromptError("prompt.init text needs prompt.init_text")
    return P.from_text(table, pcfg.length, tokenizer(pcfg.init_text, add_special_tokens=False)["input_ids"])
  if pcfg.init == "file":
    if not pcfg.init_file:
      raise P.PromptError("prompt.init file needs prompt.init_file")
    from jaxprompt.export import check_compatible, load_trained_prompt

    value, info = load_trained_prompt(pcfg.init_file)
    for warning in check_compatible(info, getattr(base, "identity", None), hidden, base.kind, pcfg.init_file,
                                    strict=not pcfg.allow_other_base):
      log.warning(warning)
    if value.shape != (pcfg.length, hidden):
      raise P.PromptError(f"{pcfg.init_file}: prompt has shape {value.shape}, expected [P, H] = ({pcfg.length}, {hidden})")
    return jnp.asarray(value)
  raise P.PromptError(f"unknown prompt.init {pcfg.init!r}")


# -- the pure steps ----------------------------------------------------------------------------------


def make_train_step(graphdef, tx, *, z_loss: float, microbatches: int = 1, seed: int = 0) -> Callable:
  """-> train_step(prompt, opt_state, frozen, batch, step) -> (prompt, opt_state, metrics)."""

  def train_step(prompt, opt_state, frozen, batch, step):
    rng = jax.random.fold_in(jax.random.key(seed), step)
    # causal batches predict token t + 1 at position t, so their first position never has a loss
    if "target_valid" in batch:
      tmask = batch["target_valid"]
    else:
      tmask = batch["target_mask"][:, 1:] if "tokens" in batch else batch["target_mask"]
    tokens = jnp.maximum(jnp.sum(tmask).astype(jnp.float32), 1.0)

    def loss_fn(prompt, mb, rng):
      model = nnx.merge(graphdef, prompt, frozen)
      logits, targets, mask = forward(model, mb, dropout_rng=rng)
      sums = cross_entropy(logits, targets, mask, z_loss)
      # normalised by the whole batch's token count, so microbatch gradients add up exactly
      return sums["loss"] / tokens, sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (_, sums), grads = grad_fn(prompt, batch, rng)
    else:
      split = jax.tree.map(lambda x: x.reshape((microbatches, x.shape[0] // microbatches) + x.shape[1:]), batch)

      def body(carry, xs):
        g_acc, s_acc = carry
        mb, i = xs
        (_, s), g = grad_fn(prompt, mb, jax.random.fold_in(rng, i))
        s = {k: jnp.sum(v) for k, v in s.items()}
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

      zeros_s = {k: jnp.zeros((), jnp.float32) for k in ("loss", "ce", "z_loss", "correct", "tokens", "seq_correct")}
      (grads, sums), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, prompt), zeros_s),
                                      (split, jnp.arange(microbatches)))
    updates, new_opt = tx.update(grads, opt_state, prompt)
    new_prompt = jax.tree.map(lambda p, u: p + u, prompt, updates)
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(gnorm)
    finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_prompt)]))
    # a non-finite step never reaches the state: the loop then stops (nan_policy error) or goes on (skip)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_prompt, new_opt = keep(new_prompt, prompt), keep(new_opt, opt_state)
    n = jnp.maximum(sums["tokens"], 1.0)
    metrics = dict(loss=sums["ce"] / n, z_loss=sums["z_loss"] / n, token_accuracy=sums["correct"] / n,
                   seq_accuracy=jnp.mean(sums["seq_correct"]) if microbatches == 1 else
                   sums["seq_correct"] / batch[next(iter(batch))].shape[0],
                   tokens=sums["tokens"], grad_norm=gnorm, finite=finite.astype(jnp.float32))
    return new_prompt, new_opt, metrics

  return train_step


# -- the run -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything a loop or an evaluation needs, built once from a Config."""

  cfg: C.Config
  mesh: Any
  base: Any
  tokenizer: Any
  graphdef: Any
  prompt: dict  # pure dict of PromptParam values
  frozen: dict  # pure dict of the frozen base weights
  identity: Any
  kind: str
  labels: tuple[str, ...] | None
  metric_names: tuple[str, ...] = ("accuracy",)

  @property
  def prompt_array(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.prompt["prompt"]["embeddings"]))


def mesh_from_config(mc: C.MeshConfig):
  """The configured mesh; a mesh smaller than the machine (single process) uses its first devices."""
  sizes = (mc.data, mc.fsdp, mc.model)
  n = jax.device_count()
  if -1 not in sizes and math.prod(sizes) < n and jax.process_count() == 1:
    log.warning("mesh data=%d x fsdp=%d x model=%d uses %d of the %d devices", *sizes, math.prod(sizes), n)
    return shd.make_mesh(*sizes, devices=jax.devices()[:math.prod(sizes)])
  return shd.make_mesh(*sizes)


def build_run(cfg: C.Config, *, mesh=None, with_train_data: bool = True) -> tuple[Run, TaskData | None]:
  mesh = mesh or mesh_from_config(cfg.mesh)
  base, tokenizer = load_base(cfg.model, mesh)
  shd.check_weights_fit(nnx.state(base), mesh)
  train = task_data(cfg.data, cfg.data.train_split) if with_train_data else None
  spec = train if train is not None else task_data(cfg.data, cfg.data.eval_split)
  labels = spec.labels
  rng = jax.random.key(cfg.train.seed)
  init = initial_prompt(cfg.prompt, base, tokenizer, labels, jax.random.fold_in(rng, 1))
  model = P.PromptedModel(base, P.SoftPrompt(init))
  graphdef, prompt_state, frozen_state = nnx.split(model, P.PromptParam, ...)
  prompt = jax.device_put(prompt_state.to_pure_dict(), shd.replicated(mesh))
  run = Run(cfg=cfg, mesh=mesh, base=base, tokenizer=tokenizer, graphdef=graphdef, prompt=prompt,
            frozen=frozen_state.to_pure_dict(), identity=base.identity, kind=base.kind, labels=labels,
            metric_names=spec.metrics)
  return run, train


def encode_split(run: Run, examples: list[dict], name: str) -> dict[str, np.ndarray]:
  d = run.cfg.data
  return encode_examples(examples, run.tokenizer, kind=run.kind, input_length=d.input_length,
                         target_length=d.target_length, name=name)


def _device_batch(run: Run, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  sharding = shd.batch_sharding(run.mesh)
  return {k: jax.make_array_from_process_local_data(shd.batch_sharding(run.mesh, v.ndim), v)
          for k, v in local.items()} if sharding else local


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def prompt_shardings(run: Run):
  return jax.tree.map(lambda _: shd.replicated(run.mesh), run.prompt)


def frozen_shardings(run: Run):
  return jax.tree.map(lambda x: x.sharding, run.frozen)
