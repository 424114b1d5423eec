"""A trained prompt's input format: how its task turned a row's fields into the model's input text (a T5 task's
prefix and field layout, taskless or not; a custom task's template), recorded with the prompt (`PromptRecord`,
`TaskRecord.input`) so that `generate`, `load_prompted` and `serve` give a prompt the text it was trained on.

A request gives the task's fields: a plain string fills a task's single text field (sst2's sentence, a custom
template's one column, the quickstart's digits), a mapping gives fields by name (rte's premise and hypothesis).
Raw mode (`--raw`, `"raw": true`) sends the text as it is, as records written before the format was kept are.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from jaxprompt.data import rows as R
from jaxprompt.data.tasks import Task, custom_task, get_task
from jaxprompt.errors import DataError

_CUSTOM_KEYS = ("template", "columns", "labels", "label_column", "label_map", "metrics")


@dataclasses.dataclass(frozen=True)
class InputFormat:
  """A task's input format: a built-in task's name (and `taskless`), or a custom task's section (`data.custom`:
  template, columns, labels, label_column, label_map, metrics) as its config gives it."""

  task: str
  taskless: bool = False
  custom: tuple[tuple[str, Any], ...] | None = None  # data.custom's items (frozen: a tuple of pairs)

  @classmethod
  def of(cls, task: str, taskless: bool, custom: Mapping | None) -> "InputFormat":
    items = None if custom is None else tuple((k, custom[k]) for k in _CUSTOM_KEYS if k in custom)
    return cls(task, bool(taskless), _frozen(items))

  def to_json(self) -> dict:
    out: dict = dict(task=self.task, taskless=self.taskless)
    if self.custom is not None:
      out["custom"] = {k: _thawed(k, v) for k, v in self.custom}
    return out

  @classmethod
  def from_json(cls, d: Mapping) -> "InputFormat":
    return cls.of(d["task"], bool(d.get("taskless")), d.get("custom"))

  def task_object(self) -> Task:
    """The task that formats requests (built once per format)."""
    return _task(self)

  @property
  def fields(self) -> tuple[str, ...]:
    return self.task_object().input_fields

  def apply(self, value: str | Mapping[str, Any]) -> str:
    """The model's input text for a request's `value` (a plain string: the task's single text field; a mapping: the
    fields by name). DataError naming the field when the value does not fit the task."""
    task = self.task_object()
    if isinstance(value, str):
      if len(task.input_fields) != 1:
        takes = f"fields {', '.join(task.input_fields)}" if task.input_fields else "a whole row"
        raise DataError(f"task {task.name} takes {takes}: give a JSON object of them (or send raw text in raw mode)")
      row: dict = {task.input_fields[0]: value}
    elif isinstance(value, Mapping):
      row = dict(value)
    else:
      raise DataError(f"expected text or an object of fields, got {type(value).__name__}")
    label = task.line_fields[0] if task.line_fields else "label"
    row.setdefault(label, -1)  # no label: the formatters' "unlabelled row"
    try:
      examples = task.examples(row, "test")
    except R.RowError as e:
      raise DataError(f"task {task.name}: {e}") from None
    if len(examples) != 1:
      raise DataError(f"task {task.name}: this row makes {len(examples)} examples; send one input (or raw text)")
    return examples[0]["inputs"]


def _frozen(v):
  if isinstance(v, Mapping):
    return tuple((k, _frozen(x)) for k, x in v.items())
  if isinstance(v, (list, tuple)):
    return tuple(_frozen(x) for x in v)
  return v


def _thawed(key: str, v):
  if key in ("columns", "label_map"):
    return {k: x for k, x in v}
  return list(v) if isinstance(v, tuple) else v


@functools.lru_cache(maxsize=64)
def _task(fmt: InputFormat) -> Task:
  if fmt.custom is None:
    return get_task(fmt.task, taskless=fmt.taskless)
  c = {k: _thawed(k, v) for k, v in fmt.custom}
  return custom_task(
    fmt.task,
    template=c.get("template", "{text}"),
    columns=c.get("columns"),
    labels=c.get("labels"),
    label_column=c.get("label_column", "label"),
    label_map=c.get("label_map"),
    metrics=c.get("metrics"),
  )


def apply(fmt: InputFormat | None, value: str | Mapping[str, Any], *, raw: bool = False) -> str:
  """`value` in `fmt` (None: a prompt without a recorded format, or raw mode: the text as given)."""
  if fmt is None or raw:
    if not isinstance(value, str):
      raise DataError(
        "an object of fields needs a prompt with a template (prompt.template) or one that records its task's input "
        "format (not raw mode)"
      )
    return value
  return fmt.apply(value)
