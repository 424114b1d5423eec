"""Prefix tuning (Li & Liang 2021) and deep prompts (P-tuning v2, Liu et al. 2022): P learned key/value slots in
front of every attention layer of the frozen model.

Notation: P prefix length, Y table layers, K key/value heads, D head dim, B batch, E reparameterisation width.

The trainable state is PEFT's table [P, Y, 2, K, D] (keys, then values; `models.interface.PrefixSlots` gives
its shape and which table layer each attention layer reads), either directly (`projection=False`: deep prompts,
what P-tuning v2 optimises) or through Li & Liang's reparameterisation (`projection=True`): an embedding [P, T]
(T = PEFT's token_dim = K * D) mapped by Linear(T, E) -> tanh -> Linear(E, Y * 2 * T), as PEFT's PrefixEncoder
does. The reparameterisation is a training device: what a trained prefix is, and what PEFT saves, is the table.
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
from jaxprompt.models.interface import Prefix, PrefixSlots
from jaxprompt.prompts.init import random_uniform
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptMethod, restored
from jaxprompt.prompts.spec import Method, PromptSpec

# seq2seq: PEFT's EncoderDecoderCache path (2 submodules), the one that gives the decoder's self-attention the prefix
PEFT_PREFIX_SUBMODULES = {"seq2seq": 2, "causal": 1, "encoder": 1}


@dataclasses.dataclass(frozen=True)
class PrefixTuningSpec(PromptSpec):
  """`slots`: the base's table layout (None: not recorded — a PEFT adapter's, the base's is taken);
  `encoder_hidden_size`: the projection's width (with `prefix_projection` only)."""

  method: ClassVar[str] = "prefix_tuning"
  prefix_projection: bool = False
  slots: PrefixSlots | None = None
  encoder_hidden_size: int | None = None

  @classmethod
  def from_json(cls, d: dict) -> "PrefixTuningSpec":
    slots = d.get("slots")
    return cls(
      prefix_projection=bool(d.get("prefix_projection")),
      encoder_hidden_size=d.get("encoder_hidden_size"),
      slots=None if slots is None else PrefixSlots.from_dict(slots),
    )

  def describe(self) -> str:
    return f"{self.method} ({'with' if self.prefix_projection else 'without'} projection)"


def torch_linear_init(rng: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
  """torch.nn.Linear's default initialisation (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


class PrefixTuning(PromptMethod):
  """A key/value prefix: `table` [P, Y, 2, K, D] (or a bank [N, P, Y, 2, K, D] for mixed batches), or with a
  projection `embedding` [P, T] + `w1` [T, E], `b1` [E], `w2` [E, Y * 2 * T], `b2` [Y * 2 * T]."""

  method = PrefixTuningSpec.method

  def __init__(
    self,
    slots: PrefixSlots,
    *,
    table: jax.Array | None = None,
    embedding: jax.Array | None = None,
    hidden_size: int | None = None,
    rng: jax.Array | None = None,
  ):
    self.slots = slots
    self.projection = embedding is not None
    if self.projection:
      t, e, out = slots.token_dim, hidden_size, slots.layers * 2 * slots.token_dim
      if embedding.shape[-1] != t:
        raise PromptError(f"a prefix projection's embedding is [P, {t}] (heads x head_dim), got {embedding.shape}")
      r = jax.random.split(rng, 4)
      self.embedding = L.param(jnp.asarray(embedding, jnp.float32), ("prompt", None), kind=PromptParam)
      self.w1 = L.param(torch_linear_init(r[0], t, (t, e)), (None, None), kind=PromptParam)
      self.b1 = L.param(torch_linear_init(r[1], t, (e,)), (None,), kind=PromptParam)
      self.w2 = L.param(torch_linear_init(r[2], e, (e, out)), (None, None), kind=PromptParam)
      self.b2 = L.param(torch_linear_init(r[3], e, (out,)), (None,), kind=PromptParam)
    else:
      table = jnp.asarray(table, jnp.float32)
      want = (slots.layers, 2, slots.heads, slots.head_dim)
      if table.ndim not in (5, 6) or table.shape[-4:] != want:
        raise PromptError(f"a prefix table is [P, {', '.join(map(str, want))}] (or a bank of them), got {table.shape}")
      self.table = L.param(table, (None,) * table.ndim, kind=PromptParam)

  @property
  def length(self) -> int:
    return self.embedding.shape[-2] if self.projection else self.table.shape[-5]

  def inference_value(self) -> jax.Array:
    """The table [P, Y, 2, K, D] (a bank: [N, P, ...]): what a trained prefix is, and what PEFT saves (flat)."""
    if not self.projection:
      return self.table[...]
    s = self.slots
    h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
    flat = h @ self.w2[...] + self.b2[...]
    return flat.reshape(flat.shape[:-1] + (s.layers, 2, s.heads, s.head_dim))

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    t = self.inference_value()
    if t.ndim == 6:
      if prompt_ids is None:
        raise PromptError("a prefix bank needs prompt_ids for each example")
      t = t[prompt_ids]  # [B, P, Y, 2, K, D]
    else:
      t = t[None]  # [1, P, Y, 2, K, D]: the same for every row
    t = t[:, :, jnp.asarray(self.slots.layer_of)]  # the table layer each attention layer reads
    kv = jnp.transpose(t, (3, 2, 0, 1, 4, 5))  # [2, Y', B|1, P, K, D]
    return Prefix(keys=kv[0], values=kv[1])

  def spec(self) -> PrefixTuningSpec:
    return PrefixTuningSpec(
      prefix_projection=self.projection,
      slots=self.slots,
      encoder_hidden_size=int(self.w1.shape[1]) if self.projection else None,
    )

  @classmethod
  def stack(cls, modules: Sequence[PromptMethod]) -> "PrefixTuning":
    tables = [m.table[...] for m in modules]
    if len({t.shape for t in tables}) != 1:
      raise PromptError(f"prefixes in a bank must share one shape, got {sorted({t.shape for t in tables})}")
    return cls(modules[0].slots, table=jnp.stack(tables))


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> PrefixTuning:
  """Keys and values, not token embeddings: initialised uniformly (`prompt.init_range`) whatever the task."""
  slots = base.prefix_slots()
  if pcfg.option("prefix_projection"):
    t = slots.token_dim
    return PrefixTuning(
      slots,
      embedding=random_uniform(rng, pcfg.length, t, *pcfg.init_range),
      hidden_size=pcfg.option("encoder_hidden_size") or t,
      rng=jax.random.fold_in(rng, 2),
    )
  shape = (pcfg.length, slots.layers, 2, slots.heads, slots.head_dim)
  return PrefixTuning(slots, table=jax.random.uniform(rng, shape, jnp.float32, *pcfg.init_range))


def _rebuild(spec: PrefixTuningSpec, params: dict) -> PrefixTuning:
  if not spec.prefix_projection:
    return PrefixTuning(spec.slots, table=params["table"])
  return restored(
    lambda: PrefixTuning(
      spec.slots,
      embedding=jnp.zeros(np.shape(params["embedding"]), jnp.float32),
      hidden_size=spec.encoder_hidden_size,
      rng=jax.random.key(0),
    ),
    params,
  )


def check_table(value: np.ndarray, slots: PrefixSlots, where: str) -> None:
  """A prefix table [P, Y, 2, K, D] fits a base whose `slots` are these."""
  want = (slots.layers, 2, slots.heads, slots.head_dim)
  if value.shape[1:] != want:
    raise PromptError(f"{where}: prefix table is {value.shape}, this model's is [P, {', '.join(map(str, want))}]")


def _fixed(value, spec: PrefixTuningSpec, slots: PrefixSlots, where: str) -> PrefixTuning:
  check_table(value, slots, where)
  return PrefixTuning(slots, table=value)


def peft_fields(value: np.ndarray, record, base_path) -> dict:
  spec = record.spec
  problem = spec.slots.peft_problem if spec.slots is not None else None
  if problem:
    raise ExportError(
      f"PEFT cannot run this prefix: {problem} (jaxprompt trains and serves it; export it "
      "--format numpy or safetensors instead)"
    )
  _, y, _, heads, d = value.shape
  return dict(
    token_dim=heads * d,
    num_attention_heads=heads,
    num_layers=y,
    num_transformer_submodules=PEFT_PREFIX_SUBMODULES[record.architecture.kind],
    prefix_projection=spec.prefix_projection,
    encoder_hidden_size=spec.encoder_hidden_size or heads * d,
    init_weights=None,
  )


def peft_read(value: np.ndarray, peft: dict, where) -> tuple[np.ndarray, PrefixTuningSpec]:
  """A PREFIX_TUNING adapter's flat table [P, Y * 2 * K * D] as [P, Y, 2, K, D] (the projection is not saved)."""
  p, y, heads, t = (peft.get(k) for k in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"))
  if not all(isinstance(x, int) and x > 0 for x in (y, heads, t)) or t % heads:
    raise PromptError(
      f"{where}: a PREFIX_TUNING adapter_config.json needs positive num_layers, num_attention_heads "
      f"and token_dim (a multiple of the heads), got {y}, {heads}, {t}"
    )
  if value.shape != (p, y * 2 * t):
    raise PromptError(
      f"{where}: prompt_embeddings is {value.shape}, expected [num_virtual_tokens, num_layers * 2 * "
      f"token_dim] = ({p}, {y * 2 * t})"
    )
  # PEFT's get_prompt: view [P, 2Y, heads, head_dim], slot 2l + kv -> ours [P, Y, 2, heads, head_dim]
  return value.reshape(p, y, 2, heads, t // heads), PrefixTuningSpec(prefix_projection=False)


PREFIX_TUNING = Method(
  name=PrefixTuningSpec.method,
  spec_type=PrefixTuningSpec,
  description="prefix tuning (Li & Liang 2021) / deep prompts (P-tuning v2): keys and values [P, Y, 2, K, D] "
  "before every attention layer",
  embeds=False,
  value_shape="[P, Y, 2, K, D]",
  saves="table [P, Y, 2, K, D], or embedding [P, K * D] and its MLP",
  peft_type="PREFIX_TUNING",
  build=_build,
  rebuild=_rebuild,
  fixed=_fixed,
  check=lambda value, base, where: check_table(value, base.prefix_slots(), where),
  peft_fields=peft_fields,
  peft_read=peft_read,
  # a bank of projections would be K fixed tables: what trains is the projection
  bank_refusal=lambda pcfg: "prefix projections" if pcfg.option("prefix_projection") else None,
  kv_table=True,
)
