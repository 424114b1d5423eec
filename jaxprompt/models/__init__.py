"""Frozen base models (Flax NNX) and their loaders."""

from jaxprompt.models.decoder import Decoder, DecoderConfig
from jaxprompt.models.encoder import Encoder, EncoderConfig
from jaxprompt.models.loading import ARCHITECTURES, build_model, load_model, load_tokenizer, save_pretrained
from jaxprompt.models.t5 import T5, T5Config

__all__ = [
  "ARCHITECTURES",
  "Decoder",
  "DecoderConfig",
  "Encoder",
  "EncoderConfig",
  "T5",
  "T5Config",
  "build_model",
  "load_model",
  "load_tokenizer",
  "save_pretrained",
]
