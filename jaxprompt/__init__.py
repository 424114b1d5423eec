"""jaxprompt: prompt tuning (Lester et al. 2021) for frozen language models in JAX / Flax NNX.

Generation lives in `jaxprompt.generate.generate` (the submodule keeps its name).
"""

__version__ = "0.1.0"

from jaxprompt.models import load_model, load_tokenizer, save_pretrained  # noqa: E402
from jaxprompt.prompts import PromptedModel, PromptParam, SoftPrompt, prompt_bank  # noqa: E402

__all__ = ["__version__", "load_model", "load_tokenizer", "save_pretrained", "PromptedModel",
           "PromptParam", "SoftPrompt", "prompt_bank"]
