"""Echo scoring: the log-probability of every token of a prompt under a served prompt (decoder-only bases), and
the most likely next token — what OpenAI's completions API returns for `echo: true, logprobs: k, max_tokens: 0`
(or 1 at temperature 0), the loglikelihood requests of lm-evaluation-harness's `local-completions` backend.

One scoring call per HTTP request (its prompts as one batch, at most `max_batch` rows per jitted call), independent
of the engine's decode loop: a forward pass over [prompt, tokens] as training scores a target (`score_targets`
with every token a target), so a continuation's summed log-probabilities equal `jaxprompt eval`'s rank score
of it as a label. Token 0 has a log-probability only where a soft prompt stands before it in the computation
(never for a served decoder prompt: its keys/values are precomputed without its last hidden state), as OpenAI
gives None for the first token.

Notation: B rows (bucketed), W row length (bucketed, tokens + 1 slot for the next token), V vocabulary, k top.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprompt.batches import CausalBatch, pad_rows


@dataclasses.dataclass(frozen=True)
class Scored:
  """One row: each token's log-probability (None where it has none) and its top-k alternatives (ids, values),
  then the most likely next token, its log-probability and top-k."""

  token_logprobs: list[float | None]
  top: list[list[tuple[int, float]] | None]
  next_token: int
  next_logprob: float
  next_top: list[tuple[int, float]]


def _pow2(n: int, least: int) -> int:
  b = least
  while b < n:
    b *= 2
  return b


class Scorer:
  """Scores token rows under a served prompt (a `serve.engine.ServedPrompt`, or None for the base)."""

  def __init__(self, base, store, *, max_batch: int = 16):
    self.store, self.max_batch = store, max_batch
    self.graphdef, self.state = nnx.split(base)
    self._lock = threading.Lock()
    self._fn = jax.jit(self._score, static_argnames=("k",))

  @staticmethod
  def scores(base) -> bool:
    """Can `base`'s prompts be scored token by token (a decoder-only model: its batches are causal)?"""
    return base.batch_type is CausalBatch

  def _score(self, state, batch: CausalBatch, prefix, k: int):
    logits, targets, mask = nnx.merge(self.graphdef, state).score_targets(batch, prefix)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, W, V]
    gold = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    top_v, top_i = jax.lax.top_k(logp, k)
    return gold, mask, top_v, top_i

  def score(self, prompt, rows: Sequence[list[int]], k: int, pad: int = 0) -> list[Scored]:
    out: list[Scored] = []
    with self._lock:  # one scoring call at a time: each is a whole batch already
      for i in range(0, len(rows), self.max_batch):
        out += self._chunk(prompt, rows[i : i + self.max_batch], max(k, 1), pad)
    return out

  def _chunk(self, prompt, rows: Sequence[list[int]], k: int, pad: int) -> list[Scored]:
    n = len(rows)
    b, w = _pow2(n, 1), _pow2(max(len(r) for r in rows) + 1, 16)
    padded = list(rows) + [rows[0]] * (b - n)
    tokens, token_mask = pad_rows(padded, w, pad)
    # every slot is a target: slot t's log-probability comes from position t - 1; the slot after a row's last token
    # (padding, never attended to) gives the next token's distribution
    index = np.broadcast_to(np.arange(w, dtype=np.int32), (b, w)).copy()
    valid = (index <= np.asarray([len(r) for r in padded])[:, None]).astype(np.int32)
    batch = CausalBatch(tokens, token_mask, index, valid, tokens, token_mask)
    prefix = self.store.rows([prompt] * b) if prompt is not None else None
    gold, mask, top_v, top_i = (
      np.asarray(a) for a in self._fn(self.state, jax.tree.map(jnp.asarray, batch), prefix, k=k)
    )
    out = []
    for r, row in enumerate(rows[:n]):
      m = len(row)
      lp = [float(gold[r, t]) if mask[r, t] else None for t in range(m)]
      top = [
        list(zip(top_i[r, t].tolist(), top_v[r, t].tolist(), strict=True)) if mask[r, t] else None for t in range(m)
      ]
      nxt = list(zip(top_i[r, m].tolist(), top_v[r, m].tolist(), strict=True))
      out.append(Scored(lp, top, nxt[0][0], nxt[0][1], nxt))
    return out
