"""`jaxprompt inspect`: what a soft prompt looks like — per-vector norms, the nearest vocabulary tokens by
cosine similarity, and a PNG heatmap of prompt-to-prompt cosine similarity. A key/value table (prefix tuning, a
cartridge: [P, Y, 2, K, D]) has no tokens near it: each slot's norms per layer, keys and values apart, and the
heatmap of its slots flattened."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[P, H] x [V, H] -> [P, V]."""
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return a @ b.T


def inspect_prompt(value: np.ndarray, table: np.ndarray | None, tokenizer=None, *, top_k: int = 5) -> list[dict]:
  """One record per prompt vector: norm and (with an embedding table) the nearest tokens."""
  norms = np.linalg.norm(value, axis=-1)
  rows = []
  sims = cosine(value, table) if table is not None else None
  for i in range(value.shape[0]):
    rec = {"index": i, "norm": float(norms[i])}
    if sims is not None:
      top = np.argsort(-sims[i])[:top_k]
      rec["nearest"] = [
        {
          "id": int(t),
          "token": tokenizer.convert_ids_to_tokens(int(t)) if tokenizer else None,
          "cosine": round(float(sims[i, t]), 4),
        }
        for t in top
      ]
    rows.append(rec)
  return rows


def inspect_kv_table(table: np.ndarray) -> list[dict]:
  """One record per slot of a key/value table [P, Y, 2, K, D]: its whole norm and each layer's key and value norms."""
  per = np.linalg.norm(table.reshape(*table.shape[:3], -1), axis=-1)  # [P, Y, 2]
  whole = np.linalg.norm(table.reshape(table.shape[0], -1), axis=-1)
  return [
    {
      "index": i,
      "norm": float(whole[i]),
      "key_norms": [round(float(x), 4) for x in per[i, :, 0]],
      "value_norms": [round(float(x), 4) for x in per[i, :, 1]],
    }
    for i in range(table.shape[0])
  ]


def similarity_heatmap(value: np.ndarray, out: Path, title: str = "soft prompt") -> Path:
  # A Figure without pyplot: no global backend switch, so a notebook's inline plots keep working.
  from matplotlib.figure import Figure

  sim = cosine(value, value)
  fig = Figure(figsize=(6, 5))
  ax = fig.subplots()
  im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
  ax.set_xlabel("prompt position")
  ax.set_ylabel("prompt position")
  ax.set_title(f"{title}: cosine similarity between prompt vectors")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  return out
