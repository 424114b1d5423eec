"""The package's shape, checked: small functions, no import cycles, no private names across modules, models that
implement their kind's interface, and no code path chosen by comparing a model kind's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxprompt"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = ast.parse(path.read_text(), filename=str(path))
  return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if node.level == 0:
    return node.module or ""
  base = module.split(".")
  is_package = (PACKAGE.parent / Path(*base) / "__init__.py").exists()
  base = base if is_package else base[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module) -> set[str]:
  """jaxprompt modules that `module` imports anywhere (functions included); `from pkg import mod` counts mod."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("jaxprompt"))
    elif isinstance(node, ast.ImportFrom):
      src = _resolve(module, node)
      if not src.startswith("jaxprompt"):
        continue
      for a in node.names:
        sub = f"{src}.{a.name}"
        out.add(sub if sub in MODULES else src)
  return out - {module}


def test_there_is_something_to_check():
  assert {"jaxprompt.run", "jaxprompt.training.trainer", "jaxprompt.models.interface"} <= set(MODULES)


def test_no_function_is_longer_than_60_lines():
  long = []
  for name, tree in MODULES.items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          long.append(f"{name}.{node.name}: {n} lines")
  assert not long, long


def test_modules_import_no_cycle():
  """The module graph, counting imports inside functions too, is acyclic (the package root aside: it only
  re-exports, and nothing inside imports it)."""
  graph = {m: {d for d in _imports(m, t) if d != "jaxprompt"} for m, t in MODULES.items() if m != "jaxprompt"}
  inside_root = [m for m, t in MODULES.items() if m != "jaxprompt" and "jaxprompt" in _imports(m, t)]
  assert not inside_root, f"modules importing the package root: {inside_root}"
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
      if d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_no_private_name_crosses_a_module_boundary():
  found = []
  for name, tree in MODULES.items():
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        src = _resolve(name, node)
        if any(part.startswith("_") and part != "__future__" for part in src.split(".")):
          found.append(f"{name}: from {src} import ...")
        found += [f"{name}: from {src} import {a.name}" for a in node.names
                  if a.name.startswith("_") and not a.name.startswith("__")]
        aliases.update(a.asname or a.name for a in node.names)
      elif isinstance(node, ast.Import):
        for a in node.names:
          if any(part.startswith("_") for part in a.name.split(".")):
            found.append(f"{name}: import {a.name}")
          aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        found.append(f"{name}: {node.value.id}.{node.attr}")
  assert not found, found


def test_no_code_path_compares_a_model_kind_name():
  """Callers dispatch on the model interface (`models.interface`), not on "seq2seq" / "causal"."""
  found = []
  for name, tree in MODULES.items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Compare):
        consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
        if {"seq2seq", "causal"} & set(consts):
          found.append(f"{name}:{node.lineno}")
  assert not found, found


def test_every_model_family_implements_its_kind_interface(tmp_path):
  from jaxprompt.data.batches import CausalBatch, Seq2SeqBatch
  from jaxprompt.models import interface as I
  from jaxprompt.models.decoder import DecoderConfig
  from jaxprompt.models.loading import abstract_model
  from jaxprompt.models.t5 import T5Config

  t5 = abstract_model(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
  assert isinstance(t5, I.Seq2SeqLM) and t5.batch_type is Seq2SeqBatch
  for family in ("llama", "gpt2"):
    dec = abstract_model(DecoderConfig(model_type=family, vocab_size=32, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2))
    assert isinstance(dec, I.CausalLM) and dec.batch_type is CausalBatch
    assert not isinstance(dec, I.Seq2SeqLM)
  assert not isinstance(t5, I.CausalLM)
