"""Multitask prompt tuning (Wang et al., ICLR 2023, "Multitask Prompt Tuning Enables Parameter-Efficient Transfer
Learning"): one shared prompt P* [P, H] and, per task k, a rank-r factor u_k v_k^T; task k's prompt is
P* ∘ (u_k v_k^T), put before the input as a plain soft prompt.

Notation: P prompt length, H hidden, r rank, T tasks, B batch.

Matched to PEFT 0.21.2 (`tuners/multitask_prompt_tuning/model.py`, MULTITASK_PROMPT_TUNING):
  * forward: `prompt_embeddings = embedding(indices) * (prefix_task_cols[task_ids] @ prefix_task_rows[task_ids])`,
    cols [T, P, r], rows [T, r, H]; one task id per row (`task_ids` [B]: a batch's rows may use different tasks).
  * init: cols and rows N(0, 0.02); the shared prompt as PEFT's PromptEmbedding (here: `prompt.init`). The
    paper's two stages: train the shared prompt and the factors on source tasks, then start a target from them —
    `prompt.multitask_source` (a multitask workdir, export or PEFT adapter) with `prompt.multitask_init`
    average_source_tasks (the shared prompt, the factors averaged over the source tasks), exact_source_task (the
    shared prompt and task `prompt.multitask_source_task`'s factors) or only_source_shared (the shared prompt;
    fresh factors), PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK / ONLY_SOURCE_SHARED.
  * saved: `prompt_embeddings` [P, H] (the shared prompt), `prefix_task_cols` [T, P, r], `prefix_task_rows`
    [T, r, H]. PEFT's forward fails on seq2seq models (a TypeError in PeftModelForSeq2SeqLM, PEFT 0.21.2), so an
    export of a T5 multitask prompt to PEFT is refused; jaxprompt trains and serves it (the encoder's input).

Training several tasks is `prompt.per_task` on a `data.mixture`: one module holds the shared prompt and T factors,
row b uses task `task_ids[b]` (the mixture member it came from). Without per_task there is one factor (T = 1).

Inference value (lossless: the factors, not only their products): per task [P + r + ceil(P·r / H), H] = the shared
prompt [P, H], then v_k [r, H], then u_k [P, r] flattened row-major into rows of H (DePT's packing, `dept.pack`);
a per-task run's value is [T, ...] of them (every member repeats the shared prompt). Inference itself uses each
task's product P* ∘ (u_k v_k^T) as a prompt-tuning prompt [P, H] (`fixed`): banks, generation and serving treat
it as one.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.errors import ExportError, PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts.dept import pack
from jaxprompt.prompts.init import initial_prompt
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptMethod, SoftPrompt, check_embeddings, restored
from jaxprompt.prompts.spec import Method, PromptSpec

FACTOR_STD = 0.02  # PEFT: torch.normal(mean=0, std=0.02) for prefix_task_cols and prefix_task_rows
PEFT_SUBMODULES = {"causal": 1}  # the model kinds exported to PEFT's MPT (its num_transformer_submodules)
PEFT_REFUSED = {"seq2seq": "fails on seq2seq models (PEFT 0.21.2: a TypeError in PeftModelForSeq2SeqLM)"}


@dataclasses.dataclass(frozen=True)
class MultitaskSpec(PromptSpec):
  """The rank r of each task's factor (PEFT's num_ranks)."""

  method: ClassVar[str] = "multitask"
  rank: int = 1

  def describe(self) -> str:
    return f"{self.method} (r {self.rank})"


def packed_rows(length: int, rank: int, hidden: int) -> int:
  """Rows of one task's value: P + r + ceil(P·r / H)."""
  return length + rank + -(-length * rank // hidden)


def unpack(value, spec: MultitaskSpec, where: str = "prompt"):
  """The value [..., P + r + ceil(P·r/H), H] -> (shared [..., P, H], cols [..., P, r], rows [..., r, H])."""
  r, h, n = spec.rank, value.shape[-1], value.shape[-2]
  length = next((p for p in range(n + 1) if packed_rows(p, r, h) == n), None)
  if length is None or length == 0:
    raise PromptError(f"{where}: a multitask value is [P + r + ceil(P·r/H), H] with r {r}: got shape {value.shape}")
  lead = value.shape[:-2]
  cols = value[..., length + r :, :].reshape(lead + (-1,))[..., : length * r].reshape(lead + (length, r))
  return value[..., :length, :], cols, value[..., length : length + r, :]


def task_prompts(shared, cols, rows):
  """Each task's prompt P* ∘ (u_k v_k^T): shared [(T,) P, H], cols [T, P, r], rows [T, r, H] -> [T, P, H]."""
  xp = jnp if isinstance(shared, jax.Array) or isinstance(cols, jax.Array) else np
  if xp is jnp:
    prod = jnp.einsum("tpr,trh->tph", cols, rows, precision=jax.lax.Precision.HIGHEST)
  else:
    prod = np.einsum("tpr,trh->tph", cols.astype(np.float64), rows.astype(np.float64)).astype(np.float32)
  return (shared if shared.ndim == 3 else shared[None]) * prod


class MultitaskPrompt(PromptMethod):
  """`shared` [P, H], `task_cols` [T, P, r], `task_rows` [T, r, H] (`PromptParam`, float32). With T > 1 a row
  takes its task's prompt by id (`prompt_ids`, else the batch's task ids); with T = 1 every row takes the one."""

  method = MultitaskSpec.method

  def __init__(self, shared, cols, rows):
    shared, cols, rows = (jnp.asarray(x, jnp.float32) for x in (shared, cols, rows))
    if shared.ndim != 2 or cols.ndim != 3 or rows.ndim != 3:
      raise PromptError(
        f"multitask: shared {shared.shape}, cols {cols.shape}, rows {rows.shape} are not [P, H], [T, P, r], [T, r, H]"
      )
    (p, h), (t, r) = shared.shape, (cols.shape[0], cols.shape[2])
    if cols.shape != (t, p, r) or rows.shape != (t, r, h):
      raise PromptError(f"multitask: cols {cols.shape} and rows {rows.shape} do not fit a shared prompt [{p}, {h}]")
    self.shared = L.param(shared, ("prompt", "prompt_embed"), kind=PromptParam)
    self.task_cols = L.param(cols, (None, "prompt", None), kind=PromptParam)
    self.task_rows = L.param(rows, (None, None, "prompt_embed"), kind=PromptParam)

  @property
  def length(self) -> int:
    return self.shared.shape[0]

  @property
  def tasks(self) -> int:
    return self.task_cols.shape[0]

  def prompts(self) -> jax.Array:
    """[T, P, H]: every task's prompt."""
    return task_prompts(self.shared[...], self.task_cols[...], self.task_rows[...])

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    table = self.prompts()
    if self.tasks == 1:
      return Prefix(embeds=table)  # [1, P, H]: the same for every row
    if prompt_ids is None:
      raise PromptError(f"a multitask prompt of {self.tasks} tasks needs a task id for each example")
    return Prefix(embeds=table[prompt_ids], bank=table, bank_ids=prompt_ids)

  def inference_value(self) -> jax.Array:
    t = self.tasks
    shared = jnp.broadcast_to(self.shared[...], (t,) + self.shared.shape)
    value = pack(shared, self.task_cols[...], self.task_rows[...])  # [T, P + r + ceil(P·r/H), H]
    return value if t > 1 else value[0]

  def spec(self) -> MultitaskSpec:
    return MultitaskSpec(rank=int(self.task_cols.shape[-1]))


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def _factors(rng: jax.Array, tasks: int, length: int, rank: int, hidden: int):
  k1, k2 = jax.random.split(rng)
  cols = FACTOR_STD * jax.random.normal(k1, (tasks, length, rank), jnp.float32)
  return cols, FACTOR_STD * jax.random.normal(k2, (tasks, rank, hidden), jnp.float32)


def _source(pcfg, source):
  """(shared [P, H], cols [S, P, r], rows [S, r, H], task names or None) of `prompt.multitask_source`, loaded by
  `methods` (`Method.init_source`): its S tasks' prompts, and their names (None: one prompt)."""
  where = pcfg.multitask_source
  tps, names = source
  for tp in tps:
    if not isinstance(tp.spec, MultitaskSpec):
      raise PromptError(f"{where}: prompt.multitask_source holds a {tp.spec.describe()} prompt, not a multitask one")
  parts = [unpack(np.asarray(tp.value), tp.spec, where) for tp in tps]
  shared, cols, rows = parts[0][0], np.stack([c for _, c, _ in parts]), np.stack([r for _, _, r in parts])
  if shared.shape[0] != pcfg.length or cols.shape[-1] != pcfg.option("multitask_rank"):
    raise PromptError(
      f"{where}: the source prompt has P {shared.shape[0]}, r {cols.shape[-1]}; prompt.length and "
      f"prompt.multitask_rank must match ({pcfg.length}, {pcfg.option('multitask_rank')})"
    )
  return shared, cols, rows, names


def _source_task(pcfg, names) -> int:
  """The index of `prompt.multitask_source_task` (a task name or an index) among the source's tasks."""
  want, count = pcfg.multitask_source_task, len(names or [0])
  if want is None:
    raise PromptError("prompt.multitask_init exact_source_task needs prompt.multitask_source_task (a name or index)")
  if names and want in names:
    return names.index(want)
  if str(want).isdigit() and int(want) < count:
    return int(want)
  raise PromptError(f"prompt.multitask_source_task {want!r}: the source has tasks {names or list(range(count))}")


def _make(pcfg, base, tokenizer, labels, rng: jax.Array, tasks: int, source) -> MultitaskPrompt:
  rank = pcfg.option("multitask_rank")
  if rank < 1:
    raise PromptError(f"prompt.multitask_rank must be >= 1, got {rank}")
  cols, rows = _factors(jax.random.fold_in(rng, 5), tasks, pcfg.length, rank, base.hidden_size)
  if source is None:
    return MultitaskPrompt(initial_prompt(pcfg, base, tokenizer, labels, rng), cols, rows)
  shared, src_cols, src_rows, names = _source(pcfg, source)
  init = pcfg.option("multitask_init")
  if init == "average_source_tasks":
    cols, rows = (np.broadcast_to(a.mean(0), (tasks,) + a.shape[1:]) for a in (src_cols, src_rows))
  elif init == "exact_source_task":
    k = _source_task(pcfg, names)
    cols, rows = (np.broadcast_to(a[k], (tasks,) + a.shape[1:]) for a in (src_cols, src_rows))
  return MultitaskPrompt(shared, cols, rows)


def _build(pcfg, base, tokenizer, labels, rng: jax.Array, source=None) -> MultitaskPrompt:
  return _make(pcfg, base, tokenizer, labels, rng, 1, source)


def _build_bank(
  pcfg, base, tokenizer, labels: Sequence[Sequence[str] | None], rng: jax.Array, source=None
) -> MultitaskPrompt:
  """`prompt.per_task`: one shared prompt (initialised with every task's labels) and a factor per task."""
  if len(labels) < 2:
    raise PromptError("prompt.per_task with multitask needs a mixture of at least two tasks")
  union = tuple(dict.fromkeys(lab for member in labels for lab in (member or ()))) or None
  return _make(pcfg, base, tokenizer, union, rng, len(labels), source)


def _rebuild(spec: MultitaskSpec, params: dict) -> MultitaskPrompt:
  def zeros(name):
    return jnp.zeros(np.shape(params[name]), jnp.float32)

  return restored(lambda: MultitaskPrompt(zeros("shared"), zeros("task_cols"), zeros("task_rows")), params)


def _fixed(value, spec: MultitaskSpec, slots, where: str) -> SoftPrompt:
  """Each task's product as a prompt-tuning prompt: [P, H], or a bank [T, P, H] of a per-task value."""
  shared, cols, rows = unpack(np.asarray(value, np.float32), spec, where)
  if value.ndim == 2:
    return SoftPrompt(task_prompts(shared, cols[None], rows[None])[0])
  return SoftPrompt(task_prompts(shared, cols, rows))


def _member_params(params: dict, k: int) -> dict:
  """Task k's parameters of a per-task run: the shared prompt and its own factor (a one-task module's)."""
  return dict(
    shared=params["shared"], task_cols=params["task_cols"][k : k + 1], task_rows=params["task_rows"][k : k + 1]
  )


def _peft_parts(value: np.ndarray, spec: MultitaskSpec):
  """(shared [P, H], cols [T, P, r], rows [T, r, H]) of a value [.., rows, H]."""
  shared, cols, rows = unpack(np.asarray(value, np.float32), spec)
  if value.ndim == 2:
    return shared, cols[None], rows[None]
  return shared[0], cols, rows


def _peft_fields(value: np.ndarray, record, base_path) -> dict:
  arch = record.architecture
  if arch.kind not in PEFT_SUBMODULES:
    why = PEFT_REFUSED.get(arch.kind, f"is exported for decoders only (the case checked against PEFT), not {arch.kind}")
    raise ExportError(
      f"PEFT's MULTITASK_PROMPT_TUNING forward {why}; export this prompt --format numpy or safetensors, or each "
      "task's product as prompt tuning"
    )
  shared, cols, _ = _peft_parts(value, record.spec)
  return dict(
    num_virtual_tokens=int(shared.shape[0]),
    token_dim=int(shared.shape[1]),
    num_transformer_submodules=PEFT_SUBMODULES[arch.kind],
    num_layers=arch.num_layers,
    num_attention_heads=arch.num_attention_heads,
    # RANDOM: PEFT reads the init only when it creates a prompt, and a source init would need the source's file
    prompt_tuning_init="RANDOM",
    prompt_tuning_init_text=None,
    tokenizer_name_or_path=None,
    prompt_tuning_init_state_dict_path=None,
    prompt_tuning_init_task=0,
    num_ranks=int(cols.shape[-1]),
    num_tasks=int(cols.shape[0]),
  )


def _peft_tensors(value: np.ndarray, record) -> dict[str, np.ndarray]:
  shared, cols, rows = _peft_parts(value, record.spec)
  return dict(prompt_embeddings=shared, prefix_task_cols=cols, prefix_task_rows=rows)


def _peft_read(tensors: dict[str, np.ndarray], peft: dict, where) -> tuple[np.ndarray, MultitaskSpec]:
  """A MULTITASK_PROMPT_TUNING adapter: [rows, H] for one task, [T, rows, H] for several."""
  if peft.get("task_type") != "CAUSAL_LM" or (peft.get("num_transformer_submodules") or 1) != 1:
    raise PromptError(f"{where}: multitask prompts are read for CAUSAL_LM adapters (PEFT's seq2seq forward fails)")
  missing = [n for n in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if tensors.get(n) is None]
  if missing:
    raise PromptError(f"{where}: a MULTITASK_PROMPT_TUNING adapter needs {', '.join(missing)}")
  shared, cols, rows = (
    np.asarray(tensors[n], np.float32) for n in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
  )
  p, (t, r) = peft.get("num_virtual_tokens"), (cols.shape[0] if cols.ndim == 3 else 0, cols.shape[-1])
  if shared.ndim != 2 or shared.shape[0] != p or cols.shape != (t, p, r) or rows.shape != (t, r, shared.shape[1]):
    raise PromptError(
      f"{where}: prompt_embeddings {shared.shape}, prefix_task_cols {cols.shape}, prefix_task_rows {rows.shape} are "
      f"not [P, H], [T, P, r], [T, r, H] with P = num_virtual_tokens {p}"
    )
  value = pack(np.broadcast_to(shared, (t,) + shared.shape), cols, rows)
  return (value if t > 1 else value[0]), MultitaskSpec(rank=int(r))


def _check(value, base, where: str) -> None:
  check_embeddings(value.reshape(-1, value.shape[-1]), base, where)


MULTITASK = Method(
  name=MultitaskSpec.method,
  spec_type=MultitaskSpec,
  description="multitask prompt tuning (Wang et al. 2023): a shared prompt [P, H] times a rank-r factor per task, "
  "before the input",
  embeds=False,  # its value is the factors ([P + r + ceil(P·r/H), H]), not input embeddings; inference: each product
  value_shape="[P + r + ceil(P·r/H), H]",
  saves="shared [P, H], task_cols [T, P, r], task_rows [T, r, H]",
  peft_type="MULTITASK_PROMPT_TUNING",
  build=_build,
  rebuild=_rebuild,
  fixed=_fixed,
  check=_check,
  peft_fields=_peft_fields,
  peft_read=_peft_read,
  build_bank=_build_bank,
  init_source=lambda pcfg: pcfg.multitask_source,
  serves_embeddings=True,
  member_params=_member_params,
  peft_tensors=_peft_tensors,
  peft_reads_tensors=True,
  peft_bank=True,
)
