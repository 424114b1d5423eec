"""Typed, frozen configs loaded from YAML, with `--set section.key=value` overrides.

Defaults live here, in the schema, and nowhere else. An unknown key or a wrong type is a one-line
`ConfigError` naming it (with the closest valid key as a suggestion).

A file may start from others: `include: base.yaml` (or a list, paths relative to the file) loads those first
and lays this file's sections over them, key by key; overrides come last. Paths in a file's data.files are
relative to that file too (absolute paths stay as they are); paths given with --set are relative to the working
directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxprompt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  path: str = "builtin:quickstart"  # HF folder, hub id, .gguf file, or builtin:quickstart
  tokenizer: str | None = None  # default: taken from `path`
  revision: str | None = None
  dtype: str = "float32"  # frozen weights: float32 | bfloat16
  compute_dtype: str = "float32"  # activations: float32 | bfloat16 (the paper: bfloat16)
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
  # layers as a scan (compile time flat in depth) or unrolled (faster steps on the CPU); auto: unrolled on the CPU
  # for models of hidden size 256 or more (`models.layers.unrolls`)
  layer_loop: Literal["auto", "scan", "unroll"] = "auto"
  # auto: cuDNN (jax.nn.dot_product_attention) on GPU, a Pallas flash kernel on TPU, the CPU kernel on the CPU
  attention: Literal["auto", "xla", "cudnn", "pallas", "cpu"] = "auto"
  dropout: float | None = None  # overrides the model config's dropout rate (the paper: 0.1)
  allow_pytorch_bin: bool = False  # a pickle; never loaded unless asked for


# prompt options that only some methods have: option -> the methods it applies to
_METHOD_OPTIONS = {
  "prefix_projection": ("prefix_tuning",),
  "encoder_hidden_size": ("prefix_tuning", "p_tuning"),
  "encoder_reparameterization_type": ("p_tuning",),
  "encoder_num_layers": ("p_tuning",),
  "encoder_dropout": ("p_tuning",),
  **{o: ("dept",) for o in ("dept_rank", "dept_max_length", "dept_alpha", "dept_offset_learning_rate")},
  "adaption_layers": ("adaption",),
  "cartridge_frozen_tokens": ("cartridge",),
  **{o: ("multitask",) for o in ("multitask_rank", "multitask_source", "multitask_init", "multitask_source_task")},
  **{
    o: ("residual",)
    for o in ("bottleneck_size", "nonlinearity", "mlp_layer_norm", "mlp_dropout", "separate_mlps", "mlp_type")
  },
}
# options that need another option of their method set: (method, option) -> the option it needs
_OPTION_NEEDS = {
  ("prefix_tuning", "encoder_hidden_size"): "prefix_projection",
  ("multitask", "multitask_init"): "multitask_source",
  ("multitask", "multitask_source_task"): "multitask_source",
}
# the inits a method takes, where it does not take them all, and why
_METHOD_INITS = {
  "prefix_tuning": (("random_uniform", "file"), "its parameters are keys and values, not token embeddings"),
  "cartridge": (("text", "random_normal", "file"), "its parameters are keys and values, not token embeddings"),
}


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  method: Literal[
    "prompt_tuning", "prefix_tuning", "p_tuning", "residual", "dept", "multitask", "adaption", "cartridge"
  ] = "prompt_tuning"
  length: int = 100
  # random_normal: N(0, 1), PEFT's RANDOM (nn.Embedding's init) and the adaption prompts' init
  init: Literal["random_uniform", "random_normal", "sampled_vocab", "class_labels", "text", "file"] = "class_labels"
  init_range: tuple[float, float] = (-0.5, 0.5)  # random_uniform; the paper's range (original code: [0, 0.5))
  vocab_sample_size: int = 5000  # sampled_vocab / class_labels draw from the first N embedding rows
  init_text: str | None = None  # init: text
  init_file: str | None = None  # init: file (.npy, .safetensors, a PEFT adapter folder or a workdir)
  allow_other_base: bool = False  # init: file — use a prompt recorded for another base model (with a warning)
  # method options (None: the method's default; set for a method they do not apply to: an error)
  prefix_projection: bool | None = None  # prefix_tuning: train through Li & Liang's MLP (default false)
  encoder_hidden_size: int | None = None  # prefix_tuning with projection / p_tuning: encoder width (PEFT's token_dim)
  encoder_reparameterization_type: Literal["MLP", "LSTM"] | None = None  # p_tuning encoder (default MLP)
  encoder_num_layers: int | None = None  # p_tuning LSTM layers (default 2)
  encoder_dropout: float | None = None  # p_tuning LSTM dropout between layers (default 0.0)
  # residual: the reparameterising MLP, defaults the authors' train.py flags (github arazd/ResidualPrompts 53087ca)
  bottleneck_size: int | None = None  # residual: the MLP's bottleneck E (default 800)
  nonlinearity: Literal["relu", "tanh", "sigmoid", "gelu"] | None = None  # residual (default relu)
  mlp_layer_norm: bool | None = None  # residual: LayerNorm after the up projection (default true)
  mlp_dropout: float | None = None  # residual: dropout before that norm, training only (default 0.0)
  separate_mlps: bool | None = None  # residual: one MLP per prompt token (default false: one shared)
  mlp_type: Literal["MLP1", "MLP2"] | None = None  # residual: MLP2 applies the block twice (default MLP1)
  # dept (github ZhengxiangShi/DePT f0266a7): the offset scaling * A @ B on the first s input tokens' embeddings
  dept_rank: int | None = None  # dept: r (default 30, the authors' --r; the paper's T5-base: m 60, r 30)
  dept_max_length: int | None = None  # dept: s, input positions the offset covers (default 256, --max_seq_length)
  dept_alpha: float | None = None  # dept: scaling = alpha / sqrt(r) (default 8, their lora_alpha)
  # dept: A's and B's own peak learning rate (their --lora_embedding_lr; the prompt's is optimizer.learning_rate);
  # default: optimizer.learning_rate for both
  dept_offset_learning_rate: float | None = None
  # multitask (PEFT's MULTITASK_PROMPT_TUNING): task k's prompt = shared ∘ (u_k v_k^T), u_k [P, r], v_k [r, H]
  multitask_rank: int | None = None  # multitask: r (default 1, PEFT's num_ranks)
  # multitask: start from a trained multitask prompt (a workdir, export or PEFT adapter: the paper's source stage)
  multitask_source: str | None = None
  # multitask with a source: its shared prompt and the factors averaged over its tasks, one task's, or fresh ones
  multitask_init: Literal["average_source_tasks", "exact_source_task", "only_source_shared"] | None = None
  multitask_source_task: str | None = None  # multitask_init exact_source_task: the source task (a name or index)
  adaption_layers: int | None = None  # adaption: the top layers with a prompt (PEFT's adapter_layers; default all)
  # P-tuning v1 templates (prompt_tuning, p_tuning): virtual tokens between parts of the input, e.g.
  # "[P:3] {premise} [P:3] ? {hypothesis} [P:3]": [P:n] is n virtual tokens (they sum to prompt.length, the prompt's
  # rows fill them in order), {field} an example's field, the rest literal text (`data.templates`); None: in front
  template: str | None = None
  # cartridge: the first slots kept as initialised, an attention sink (PEFT's num_frozen_tokens; default 1)
  cartridge_frozen_tokens: int | None = None
  # with data.mixture: one prompt per member (a bank [K, P, ...] trained together, each row under its task's
  # prompt); false: one prompt shared by every task (e.g. SPoT's source prompt)
  per_task: bool = False

  def __post_init__(self):
    for option, methods in _METHOD_OPTIONS.items():
      if getattr(self, option) is not None and self.method not in methods:
        raise ConfigError(f"prompt.{option} applies to method {' / '.join(methods)}, not {self.method}")
    for (method, option), needs in _OPTION_NEEDS.items():
      if self.method == method and getattr(self, option) is not None and not getattr(self, needs):
        kind = ": true" if "bool" in str(PromptConfig.__dataclass_fields__[needs].type) else " set"
        raise ConfigError(f"prompt.{option} applies to {method} with prompt.{needs}{kind}")
    lstm = self.encoder_reparameterization_type == "LSTM"
    for option in ("encoder_num_layers", "encoder_dropout"):
      if getattr(self, option) is not None and not lstm:
        raise ConfigError(
          f"prompt.{option} applies to the LSTM encoder (prompt.encoder_reparameterization_type: "
          "LSTM); the MLP has exactly 3 layers and no dropout"
        )
    inits, why = _METHOD_INITS.get(self.method, (None, None))
    if inits is not None and self.init not in inits:
      raise ConfigError(
        f"prompt.init {self.init} does not apply to method {self.method} ({why}): use {' or '.join(inits)}"
      )
    if self.length < 0:
      raise ConfigError(f"prompt.length must be >= 0 (0: the base model alone), got {self.length}")
    if self.template is not None:
      from jaxprompt.data.templates import Template

      Template.parse(self.template).check_length(self.length)

  def option(self, name: str):
    """A method option with its default filled in (encoder_hidden_size stays None: the model decides)."""
    defaults = dict(
      prefix_projection=False,
      encoder_reparameterization_type="MLP",
      encoder_num_layers=2,
      encoder_dropout=0.0,
      encoder_hidden_size=None,
      dept_rank=30,
      dept_max_length=256,
      dept_alpha=8.0,
      dept_offset_learning_rate=None,
      bottleneck_size=800,
      nonlinearity="relu",
      mlp_layer_norm=True,
      mlp_dropout=0.0,
      separate_mlps=False,
      mlp_type="MLP1",
      adaption_layers=None,
      cartridge_frozen_tokens=1,
      multitask_rank=1,
      multitask_source=None,
      multitask_init="average_source_tasks",
      multitask_source_task=None,
      template=None,
    )
    value = getattr(self, name)
    return defaults[name] if value is None else value


@dataclasses.dataclass(frozen=True)
class CustomTaskConfig:
  columns: dict[str, str] = dataclasses.field(default_factory=dict)  # template field -> file column
  template: str = "{text}"
  labels: tuple[str, ...] = ()  # empty: a generative task whose target is the label column's text
  label_column: str = "label"
  label_map: dict[str, str] = dataclasses.field(default_factory=dict)  # raw file label -> label string
  metrics: tuple[str, ...] | None = None  # default: accuracy (labels) / exact_match, token_f1 (generative)


@dataclasses.dataclass(frozen=True)
class MixtureMember:
  """One task of `data.mixture`: where its rows come from (as data.task / files / ... for a single task) and how
  often it is drawn."""

  task: str
  name: str | None = None  # how metrics, checkpoints and exports name it (default: the task's name)
  rate: float | None = None  # relative mixing rate; None for every member: examples-proportional (data.mixture_cap)
  files: dict[str, str] = dataclasses.field(default_factory=dict)
  custom: CustomTaskConfig | None = None
  # None: as the data section says (data.taskless, data.tfds_data_dir, data.hf_datasets)
  taskless: bool | None = None
  tfds_data_dir: str | None = None
  hf_datasets: bool | None = None

  def __post_init__(self):
    if self.rate is not None and not self.rate > 0:
      raise ConfigError(f"data.mixture: task {self.task!r} has rate {self.rate}; a rate must be > 0")


# what only a mixture member says (with data.mixture these stay unset in the data section), and what a member
# takes from the data section unless it sets its own
_MEMBER_ONLY = ("task", "files", "custom")
_MEMBER_INHERITS = ("taskless", "tfds_data_dir", "hf_datasets")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = "quickstart"
  taskless: bool = False  # the paper's variant: drop the leading task name from the inputs
  files: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> local JSONL/CSV/TSV file
  tfds_data_dir: str | None = None  # pre-downloaded TFDS data (works offline)
  hf_datasets: bool = False  # read the task from HF `datasets` when installed
  custom: CustomTaskConfig | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  input_length: int = 512  # tokens, before the prompt
  target_length: int = 8
  seed: int = 0  # shuffling order
  # pad each batch's input only to the smallest of these lengths that holds its longest input (one compiled step
  # per bucket): "auto" = 64, 96, 128, 192, 256, 384, ... (2^k and 1.5 x 2^k) below input_length, then
  # input_length; "none": input_length
  length_buckets: Literal["auto", "none"] | tuple[int, ...] = "auto"
  # > 0: batches of similar input lengths (less padding): each window of this many batches is sorted by length
  # before it is cut into batches, then the batches are shuffled (HF Trainer's group_by_length uses 50); 0: off
  group_by_length: int = 0
  # seq2seq (T5) training: several examples per row, each with its own prompt, attention kept inside each example
  # (T5X-style packing: every example's loss and gradient as unpacked; only dropout masks fall elsewhere). A row
  # is as long as the unpacked one (prompt + the batch's length bucket); packing refills its padding with other
  # examples, so a step runs fewer rows for the same examples. auto: on for seq2seq models with an input prompt
  # (prompt_tuning, p_tuning), off otherwise. Evaluation is not packed
  pack: bool | Literal["auto"] = "auto"
  # several tasks in one run (seqio-style): each batch row is drawn from a member with probability proportional to
  # its rate, or (no rates) to its number of training examples, each capped at mixture_cap
  mixture: tuple[MixtureMember, ...] = ()
  mixture_cap: int | None = None

  def __post_init__(self):
    if self.mixture:
      self._check_mixture()
    elif self.mixture_cap is not None:
      raise ConfigError("data.mixture_cap applies to a data.mixture")
    if isinstance(self.length_buckets, tuple):
      bad = [b for b in self.length_buckets if not 0 < b <= self.input_length]
      if bad or not self.length_buckets:
        raise ConfigError(
          f"data.length_buckets: {list(self.length_buckets)} must be lengths in 1..data.input_length "
          f"({self.input_length}), or auto / none"
        )
    if self.group_by_length < 0:
      raise ConfigError(f"data.group_by_length: {self.group_by_length} must be >= 0 (batches per window; 0 is off)")

  def _check_mixture(self) -> None:
    names = [m.name or m.task for m in self.mixture]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
      raise ConfigError(
        f"data.mixture: {', '.join(map(repr, twice))} appears more than once; give each member its "
        "own name (data.mixture[i].name)"
      )
    rated = [m.rate is not None for m in self.mixture]
    if any(rated) and not all(rated):
      raise ConfigError(
        "data.mixture: give every member a rate, or none (then each is drawn in proportion to its "
        "number of training examples)"
      )
    if self.mixture_cap is not None and (all(rated) or self.mixture_cap < 1):
      raise ConfigError(
        f"data.mixture_cap: {self.mixture_cap} caps examples-proportional rates (members without "
        "a rate) and must be >= 1"
      )
    defaults = DataConfig()
    given = [f for f in _MEMBER_ONLY if getattr(self, f) != getattr(defaults, f)]
    if given:
      raise ConfigError(
        f"data.{given[0]} names one task's data; with data.mixture each member sets its own "
        f"(data.mixture[i].{given[0]})"
      )
    if self.group_by_length:
      raise ConfigError("data.group_by_length does not apply to a data.mixture (its batches mix tasks at random)")

  def members(self) -> tuple["DataConfig", ...]:
    """One single-task data section per task of the run: this one, or one per mixture member."""
    if not self.mixture:
      return (self,)
    return tuple(
      dataclasses.replace(
        self,
        task=m.task,
        files=m.files,
        custom=m.custom,
        mixture=(),
        mixture_cap=None,
        **{f: getattr(self if getattr(m, f) is None else m, f) for f in _MEMBER_INHERITS},
      )
      for m in self.mixture
    )

  def member_names(self) -> tuple[str, ...]:
    return tuple(m.name or m.task for m in self.mixture) if self.mixture else (self.task,)

  def buckets(self) -> tuple[int, ...]:
    """The input lengths batches are padded to, ascending (the last is input_length)."""
    from jaxprompt.data.pipeline import bucket_lengths

    return bucket_lengths(self.length_buckets, self.input_length)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: Literal["adafactor", "adam", "adamw", "sgd"] = "adafactor"
  learning_rate: float = 0.3
  schedule: Literal["constant", "warmup_constant", "cosine", "warmup_cosine", "linear"] = "constant"
  warmup_steps: int = 0
  end_learning_rate_factor: float = 0.0  # cosine / linear decay to this fraction of the peak
  weight_decay: float = 1e-5  # adafactor: param *= 1 - wd each step (not LR-scaled); adamw: decoupled
  decay_rate: float = 0.8  # adafactor: beta2_t = 1 - (t + 1) ** -decay_rate
  clipping_threshold: float | None = 1.0  # adafactor update clipping (RMS)
  momentum: float | None = None  # adafactor first moment (the original: none)
  eps: float = 1e-30  # adafactor eps1
  b1: float = 0.9  # adam(w)
  b2: float = 0.999  # adam(w)
  grad_clip_norm: float | None = None  # global-norm clipping before the optimizer


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """What the prompted model's outputs are scored with (`prompts.heads`)."""

  # lm: the language model's own head (targets as text; rank / generate evaluation); sequence: a classifier on one
  # state per example (decoders: the last real token; T5: the decoder at EOS), trained with the prompt; token: a
  # classifier on every word's first sub-token (tasks with words and tags, e.g. wnut17)
  type: Literal["lm", "sequence", "token"] = "lm"
  dropout: float | None = None  # before the classifier, training only (default: transformers' for that model class)
  # token heads: which sub-token of a word carries its label and prediction. first: HF's token-classification
  # examples (and PEFT); last: the one that has seen the whole word in a causal model (a decoder's first sub-token
  # has not, e.g. a tokenizer that starts every word with a bare "▁")
  word_token: Literal["first", "last"] = "first"

  def __post_init__(self):
    if self.dropout is not None and not 0 <= self.dropout < 1:
      raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 30000
  batch_size: int = 32  # global
  # gradient accumulation: the batch in this many equal chunks; auto: 1 on GPU/TPU, and on the CPU chunks of at
  # most ~4096 tokens (`training.step.auto_microbatches`: a big batch's activations outgrow the CPU's caches)
  microbatches: int | Literal["auto"] = "auto"
  z_loss: float = 1e-4
  seed: int = 0
  log_every: int = 50
  nan_policy: Literal["error", "skip"] = "error"
  plot: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 1000  # steps; 0 = only at the end
  mode: Literal["rank", "generate", "loss"] = "rank"
  metric: str = "accuracy"  # selects the best checkpoint
  batch_size: int = 32
  max_examples: int | None = None
  patience: int | None = None  # early stopping after this many evals without improvement
  at_end: bool = True


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Decoding settings: `jaxprompt generate`, `jaxprompt.generate.generate`, eval in generate mode."""

  max_new_tokens: int = 32
  method: Literal["greedy", "sample", "beam"] = "greedy"
  temperature: float = 1.0  # sample
  top_k: int = 0  # sample: keep the k most likely tokens (0 = all)
  top_p: float = 1.0  # sample: nucleus probability mass (1.0 = off)
  num_beams: int = 4  # beam
  alpha: float = 0.6  # beam: T5X's length-penalty exponent
  seed: int = 0  # sample

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"generate.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.method == "sample" and not self.temperature > 0:
      raise ConfigError(
        f"generate.temperature must be > 0 to sample, got {self.temperature} (for greedy decoding: "
        "generate.method greedy, or generate --method greedy)"
      )
    if self.method == "beam" and (self.num_beams < 1 or self.alpha < 0):
      raise ConfigError(f"beam search needs generate.num_beams >= 1 and alpha >= 0, got {self.num_beams}, {self.alpha}")
    if not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ConfigError(f"generate.top_p must be in (0, 1] and top_k >= 0, got {self.top_p}, {self.top_k}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # -1: all remaining devices
  fsdp: int = 1
  model: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 1000
  keep: int = 3  # the last K
  keep_best: bool = True  # plus the best by eval.metric
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """`jaxprompt distill`: a cartridge (prompt.method cartridge) trained so that the model with it answers like the
  model with a long context in front (`training.distill`); train.steps, optimizer, checkpoint and train.log_every
  apply as in training."""

  context_file: str | None = None  # the text to compress (relative to the config file, as data.files are)
  chunk: int = 64  # tokens per query
  # queries: the context's own chunks, plus this many continuations of `chunk` tokens the teacher samples after
  # the context (the paper's self-study: the teacher writes the training data)
  samples: int = 0
  temperature: float = 1.0  # the teacher's sampling temperature

  def __post_init__(self):
    if self.chunk < 1 or self.samples < 0 or not self.temperature > 0:
      raise ConfigError(
        f"distill.chunk must be >= 1, samples >= 0 and temperature > 0, got {self.chunk}, {self.samples}, "
        f"{self.temperature}"
      )


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
  head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

  def to_dict(self) -> dict:
    """Plain dicts and lists (JSON / YAML ready)."""
    return _plain(dataclasses.asdict(self))


# -- parsing ---------------------------------------------------------------------------------------


def _suggest(key: str, options) -> str:
  close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, where)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    return value
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return _build(tp, value, where)
  if origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{where}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ConfigError(f"{where}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)  # YAML reads "1e-5" as a string
      except ValueError:
        pass
    raise ConfigError(f"{where}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{where}: expected a string, got {value!r}")
  raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls, raw: dict, where: str):
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  for key in raw:
    if key not in fields:
      name = f"{where}.{key}" if where else key
      raise ConfigError(f"unknown config key {name!r}{_suggest(str(key), fields)}")
  kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
  return cls(**kwargs)


def _parse_value(text: str, tp: Any = Any) -> Any:
  """An override's value: YAML, except where the schema wants a string (`tp`), which keeps the text as given
  ("review: {text}" stays a string; quotes around it are YAML's; null / ~ / nothing: None where None is allowed)."""
  stringy = tp is str or (
    typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {str, type(None)}
  )
  if stringy:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # quoted: YAML's, where it reads a string
      try:
        value = yaml.safe_load(text)
      except yaml.YAMLError:
        value = None
      return value if isinstance(value, str) else text
    return None if tp is not str and text.strip() in ("", "null", "~", "None") else text
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    return text


def _section_type(tp: Any) -> Any:
  """The dataclass (or dict) type a dotted key may descend into, `X | None` unwrapped; None for a leaf."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = inner[0] if len(inner) == 1 else tp
  return tp if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict else None


def override_type(key: str, where: str = "") -> Any:
  """The schema type of a dotted config key (`data.custom.template` -> str); ConfigError naming it (prefixed by
  `where`) when the config has no such key."""
  tp: Any = Config
  parts = key.split(".")
  for i, p in enumerate(parts):
    section = _section_type(tp)
    if section is None:
      raise ConfigError(f"{where}{'.'.join(parts[:i])!r} is a value, not a section")
    if typing.get_origin(section) is dict:
      tp = typing.get_args(section)[1]
      continue
    hints = typing.get_type_hints(section)
    if p not in hints:
      raise ConfigError(f"{where}unknown config key {'.'.join(parts[: i + 1])!r}{_suggest(p, hints)}")
    tp = hints[p]
  return tp


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
  """`section.key=value` strings applied to a raw config dict: values parsed as YAML, except for string keys (kept
  as written); a key the config does not have is a ConfigError naming the override."""
  raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    tp = override_type(key, f"--set {key}: ")
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = _parse_value(value, tp)
  return raw


def from_dict(raw: dict) -> Config:
  return _build(Config, raw or {}, "")


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
  """A config file as a raw dict, its `include:`s laid under it."""
  if not p.exists():
    raise ConfigError(f"config file {str(p)!r} does not exist")
  if p.resolve() in seen:
    raise ConfigError(f"{p}: includes itself (through {' -> '.join(map(str, seen))})")
  try:
    raw = yaml.safe_load(p.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{p}: expected a mapping of sections at the top level")
  _resolve_files(raw, p.parent)
  includes = raw.pop("include", [])
  for inc in [includes] if isinstance(includes, str) else includes:
    if not isinstance(inc, str):
      raise ConfigError(f"{p}: include: expected a file name or a list of them, got {inc!r}")
    raw = _merge(_read_yaml(p.parent / inc, seen + (p.resolve(),)), raw)
  return raw


def _resolve_files(raw: dict, folder: Path) -> None:
  """data.files (and each data.mixture member's files) and distill.context_file written in a config file are
  relative to that file, as `include:` is: made absolute here. Absolute paths stay; a relative path that exists
  only from the working directory (configs written before paths were resolved this way) keeps meaning that file."""
  distill = raw.get("distill")
  if isinstance(distill, dict) and isinstance(distill.get("context_file"), str):
    path = distill["context_file"]
    if path and not Path(path).is_absolute():
      distill["context_file"] = str((folder / path).resolve())
  data = raw.get("data")
  if not isinstance(data, dict):
    return
  sections = [data] + [m for m in data.get("mixture") or () if isinstance(m, dict)]
  for section in sections:
    files = section.get("files")
    if not isinstance(files, dict):
      continue
    for split, path in files.items():
      if isinstance(path, str) and path and not Path(path).is_absolute():
        beside = (folder / path).resolve()
        files[split] = str(beside if beside.exists() or not Path(path).exists() else Path(path).resolve())


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
  """Load a YAML config file (or the defaults when `path` is None) and apply overrides."""
  raw = apply_overrides(_read_yaml(Path(path)) if path is not None else {}, list(overrides))  # errors name the --set
  try:
    return from_dict(raw)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump(cfg: Config) -> str:
  return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _plain(x):
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x
