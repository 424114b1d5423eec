"""Soft prompts: the trainable type, the prompt modules, their initialisers and files.

  params   `PromptParam`, the one trainable variable type (optimizer, checkpoints and export select by it)
  soft     `SoftPrompt` (a [P, H] prompt or a [K, P, H] bank) and `PromptedModel` (a frozen base + a prompt)
  init     initialisers (random uniform, sampled vocabulary, class labels, text, file)
  io       prompt files and workdirs in (.npy, .safetensors, PEFT adapter folders), compatibility checks
  export   prompts out: PEFT adapter folders, the original .npy format, safetensors
"""

from jaxprompt.errors import PromptError
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptedModel, SoftPrompt, prompt_bank

__all__ = ["PromptError", "PromptParam", "PromptedModel", "SoftPrompt", "prompt_bank"]
