"""A `Run`: everything training and evaluation need, built once from a Config and checked up front.

    config ─► mesh ─► frozen base (straight into its shards) + tokenizer ─► task(s) ─► initial prompt (or bank)
           ─► PromptedModel split by type: graphdef, prompt (PromptParam values), frozen (the rest)

`validate` checks the whole config against the task and the mesh before anything is trained, so a typo in
`eval.metric` or a batch that does not split over the devices fails at once, not at the first eval.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprompt import config as C
from jaxprompt import metrics as M
from jaxprompt import sharding as shd
from jaxprompt.data import encoding, sources
from jaxprompt.data.input_format import InputFormat
from jaxprompt.data.tasks import Task
from jaxprompt.data.templates import Template
from jaxprompt.errors import ConfigError, DataError
from jaxprompt.models import hf
from jaxprompt.models.interface import require_lm_head
from jaxprompt.models.loading import architecture_summary, load_model, load_tokenizer
from jaxprompt.prompts import PromptedModel, PromptParam, heads, methods, registry
from jaxprompt.prompts.record import TaskMember, TaskRecord
from jaxprompt.prompts.spec import PromptSpec

log = logging.getLogger(__name__)

LOSS_METRICS = ("eval_loss", "eval_seq_accuracy")  # every eval mode computes these


def load_base(mcfg: C.ModelConfig, mesh=None, *, lm_head: bool = True):
  """(frozen base model, tokenizer) as the model section says; `lm_head`: the run scores text targets (no
  classification head), which a model without a language-model head (an encoder) refuses."""
  base = load_model(
    mcfg.path,
    dtype=jnp.dtype(mcfg.dtype),
    mesh=mesh,
    compute_dtype=jnp.dtype(mcfg.compute_dtype),
    remat=mcfg.remat,
    layer_loop=mcfg.layer_loop,
    attention=mcfg.attention,
    dropout=mcfg.dropout,
    revision=mcfg.revision,
    allow_pytorch_bin=mcfg.allow_pytorch_bin,
  )
  if lm_head:
    require_lm_head(base, "training and evaluation on text targets")
  tok_path = mcfg.tokenizer or mcfg.path
  tokenizer = load_tokenizer(tok_path)
  if len(tokenizer) > base.config.vocab_size:
    raise DataError(
      f"tokenizer {tok_path!r} has {len(tokenizer)} tokens but the model's vocabulary "
      f"has {base.config.vocab_size} rows: they do not belong together"
    )
  return base, tokenizer


def mesh_from_config(mc: C.MeshConfig):
  """The configured mesh; a mesh smaller than the machine (single process) uses its first devices."""
  sizes = (mc.data, mc.fsdp, mc.model)
  n = jax.device_count()
  try:
    if -1 not in sizes and math.prod(sizes) < n and jax.process_count() == 1:
      log.warning("mesh data=%d x fsdp=%d x model=%d uses %d of the %d devices", *sizes, math.prod(sizes), n)
      return shd.make_mesh(*sizes, devices=jax.devices()[: math.prod(sizes)])
    return shd.make_mesh(*sizes)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None


# a split's examples and its task (`data.sources`), under the names training uses
TaskData = sources.SplitData
task_data = sources.task_examples


@dataclasses.dataclass(frozen=True)
class Member:
  """One task of a run: a single-task run has one, a `data.mixture` one per entry. `data` is its own single-task
  data section (where its splits come from); `rate` its mixing rate (None: examples-proportional)."""

  name: str
  task: Task
  data: C.DataConfig
  rate: float | None = None

  @property
  def labels(self) -> tuple[str, ...] | None:
    return self.task.labels

  @property
  def input_format(self) -> InputFormat:
    """How this task makes input text (recorded with the prompt: serving and generation apply it)."""
    custom = dataclasses.asdict(self.data.custom) if self.data.custom is not None else None
    return InputFormat.of(self.data.task, self.data.taskless, custom)


def members_of(dcfg: C.DataConfig) -> tuple[Member, ...]:
  """The tasks a data section trains on, in order (a mixture's member i is prompt i of a per-task bank)."""
  rates = [m.rate for m in dcfg.mixture] or [None]
  return tuple(
    Member(name, sources.task_from_config(d), d, rate)
    for name, d, rate in zip(dcfg.member_names(), dcfg.members(), rates, strict=False)
  )


def union_labels(members) -> tuple[str, ...] | None:
  """Every member's label strings, in order, each once (None when no member has labels)."""
  out = tuple(dict.fromkeys(lab for m in members for lab in (m.labels or ())))
  return out or None


def available_metrics(task: Task, mode: str, head: str = "lm") -> tuple[str, ...]:
  """The metric names an evaluation in `mode` (or of a classification head, `head.type`) computes for `task`."""
  if head != "lm":
    if task.per_token:
      return LOSS_METRICS + M.ENTITY
    return LOSS_METRICS + tuple(
      dict.fromkeys(M.SEQUENCE_HEAD + tuple(m for m in task.metrics if m in M.CLASSIFICATION))
    )
  if mode == "loss":
    return LOSS_METRICS
  known = M.CLASSIFICATION if task.labels else M.GENERATION
  return LOSS_METRICS + tuple(m for m in task.metrics if m in known)


def mixture_metrics(members, mode: str, head: str = "lm") -> tuple[str, ...]:
  """What evaluating several tasks reports: each member's metrics as NAME/metric, and the metrics every member
  computes, averaged over the members, under their plain names."""
  each = [available_metrics(m.task, mode, head) for m in members]
  if len(members) == 1:
    return each[0]
  common = tuple(k for k in each[0] if all(k in e for e in each))
  return common + tuple(f"{m.name}/{k}" for m, e in zip(members, each, strict=False) for k in e)


def validate(cfg: C.Config, members, mesh) -> None:
  """The config against the tasks and the mesh, before any work (`ConfigError` naming the key)."""
  tc, ec = cfg.train, cfg.eval
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.microbatches != "auto" and tc.batch_size % (tc.microbatches * dp):
    raise ConfigError(
      f"train.batch_size {tc.batch_size} must be divisible by train.microbatches "
      f"({tc.microbatches}) x data-parallel devices ({dp})"
    )
  if tc.batch_size % dp:
    raise ConfigError(f"train.batch_size {tc.batch_size} must be divisible by the data-parallel devices ({dp})")
  _validate_head(cfg, members)
  metrics = mixture_metrics(members, ec.mode, cfg.head.type)
  if ec.metric not in metrics:
    names = ", ".join(m.task.name for m in members)
    raise ConfigError(
      f"eval.metric {ec.metric!r} is not computed for task {names} in eval.mode "
      f"{ec.mode}; available: {', '.join(metrics)}"
    )
  _validate_prompt(cfg.prompt, cfg.data, members)
  for key, value in (
    ("data.input_length", cfg.data.input_length),
    ("data.target_length", cfg.data.target_length),
    ("train.batch_size", tc.batch_size),
    ("train.microbatches", 1 if tc.microbatches == "auto" else tc.microbatches),
    ("train.log_every", tc.log_every),
    ("eval.batch_size", ec.batch_size),
    ("checkpoint.every", cfg.checkpoint.every),
    ("checkpoint.keep", cfg.checkpoint.keep),
  ):
    if value < 1:
      raise ConfigError(f"{key} must be >= 1, got {value}")


def _validate_head(cfg: C.Config, members) -> None:
  """A classification head (`head.type`) against the task: one task with labels, tags per word for a token head."""
  kind = cfg.head.type
  if kind == "lm":
    tagged = [m.task.name for m in members if m.task.per_token]
    if tagged:
      raise ConfigError(f"task {tagged[0]} labels every word: it needs head.type token")
    return
  if len(members) > 1:
    raise ConfigError(f"head.type {kind} trains one task's classifier; data.mixture is not supported with it")
  task = members[0].task
  if not task.labels:
    raise ConfigError(f"head.type {kind} needs a task with labels; {task.name} is generative")
  if task.per_token != heads.head_type(kind).per_token:
    want, per = ("token", "word") if task.per_token else ("sequence", "example")
    raise ConfigError(f"head.type {kind} does not fit task {task.name} (a label per {per}): use head.type {want}")
  if cfg.data.pack is True:
    raise ConfigError(f"data.pack packs text-to-text rows; head.type {kind} reads one example per row")
  if cfg.prompt.template is not None:
    raise ConfigError(f"prompt.template places a prompt in text-to-text inputs; head.type {kind} puts it in front")


def _validate_template(pc: C.PromptConfig, dc: C.DataConfig, members) -> None:
  """prompt.template: a method whose rows may sit at slots, fields every task has, rows left unpacked."""
  if pc.template is None:
    return
  if not registry.get(pc.method).templates:
    able = ", ".join(n for n, m in registry.METHODS.items() if m.templates)
    raise ConfigError(f"prompt.template places input embeddings ({able}); {pc.method} cannot sit at its slots")
  if dc.pack is True:
    raise ConfigError("data.pack puts each prompt in front of its example; a prompt.template places it (pack: false)")
  template = Template.parse(pc.template)
  for m in members:
    template.check_fields(m.task.fields, m.name)


def _validate_prompt(pc: C.PromptConfig, dc: C.DataConfig, members) -> None:
  _validate_template(pc, dc, members)
  if dc.pack is True and not registry.get(pc.method).embeds:
    raise ConfigError(
      f"data.pack needs a prompt before the input ({', '.join(registry.names(embeds=True))}); "
      f"{pc.method} puts keys/values in every layer"
    )
  if pc.per_task and not dc.mixture:
    raise ConfigError("prompt.per_task trains one prompt per task of a data.mixture; this config has one task")
  refusal = methods.bank_refusal(pc) if pc.per_task else None
  if refusal:
    raise ConfigError(
      f"prompt.per_task: a bank of {refusal} is not supported; use prompt_tuning or prefix_tuning without projection"
    )
  groups = (
    [(m.name, m.labels) for m in members]
    if pc.per_task
    else [(members[0].task.name if len(members) == 1 else "the mixture", union_labels(members))]
  )
  for name, labels in groups if pc.init == "class_labels" else ():
    if not labels:
      raise ConfigError(f"prompt.init class_labels needs a task with label strings; {name} is generative")
    if len(labels) > pc.length:
      raise ConfigError(
        f"prompt.length {pc.length} is shorter than the {len(labels)} class labels of {name} "
        "that prompt.init class_labels writes into it"
      )


@dataclasses.dataclass
class Run:
  """Everything a loop or an evaluation needs, built once from a Config."""

  cfg: C.Config
  mesh: Any
  base: Any
  tokenizer: Any
  graphdef: Any
  prompt: dict  # pure dict of PromptParam values
  frozen: dict  # pure dict of the frozen base weights
  members: tuple[Member, ...]  # the tasks (one, or a mixture's)
  prompt_spec: PromptSpec  # the prompt method and its options (`PromptMethod.spec()`)
  head_spec: heads.HeadSpec | None = None  # a classification head trained with the prompt (None: the LM head)

  @property
  def identity(self):
    return self.base.identity

  @property
  def kind(self) -> str:
    return self.base.kind

  @property
  def per_task(self) -> bool:
    """One prompt per member (a bank; row b uses prompt `task_ids[b]`)?"""
    return self.cfg.prompt.per_task

  @property
  def labels(self) -> tuple[str, ...] | None:
    """The label strings of the run's task(s), each once."""
    return union_labels(self.members)

  def task_record(self) -> TaskRecord:
    """What checkpoints and exports record about the task(s): name and labels, and for a mixture its members (and
    whether each has its own prompt)."""
    labels = tuple(self.labels or ())
    if len(self.members) == 1:
      return TaskRecord(name=self.members[0].name, labels=labels, input=self.members[0].input_format)
    return TaskRecord(
      name="+".join(m.name for m in self.members),
      labels=labels,
      per_task=self.per_task,
      mixture=tuple(TaskMember(m.name, tuple(m.labels or ()), m.input_format) for m in self.members),
    )

  def architecture(self) -> hf.Architecture:
    return architecture_summary(self.base)

  def encode(self, examples: list[dict], name: str):
    """Examples -> one numpy batch of every row, laid out for this model kind."""
    d = self.cfg.data
    if self.head_spec is not None:
      return self.head_spec.encode(examples, self.tokenizer, input_length=d.input_length, name=name)
    return encoding.encode(
      self.base.batch_type,
      examples,
      self.tokenizer,
      input_length=d.input_length,
      target_length=d.target_length,
      name=name,
      template=self.template,
    )

  @property
  def template(self) -> Template | None:
    """Where the prompt's rows go in the input (`prompt.template`); None: in front."""
    return None if self.cfg.prompt.template is None else Template.parse(self.cfg.prompt.template)

  @property
  def packs(self) -> bool:
    """Are training rows packed (`data.pack`; auto: a seq2seq model with an input prompt in front of it)?"""
    pack = self.cfg.data.pack
    if pack == "auto":
      embeds = registry.get(self.cfg.prompt.method).embeds
      return self.base.supports_packing and embeds and self.cfg.prompt.template is None and self.head_spec is None
    return pack

  def device_batch(self, local):
    """This host's rows of a global batch -> arrays sharded over (data, fsdp) across all hosts."""
    return shd.device_batch(self.mesh, local)

  def prompt_shardings(self):
    return jax.tree.map(lambda _: shd.replicated(self.mesh), self.prompt)

  def frozen_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.frozen)


def check_label_lengths(dc: C.DataConfig, members, batch_type, tokenizer) -> None:
  """Every label of a classification task fits data.target_length whole: a cut label would be trained and ranked
  as its prefix (generative targets may still be cut, with a warning)."""
  for m in members:
    if not m.labels:
      continue
    lengths = encoding.label_lengths(batch_type, tokenizer, m.labels)
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > dc.target_length:
      raise ConfigError(
        f"data.target_length {dc.target_length} cuts label {m.labels[longest]!r} of task {m.name} "
        f"({lengths[longest]} tokens with EOS); set data.target_length to at least {lengths[longest]}"
      )


def build_run(
  cfg: C.Config, *, mesh=None, with_train_data: bool = True, bases: dict | None = None
) -> tuple[Run, tuple[TaskData, ...] | None]:
  """Load, check and assemble; returns the run and (unless `with_train_data=False`) the training split of each of
  its tasks (`Run.members`, in order). `bases`:
  loaded (base, tokenizer) by model section and mesh, shared between runs (a sweep loads its base once)."""
  mesh = mesh or mesh_from_config(cfg.mesh)
  members = members_of(cfg.data)
  train = tuple(task_data(m.data, cfg.data.train_split) for m in members) if with_train_data else None
  validate(cfg, members, mesh)
  key = (cfg.model, tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()))
  if bases is not None and key in bases:
    base, tokenizer = bases[key]
  else:
    base, tokenizer = load_base(cfg.model, mesh, lm_head=cfg.head.type == "lm")
    if bases is not None:
      bases[key] = (base, tokenizer)
  shd.check_weights_fit(nnx.state(base), mesh)
  if cfg.head.type == "lm":  # a classification head predicts class ids: no label string is scored
    check_label_lengths(cfg.data, members, base.batch_type, tokenizer)
  if cfg.data.pack is True and not base.supports_packing:
    raise ConfigError(
      f"data.pack packs seq2seq (T5) rows; this {base.kind} model shares its prompt between rows "
      "instead (set data.pack=false)"
    )
  rng = jax.random.fold_in(jax.random.key(cfg.train.seed), 1)
  if cfg.prompt.per_task:
    method = methods.build_bank(cfg.prompt, base, tokenizer, [m.labels for m in members], rng)
  else:
    method = methods.build(cfg.prompt, base, tokenizer, union_labels(members), rng)
  head_spec, head = None, None
  if cfg.head.type != "lm":
    head_spec = heads.HeadSpec(cfg.head.type, tuple(members[0].labels), word_token=cfg.head.word_token).on(base)
    head = heads.build(head_spec, base, jax.random.fold_in(rng, 2), dropout=cfg.head.dropout)
  graphdef, prompt_state, frozen_state = nnx.split(PromptedModel(base, method, head), PromptParam, ...)
  prompt = jax.device_put(prompt_state.to_pure_dict(), shd.replicated(mesh))
  run = Run(
    cfg=cfg,
    mesh=mesh,
    base=base,
    tokenizer=tokenizer,
    graphdef=graphdef,
    prompt=prompt,
    frozen=frozen_state.to_pure_dict(),
    members=members,
    prompt_spec=method.spec(),
    head_spec=head_spec,
  )
  return run, train
