"""Inference: KV-cache generation for every model kind (`decoding.generate`) and text in, text out with one or several
soft prompts in one mixed-prompt batch (`text`)."""

from jaxprompt.inference.decoding import generate
from jaxprompt.inference.text import generate_text

__all__ = ["generate", "generate_text"]
