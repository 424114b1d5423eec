"""Writing outputs atomically: everything goes to a temporary path beside the target and is renamed into
place, so an interrupted write never leaves a half-written checkpoint, export or model folder, and an existing
output is replaced only when asked to."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from jaxprompt.errors import OutputExistsError, WriteError


def apply_umask(path: Path) -> None:
  """mkstemp/mkdtemp create 0600/0700 entries; give them the permissions a plain open()/mkdir() would."""
  mask = os.umask(0)
  os.umask(mask)
  for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
    if not p.is_symlink():
      os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _reraise(e: BaseException, target: Path, error: type[WriteError] = WriteError):
  """An OS error while writing is the user's to fix (disk space, permissions): one line naming the output."""
  if isinstance(e, OSError) and not isinstance(e, WriteError):
    raise error(f"cannot write {target}: {e.strerror or e}") from e
  raise e


def _check_target(target: Path, overwrite: bool, error: type[WriteError] = WriteError) -> None:
  if target.exists() and not overwrite:
    raise OutputExistsError(f"{target} already exists (use --overwrite to replace it)")
  blocker = next((p for p in target.parents if p.exists()), None)
  if blocker is not None and not blocker.is_dir():
    raise error(f"cannot write {target}: {blocker} is a file, not a folder")
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    _reraise(e, target, error)


def write_folder_atomically(
  target: str | os.PathLike,
  write: Callable[[Path], None],
  *,
  overwrite: bool = False,
  error: type[WriteError] = WriteError,
) -> Path:
  """Run `write(tmpdir)`, then rename tmpdir to `target`. A crash leaves no half-written `target`. An OS error
  (a full disk, no permission, a file where a folder should be) raises `error` naming `target`."""
  target = Path(target)
  _check_target(target, overwrite, error)
  try:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  except OSError as e:
    _reraise(e, target, error)
  try:
    write(tmp)
    apply_umask(tmp)
    if target.exists():
      old = target.with_name(f".{target.name}.old-{os.getpid()}")
      os.rename(target, old)
      os.rename(tmp, target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    _reraise(e, target, error)
  return target


def write_file_atomically(
  target: str | os.PathLike,
  write: Callable[[Path], None],
  *,
  overwrite: bool = False,
  error: type[WriteError] = WriteError,
) -> Path:
  """Run `write(tmpfile)`, then rename it to `target` (errors as `write_folder_atomically`)."""
  target = Path(target)
  _check_target(target, overwrite, error)
  try:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
  except OSError as e:
    _reraise(e, target, error)
  os.close(fd)
  try:
    write(Path(tmp))
    apply_umask(Path(tmp))
    os.replace(tmp, target)
  except BaseException as e:
    Path(tmp).unlink(missing_ok=True)
    _reraise(e, target, error)
  return target
