"""Log-probabilities of generated tokens, in OpenAI's completions shape (`logprobs: k`, k <= TOP_LOGPROBS).

A generated token's log-probability is the model's: the log-softmax of its raw logits, before temperature, top-k
and top-p (vLLM's default, what OpenAI reports), so a sampled token's value does not depend on the settings that
drew it. The decode loops keep it for every token (one gather per row and step) and, only while a request asks
for alternatives, the TOP_LOGPROBS best (one static k, so no program per k); the host keeps the first k of them.

`choices[i].logprobs` = {tokens, token_logprobs, top_logprobs, text_offset}: a token's text is its own decoding
(special tokens by name, so EOS shows as itself), `top_logprobs` the k best as {text: log-probability}, best first,
plus the chosen token where it is not among them (as OpenAI and vLLM: up to k + 1 entries), and `text_offset` where
the token's text starts in the completion's text (0-based: the length of the text of the tokens before it).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxprompt.inference.decoding import TOP_LOGPROBS

__all__ = ["TOP_LOGPROBS", "TokenLogprob", "entries", "covered", "openai_logprobs"]


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """One generated token: its id, log-probability and the best alternatives [(id, log-probability)], best first."""

  token: int
  logprob: float
  top: tuple[tuple[int, float], ...] = ()


def entries(tokens: Sequence[int], logprobs, top_values=None, top_ids=None, k: int = 0) -> list[TokenLogprob]:
  """Host rows -> one TokenLogprob per token: logprobs [n], top_values / top_ids [n, >= k] (None: no alternatives)."""
  out = []
  for j, tok in enumerate(tokens):
    top = ()
    if k and top_ids is not None:
      top = tuple(zip(np.asarray(top_ids[j][:k]).tolist(), np.asarray(top_values[j][:k]).tolist(), strict=True))
    out.append(TokenLogprob(int(tok), float(logprobs[j]), top))
  return out


def _text_length(tokenizer, ids: Sequence[int]) -> int:
  return len(tokenizer.decode(list(ids), skip_special_tokens=True))


def covered(tokenizer, ids: Sequence[int], start: int, chars: int) -> int:
  """How many of `ids` (the first `start` known to be) lie wholly within the first `chars` characters of their
  text: a stream sends a token's log-probability with the chunk that completes its text."""
  n = start
  while n < len(ids) and _text_length(tokenizer, ids[: n + 1]) <= chars:
    n += 1
  return n


def openai_logprobs(tokenizer, items: Sequence[TokenLogprob], k: int, before: Sequence[int] = ()) -> dict:
  """OpenAI's completions `logprobs` object of `items`, which follow the tokens `before` (a stream's earlier
  chunks: offsets stay those of the whole completion)."""
  ids = [*before, *(x.token for x in items)]
  offsets = [_text_length(tokenizer, ids[:j]) for j in range(len(before), len(ids))]
  tops = []
  for x in items:
    top: dict[str, float] = {}
    for tok, lp in (*x.top[:k], (x.token, x.logprob)):
      top.setdefault(tokenizer.decode([tok]), lp)  # two ids may share a text: the likelier one is kept
    tops.append(top)
  return dict(
    tokens=[tokenizer.decode([x.token]) for x in items],
    token_logprobs=[x.logprob for x in items],
    top_logprobs=tops,
    text_offset=offsets,
  )
