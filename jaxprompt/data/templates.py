"""Prompt templates (P-tuning v1, Liu et al. 2021): virtual tokens placed between parts of the input, not only in
front of it — `prompt.template: "[P:3] {premise} [P:3] ? {hypothesis} [P:3]"`.

Syntax: `[P:n]` is n virtual tokens (`[P]` one); `{name}` is a field of the example (a built-in task's features,
e.g. RTE's premise / hypothesis; a custom task's template fields; `Task.fields`); anything else is literal text.
The slots' sizes add up to prompt.length, and the prompt's rows fill them in order: row k goes to the k-th virtual
token, as THUDM/P-tuning (9857868, LAMA/p_tuning/modeling.py `embed_input`) writes its encoder's outputs into the
pseudo-token positions. The template replaces the task's input text (T5's format or data.custom.template); targets
and labels are unchanged.

Tokens: each field and literal is tokenised on its own, without the whitespace around it (as THUDM/P-tuning
tokenises each part), the tokenizer's special tokens (BOS / EOS) put around the whole row where the tokenizer puts
them, and virtual token k is the id -1-k (`batches`: negative input ids are prompt rows; a model scatters the
prompt's rows into them, `models.interface.place_prompt`). Virtual tokens are real tokens: they have mask 1 and
take real positions in sequence order.

Length: rows are cut to data.input_length by the fields only, each keeping its start, the longest first (as HF's
`longest_first` truncation); the virtual tokens, the literal text and the special tokens always stay (a template
whose fixed tokens alone do not fit is refused).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from jaxprompt.errors import ConfigError, DataError

_PART = re.compile(r"\[P(?::(\d+))?\]|\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class Slot:
  size: int  # virtual tokens


@dataclasses.dataclass(frozen=True)
class Field:
  name: str


@dataclasses.dataclass(frozen=True)
class Text:
  text: str


def slot_id(k: int) -> int:
  """The input id of virtual token k (prompt row k)."""
  return -1 - k


@dataclasses.dataclass(frozen=True)
class Template:
  """A parsed `prompt.template` (see the module docstring)."""

  source: str
  parts: tuple[Slot | Field | Text, ...]

  @classmethod
  def parse(cls, source: str, where: str = "prompt.template") -> "Template":
    parts: list[Slot | Field | Text] = []
    at = 0
    for m in _PART.finditer(source):
      _text(parts, source[at : m.start()], source, where)
      if m.group(0).startswith("["):
        size = int(m.group(1) or 1)
        if size < 1:
          raise ConfigError(f"{where} {source!r}: {m.group(0)} holds no virtual token; write [P:n] with n >= 1")
        parts.append(Slot(size))
      else:
        name = m.group(2).strip()
        if not name.isidentifier():
          raise ConfigError(f"{where} {source!r}: {{{m.group(2)}}} is not a field name like {{premise}}")
        parts.append(Field(name))
      at = m.end()
    _text(parts, source[at:], source, where)
    template = cls(source, tuple(parts))
    if not template.length:
      raise ConfigError(f"{where} {source!r}: no prompt slot; place virtual tokens with [P:n]")
    if not template.fields:
      raise ConfigError(f"{where} {source!r}: no input field; name the example's text with {{field}}")
    return template

  @property
  def length(self) -> int:
    """Virtual tokens in all (prompt.length)."""
    return sum(p.size for p in self.parts if isinstance(p, Slot))

  @property
  def fields(self) -> tuple[str, ...]:
    """The fields it reads, in order, each once."""
    return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, Field)))

  def check_length(self, prompt_length: int, where: str = "prompt.template") -> None:
    if self.length != prompt_length:
      sizes = [str(p.size) for p in self.parts if isinstance(p, Slot)]
      total = " + ".join(sizes) + (f" = {self.length}" if len(sizes) > 1 else "")
      raise ConfigError(
        f"{where} {self.source!r}: its slots hold {total} virtual tokens, prompt.length is {prompt_length}; "
        "make them equal"
      )

  def check_fields(self, available: Sequence[str], task: str, where: str = "prompt.template") -> None:
    """Every field is one the task's examples carry (`Task.fields`)."""
    if not available:
      raise ConfigError(
        f"{where}: task {task} has no named fields to place (templates read built-in GLUE / SuperGLUE tasks' "
        "features, the quickstart's digits, or a custom task's fields)"
      )
    unknown = [f for f in self.fields if f not in available]
    if unknown:
      raise ConfigError(
        f"{where} {self.source!r}: unknown field {{{unknown[0]}}}; task {task} has {', '.join(available)}"
      )

  def values(self, given: str | Mapping[str, str], where: str = "input") -> dict[str, str]:
    """A request's input as this template's fields: a plain string is the single field; a mapping names them."""
    if isinstance(given, str):
      if len(self.fields) != 1:
        raise DataError(
          f"{where}: the prompt's template {self.source!r} reads fields {', '.join(self.fields)}; give them by name "
          "(an object of field: text), not one string"
        )
      return {self.fields[0]: given}
    missing = [f for f in self.fields if f not in given]
    extra = sorted(set(given) - set(self.fields))
    if missing or extra:
      problem = f"lacks field {missing[0]!r}" if missing else f"has unknown field {extra[0]!r}"
      raise DataError(f"{where} {problem}; the prompt's template {self.source!r} reads {', '.join(self.fields)}")
    bad = [f for f in self.fields if not isinstance(given[f], str)]
    if bad:
      raise DataError(f"{where}: field {bad[0]!r} must be a string")
    return {f: given[f] for f in self.fields}

  def token_rows(
    self,
    tokenizer,
    examples: Sequence[Mapping[str, str]],
    *,
    length: int | None = None,
    drop_eos: bool = False,
    where: str = "data",
  ) -> tuple[list[list[int]], int]:
    """Each example's fields -> its input ids with virtual tokens (-1-k), at most `length` tokens (fields cut,
    the longest first); `drop_eos`: leave out a final EOS the tokenizer adds (a causal model's input). -> (rows,
    how many were cut)."""
    before, after = special_tokens(tokenizer)
    if drop_eos and after and after[-1] == tokenizer.eos_token_id:
      after = after[:-1]
    texts = [p.text for p in self.parts if isinstance(p, Text)]
    literal = dict(zip(texts, _plain_ids(tokenizer, texts), strict=True)) if texts else {}
    fixed = len(before) + len(after) + self.length + sum(len(literal[t]) for t in texts)
    if length is not None and fixed > length:
      raise ConfigError(
        f"prompt.template {self.source!r} needs {fixed} tokens before any field (virtual tokens, text, special "
        f"tokens), more than the {length} input tokens (data.input_length)"
      )
    names = self.fields
    values = [_field_values(ex, names, where) for ex in examples]
    flat = _plain_ids(tokenizer, [v.strip() for vals in values for v in vals])
    rows, cut = [], 0
    for i in range(len(examples)):
      ids = dict(zip(names, flat[i * len(names) : (i + 1) * len(names)], strict=True))
      if length is not None:
        keep = fit_lengths([len(ids[n]) for n in names], length - fixed)
        cut += any(k < len(ids[n]) for k, n in zip(keep, names, strict=True))
        ids = {n: ids[n][:k] for n, k in zip(names, keep, strict=True)}
      rows.append(before + self._layout(ids, literal) + after)
    return rows, cut

  def _layout(self, fields: Mapping[str, list[int]], literal: Mapping[str, list[int]]) -> list[int]:
    out, k = [], 0
    for p in self.parts:
      if isinstance(p, Slot):
        out += [slot_id(k + i) for i in range(p.size)]
        k += p.size
      else:
        out += fields[p.name] if isinstance(p, Field) else literal[p.text]
    return out


def _text(parts: list, text: str, source: str, where: str) -> None:
  if "{" in text or "}" in text:
    raise ConfigError(f"{where} {source!r}: a brace outside a field; fields are written {{name}}")
  if text.strip():
    parts.append(Text(text.strip()))


def _field_values(example: Mapping, names: Sequence[str], where: str) -> list[str]:
  fields = example.get("fields")
  if fields is None:
    raise DataError(f"{where}: an example without named fields cannot fill a prompt template")
  missing = [n for n in names if n not in fields]
  if missing:
    raise DataError(f"{where}: an example has no field {missing[0]!r} for the prompt template")
  return [str(fields[n]) for n in names]


def _plain_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Each text's ids without special tokens, each distinct text tokenised once."""
  unique = list(dict.fromkeys(texts))
  table = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True)) if unique else {}
  return [list(table[t]) for t in texts]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
  """The ids the tokenizer puts (before, after) a text's own tokens (e.g. Llama's BOS, T5's EOS)."""
  probe = "a"
  with_special = tokenizer([probe], add_special_tokens=True)["input_ids"][0]
  plain = tokenizer([probe], add_special_tokens=False)["input_ids"][0]
  for at in range(len(with_special) - len(plain) + 1):
    if list(with_special[at : at + len(plain)]) == list(plain):
      return list(with_special[:at]), list(with_special[at + len(plain) :])
  return [], []


def fit_lengths(lengths: Sequence[int], room: int) -> list[int]:
  """How many tokens each field keeps so that they fit `room`: the longest cut first (all cut fields end equal, or
  one apart), the short ones whole."""
  if sum(lengths) <= room:
    return list(lengths)
  lo, hi = 0, max(lengths)  # the largest cap c with sum(min(n, c)) <= room
  while lo < hi:
    c = (lo + hi + 1) // 2
    lo, hi = (c, hi) if sum(min(n, c) for n in lengths) <= room else (lo, c - 1)
  keep = [min(n, lo) for n in lengths]
  spare = room - sum(keep)
  for i, n in enumerate(lengths):
    if spare and n > keep[i]:
      keep[i] += 1
      spare -= 1
  return keep
