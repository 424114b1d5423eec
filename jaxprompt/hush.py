"""Import-time noise of third-party packages, quieted before anything imports them (the package root imports this
module first).

transformers (imported for tokenizers and model configs) announces on import that PyTorch was not found; the core
install never needs PyTorch, so that one line is dropped. Everything else transformers logs stays.
"""

from __future__ import annotations

import logging


def _not_the_pytorch_banner(record: logging.LogRecord) -> bool:
  return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_not_the_pytorch_banner)
