"""Where a task's rows come from: local files, TFDS, or HF `datasets` -> text-to-text examples.

`load_split` picks, in this order: a local file for the split (`files`), HF `datasets` when asked
(`hf_datasets=True`), else TFDS. TFDS and `datasets` are imported only on their paths, so TensorFlow is
needed only for the `tfds` extra. Every path keeps the source's order (TFDS with shuffle_files=False),
so the same data always gives the same list.

For built-in tasks, local files carry the TFDS feature names (e.g. premise / hypothesis / label / idx for
RTE); labels may be label strings or indices (see `rows`); the original SuperGLUE jsonl layout of
MultiRC, ReCoRD and WSC is flattened as TFDS does. .txt "LABEL text" files fit sst2, cola and custom tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from jaxprompt.data import readers
from jaxprompt.data.rows import RowError
from jaxprompt.data.tasks import Task, custom_task, get_task
from jaxprompt.errors import DataError

log = logging.getLogger(__name__)


def load_split(
  task: Task | str,
  split: str,
  *,
  files: Mapping[str, str | os.PathLike] | None = None,
  tfds_data_dir: str | os.PathLike | None = None,
  hf_datasets: bool = False,
) -> list[dict]:
  """The examples of one split: {"inputs", "targets"} (+ "label" index on classification tasks)."""
  task = get_task(task) if isinstance(task, str) else task
  if files:
    if split not in files:
      raise DataError(f"task {task.name}: no file for split {split!r} (data.files has {', '.join(sorted(files))})")
    source = f"file {files[split]}"
    rows = readers.read_rows(files[split], line_fields=task.line_fields)
  elif task.generate_rows is not None:
    split = task.resolve_split(split)
    source = f"built-in task {task.name}[{split}]"
    rows = [(f"{source} row {i}", r) for i, r in enumerate(task.generate_rows(split))]
  elif task.tfds_name is None and task.hf_name is None:
    raise DataError(f"task {task.name}: a custom task reads local files only; set data.files.{split}")
  elif hf_datasets:
    split = task.resolve_split(split)
    source = f"HF datasets {'/'.join(task.hf_name)}[{split}]"
    rows = _hf_rows(task, split)
  else:
    split = task.resolve_split(split)
    source = f"TFDS {task.tfds_name}[{split}]"
    rows = _tfds_rows(task, split, tfds_data_dir)
  examples = _format(task, rows, split)
  if not examples:
    raise DataError(f"task {task.name}: {source} has no examples")
  log.info("task %s split %s: %d examples from %s", task.name, split, len(examples), source)
  return examples


def _format(task: Task, rows: Iterable[tuple[str, Mapping[str, Any]]], split: str) -> list[dict]:
  out = []
  for where, row in rows:
    try:
      out.extend(task.examples(row, split))
    except RowError as e:
      raise DataError(f"{where}: {e} (task {task.name})") from None
  return out


# -- TFDS ----------------------------------------------------------------------------------------------


def _tfds_rows(task: Task, split: str, data_dir) -> list[tuple[str, dict]]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(
      f"task {task.name}: reading TFDS needs tensorflow-datasets (pip install 'jaxprompt[tfds]'), "
      f"or give a local file as data.files.{split}"
    ) from None
  _hide_accelerators_from_tf()
  try:
    # download=True only downloads what `data_dir` lacks: prepared data there is read offline.
    ds = tfds.load(
      task.tfds_name,
      split=split,
      data_dir=None if data_dir is None else str(data_dir),
      shuffle_files=False,
      download=True,
    )
  except Exception as e:  # TFDS raises many types (missing data, no network, bad split): name the source
    where = f" in {data_dir}" if data_dir else ""
    raise DataError(f"task {task.name}: TFDS {task.tfds_name}[{split}]{where}: {type(e).__name__}: {e}") from e
  return [(f"TFDS {task.tfds_name}[{split}] example {i}", _to_python(ex)) for i, ex in enumerate(tfds.as_numpy(ds))]


def _hide_accelerators_from_tf() -> None:
  # TF would otherwise reserve GPU memory that JAX needs.
  import tensorflow as tf

  with contextlib.suppress(RuntimeError):  # TF already initialised its devices; nothing to change any more
    tf.config.set_visible_devices([], "GPU")


def _to_python(v: Any) -> Any:
  """numpy / bytes values from tfds.as_numpy -> str, int, float, list, dict."""
  import numpy as np

  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, Mapping):
    return {k: _to_python(x) for k, x in v.items()}
  if isinstance(v, np.ndarray):
    return _to_python(v.item()) if v.ndim == 0 else [_to_python(x) for x in v.tolist()]
  if isinstance(v, np.generic):
    return v.item()
  return v


# -- HF datasets ---------------------------------------------------------------------------------------


def _hf_rows(task: Task, split: str) -> list[tuple[str, dict]]:
  try:
    import datasets
  except ImportError:
    raise DataError(
      f"task {task.name}: hf_datasets needs the `datasets` package (pip install datasets), "
      f"or give a local file as data.files.{split}"
    ) from None
  path, config = task.hf_name
  try:
    ds = datasets.load_dataset(path, config, split=split)
  except Exception as e:  # hub, cache and split errors alike: name the source
    raise DataError(f"task {task.name}: HF datasets {path}/{config}[{split}]: {type(e).__name__}: {e}") from e
  return [(f"HF {path}/{config}[{split}] row {i}", dict(row)) for i, row in enumerate(ds)]


# -- the config's data section ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitData:
  examples: list[dict]
  labels: tuple[str, ...] | None
  task: Task


def task_from_config(dcfg) -> Task:
  """data.task (+ data.taskless), or data.custom when given."""
  if dcfg.custom is None:
    return get_task(dcfg.task, taskless=dcfg.taskless)
  if dcfg.taskless:
    raise DataError("data.taskless applies to built-in T5 tasks; a custom task's text is its data.custom.template")
  c = dcfg.custom
  return custom_task(
    dcfg.task,
    template=c.template,
    columns=c.columns,
    labels=c.labels,
    label_column=c.label_column,
    label_map=c.label_map or None,
    metrics=c.metrics,
  )


def task_examples(dcfg, split: str) -> SplitData:
  """One split of the task a `config.DataConfig` describes."""
  task = task_from_config(dcfg)
  files = {k: Path(v) for k, v in dcfg.files.items()}
  return SplitData(
    load_split(task, split, files=files, tfds_data_dir=dcfg.tfds_data_dir, hf_datasets=dcfg.hf_datasets),
    task.labels,
    task,
  )
