"""Adaption prompts (LLaMA-Adapter, Zhang et al. 2023; PEFT's ADAPTION_PROMPT): A learned prompt vectors in each of
the top L_a attention layers, with a zero-initialised gate — the frozen model starts exactly as it was.

Notation: Y layers, L_a adapted layers (the top ones), A adapter length, H hidden, B batch.

Matched to PEFT 0.21.2 (`tuners/adaption_prompt/layer.py`, `utils.py`): in an adapted layer the attention output
gains `gate * softmax(q k_a^T / sqrt(D)) v_a`, with k_a / v_a = the layer's own k_proj / v_proj (biases included) of
the raw prompt [A, H] (not normed, no rotary embedding, no mask), q the layer's queries (rotary embedding applied),
the softmax in float32 over the A slots alone, the raw gate (no tanh), key/value head n // (N / K) for query head n
(GQA); Llama and Mistral add o_proj of it (o_proj's bias too), GPT-2 adds it unprojected. PEFT supports model types
llama, mistral and gpt2: an adaption prompt on another decoder (Qwen2...) trains and serves here, and its PEFT
export is refused. T5 has no adaption prompts (PEFT neither). The attention itself is `models.kv.adaption_attention`.

Init: PEFT draws the prompts N(0, 1) (`prompt.init: random_normal`; any other input-embedding init fills each
layer's prompt as it would a soft prompt), gates 0. Saved by PEFT per adapted layer i:
`base_model.model.model.layers.{i}.self_attn.adaption_prompt` [1, A, H] and `.adaption_gate` [1] (GPT-2:
`base_model.model.transformer.h.{i}.attn.`), config adapter_len, adapter_layers, target_modules.

Inference value (lossless): [L_a, A + 1, H] — each adapted layer's prompt, then a row holding its gate in column 0.
"""

from __future__ import annotations

import dataclasses
import re
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

# PEFT's TRANSFORMERS_MODEL_CONFIG: model_type -> (where the layers are, the attention module: target_modules)
PEFT_MODULES = {
  "llama": ("model.layers", "self_attn"),
  "mistral": ("model.layers", "self_attn"),
  "gpt2": ("transformer.h", "attn"),
}
_PEFT_KEY = re.compile(r"\.(\d+)\.(?:self_attn|attn)\.adaption_(prompt|gate)$")


@dataclasses.dataclass(frozen=True)
class AdaptionSpec(PromptSpec):
  """`num_layers`: the base's layer count Y (the prompts sit in its top L_a layers; None: not recorded);
  `peft_problem`: why PEFT cannot run it on that base (its GQA arithmetic), or None."""

  method: ClassVar[str] = "adaption"
  num_layers: int | None = None
  peft_problem: str | None = None

  def describe(self) -> str:
    return self.method


def pack(prompt, gate):
  """prompt [..., L_a, A, H], gate [..., L_a] -> the value [..., L_a, A + 1, H] (gate in the last row's column 0)."""
  xp = jnp if isinstance(prompt, jax.Array) else np
  row = xp.zeros(prompt.shape[:-2] + (1, prompt.shape[-1]), prompt.dtype)
  row = row.at[..., 0, 0].set(gate) if xp is jnp else _set_gate(row, gate)
  return xp.concatenate([prompt, row], axis=-2)


def _set_gate(row: np.ndarray, gate) -> np.ndarray:
  row = row.copy()
  row[..., 0, 0] = gate
  return row


def unpack(value, where: str = "prompt"):
  """The value [..., L_a, A + 1, H] -> (prompt [..., L_a, A, H], gate [..., L_a])."""
  if value.ndim < 3 or value.shape[-2] < 2:
    raise PromptError(f"{where}: an adaption value is [L_a, A + 1, H], got shape {tuple(value.shape)}")
  return value[..., :-1, :], value[..., -1, 0]


class AdaptionPrompt(PromptMethod):
  """`prompt` [L_a, A, H] and `gate` [L_a] (`PromptParam`, float32) for the top L_a of `layers` attention layers —
  or a bank of K ([K, L_a, A, H], [K, L_a]) for mixed batches, each row picking its own by id."""

  method = AdaptionSpec.method

  def __init__(self, prompt, gate, *, layers: int, peft_problem: str | None = None):
    prompt, gate = jnp.asarray(prompt, jnp.float32), jnp.asarray(gate, jnp.float32)
    if prompt.ndim not in (3, 4) or gate.shape != prompt.shape[:-2]:
      raise PromptError(f"adaption: prompt {prompt.shape} and gate {gate.shape} are not [L_a, A, H] and [L_a]")
    if not 0 < prompt.shape[-3] <= layers:
      raise PromptError(f"adaption: {prompt.shape[-3]} adapted layers, the model has {layers}")
    lead = ("prompts",) if prompt.ndim == 4 else ()
    self.prompt = L.param(prompt, lead + (None, "prompt", "prompt_embed"), kind=PromptParam)
    self.gate = L.param(gate, lead + (None,), kind=PromptParam)
    self.layers = layers
    self.peft_problem = peft_problem

  @property
  def length(self) -> int:
    return self.prompt.shape[-2]

  def spec(self) -> AdaptionSpec:
    return AdaptionSpec(num_layers=self.layers, peft_problem=self.peft_problem)

  def prefix(self, batch_size: int, prompt_ids=None, *, dropout_rng=None) -> Prefix:
    prompt, gate = self.prompt[...], self.gate[...]
    if prompt.ndim == 4:
      if prompt_ids is None:
        raise PromptError("an adaption prompt bank needs prompt_ids for each example")
      prompt, gate = prompt[prompt_ids], gate[prompt_ids]
    else:
      prompt, gate = prompt[None], gate[None]  # [1, L_a, A, H]: the same for every row
    below = self.layers - prompt.shape[1]  # the layers under the adapted ones carry zeros, switched off
    rows = prompt.shape[0]
    return Prefix(
      adaption=jnp.concatenate([jnp.zeros((rows, below) + prompt.shape[2:], prompt.dtype), prompt], axis=1),
      adaption_gate=jnp.concatenate([jnp.zeros((rows, below), gate.dtype), gate], axis=1),
      adaption_on=jnp.concatenate([jnp.zeros((rows, below)), jnp.ones((rows, prompt.shape[1]))], axis=1),
    )

  def inference_value(self) -> jax.Array:
    return pack(self.prompt[...], self.gate[...])

  @classmethod
  def stack(cls, modules: Sequence[PromptMethod]) -> "AdaptionPrompt":
    shapes = {(m.prompt.shape, m.layers) for m in modules}
    if len(shapes) != 1:
      raise PromptError(f"adaption prompts in a bank must share L_a, A and the model, got {sorted(shapes)}")
    prompt = jnp.stack([m.prompt[...] for m in modules])
    gate = jnp.stack([m.gate[...] for m in modules])
    return cls(prompt, gate, layers=modules[0].layers, peft_problem=modules[0].peft_problem)


# -- the registry entry (`prompts.registry`) ------------------------------------------------------------------


def _refuse_unless_supported(base, where: str) -> None:
  if not base.supports_adaption:
    raise PromptError(
      f"{where}: adaption prompts need a decoder-only model (PEFT: Llama, Mistral, GPT-2), not {base.kind}"
    )


def _peft_problem(base) -> str | None:
  """PEFT's AdaptedAttention takes K = N // (H // (K·D)) key/value heads: wrong unless H = N·D."""
  slots, n, h = base.prefix_slots(), base.config.num_attention_heads, base.hidden_size
  kd = slots.heads * slots.head_dim
  if h % kd or n % (h // kd) or n // (h // kd) != slots.heads:
    return f"its key/value heads ({slots.heads} of {slots.head_dim}) do not fit PEFT's H / (K·D) arithmetic"
  return None


def _build(pcfg, base, tokenizer, labels, rng: jax.Array) -> AdaptionPrompt:
  _refuse_unless_supported(base, "prompt.method adaption")
  layers = base.prefix_slots().layers
  adapted = pcfg.option("adaption_layers") or layers
  if not 0 < adapted <= layers:
    raise PromptError(f"prompt.adaption_layers {adapted}: the model has {layers} layers")
  prompt = jnp.stack(
    [initial_prompt(pcfg, base, tokenizer, labels, jax.random.fold_in(rng, i)) for i in range(adapted)]
  )
  return AdaptionPrompt(prompt, jnp.zeros((adapted,), jnp.float32), layers=layers, peft_problem=_peft_problem(base))


def _rebuild(spec: AdaptionSpec, params: dict) -> AdaptionPrompt:
  shape = np.shape(params["prompt"])
  return restored(
    lambda: AdaptionPrompt(
      jnp.zeros(shape, jnp.float32),
      jnp.zeros(shape[:-2], jnp.float32),
      layers=spec.num_layers,
      peft_problem=spec.peft_problem,
    ),
    params,
  )


def _fixed(value, spec: AdaptionSpec, slots, where: str) -> AdaptionPrompt:
  if slots is None:
    raise PromptError(f"{where}: an adaption prompt needs its base model (its layer count)")
  if spec.num_layers not in (None, slots.layers):
    raise PromptError(f"{where}: adaption prompt for a model of {spec.num_layers} layers, this one has {slots.layers}")
  prompt, gate = unpack(np.asarray(value, np.float32), where)
  return AdaptionPrompt(prompt, gate, layers=slots.layers, peft_problem=spec.peft_problem)


def _check(value, base, where: str) -> None:
  _refuse_unless_supported(base, where)
  if value.shape[-1] != base.hidden_size:
    raise PromptError(f"{where}: adaption value is {value.shape}, this model's hidden size is {base.hidden_size}")


def _peft_module(record) -> tuple[str, str]:
  model_type = record.architecture.model_type if record.architecture is not None else None
  if model_type not in PEFT_MODULES:
    raise ExportError(
      f"PEFT's ADAPTION_PROMPT supports model types {', '.join(PEFT_MODULES)}, not {model_type!r} (jaxprompt trains "
      "and serves it; export it --format numpy or safetensors instead)"
    )
  if record.spec.peft_problem:
    raise ExportError(f"PEFT cannot run this adaption prompt: {record.spec.peft_problem} (export --format numpy)")
  return PEFT_MODULES[model_type]


def _peft_fields(value: np.ndarray, record, base_path) -> dict:
  _, target = _peft_module(record)
  return dict(
    num_virtual_tokens=None,
    adapter_len=int(value.shape[1] - 1),
    adapter_layers=int(value.shape[0]),
    target_modules=target,
  )


def _peft_tensors(value: np.ndarray, record) -> dict[str, np.ndarray]:
  layers_at, target = _peft_module(record)
  prompt, gate = unpack(value)
  y, adapted = record.spec.num_layers, prompt.shape[0]
  out = {}
  for j in range(adapted):
    i = y - adapted + j
    out[f"base_model.model.{layers_at}.{i}.{target}.adaption_prompt"] = prompt[j][None]
    out[f"base_model.model.{layers_at}.{i}.{target}.adaption_gate"] = np.asarray(gate[j : j + 1])
  return out


def _peft_read(tensors: dict[str, np.ndarray], peft: dict, where) -> tuple[np.ndarray, AdaptionSpec]:
  """An ADAPTION_PROMPT adapter's per-layer prompts and gates as [L_a, A + 1, H] (the layers must be the top
  adapter_layers ones, as PEFT makes them)."""
  a, adapted = peft.get("adapter_len"), peft.get("adapter_layers")
  found: dict[int, dict[str, np.ndarray]] = {}
  for name, t in tensors.items():
    m = _PEFT_KEY.search(name)
    if m:
      found.setdefault(int(m.group(1)), {})[m.group(2)] = t
  layers = sorted(found)
  if not layers or len(layers) != adapted or layers != list(range(layers[0], layers[0] + len(layers))):
    raise PromptError(f"{where}: adapter_layers {adapted}, but the adapter holds layers {layers}")
  for i in layers:
    got = found[i]
    if set(got) != {"prompt", "gate"} or got["prompt"].shape[-2:][:1] != (a,) or got["gate"].size != 1:
      shapes = {k: v.shape for k, v in got.items()}
      raise PromptError(
        f"{where}: layer {i} holds {shapes}; expected adaption_prompt [1, {a}, H] and adaption_gate [1]"
      )
  prompt = np.stack([found[i]["prompt"].reshape(a, -1) for i in layers]).astype(np.float32)
  gate = np.asarray([found[i]["gate"].reshape(()) for i in layers], np.float32)
  return pack(prompt, gate), AdaptionSpec(num_layers=layers[-1] + 1)


ADAPTION = Method(
  name=AdaptionSpec.method,
  spec_type=AdaptionSpec,
  description="adaption prompts (LLaMA-Adapter, Zhang et al. 2023): A prompt vectors and a zero-init gate in each "
  "of the top L_a attention layers",
  embeds=False,
  value_shape="[L_a, A + 1, H]",
  saves="prompt [L_a, A, H], gate [L_a]",
  peft_type="ADAPTION_PROMPT",
  build=_build,
  rebuild=_rebuild,
  fixed=_fixed,
  check=_check,
  peft_fields=_peft_fields,
  peft_read=_peft_read,
  peft_tensors=_peft_tensors,
  peft_reads_tensors=True,
  # mixed batches of trained adaption prompts work (`AdaptionPrompt.stack`); per-task training is not built
  bank_refusal=lambda pcfg: "adaption prompts (per-task training)",
)
