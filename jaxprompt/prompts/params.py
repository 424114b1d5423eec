"""`PromptParam` is *the* trainable type: gradients, optimizer state, checkpoints and exports all select
state with `nnx.split(model, PromptParam, ...)`, never with regexes over parameter paths."""

from flax import nnx


class PromptParam(nnx.Param):
  """A trainable soft-prompt parameter. Everything else in a prompted model is frozen."""
