"""A method module rebuilt from its spec (`PromptMethod.spec()`: method and options, JSON) and its parameters (a
checkpoint's `prompt` tree) — what reading a workdir needs, with no base model and no config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import PromptError
from jaxprompt.models.interface import PrefixSlots
from jaxprompt.prompts.encoders import PTuning
from jaxprompt.prompts.prefix import PrefixTuning
from jaxprompt.prompts.soft import PromptMethod, SoftPrompt


def from_spec(spec: dict, params: dict) -> PromptMethod:
  """A method module from its spec and parameters (a checkpoint's `prompt` tree)."""
  method = spec.get("method", "prompt_tuning")
  shape = lambda name: jnp.zeros(np.shape(params[name]), jnp.float32)
  if method == "prompt_tuning":
    return SoftPrompt(params["embeddings"])
  if method == "prefix_tuning" and not spec.get("prefix_projection"):
    return PrefixTuning(PrefixSlots.from_dict(spec["slots"]), table=params["table"])
  if method == "prefix_tuning":
    build_fn = lambda: PrefixTuning(PrefixSlots.from_dict(spec["slots"]), embedding=shape("embedding"),
                                    hidden_size=spec["encoder_hidden_size"], rng=jax.random.key(0))
  elif method == "p_tuning":
    build_fn = lambda: PTuning(shape("embedding"), encoder=spec["encoder_reparameterization_type"],
                               hidden_size=spec["encoder_hidden_size"], num_layers=spec["encoder_num_layers"],
                               dropout=spec["encoder_dropout"], rng=jax.random.key(0))
  else:
    raise PromptError(f"unknown prompt method {method!r}")
  module = nnx.eval_shape(build_fn)
  nnx.update(module, jax.tree.map(jnp.asarray, params))
  return module
