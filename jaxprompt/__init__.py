"""jaxprompt: prompt tuning (Lester et al. 2021) for frozen language models in JAX / Flax NNX."""

__version__ = "0.1.0"

from jaxprompt.models import load_model, load_tokenizer, save_pretrained  # noqa: E402

__all__ = ["__version__", "load_model", "load_tokenizer", "save_pretrained"]
