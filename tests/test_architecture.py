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
  base = base[: len(base) - node.level + 1]
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


def _module_graph() -> dict[str, set[str]]:
  return {m: {d for d in _imports(m, t) if d != "jaxprompt"} for m, t in MODULES.items() if m != "jaxprompt"}


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(d) :] + [d]) if d in path else d)
      if d not in state:
        visit(d, path + [d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_modules_import_no_cycle():
  """The module graph, counting imports inside functions too, is acyclic (the package root aside: it only
  re-exports, and nothing inside imports it)."""
  inside_root = [m for m, t in MODULES.items() if m != "jaxprompt" and "jaxprompt" in _imports(m, t)]
  assert not inside_root, f"modules importing the package root: {inside_root}"
  _assert_acyclic(_module_graph())


def _package(module: str) -> str:
  """A module's package below the root (jaxprompt.models.t5 -> jaxprompt.models); a module at the root is its own."""
  return ".".join(module.split(".")[:2])


def test_packages_import_no_cycle():
  """The packages (models, data, prompts, training, evaluation, inference, serve, tools and the root's modules)
  import each other without a cycle: a layer never reaches back into one above it."""
  graph: dict[str, set[str]] = {}
  for m, deps in _module_graph().items():
    graph.setdefault(_package(m), set()).update(_package(d) for d in deps if _package(d) != _package(m))
  assert {"jaxprompt.models", "jaxprompt.training", "jaxprompt.evaluation"} <= set(graph)
  _assert_acyclic(graph)


# what a model is: the interface's methods and attributes, and the options fixed when it is built
def _model_attributes() -> set[str]:
  from jaxprompt.models import interface as I
  from jaxprompt.models.decoder import Decoder
  from jaxprompt.models.encoder import Encoder
  from jaxprompt.models.t5 import T5

  out = set()
  for cls in (I.PromptableLM, I.Seq2SeqLM, I.CausalLM, I.EncoderModel, I.FrozenLM, T5, Decoder, Encoder):
    out |= {n for n in vars(cls) if not n.startswith("__")} | set(getattr(cls, "__annotations__", {}))
  return out | {f.name for f in __import__("dataclasses").fields(I.ModelOptions)}


def test_no_capability_is_probed_and_no_model_is_changed_after_construction():
  """Capabilities are the interface's (`models.interface`): no `hasattr(x, "score_packed")` or
  `getattr(x, "identity", None)` on a model's attributes, and no `base.layer_loop = ...` outside a model's own
  methods (options and identity are passed when the model is built)."""
  names, found = _model_attributes(), []
  probe = names - {"dtype"}  # (an array's dtype is no capability)
  assert {"score_packed", "shared_prompt", "identity", "layer_loop", "supports_packing", "has_lm_head"} <= names
  for mod, tree in MODULES.items():
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("hasattr", "getattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in probe
        and (node.func.id == "hasattr" or len(node.args) == 3)
      ):
        found.append(f"{mod}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
      if isinstance(node, ast.Assign):
        for t in node.targets:
          if (
            isinstance(t, ast.Attribute)
            and t.attr in names
            and not (isinstance(t.value, ast.Name) and t.value.id == "self")
          ):
            found.append(f"{mod}:{node.lineno}: .{t.attr} = ...")
  assert not found, found


def test_no_private_name_crosses_a_module_boundary():
  found = []
  for name, tree in MODULES.items():
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        src = _resolve(name, node)
        if any(part.startswith("_") and part != "__future__" for part in src.split(".")):
          found.append(f"{name}: from {src} import ...")
        found += [
          f"{name}: from {src} import {a.name}"
          for a in node.names
          if a.name.startswith("_") and not a.name.startswith("__")
        ]
        aliases.update(a.asname or a.name for a in node.names)
      elif isinstance(node, ast.Import):
        for a in node.names:
          if any(part.startswith("_") for part in a.name.split(".")):
            found.append(f"{name}: import {a.name}")
          aliases.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
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


METHOD_NAMES = {"prompt_tuning", "p_tuning", "prefix_tuning"}
# where a method's name may be looked up: the registry (names -> entries, a spec's JSON -> its type)
METHOD_REGISTRY_MODULES = {"jaxprompt.prompts.registry"}


def _method_name_dispatch(node: ast.AST) -> bool:
  """A comparison with a method's name (`m == "p_tuning"`, `m in ("prompt_tuning", ...)`), or a spec dict's method
  looked up (`d.get("method", ...)`, `d["method"]`)."""

  def const(n):
    return isinstance(n, ast.Constant) and n.value in METHOD_NAMES

  if isinstance(node, ast.Compare):
    operands = [node.left, *node.comparators]
    return any(
      const(c) or (isinstance(c, (ast.Tuple, ast.List, ast.Set)) and any(map(const, c.elts))) for c in operands
    )
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
    return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "method"
  return isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "method"


def test_no_code_path_compares_a_method_name():
  """Callers ask the method registry (`prompts.registry`: a `Method` entry, a typed `PromptSpec`), never compare
  "prompt_tuning" / "p_tuning" / "prefix_tuning" or read a spec dict's "method": a new method is its own module and
  one registry line."""
  found = [
    f"{name}:{node.lineno}"
    for name, tree in MODULES.items()
    if name not in METHOD_REGISTRY_MODULES
    for node in ast.walk(tree)
    if _method_name_dispatch(node)
  ]
  assert not found, found


def test_every_model_family_implements_its_kind_interface(tmp_path):
  from jaxprompt.batches import CausalBatch, Seq2SeqBatch
  from jaxprompt.models import interface as I
  from jaxprompt.models.deberta import DebertaV2Config
  from jaxprompt.models.decoder import DecoderConfig
  from jaxprompt.models.encoder import EncoderConfig
  from jaxprompt.models.loading import abstract_model
  from jaxprompt.models.t5 import T5Config

  t5 = abstract_model(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
  assert isinstance(t5, I.Seq2SeqLM) and t5.batch_type is Seq2SeqBatch
  for family in ("llama", "gpt2"):
    dec = abstract_model(
      DecoderConfig(
        model_type=family,
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
      )
    )
    assert isinstance(dec, I.CausalLM) and dec.batch_type is CausalBatch and dec.has_lm_head
    assert not isinstance(dec, I.Seq2SeqLM) and not isinstance(dec, I.EncoderModel)
  assert not isinstance(t5, I.CausalLM) and not isinstance(t5, I.EncoderModel) and t5.has_lm_head
  for config_cls, family in ((EncoderConfig, "bert"), (EncoderConfig, "roberta"), (DebertaV2Config, "deberta-v2")):
    enc = abstract_model(
      config_cls(
        model_type=family,
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=1,
      )
    )
    assert isinstance(enc, I.EncoderModel) and not enc.has_lm_head
    assert not isinstance(enc, (I.Seq2SeqLM, I.CausalLM))


TESTS = Path(__file__).resolve().parent


def _names_a_test_module(dotted: str) -> bool:
  """`test_x`, `tests.test_x`, `test_x.sub` (absolute, or relative to tests/)."""
  parts = dotted.split(".")
  parts = parts[1:] if parts[0] == "tests" else parts
  return bool(parts) and parts[0].startswith("test_")


def _imported_test_modules(tree: ast.Module) -> list[str]:
  """The test modules a module imports: `import tests.test_x`, `from tests.test_x import ...`, `from tests import
  test_x`, `import test_x`, `from test_x import ...`, `from .test_x import ...`, `from . import test_x`."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [a.name for a in node.names if _names_a_test_module(a.name)]
    elif isinstance(node, ast.ImportFrom):
      source = "." * node.level + (node.module or "")
      if node.module and _names_a_test_module(node.module):
        found.append(source)
      elif node.module in (None, "tests"):
        sep = "." if node.module else ""
        found += [f"{source}{sep}{a.name}" for a in node.names if _names_a_test_module(a.name)]
  return found


def test_no_test_module_imports_another():
  """Test modules share fixtures through conftest.py and plain code through helper modules (tests/helpers*.py),
  never by importing each other."""
  paths = sorted(TESTS.glob("test_*.py"))
  assert Path(__file__).resolve() in paths
  found = [
    f"{path.name}: {name}"
    for path in paths
    for name in _imported_test_modules(ast.parse(path.read_text(), filename=str(path)))
  ]
  assert not found, found
