"""Cartridges (Eyuboglu et al. 2025, PEFT's CARTRIDGE): a trained key/value cache of P slots in front of every
attention layer — a prefix in PEFT's prefix-tuning layout, trained directly (no projection), its first F slots
frozen as an attention sink (PEFT's `num_frozen_tokens`, default 1, the paper's advice).

Notation: P cartridge length, F frozen slots, Y table layers, K key/value heads, D head dim.

A cartridge is served exactly as a prefix (`prefix.PrefixTuning.prefix`: a pre-filled cache). Its initialisers:
`prompt.init: text` (the keys and values the frozen model computes for the first P tokens of `prompt.init_text`,
special tokens included, as PEFT's `initialize_kv_prefix_from_text` without a chat template: before training the
cartridge *is* that text in front; T5, where PEFT's initialiser fails: its decoder's self-attention fed the decoder
start token and the text, reading an empty encoder input, in a table with each decoder layer's own keys/values,
which PEFT's T5 layout cannot hold: `PrefixSlots.per_layer`), `random_normal` (N(0, 1), PEFT's reset_parameters) or
`file`. The trainable state is `table` [P - F, Y, 2, K, D]; the frozen slots are `sink` [F, Y, 2, K, D], kept in
checkpoints but with a learning rate of 0 (`Method.learning_rates`: no update, no optimizer state) and no
gradient. What PEFT saves is the whole [P, Y * 2 * K * D] as `prompt_embeddings`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.decoder import Decoder
from jaxprompt.models.interface import PrefixSlots
from jaxprompt.models.t5 import T5
from jaxprompt.prompts import prefix as P
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.soft import PromptMethod
from jaxprompt.prompts.spec import Method, PromptSpec


@dataclasses.dataclass(frozen=True)
class CartridgeSpec(PromptSpec):
  """`frozen_tokens`: F, the first slots kept as initialised (PEFT's num_frozen_tokens); `slots`: the base's table
  layout (None: not recorded — a PEFT adapter's, the base's is taken)."""

  method: ClassVar[str] = "cartridge"
  frozen_tokens: int = 1
  slots: PrefixSlots | None = None

  @classmethod
  def from_json(cls, d: dict) -> "CartridgeSpec":
    slots = d.get("slots")
    return cls(
      frozen_tokens=int(d.get("frozen_tokens", 1)), slots=None if slots is None else PrefixSlots.from_dict(slots)
    )

  def describe(self) -> str:
    return f"{self.method} ({self.frozen_tokens} frozen)"


class Cartridge(P.PrefixTuning):
  """`sink` [F, Y, 2, K, D] (frozen; absent when F = 0) and `table` [P - F, Y, 2, K, D]; served as their
  concatenation, a prefix table [P, Y, 2, K, D]."""

  method = CartridgeSpec.method

  def __init__(self, slots: PrefixSlots, *, table: jax.Array, frozen_tokens: int):
    table = jnp.asarray(table, jnp.float32)
    want = (slots.layers, 2, slots.heads, slots.head_dim)
    if table.ndim != 5 or table.shape[1:] != want:
      raise PromptError(f"a cartridge is [P, {', '.join(map(str, want))}], got {table.shape}")
    if not 0 <= frozen_tokens <= table.shape[0]:
      raise PromptError(f"a cartridge's frozen tokens must be in [0, {table.shape[0]}], got {frozen_tokens}")
    self.slots, self.projection, self.frozen_tokens = slots, False, frozen_tokens
    self.sink = L.param(table[:frozen_tokens], (None,) * 5, kind=PromptParam) if frozen_tokens else None
    self.table = L.param(table[frozen_tokens:], (None,) * 5, kind=PromptParam)

  @property
  def length(self) -> int:
    return self.frozen_tokens + self.table.shape[0]

  def inference_value(self) -> jax.Array:
    """The whole table [P, Y, 2, K, D], the sink's slots without a gradient."""
    if self.sink is None:
      return self.table[...]
    return jnp.concatenate([jax.lax.stop_gradient(self.sink[...]), self.table[...]])

  def spec(self) -> CartridgeSpec:
    return CartridgeSpec(frozen_tokens=self.frozen_tokens, slots=self.slots)

  @classmethod
  def stack(cls, modules: Sequence[PromptMethod]) -> P.PrefixTuning:
    """Several cartridges in one batch (served side by side): a bank of plain prefix tables, each with a table layer
    per attention layer (cartridges in T5's two layouts can share a batch)."""
    per_layer = [m.inference_value()[:, jnp.asarray(m.slots.layer_of)] for m in modules]
    return P.PrefixTuning.stack(
      [P.PrefixTuning(m.slots.per_layer(), table=t) for m, t in zip(modules, per_layer, strict=True)]
    )


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def text_table(base, tokenizer, text: str | None, length: int) -> jax.Array:
  """[P, Y', 2, K, D], a table layer per attention layer (`PrefixSlots.per_layer`; a decoder's own layout): the keys
  and values `base` computes for the first P tokens of `text` — what a cache holds after prefilling them. A
  decoder: the text's tokens, special tokens included. T5: its decoder's self-attention fed the decoder start token
  and the text's first P - 1 tokens, reading an empty encoder input (the tokenizer's encoding of "": </s>)."""
  if not text:
    raise PromptError("prompt.init text needs prompt.init_text")
  ids = tokenizer(text)["input_ids"]
  if isinstance(base, Decoder):
    if len(ids) < length:
      raise PromptError(f"prompt.init_text is {len(ids)} tokens; a cartridge of prompt.length {length} needs as many")
    ids = jnp.asarray([ids[:length]], jnp.int32)
    _, cache = base.prefill(ids, jnp.ones_like(ids), max_new_tokens=1)
    k, v = cache.k, cache.v
  elif isinstance(base, T5):
    if len(ids) < length - 1:
      raise PromptError(
        f"prompt.init_text is {len(ids)} tokens; a cartridge of prompt.length {length} on T5 needs {length - 1} "
        "(after the decoder start token)"
      )
    ids = jnp.asarray([[base.config.decoder_start_token_id] + ids[: length - 1]], jnp.int32)
    empty = jnp.asarray([tokenizer("")["input_ids"] or [base.config.eos_token_id]], jnp.int32)
    k, v = base.decoder_keys_values(ids, empty)
  else:  # its keys/values are a cache's: a decoder's, or T5's decoder (an encoder's layers take no text in front)
    raise PromptError("prompt.init text for a cartridge needs a decoder-only model or T5 (use random_normal or file)")
  kv = jnp.stack([k[:, 0, :length], v[:, 0, :length]], axis=1)  # [Y', 2, P, K, D]
  return jnp.transpose(kv, (2, 0, 1, 3, 4)).astype(jnp.float32)


def _layout(spec: CartridgeSpec, slots: PrefixSlots) -> PrefixSlots:
  """The table layout of a cartridge on a base whose (PEFT) layout is `slots`: that, or a table layer per attention
  layer when its record says so (`prompt.init text` on T5); a PEFT adapter records none (the base's)."""
  own = slots.per_layer()
  return own if spec.slots is not None and spec.slots.layer_of == own.layer_of else slots


def _check(value, base, where: str) -> None:
  """The value fits the base's table layout or its layout of a table layer per attention layer."""
  slots = base.prefix_slots()
  own = slots.per_layer()
  P.check_table(value, own if value.shape[1:2] == (own.layers,) else slots, where)


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> Cartridge:
  slots = base.prefix_slots()
  if pcfg.init == "text":
    slots, table = slots.per_layer(), text_table(base, tokenizer, pcfg.init_text, pcfg.length)
  elif pcfg.init == "random_normal":
    table = jax.random.normal(rng, (pcfg.length, slots.layers, 2, slots.heads, slots.head_dim), jnp.float32)
  else:  # config.py allows only these (and file, handled before)
    raise PromptError(f"prompt.init {pcfg.init} does not apply to a cartridge")
  return Cartridge(slots, table=table, frozen_tokens=min(pcfg.option("cartridge_frozen_tokens"), pcfg.length))


def _rebuild(spec: CartridgeSpec, params: dict) -> Cartridge:
  parts = ([params["sink"]] if "sink" in params else []) + [params["table"]]
  return Cartridge(spec.slots, table=jnp.concatenate([jnp.asarray(p) for p in parts]), frozen_tokens=spec.frozen_tokens)


def _fixed(value, spec: CartridgeSpec, slots: PrefixSlots, where: str) -> Cartridge:
  slots = _layout(spec, slots)
  P.check_table(value, slots, where)
  return Cartridge(slots, table=value, frozen_tokens=min(spec.frozen_tokens, value.shape[0]))


def _peft_fields(value: np.ndarray, record, base_path) -> dict:
  fields = P.peft_fields(value, dataclasses.replace(record, spec=P.PrefixTuningSpec(slots=record.spec.slots)), None)
  keep = ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules")
  return {**{k: fields[k] for k in keep}, "num_frozen_tokens": record.spec.frozen_tokens}


def _peft_read(value: np.ndarray, peft: dict, where) -> tuple[np.ndarray, CartridgeSpec]:
  table, _ = P.peft_read(value, peft, where)
  frozen = peft.get("num_frozen_tokens", 1)
  if not isinstance(frozen, int) or not 0 <= frozen <= table.shape[0]:
    raise PromptError(f"{where}: num_frozen_tokens must be in [0, num_virtual_tokens], got {frozen!r}")
  return table, CartridgeSpec(frozen_tokens=frozen)


CARTRIDGE = Method(
  name=CartridgeSpec.method,
  spec_type=CartridgeSpec,
  description="cartridges (Eyuboglu et al. 2025): a trained key/value cache [P, Y, 2, K, D] before every attention "
  "layer, its first slots frozen as an attention sink",
  embeds=False,
  value_shape="[P, Y, 2, K, D]",
  saves="sink [F, Y, 2, K, D] (frozen) and table [P - F, Y, 2, K, D]",
  peft_type="CARTRIDGE",
  build=_build,
  rebuild=_rebuild,
  fixed=_fixed,
  check=_check,
  peft_fields=_peft_fields,
  peft_read=_peft_read,
  bank_refusal=lambda pcfg: "cartridges",
  learning_rates=lambda pcfg: {"sink": 0.0} if pcfg.option("cartridge_frozen_tokens") else {},
  kv_table=True,
)
