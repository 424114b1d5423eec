"""Text in, text out: a frozen base model with one or several soft prompts, generating in one jitted call.

With several prompts the inputs are run under every prompt as one mixed-prompt batch: a prompt bank
[K, P, H] and a prompt id per row (`prompts.PromptedModel`), so many tasks share one frozen model and one
compiled program.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt import prompts as P

log = logging.getLogger(__name__)


def load_prompts(sources: Sequence[str], *, step: str | int = "best") -> list[tuple[np.ndarray, dict]]:
  from jaxprompt.export import load_trained_prompt

  return [load_trained_prompt(s, step) for s in sources]


def recorded_base(infos: Sequence[dict]) -> tuple[str | None, str | None]:
  """(model path, tokenizer) recorded with the first prompt that has them."""
  for info in infos:
    path = (info.get("base_model") or {}).get("path")
    if path:
      return path, info.get("tokenizer")
    peft = info.get("peft") or {}
    if peft.get("base_model_name_or_path"):
      return peft["base_model_name_or_path"], None
  return None, None


def encode_inputs(tokenizer, texts: Sequence[str], kind: str, max_length: int | None = None):
  """Token ids [B, L] and mask. Decoders: left-padded, as in training and as transformers pads for generation.
  T5: right-padded, as in training and PEFT: T5's relative positions would otherwise put a soft prompt further
  from a shorter input."""
  rows = []
  eos = tokenizer.eos_token_id
  for t in texts:
    ids = list(tokenizer(t)["input_ids"])
    if kind == "causal" and eos is not None and ids and ids[-1] == eos:
      ids = ids[:-1]
    if not ids:  # empty input: start from BOS (decoders) / an empty encoder input (T5 gets its EOS)
      ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (eos or 0)]
    if max_length:
      ids = ids[-max_length:] if kind == "causal" else ids[:max_length]
    rows.append(ids)
  length = max(len(r) for r in rows)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    at = slice(length - len(r), None) if kind == "causal" else slice(0, len(r))
    ids[i, at] = r
    mask[i, at] = 1
  return ids, mask


def generate_text(base, tokenizer, texts: Sequence[str], prompts: Sequence[np.ndarray] = (), *,
                  max_new_tokens: int = 32, method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, num_beams: int = 4, alpha: float = 0.6, seed: int = 0) -> list[dict]:
  """Generate for every (prompt, input) pair; one record per pair, in prompt-major order."""
  from jaxprompt.generate import generate

  ids, mask = encode_inputs(tokenizer, texts, base.kind)
  n = len(texts)
  if prompts:
    k = len(prompts)
    model = P.PromptedModel(base, P.prompt_bank(list(prompts)))
    ids_k, mask_k = np.tile(ids, (k, 1)), np.tile(mask, (k, 1))
    which = np.repeat(np.arange(k), n)
    # eager: a gather and a concat, not worth a fresh jit trace per call
    embeds, m = model.embed_inputs(jnp.asarray(ids_k), jnp.asarray(mask_k), jnp.asarray(which))
    out = generate(base, inputs_embeds=embeds, attention_mask=m, max_new_tokens=max_new_tokens, method=method,
                   temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, alpha=alpha,
                   rng=jax.random.key(seed))
  else:
    k, which = 1, np.zeros(n, np.int64)
    out = generate(base, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
                   method=method, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                   alpha=alpha, rng=jax.random.key(seed))
  tokens = np.asarray(out["tokens"])
  lengths = np.asarray(out["lengths"])
  scores = np.asarray(out["scores"])
  records = []
  for row in range(k * n):
    toks = tokens[row, :lengths[row]].tolist()
    records.append(dict(prompt=int(which[row]) if prompts else None, input=texts[row % n],
                        output=tokenizer.decode(toks, skip_special_tokens=True), tokens=toks,
                        score=float(scores[row])))
  return records
