"""DePT, Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024): a shorter soft prompt [m, H] before the input, plus
a low-rank offset scaling * A @ B (A [s, r], B [r, H]) added to the frozen embeddings of the first s input tokens,
the two trained with their own learning rates.

Matched to the authors' code, github.com/ZhengxiangShi/DePT at f0266a774a45c62ce32f159e2182583f1878546c
(`peft/tuners/prompt_tuning_lora.py`, `peft/peft_model.py`, `train.py`):
  * offset: `inputs_embeds += scaling * (lora_embedding_A @ lora_embedding_B)` on the token embeddings, before the
    prompt is concatenated in front (so never on the prompt, nor on T5's decoder); scaling = lora_alpha / sqrt(r)
    (their PromptEmbeddingLoRA; r = 0 there means no offset, here r >= 1).
  * positions: their inputs are padded (right, T5) to max_length = s, and offset row i lands on position i, padding
    included (masked keys: no effect). Here row i goes to each row's i-th token counted from its first real token
    (`models.interface.add_input_offset`): identical for right padding, and a left-padded generation row gets what
    it gets unpadded. Their decoder path adds it over a left-padded [input; target] of length s; here a causal
    model's offset covers its input tokens only (the targets, and generated tokens, get none).
  * init: A kaiming_uniform_(a=sqrt(5)) on [s, r], i.e. U(-1/sqrt(r), 1/sqrt(r)); B zeros (the offset starts at 0);
    the prompt as `prompt.init` says (theirs: RANDOM or TEXT).
  * defaults: r = 30 (train.py --r; the paper's T5-base m = 60, r = 30 keeps vanilla PT's 100-token budget
    76,800 = 60·768 + 256·30 + 30·768; the README's m = 40, r = 45 too), s = 256 (--max_seq_length),
    lora_alpha = 8 (PromptTuningLoRAConfig's default; train.py never sets it).
  * two learning rates: AdamW groups {prompt: --learning_rate, A and B: --lora_embedding_lr} under one linear
    schedule; here `prompt.dept_offset_learning_rate` is A's and B's, optimizer.learning_rate the prompt's
    (`training.optim.build_optimizer`; None: one rate, as their code without --lora_embedding_lr).

Inference value and export layout (one float32 array, H wide, lossless: the trained factors, not their product):
  [m + r + ceil(s·r / H), H] = the prompt [m, H], then B [r, H], then A [s, r] flattened row-major into rows of H
  (zero-padded to a whole row); the record's spec holds r, s and alpha (`pack` / `unpack`). A bank: [K, ...].
PEFT has no DePT: `export --format peft` refuses. Packed T5 rows (`data.pack`) cannot carry the offset.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.errors import ExportError, PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts.init import initial_prompt
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptMethod, restored
from jaxprompt.prompts.spec import Method, PromptSpec


@dataclasses.dataclass(frozen=True)
class DePTSpec(PromptSpec):
  """The offset's shape and scale: rank r, max_length s (input positions covered), alpha (scaling alpha / sqrt r)."""

  method: ClassVar[str] = "dept"
  rank: int = 30
  max_length: int = 256
  alpha: float = 8.0

  @property
  def scaling(self) -> float:
    return self.alpha / math.sqrt(self.rank)

  def describe(self) -> str:
    return f"{self.method} (r {self.rank}, s {self.max_length})"


def init_offset_a(rng: jax.Array, max_length: int, rank: int) -> jax.Array:
  """A [s, r] as torch's kaiming_uniform_(a=sqrt(5)): fan_in r, bound sqrt(6 / ((1 + 5) r)) = 1 / sqrt(r)."""
  bound = 1.0 / math.sqrt(rank)
  return jax.random.uniform(rng, (max_length, rank), jnp.float32, -bound, bound)


def pack(embeddings, a, b):
  """[..., m, H], A [..., s, r], B [..., r, H] -> the inference value [..., m + r + ceil(s·r / H), H]."""
  xp = jnp if isinstance(embeddings, jax.Array) else np
  lead, h = embeddings.shape[:-2], embeddings.shape[-1]
  flat = a.reshape(lead + (-1,))
  flat = xp.pad(flat, [(0, 0)] * len(lead) + [(0, (-flat.shape[-1]) % h)]).reshape(lead + (-1, h))
  return xp.concatenate([embeddings, b.astype(embeddings.dtype), flat.astype(embeddings.dtype)], axis=-2)


def unpack(value, spec: DePTSpec, where: str = "prompt"):
  """The inference value [..., rows, H] -> (prompt [..., m, H], A [..., s, r], B [..., r, H])."""
  r, s, h = spec.rank, spec.max_length, value.shape[-1]
  rows_a = -(-s * r // h)
  m = value.shape[-2] - r - rows_a
  if m < 0:
    raise PromptError(
      f"{where}: a dept value is [m + r + ceil(s·r/H), H] with r {r}, s {s}: got shape {tuple(value.shape)}"
    )
  lead = value.shape[:-2]
  a = value[..., m + r :, :].reshape(lead + (-1,))[..., : s * r].reshape(lead + (s, r))
  return value[..., :m, :], a, value[..., m : m + r, :]


class DePT(PromptMethod):
  """`embeddings` [m, H], `offset_a` [s, r], `offset_b` [r, H] (all `PromptParam`, float32) — or a bank of K of
  each ([K, m, H], [K, s, r], [K, r, H]) for mixed batches, each row picking its prompt by id."""

  method = DePTSpec.method

  def __init__(self, embeddings, offset_a, offset_b, *, alpha: float):
    embeddings, a, b = (jnp.asarray(x, jnp.float32) for x in (embeddings, offset_a, offset_b))
    bank = embeddings.ndim == 3
    if embeddings.ndim not in (2, 3) or a.ndim != embeddings.ndim or b.ndim != embeddings.ndim:
      raise PromptError(f"dept: prompt {embeddings.shape}, A {a.shape}, B {b.shape} are not [m, H], [s, r], [r, H]")
    if a.shape[-1] != b.shape[-2] or b.shape[-1] != embeddings.shape[-1] or a.shape[-1] < 1:
      raise PromptError(f"dept: A {a.shape} @ B {b.shape} must give the prompt's width {embeddings.shape[-1]}")
    lead = ("prompts",) if bank else ()
    self.embeddings = L.param(embeddings, lead + ("prompt", "prompt_embed"), kind=PromptParam)
    self.offset_a = L.param(a, lead + (None, None), kind=PromptParam)
    self.offset_b = L.param(b, lead + (None, "prompt_embed"), kind=PromptParam)
    self.alpha = float(alpha)

  @property
  def length(self) -> int:
    return self.embeddings.shape[-2]

  def spec(self) -> DePTSpec:
    return DePTSpec(rank=self.offset_a.shape[-1], max_length=self.offset_a.shape[-2], alpha=self.alpha)

  def offset(self) -> jax.Array:
    """scaling * A @ B: [s, H] (a bank: [K, s, H]), float32."""
    ab = jnp.matmul(self.offset_a[...], self.offset_b[...], precision=jax.lax.Precision.HIGHEST)
    return self.spec().scaling * ab

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    embeddings, offset = self.embeddings[...], self.offset()
    if embeddings.ndim == 2:
      return Prefix(embeds=embeddings[None], input_offset=offset[None])
    if prompt_ids is None:
      raise PromptError("a dept prompt bank needs prompt_ids for each example")
    return Prefix(embeds=embeddings[prompt_ids], bank=embeddings, bank_ids=prompt_ids, input_offset=offset[prompt_ids])

  def inference_value(self) -> jax.Array:
    return pack(self.embeddings[...], self.offset_a[...], self.offset_b[...])

  def packed_table(self, dropout_rng=None) -> jax.Array:
    raise PromptError(
      "dept adds an offset to each example's input tokens, which packed rows cannot carry: set data.pack false"
    )

  @classmethod
  def stack(cls, modules: Sequence[PromptMethod]) -> "DePT":
    specs = {(m.spec(), m.length) for m in modules}
    if len(specs) != 1:
      raise PromptError(f"dept prompts in a bank must share m, r, s and alpha, got {sorted(map(str, specs))}")
    parts = [jnp.stack([getattr(m, n)[...] for m in modules]) for n in ("embeddings", "offset_a", "offset_b")]
    return cls(*parts, alpha=modules[0].alpha)


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> DePT:
  rank, max_length = pcfg.option("dept_rank"), pcfg.option("dept_max_length")
  if rank < 1 or max_length < 1:
    raise PromptError(f"prompt.dept_rank ({rank}) and prompt.dept_max_length ({max_length}) must be >= 1")
  return DePT(
    initial_prompt(pcfg, base, tokenizer, labels, rng),
    init_offset_a(jax.random.fold_in(rng, 3), max_length, rank),
    jnp.zeros((rank, base.hidden_size), jnp.float32),
    alpha=pcfg.option("dept_alpha"),
  )


def _rebuild(spec: DePTSpec, params: dict) -> DePT:
  def zeros(name):
    return jnp.zeros(np.shape(params[name]), jnp.float32)

  return restored(lambda: DePT(zeros("embeddings"), zeros("offset_a"), zeros("offset_b"), alpha=spec.alpha), params)


def _fixed(value, spec: DePTSpec, slots, where: str) -> DePT:
  return DePT(*unpack(value, spec, where), alpha=spec.alpha)


def _check(value, base, where: str) -> None:
  if value.shape[-1] != base.hidden_size:
    raise PromptError(f"{where}: dept value is {value.shape}, this model's hidden size is {base.hidden_size}")


def _no_peft(*args):
  raise ExportError("PEFT has no DePT (decomposed prompt tuning): export it as --format numpy or safetensors")


def _no_peft_read(value, peft, where):
  raise PromptError(f"{where}: DePT adapters of the authors' PEFT fork (PROMPT_TUNING_LORA) are not read")


def _learning_rates(pcfg) -> dict[str, float]:
  lr = pcfg.option("dept_offset_learning_rate")
  return {} if lr is None else {"offset_a": lr, "offset_b": lr}


DEPT = Method(
  name=DePTSpec.method,
  spec_type=DePTSpec,
  description="DePT (Shi & Lipani 2024): a prompt [m, H] before the input, a low-rank offset A·B on its first s tokens",
  embeds=False,  # its input offset is per token: rows cannot be packed (`data.pack`)
  value_shape="[m + r + ceil(s·r/H), H]",
  saves="embeddings [m, H], offset_a [s, r], offset_b [r, H]",
  peft_type="PROMPT_TUNING_LORA",  # the authors' PEFT fork's name; PEFT itself has none (export refuses)
  build=_build,
  rebuild=_rebuild,
  fixed=_fixed,
  check=_check,
  peft_fields=_no_peft,
  peft_read=_no_peft_read,
  learning_rates=_learning_rates,
  # mixed batches of trained DePT prompts work (`DePT.stack`); training them as a per-task bank is not tested
  bank_refusal=lambda pcfg: "DePT prompts (per-task training)",
)
