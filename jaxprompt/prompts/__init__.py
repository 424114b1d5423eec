"""Soft prompts: the trainable type, the prompt modules, their initialisers and files.

params    `PromptParam`, the one trainable variable type (optimizer, checkpoints and export select by it)
spec      `PromptSpec` (a method's options, JSON) and `Method` (a registry entry: what a method is to the package)
soft      `SoftPrompt` (a [P, H] prompt or a [K, P, H] bank), `PromptedModel` (a frozen base + a prompt), and
          prompt tuning's spec and entry; `encoders`: P-tuning's; `prefix`: prefix tuning's; `residual`, `dept`,
          `multitask` (MPT: a shared prompt times a factor per task), `adaption` (LLaMA-Adapter's gated per-layer
          prompts): theirs
registry  the methods by name: `get(name)`, `of(spec)`, `spec_from_json`
heads     classification heads trained with the prompt (`head.type` sequence / token): `HeadParam` (a PromptParam),
          `HeadSpec` (type, labels, transformers' layout), the head types by name
record    `PromptRecord`, what checkpoints and exports say about a trained prompt (typed, JSON)
methods   any method built from a config (`prompt.init: file` included), a trained value or a bank of them
init      initialisers (random uniform, random normal, sampled vocabulary, class labels, text)
io        prompt files and workdirs in (.npy, .safetensors, PEFT adapter folders), compatibility checks
export    prompts out: PEFT adapter folders, the original .npy format, safetensors
"""

from jaxprompt.errors import PromptError
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptedModel, SoftPrompt, prompt_bank

__all__ = ["PromptError", "PromptParam", "PromptedModel", "SoftPrompt", "prompt_bank"]
