"""Residual Prompt Tuning (Razdaibiedina et al., ACL Findings 2023): every prompt token goes through a shallow
MLP with a skip connection while the prompt trains; afterwards the MLP is applied once and dropped, so a trained
residual prompt is a plain soft prompt [P, H] (PEFT's PROMPT_TUNING).

Notation: P prompt length, H hidden, E bottleneck.

The forward is the authors' `ResMLP` (github.com/arazd/ResidualPrompts, prompt_tuner2.py at commit
53087ca191db788245c0ecabd10b45a1c3b36cea), module_type MLP1:

  out = x + LayerNorm(Dropout(Linear(E, H)(act(Linear(H, E)(x)))))

LayerNorm (torch's: eps 1e-5, weight 1 and bias 0 at the start) and dropout are optional; the norm sits after the
up projection and dropout, *before* the skip connection. MLP2 is their `layers + layers`: the same modules (the
same weights) applied twice inside the skip connection. `separate_mlps`: one MLP per prompt token (their dict of
ResMLPs), held here as weights stacked over P. Linear weights start as torch.nn's defaults (U(+-1/sqrt(fan_in))).

A jaxprompt checkpoint keeps the MLP (training resumes exactly); what inference, exports and PEFT see is
`inference_value()`, the MLP's output without dropout.
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
from jaxprompt.prompts.soft import PROMPT_TUNING, PromptMethod, check_embeddings, fixed_embeddings, restored
from jaxprompt.prompts.spec import Method, PromptSpec

# the authors' `nonlinearity` choices (their 'sigm' is torch.nn.Sigmoid), plus torch.nn.GELU (exact erf form)
NONLINEARITIES = {
  "relu": jax.nn.relu,
  "tanh": jnp.tanh,
  "sigmoid": jax.nn.sigmoid,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
MLP_REPEATS = {"MLP1": 1, "MLP2": 2}  # their module_type: MLP2 runs the MLP1 block's modules twice
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which ResMLP uses


@dataclasses.dataclass(frozen=True)
class ResidualSpec(PromptSpec):
  """The reparameterisation's options, named as the authors' train.py flags (defaults: `config.PromptConfig`)."""

  method: ClassVar[str] = "residual"
  bottleneck_size: int  # E
  nonlinearity: str  # relu | tanh | sigmoid | gelu
  mlp_layer_norm: bool
  mlp_dropout: float
  separate_mlps: bool  # one MLP per prompt token, else one shared by all
  mlp_type: str  # MLP1 | MLP2

  def describe(self) -> str:
    return f"{self.method} ({self.mlp_type}, E = {self.bottleneck_size}{', separate' if self.separate_mlps else ''})"


def _dense(rng: jax.Array, fan_in: int, fan_out: int, lead: tuple[int, ...]) -> nnx.Dict:
  """A torch.nn.Linear (w [..., fan_in, fan_out], b [..., fan_out]); `lead` = (P,) for one per prompt token."""
  k1, k2 = jax.random.split(rng)
  axes = (None,) * len(lead)
  return nnx.Dict(
    w=L.param(torch_linear_init(k1, fan_in, (*lead, fan_in, fan_out)), (*axes, None, None), kind=PromptParam),
    b=L.param(torch_linear_init(k2, fan_in, (*lead, fan_out)), (*axes, None), kind=PromptParam),
  )


def _apply(p: nnx.Dict, x: jax.Array) -> jax.Array:
  """x [P, I] through a shared Linear (w [I, O]) or a per-token one (w [P, I, O]) -> [P, O]."""
  w = p["w"][...]
  y = jnp.einsum("pi,pio->po", x, w) if w.ndim == 3 else x @ w
  return y + p["b"][...]


class ResidualPrompt(PromptMethod):
  """`embedding` [P, H] (the authors' `model.prompt`) and its residual MLP: `down` [(P,) H, E], `up` [(P,) E, H]
  and, with layer norm, `norm` scale / bias [(P,) H]; `prefix` gives every row the reparameterised prompt."""

  method = ResidualSpec.method

  def __init__(self, embedding: jax.Array, spec: ResidualSpec, rng: jax.Array):
    if spec.nonlinearity not in NONLINEARITIES or spec.mlp_type not in MLP_REPEATS:
      raise PromptError(
        f"residual prompt: nonlinearity {spec.nonlinearity!r} / mlp_type {spec.mlp_type!r} unknown "
        f"({' | '.join(NONLINEARITIES)}; {' | '.join(MLP_REPEATS)})"
      )
    embedding = jnp.asarray(embedding, jnp.float32)
    p, h = embedding.shape
    e, lead = spec.bottleneck_size, ((p,) if spec.separate_mlps else ())
    self.options = spec
    self.embedding = L.param(embedding, ("prompt", "prompt_embed"), kind=PromptParam)
    r_down, r_up = jax.random.split(rng)
    self.down = _dense(r_down, h, e, lead)
    self.up = _dense(r_up, e, h, lead)
    if spec.mlp_layer_norm:
      axes = (None,) * (len(lead) + 1)
      self.norm = nnx.Dict(
        scale=L.param(jnp.ones((*lead, h), jnp.float32), axes, kind=PromptParam),
        bias=L.param(jnp.zeros((*lead, h), jnp.float32), axes, kind=PromptParam),
      )

  @property
  def uses_dropout(self) -> bool:
    return self.options.mlp_dropout > 0

  @property
  def length(self) -> int:
    return self.embedding.shape[-2]

  def reparameterise(self, dropout_rng=None) -> jax.Array:
    """The prompt [P, H]: x + block(x), block = [LayerNorm](Dropout(up(act(down(x))))) once (MLP1) or twice with
    the same weights (MLP2); dropout only with a key (training), a fresh mask each pass as torch draws."""
    s = self.options
    x = self.embedding[...]
    act = NONLINEARITIES[s.nonlinearity]
    rngs = L.split_rng(dropout_rng, MLP_REPEATS[s.mlp_type])
    y = x
    for rng in rngs:
      y = L.dropout(_apply(self.up, act(_apply(self.down, y))), s.mlp_dropout, rng)
      if s.mlp_layer_norm:
        y = L.layer_norm(y, self.norm["scale"][...], self.norm["bias"][...], LAYER_NORM_EPS)
    return x + y

  def inference_value(self) -> jax.Array:
    return self.reparameterise()

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    # computed once for one row and repeated over the batch, as the authors' `prompt.repeat(k, 1, 1)`
    return Prefix(embeds=self.reparameterise(dropout_rng)[None])  # [1, P, H]

  def packed_table(self, dropout_rng=None) -> jax.Array:
    return self.reparameterise(dropout_rng)

  def spec(self) -> ResidualSpec:
    return self.options


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def spec_of(pcfg) -> ResidualSpec:
  """The configured options (`config.PromptConfig`, defaults filled in)."""
  return ResidualSpec(**{f.name: pcfg.option(f.name) for f in dataclasses.fields(ResidualSpec)})


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> ResidualPrompt:
  # the base prompt starts as prompt tuning's would (the authors: sampled vocabulary or U(-0.5, 0.5))
  return ResidualPrompt(initial_prompt(pcfg, base, tokenizer, labels, rng), spec_of(pcfg), jax.random.fold_in(rng, 2))


def _rebuild(spec: ResidualSpec, params: dict) -> ResidualPrompt:
  zeros = jnp.zeros(np.shape(params["embedding"]), jnp.float32)
  return restored(lambda: ResidualPrompt(zeros, spec, jax.random.key(0)), params)


RESIDUAL = Method(
  name=ResidualSpec.method,
  spec_type=ResidualSpec,
  description="residual prompt tuning (Razdaibiedina et al. 2023): embeddings [P, H] through a residual MLP, "
  "its output before the input",
  embeds=True,
  value_shape="[P, H]",
  saves="embedding [P, H] and its residual MLP",
  peft_type="PROMPT_TUNING",  # the MLP folded away: a plain prompt, which reads back as prompt_tuning
  build=_build,
  rebuild=_rebuild,
  fixed=fixed_embeddings,
  check=check_embeddings,
  peft_fields=PROMPT_TUNING.peft_fields,
  peft_read=PROMPT_TUNING.peft_read,
  # a bank would be K MLPs' outputs, fixed: what trains is the MLP
  bank_refusal=lambda pcfg: "residual prompt MLPs",
)
