"""The optimizer: Optax transforms built from `OptimizerConfig`, applied to PromptParam state only.

The default is Adafactor as in the original prompt-tuning setup: decay_rate 0.8 (beta2_t = 1 - (t+1)^-0.8),
no momentum, update clipping at RMS 1.0, eps1 1e-30, no parameter scaling, weight decay 1e-5 applied as
param *= 1 - 1e-5 (after the learning-rate scaling, so not LR-scaled), constant LR 0.3. A [100, H] prompt is
not factored (100 < min_dim_size_to_factor = 128).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxprompt.config import OptimizerConfig
from jaxprompt.errors import ConfigError


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  lr, w = cfg.learning_rate, cfg.warmup_steps
  end = lr * cfg.end_learning_rate_factor
  decay_steps = max(total_steps - w, 1)
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "warmup_constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(w, 1)), optax.constant_schedule(lr)], [w])
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=cfg.end_learning_rate_factor)
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(w, 1), w + decay_steps, end_value=end)
  if cfg.schedule == "linear":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(w, 1)), optax.linear_schedule(lr, end, decay_steps)], [w]
    )
  raise ConfigError(f"unknown schedule {cfg.schedule!r}")


def build_optimizer(
  cfg: OptimizerConfig, total_steps: int, learning_rates: dict[str, float] | None = None
) -> optax.GradientTransformation:
  """The configured optimizer over the prompt's parameters. `learning_rates` {name: peak learning rate}: the
  prompt parameters of those names form their own group with that rate, under the same optimizer and schedule
  shape (DePT's two groups, as its authors' two AdamW parameter groups share one LambdaLR); the rest use
  optimizer.learning_rate; a rate of 0 freezes those parameters (no update, not even weight decay, and no
  optimizer state: a cartridge's attention sink). Empty or None: one group, the plain transform (its state as
  before)."""
  tx = _grouped(cfg, total_steps, learning_rates) if learning_rates else _transform(cfg, total_steps)
  if cfg.grad_clip_norm:  # over every group's gradients at once
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def _grouped(cfg: OptimizerConfig, total_steps: int, learning_rates: dict[str, float]) -> optax.GradientTransformation:
  """One transform per group (`build_optimizer`), each leaf labelled by its path."""
  groups = {
    name: _transform(dataclasses.replace(cfg, learning_rate=lr), total_steps) if lr else optax.set_to_zero()
    for name, lr in learning_rates.items()
  }
  groups[_REST] = _transform(cfg, total_steps)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _group(path, learning_rates), params)

  return optax.multi_transform(groups, labels)


_REST = "__rest__"  # the group of parameters without a learning rate of their own


def _group(path, learning_rates: dict) -> str:
  """A leaf's group: the last of its path's names that has its own learning rate, else the rest."""
  names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
  return next((n for n in reversed(names) if n in learning_rates), _REST)


def _transform(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  lr = schedule(cfg, total_steps)
  if cfg.name == "adafactor":
    tx = optax.adafactor(
      learning_rate=lr,
      decay_rate=cfg.decay_rate,
      clipping_threshold=cfg.clipping_threshold,
      multiply_by_parameter_scale=False,
      momentum=cfg.momentum,
      eps=cfg.eps,
      min_dim_size_to_factor=128,
      weight_decay_rate=cfg.weight_decay or None,
      factored=True,
    )
  elif cfg.name == "adam":
    tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2)
  elif cfg.name == "adamw":
    tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
  elif cfg.name == "sgd":
    tx = optax.sgd(lr)
  else:
    raise ConfigError(f"unknown optimizer {cfg.name!r}")
  return tx
