"""Tasks: how a dataset row becomes a text-to-text example, and how predictions are scored.

A `Task` is a name, where its data lives by default (TFDS / HF names), a formatter (row -> examples),
the label strings of a classification task (None for generative tasks), metric names (see
`jaxprompt.metrics.classification_metrics`) and split names.

Built-in tasks reproduce T5's text formats exactly (see `t5_formats`):

  SuperGLUE  boolq cb copa multirc record rte wic wsc   TFDS super_glue/<name> (wsc: super_glue/wsc.fixed)
  GLUE       cola sst2 mrpc qqp stsb mnli qnli rte      TFDS glue/<name>

Names: "super_glue/rte" or "glue/rte", or a bare name. Bare "rte" is SuperGLUE RTE (the paper's task);
GLUE's is "glue/rte". `get_task(name, taskless=True)` is the paper's "taskless" variant: T5's text with
its leading task name removed ("rte hypothesis: ..." -> "hypothesis: ..."), as prompt-tuning does it.

Custom tasks (`custom_task`) fill a `str.format` template from file columns.

Every example is {"inputs": str, "targets": str}, plus "fields" (the row's named texts, `Task.fields`, on tasks that
have them: what a prompt template places), plus "label" (index into the label strings, -1 for an
unlabeled row) on classification tasks, plus task extras: "group" (MultiRC question, ReCoRD query) and
"answers" (ReCoRD), "referent_correct" (WSC).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import string
from typing import Any, Callable, Mapping, Sequence

from jaxprompt import metrics as M
from jaxprompt.data import rows as R
from jaxprompt.data import superglue_raw
from jaxprompt.data import t5_formats as T5
from jaxprompt.errors import DataError

Row = Mapping[str, Any]
Formatter = Callable[[Row, str], list[dict]]  # (row, split) -> examples


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  format: Formatter
  labels: tuple[str, ...] | None  # None: a generative task
  metrics: tuple[str, ...]
  splits: tuple[str, ...] = ()  # as TFDS names them; () = whatever splits the files provide
  split_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # mnli: validation -> ..._matched
  tfds_name: str | None = None
  hf_name: tuple[str, str] | None = None  # (path, config) for datasets.load_dataset
  line_fields: tuple[str, str] | None = None  # columns that a "LABEL text" line of a .txt file fills
  taskless: bool = False
  generate_rows: Callable[[str], list[Row]] | None = None  # a task that makes its own rows (split -> rows)
  per_token: bool = False  # a tag per word (examples carry "words" and "tags"): token classification (head.type)
  # the named fields every example carries as ex["fields"] (what a prompt template places, `data.templates`)
  fields: tuple[str, ...] = ()
  # the row fields its input text is made of, in order (what a served request gives; one: a plain string fills it);
  # () for tasks whose rows are nested (MultiRC, ReCoRD, WSC): a request gives a whole row
  input_fields: tuple[str, ...] = ()

  def resolve_split(self, split: str) -> str:
    split = self.split_aliases.get(split, split)
    if self.splits and split not in self.splits:
      raise DataError(f"task {self.name}: no split {split!r}; it has {', '.join(self.splits)}")
    return split

  def examples(self, row: Row, split: str) -> list[dict]:
    """The examples of one row; raises `rows.RowError` naming the bad field."""
    out = self.format(row, split)
    for ex in out:
      if self.taskless:
        ex["inputs"] = T5.remove_first_text_token(ex["inputs"])
      if self.labels is not None and not self.per_token:
        ex["label"] = self.labels.index(ex["targets"]) if ex["targets"] in self.labels else -1
    return out


# -- built-in tasks ----------------------------------------------------------------------------------

_SPLITS = ("train", "validation", "test")
_FALSE_TRUE = ("False", "True")


def _glue_task(
  name: str,
  tfds_name: str,
  hf_name: tuple[str, str],
  features: Sequence[str],
  labels: Sequence[str],
  metrics: Sequence[str],
  *,
  sort: bool = True,
  **kw,
) -> Task:
  # T5 sorts the feature names unless glue_utils fixes an order (MultiRC, WiC).
  features = tuple(sorted(features)) if sort else tuple(features)
  benchmark = tfds_name.split("/")[1]
  fmt = functools.partial(T5.glue, benchmark=benchmark, features=features, labels=tuple(labels))
  kw.setdefault("splits", _SPLITS)
  return Task(
    name,
    fmt,
    tuple(labels),
    tuple(metrics),
    tfds_name=tfds_name,
    hf_name=hf_name,
    fields=features,
    input_fields=features,
    **kw,
  )


def _expanding(expand: Callable[[Row], list[Row]], fmt: Formatter) -> Formatter:
  def format_rows(row: Row, split: str) -> list[dict]:
    return [ex for r in expand(row) for ex in fmt(r, split)]

  return format_rows


_SG, _GLUE = "aps/super_glue", "nyu-mll/glue"  # their HF datasets ids
_BUILTIN_TASKS = (
  _glue_task(
    "super_glue/boolq", "super_glue/boolq", (_SG, "boolq"), ["question", "passage"], _FALSE_TRUE, ["accuracy"]
  ),
  _glue_task(
    "super_glue/cb",
    "super_glue/cb",
    (_SG, "cb"),
    ["premise", "hypothesis"],
    ["entailment", "contradiction", "neutral"],
    ["macro_f1", "accuracy"],
  ),
  _glue_task(
    "super_glue/copa",
    "super_glue/copa",
    (_SG, "copa"),
    ["premise", "choice1", "choice2", "question"],
    ["choice1", "choice2"],
    ["accuracy"],
  ),
  Task(
    "super_glue/multirc",
    _expanding(superglue_raw.multirc, functools.partial(T5.multirc, labels=_FALSE_TRUE)),
    _FALSE_TRUE,
    ("f1", "group_exact_match"),
    _SPLITS,
    tfds_name="super_glue/multirc",
    hf_name=(_SG, "multirc"),
  ),
  Task(
    "super_glue/record",
    _expanding(superglue_raw.record, T5.record),
    None,
    ("exact_match", "token_f1"),
    _SPLITS,
    tfds_name="super_glue/record",
    hf_name=(_SG, "record"),
  ),
  _glue_task(
    "super_glue/rte",
    "super_glue/rte",
    (_SG, "rte"),
    ["premise", "hypothesis"],
    ["entailment", "not_entailment"],
    ["accuracy"],
  ),
  _glue_task(
    "super_glue/wic",
    "super_glue/wic",
    (_SG, "wic"),
    ["sentence1", "sentence2", "word"],
    _FALSE_TRUE,
    ["accuracy"],
    sort=False,
  ),
  Task(
    "super_glue/wsc",
    _expanding(superglue_raw.wsc, T5.wsc_simple),
    None,
    ("wsc_accuracy",),
    _SPLITS,
    tfds_name="super_glue/wsc.fixed",
    hf_name=(_SG, "wsc.fixed"),
  ),
  _glue_task(
    "glue/cola",
    "glue/cola",
    (_GLUE, "cola"),
    ["sentence"],
    ["unacceptable", "acceptable"],
    ["matthews"],
    line_fields=("label", "sentence"),
  ),
  _glue_task(
    "glue/sst2",
    "glue/sst2",
    (_GLUE, "sst2"),
    ["sentence"],
    ["negative", "positive"],
    ["accuracy"],
    line_fields=("label", "sentence"),
  ),
  _glue_task(
    "glue/mrpc",
    "glue/mrpc",
    (_GLUE, "mrpc"),
    ["sentence1", "sentence2"],
    ["not_equivalent", "equivalent"],
    ["f1", "accuracy"],
  ),
  _glue_task(
    "glue/qqp",
    "glue/qqp",
    (_GLUE, "qqp"),
    ["question1", "question2"],
    ["not_duplicate", "duplicate"],
    ["f1", "accuracy"],
  ),
  Task(
    "glue/stsb",
    T5.stsb,
    T5.STSB_LABELS,
    ("pearson", "spearman"),
    _SPLITS,
    tfds_name="glue/stsb",
    hf_name=(_GLUE, "stsb"),
    fields=("sentence1", "sentence2"),
    input_fields=("sentence1", "sentence2"),
  ),
  _glue_task(
    "glue/mnli",
    "glue/mnli",
    (_GLUE, "mnli"),
    ["premise", "hypothesis"],
    ["entailment", "neutral", "contradiction"],
    ["accuracy"],
    splits=("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
    split_aliases={"validation": "validation_matched", "test": "test_matched"},
  ),
  _glue_task(
    "glue/qnli", "glue/qnli", (_GLUE, "qnli"), ["question", "sentence"], ["entailment", "not_entailment"], ["accuracy"]
  ),
  _glue_task(
    "glue/rte", "glue/rte", (_GLUE, "rte"), ["sentence1", "sentence2"], ["entailment", "not_entailment"], ["accuracy"]
  ),
)


# -- token classification (CoNLL files) and TREC -------------------------------------------------------------------

# WNUT-17 (Derczynski et al. 2017; CC-BY-4.0): 6 entity types in IOB2, the tag order of HF's `wnut_17` ner_tags
WNUT17_TAGS = (
  "O",
  *(f"{p}-{t}" for t in ("corporation", "creative-work", "group", "location", "person", "product") for p in "BI"),
)


def _tagged(row: Row, split: str, *, labels: tuple[str, ...]) -> list[dict]:
  """A sentence {"tokens", "ner_tags" (tag strings, or ids into `labels`)} -> one example: "words", "tags" (ids),
  and the text forms "inputs" (the words) / "targets" (the tags) for the language-model head and reports."""
  words, raw = R.texts(row, "tokens"), R.value(row, "ner_tags")
  if not isinstance(raw, (list, tuple)) or len(raw) != len(words):
    raise R.RowError("ner_tags", f"needs one tag per token ({len(words)} tokens)")
  ids = [labels.index(t) if t in labels else t for t in raw]  # tag strings, or ids already (HF datasets)
  bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < len(labels)]
  if bad:
    raise R.RowError("ner_tags", f"unknown tags {[str(t) for t in bad][:5]}; tags: {', '.join(labels)}")
  tags = [labels[i] for i in ids]
  return [{"inputs": " ".join(words), "targets": " ".join(tags), "words": list(words), "tags": ids}]


TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")  # the 6 coarse classes


def _trec(row: Row, split: str) -> list[dict]:
  """ "COARSE:fine question" (Li & Roth's files) -> the question, its coarse class as the target."""
  label = R.text(row, "label").split(":", 1)[0]
  if label not in TREC_LABELS:
    raise R.RowError("label", f"{label!r} is not a TREC coarse class ({', '.join(TREC_LABELS)})")
  return [{"inputs": R.text(row, "text"), "targets": label}]


_BUILTIN_TASKS += (
  Task(
    "wnut17",
    functools.partial(_tagged, labels=WNUT17_TAGS),
    WNUT17_TAGS,
    ("entity_f1", "entity_precision", "entity_recall", "tag_accuracy"),
    hf_name=("leondz/wnut_17", "wnut_17"),
    per_token=True,
  ),
  Task("trec", _trec, TREC_LABELS, ("accuracy", "macro_f1"), line_fields=("label", "text")),
)

BUILTIN: dict[str, Task] = {t.name: t for t in _BUILTIN_TASKS}
# Bare names; "rte" is SuperGLUE's (the paper's), GLUE's RTE needs "glue/rte".
ALIASES: dict[str, str] = {
  **{n.split("/")[1]: n for n in BUILTIN if n.startswith("glue/")},
  **{n.split("/")[1]: n for n in BUILTIN if n.startswith("super_glue/")},
  "super_glue/wsc.fixed": "super_glue/wsc",
  "wsc.fixed": "super_glue/wsc",
}


def register(task: Task) -> None:
  """Make a task available by name (e.g. the quickstart's digit tasks, registered when they are imported)."""
  BUILTIN[task.name] = task


def register_alias(alias: str, name: str) -> None:
  ALIASES[alias] = name


def task_names() -> list[str]:
  return sorted(BUILTIN) + sorted(ALIASES)


def get_task(name: str, *, taskless: bool = False) -> Task:
  """A built-in task by name ("rte", "super_glue/rte", "glue/rte", ...); `taskless` drops the task name."""
  key = ALIASES.get(name, name)
  if key not in BUILTIN:
    close = difflib.get_close_matches(name, task_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(
      f"unknown task {name!r}{hint}; built-in tasks: {', '.join(sorted(ALIASES))}; "
      "or describe a custom one (data.custom)"
    )
  task = BUILTIN[key]
  return dataclasses.replace(task, taskless=True) if taskless else task


# -- custom tasks ------------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
  fields = []
  for _, field, spec, conv in string.Formatter().parse(template):
    if field is None:
      continue
    if not field.isidentifier() or spec or conv:
      raise DataError(f"template {template!r}: fields must be plain names like {{text}}, got {{{field}}}")
    fields.append(field)
  return fields


def _format_custom(
  row: Row,
  split: str,
  *,
  template: str,
  columns: Mapping[str, str],
  labels: tuple[str, ...] | None,
  label_column: str,
  label_map: Mapping[str, str],
) -> list[dict]:
  values = {f: R.text(row, col) for f, col in columns.items()}
  inputs = template.format_map(values)
  if labels is None:
    return [{"inputs": inputs, "targets": R.text(row, label_column), "fields": values}]
  return [{"inputs": inputs, "targets": R.label_string(row, labels, label_column, label_map), "fields": values}]


def custom_task(
  name: str,
  *,
  template: str,
  columns: Mapping[str, str] | None = None,
  labels: Sequence[str] | None = None,
  label_column: str = "label",
  label_map: Mapping[str, str] | None = None,
  metrics: Sequence[str] | None = None,
) -> Task:
  """A task read from local files: `template` ("classify: {text}") filled from the row's columns.

  columns: template field -> file column (a field not listed reads the column of its own name).
  labels: the label strings (file labels may be these strings or indices into them; see `rows`);
    None or empty: a generative task whose target text is the `label_column` column.
  label_map: raw file label -> label string, applied first (e.g. TREC "DESC:manner" -> "description"); a key
    ending in "*" maps every raw label starting with what comes before it ("DESC:*"), a key "re:PATTERN" every raw
    label the regular expression matches in full ("re:DESC:.*"); exact keys first, then the others in order.
  A .txt file's "LABEL text" lines fill the columns `label_column` and "text".
  """
  fields = template_fields(template)
  if not fields:
    raise DataError(f"custom task {name!r}: template {template!r} uses no column (write e.g. {{text}})")
  columns = dict(columns or {})
  unused = sorted(set(columns) - set(fields))
  if unused:
    raise DataError(f"custom task {name!r}: columns {unused} are not fields of the template {template!r}")
  columns = {f: columns.get(f, f) for f in fields}
  labels = tuple(labels) if labels else None
  if labels is not None and len(set(labels)) != len(labels):
    raise DataError(f"custom task {name!r}: duplicate label strings in {list(labels)}")
  label_map = dict(label_map or {})
  R.check_label_map(label_map, f"custom task {name!r}: label_map")
  if labels is not None:
    bad = sorted({v for v in label_map.values() if v not in labels})
    if bad:
      raise DataError(f"custom task {name!r}: label_map values {bad} are not labels ({', '.join(labels)})")
  known = M.CLASSIFICATION if labels else M.GENERATION
  if metrics is None:
    metrics = ("accuracy",) if labels else ("exact_match", "token_f1")
  bad = [m for m in metrics if m not in known]
  if bad:
    kind = "classification" if labels else "generative"
    raise DataError(f"custom task {name!r}: metrics {bad} do not fit a {kind} task; use {', '.join(known)}")
  fmt = functools.partial(
    _format_custom, template=template, columns=columns, labels=labels, label_column=label_column, label_map=label_map
  )
  row_fields = tuple(dict.fromkeys(columns[f] for f in fields))
  return Task(
    name, fmt, labels, tuple(metrics), line_fields=(label_column, "text"), fields=tuple(fields), input_fields=row_fields
  )
