"""jaxprompt: prompt tuning (Lester et al. 2021) for frozen language models in JAX / Flax NNX.

The public API: training and evaluating (`train`, `evaluate`, `load_config`: the CLI's commands as functions),
loading base models (`load_model`, `load_tokenizer`, `save_pretrained`), a base model with a
trained prompt of any method (`load_prompted`: PEFT adapters, jaxprompt workdirs and exports), the prompt types
(`PromptParam`, `SoftPrompt`, `PromptedModel`, `prompt_bank`), generation (`jaxprompt.inference.generate`),
and `UserError`, the base of every error that reports bad input.
"""

from jaxprompt import hush as _hush  # noqa: F401 — first: quiets third-party import banners
from jaxprompt import quickstart as _quickstart  # noqa: F401 — registers builtin:quickstart and its tasks
from jaxprompt.api import EvalResult, TrainResult, evaluate, evaluate_ensemble, load_config, train
from jaxprompt.errors import UserError
from jaxprompt.models import load_model, load_tokenizer, save_pretrained
from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt, prompt_bank
from jaxprompt.prompts.methods import load_prompted
from jaxprompt.version import __version__

__all__ = [
  "__version__",
  "UserError",
  "train",
  "evaluate",
  "evaluate_ensemble",
  "load_config",
  "TrainResult",
  "EvalResult",
  "load_model",
  "load_tokenizer",
  "load_prompted",
  "save_pretrained",
  "PromptedModel",
  "PromptParam",
  "SoftPrompt",
  "prompt_bank",
]
