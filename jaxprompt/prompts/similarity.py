"""Prompt similarity for prompt transfer (SPoT, Vu et al. 2022): which trained source prompt should initialise a
target task's prompt. Prompts are input embeddings [P, H] (prompt tuning, P-tuning); lengths may differ.

  average    cosine similarity of the prompts' average tokens (SPoT's "cosine similarity of average tokens")
  per_token  the mean cosine similarity over every pair of tokens (SPoT's "per-token average cosine similarity")
  max        for each target token its best-matching source token's cosine, averaged over the target's tokens
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxprompt.errors import PromptError

METRICS = ("average", "per_token", "max")


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def similarity(target: np.ndarray, source: np.ndarray, metric: str = "average") -> float:
  """How alike two prompts [P1, H] and [P2, H] are, in [-1, 1] (1: the same directions)."""
  a, b = np.asarray(target, np.float64), np.asarray(source, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise PromptError(f"prompt similarity needs two [P, H] prompts of one hidden size, got {a.shape} and {b.shape}")
  if metric == "average":
    return float(_unit(a.mean(0)) @ _unit(b.mean(0)))
  cos = _unit(a) @ _unit(b).T  # [P1, P2]
  if metric == "per_token":
    return float(cos.mean())
  if metric == "max":
    return float(cos.max(axis=1).mean())
  raise PromptError(f"unknown similarity metric {metric!r}; choose one of {', '.join(METRICS)}")


def rank(target: np.ndarray, sources: Mapping[str, np.ndarray], metric: str = "average") -> list[tuple[str, float]]:
  """Sources by similarity to the target, most similar first (ties: by name, so the order is stable)."""
  scored = [(name, similarity(target, value, metric)) for name, value in sources.items()]
  return sorted(scored, key=lambda item: (-round(item[1], 12), item[0]))
