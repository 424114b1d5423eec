"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): the soft prompt is the output of a small prompt encoder
applied to learned input embeddings, exactly as PEFT's PromptEncoder builds it.

Notation: P prompt length, H hidden (PEFT's token_dim), E encoder width, N prompts in a bank.

  MLP   Linear(H, E) -> ReLU -> Linear(E, E) -> ReLU -> Linear(E, H)   (PEFT ignores encoder_num_layers here)
  LSTM  a bidirectional LSTM(H, E, num_layers, dropout between layers) -> Linear(2E, 2E) -> ReLU -> Linear(2E, H)

Weights start as torch.nn's defaults (uniform in +-1/sqrt(fan_in)); the LSTM's gates follow torch's order
(input, forget, cell, output) with both of its biases. The encoder is a training device: what a trained P-tuning
prompt is at inference, and what PEFT saves, is its output [P, H] — so a jaxprompt checkpoint keeps the encoder
(training resumes exactly) while an export holds the output.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.errors import PromptError
from jaxprompt.models import layers as L
from jaxprompt.models.interface import Prefix
from jaxprompt.prompts.init import initial_prompt
from jaxprompt.prompts.params import PromptParam
from jaxprompt.prompts.prefix import torch_linear_init
from jaxprompt.prompts.soft import (
  PromptMethod,
  check_embeddings,
  embedding_peft_fields,
  fixed_embeddings,
  peft_embeddings,
  restored,
)
from jaxprompt.prompts.spec import Method, PromptSpec


@dataclasses.dataclass(frozen=True)
class PTuningSpec(PromptSpec):
  """PEFT's PromptEncoder options (None: not recorded, e.g. an adapter_config.json without them)."""

  method: ClassVar[str] = "p_tuning"
  encoder_reparameterization_type: str | None = None  # MLP | LSTM
  encoder_hidden_size: int | None = None
  encoder_num_layers: int | None = None
  encoder_dropout: float | None = None

  def describe(self) -> str:
    return f"{self.method} ({self.encoder_reparameterization_type})"


def _linear(rng, fan_in: int, fan_out: int) -> nnx.Dict:
  k1, k2 = jax.random.split(rng)
  return nnx.Dict(
    w=L.param(torch_linear_init(k1, fan_in, (fan_in, fan_out)), (None, None), kind=PromptParam),
    b=L.param(torch_linear_init(k2, fan_in, (fan_out,)), (None,), kind=PromptParam),
  )


def _apply(p: dict, x: jax.Array) -> jax.Array:
  return x @ p["w"][...] + p["b"][...]


def lstm_direction(x: jax.Array, w_ih: jax.Array, w_hh: jax.Array, b: jax.Array, reverse: bool) -> jax.Array:
  """One direction of one LSTM layer, torch's equations: x [P, I], w_ih [I, 4E], w_hh [E, 4E], b [4E] (b_ih + b_hh)
  -> hidden states [P, E] in input order."""
  e = w_hh.shape[0]

  def step(carry, xt):
    h, c = carry
    i, f, g, o = jnp.split(xt @ w_ih + h @ w_hh + b, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((e,), x.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), x, reverse=reverse)
  return hs


class PTuning(PromptMethod):
  """`embedding` [P, H] and its encoder (`mlp` or `lstm` + `mlp`); `prefix` gives every row the encoder's output."""

  method = PTuningSpec.method

  def __init__(
    self,
    embedding: jax.Array,
    *,
    encoder: str,
    hidden_size: int,
    num_layers: int,
    dropout: float,
    rng: jax.Array,
    template: str | None = None,
  ):
    if encoder not in ("MLP", "LSTM"):
      raise PromptError(f"unknown P-tuning encoder {encoder!r} (MLP or LSTM)")
    self.template = template  # the encoder's outputs go into a template's slots in order (`data.templates`)
    embedding = jnp.asarray(embedding, jnp.float32)
    p, h = embedding.shape
    self.encoder, self.hidden_size, self.num_layers, self.dropout = encoder, hidden_size, num_layers, dropout
    self.embedding = L.param(embedding, ("prompt", "prompt_embed"), kind=PromptParam)
    r = list(jax.random.split(rng, 8 * num_layers + 3))
    e = hidden_size
    if encoder == "MLP":
      self.mlp = nnx.Dict(l0=_linear(r.pop(), h, e), l1=_linear(r.pop(), e, e), l2=_linear(r.pop(), e, h))
    else:
      lstm = {}
      for layer in range(num_layers):
        fan_in = h if layer == 0 else 2 * e
        for direction in ("fwd", "bwd"):
          # torch initialises every LSTM weight and bias U(-1/sqrt(E), 1/sqrt(E)); b = b_ih + b_hh
          lstm[f"l{layer}_{direction}"] = nnx.Dict(
            w_ih=L.param(torch_linear_init(r.pop(), e, (fan_in, 4 * e)), (None, None), kind=PromptParam),
            w_hh=L.param(torch_linear_init(r.pop(), e, (e, 4 * e)), (None, None), kind=PromptParam),
            b=L.param(
              torch_linear_init(r.pop(), e, (4 * e,)) + torch_linear_init(r.pop(), e, (4 * e,)),
              (None,),
              kind=PromptParam,
            ),
          )
      self.lstm = nnx.Dict(lstm)
      self.mlp = nnx.Dict(l0=_linear(r.pop(), 2 * e, 2 * e), l1=_linear(r.pop(), 2 * e, h))

  @property
  def uses_dropout(self) -> bool:
    return self.encoder == "LSTM" and self.num_layers > 1 and self.dropout > 0

  @property
  def length(self) -> int:
    return self.embedding.shape[-2]

  def encode(self, dropout_rng=None) -> jax.Array:
    """The encoder's output [P, H] (dropout between LSTM layers in training, as torch.nn.LSTM)."""
    x = self.embedding[...]
    if self.encoder == "LSTM":
      rngs = L.split_rng(dropout_rng, self.num_layers)
      for i in range(self.num_layers):
        if i:
          x = L.dropout(x, self.dropout, rngs[i])
        x = jnp.concatenate(
          [
            lstm_direction(x, d["w_ih"][...], d["w_hh"][...], d["b"][...], reverse)
            for d, reverse in ((self.lstm[f"l{i}_fwd"], False), (self.lstm[f"l{i}_bwd"], True))
          ],
          axis=-1,
        )
    layers = [self.mlp[f"l{i}"] for i in range(len(self.mlp))]
    for layer in layers[:-1]:
      x = jax.nn.relu(_apply(layer, x))
    return _apply(layers[-1], x)

  def inference_value(self) -> jax.Array:
    return self.encode()

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    # computed once for one row and repeated over the batch, as PEFT does (peft#2043)
    # [1, P, H]: the same for every row
    return Prefix(embeds=self.encode(dropout_rng)[None], at_slots=self.template is not None)

  def packed_table(self, dropout_rng=None) -> jax.Array:
    return self.encode(dropout_rng)

  def spec(self) -> PTuningSpec:
    return PTuningSpec(
      encoder_reparameterization_type=self.encoder,
      encoder_hidden_size=self.hidden_size,
      encoder_num_layers=self.num_layers,
      encoder_dropout=self.dropout,
      template=self.template,
    )


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> PTuning:
  return PTuning(
    initial_prompt(pcfg, base, tokenizer, labels, rng),
    encoder=pcfg.option("encoder_reparameterization_type"),
    hidden_size=pcfg.option("encoder_hidden_size") or base.hidden_size,
    num_layers=pcfg.option("encoder_num_layers"),
    dropout=pcfg.option("encoder_dropout"),
    rng=jax.random.fold_in(rng, 2),
    template=pcfg.template,
  )


def _rebuild(spec: PTuningSpec, params: dict) -> PTuning:
  return restored(
    lambda: PTuning(
      jnp.zeros(np.shape(params["embedding"]), jnp.float32),
      encoder=spec.encoder_reparameterization_type,
      hidden_size=spec.encoder_hidden_size,
      num_layers=spec.encoder_num_layers,
      dropout=spec.encoder_dropout,
      rng=jax.random.key(0),
      template=spec.template,
    ),
    params,
  )


P_TUNING = Method(
  name=PTuningSpec.method,
  spec_type=PTuningSpec,
  description="P-tuning (Liu et al. 2021): an MLP / LSTM encoder's output [P, H] before the input",
  embeds=True,
  value_shape="[P, H]",
  saves="embedding [P, H] and its encoder",
  peft_type="P_TUNING",
  build=_build,
  rebuild=_rebuild,
  fixed=fixed_embeddings,
  check=check_embeddings,
  peft_fields=lambda value, record, base_path: {
    **embedding_peft_fields(value, record),
    **{k: v for k, v in dataclasses.asdict(record.spec).items() if k != "template"},  # PEFT has no templates
  },
  peft_read=lambda value, peft, where: (peft_embeddings(value, peft, where), PTuningSpec.from_json(peft)),
  # a bank would be K encoders' outputs, fixed: what trains is the encoder
  bank_refusal=lambda pcfg: "P-tuning encoders",
  templates=True,
)
