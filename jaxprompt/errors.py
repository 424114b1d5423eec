"""The user-error types. A `UserError` is a problem with what the user gave (a config, a file, a flag, data):
the CLI prints its message as one line and exits 2. Every other exception is a bug and shows its traceback.

Each type also derives from the built-in exception a Python caller would expect (ValueError, FileNotFoundError,
...), so `except ValueError` keeps working around the public API.
"""

from __future__ import annotations


class UserError(Exception):
  """Bad input from the user; shown as one line (exit code 2)."""


class ConfigError(UserError, ValueError):
  """A config file or override is invalid, or does not fit the task, the model or the mesh."""


class DataError(UserError, ValueError):
  """Data that cannot be used: an empty dataset, a missing field, a batch larger than the data..."""


class ModelError(UserError, ValueError):
  """A base model that jaxprompt cannot build: an unsupported architecture or config value."""


class WeightError(ModelError):
  """A checkpoint does not match the model: a missing, unexpected or misshaped tensor."""


class PromptError(UserError, ValueError):
  """A prompt file, adapter or initialiser does not fit the model."""


class CheckpointError(UserError, ValueError):
  """A workdir's checkpoints are missing, incomplete or belong to another base model."""


class ExportError(UserError, ValueError):
  """A prompt cannot be exported in the asked-for format."""


class UsageError(UserError, ValueError):
  """Arguments that do not go together (command-line flags, generation options)."""


class NonFiniteError(UserError, RuntimeError):
  """Training produced a NaN/Inf loss, gradient or update."""


class MissingPathError(UserError, FileNotFoundError):
  """A file or folder the user named does not exist (or is the wrong kind of thing)."""


class OutputExistsError(UserError, FileExistsError):
  """An output would replace something already written (pass overwrite)."""


class WorkdirError(UserError, OSError):
  """A workdir that cannot be created or written."""


class WriteError(UserError, OSError):
  """An output could not be written (a full disk, a read-only folder); nothing half-written is left behind."""


class ExportWriteError(WriteError, ExportError):
  """An export could not be written where --out says (a file in the way, no permission, a full disk)."""
