"""The Colab notebooks in colab/: each runs top to bottom in smoke mode (JAXPROMPT_SMOKE=1: offline, tiny model,
few steps, CPU), is stored without outputs, and carries its "Open in Colab" badge. The real-mode settings, which
CI cannot run (hub models, TFDS downloads, a TPU), are at least checked to be valid configs."""

import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
COLAB = ROOT / "colab"
FIXTURES = ROOT.parent / "shared" / "fixtures"
EXPECTED = ("quickstart.ipynb", "export_to_pytorch.ipynb", "multitask_serving.ipynb")
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
NEEDS_FIXTURES = {"quickstart.ipynb"}  # SST-2 sentences from ../shared/fixtures/data/sst2
CELL_TIMEOUT = 600  # seconds; the first notebook may pre-train the built-in quickstart model (~35 s on 2 cores)
OWNER_RE = re.compile(r'^OWNER = "([^"]+)"', re.M)


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLAB / name, as_version=4)


def _code(nb) -> list[str]:
  return [c.source for c in nb.cells if c.cell_type == "code"]


def _tagged(nb, tag: str) -> str:
  cells = [c.source for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def test_the_three_notebooks_exist():
  assert set(EXPECTED) <= set(NOTEBOOKS), NOTEBOOKS
  assert (COLAB / "README.md").exists()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name} cell {i} has outputs: clear them before committing"
      assert cell.execution_count is None, f"{name} cell {i} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_badge_and_owner_placeholder(name):
  nb = _read(name)
  owners = [m for src in _code(nb) for m in OWNER_RE.findall(src)]
  assert len(owners) == 1, f"{name}: the OWNER constant must be defined exactly once, found {owners}"
  url = f"https://colab.research.google.com/github/{owners[0]}/jaxprompt/blob/main/colab/{name}"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and url in first.source and "colab-badge.svg" in first.source, (
    f"{name}: the first cell needs the Open-in-Colab badge linking to {url}"
  )
  assert any("git+https://github.com/{OWNER}/jaxprompt" in src for src in _code(nb)), (
    f"{name}: the install cell must pip-install jaxprompt from the OWNER's repository"
  )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_real_mode_settings_are_valid_configs(name):
  """The settings cell with SMOKE=False: what a Colab user runs must at least be a valid config."""
  from jaxprompt import config as C

  ns = {"os": os, "SMOKE": False}
  exec(_tagged(_read(name), "settings"), ns)  # noqa: S102 — our own notebook's plain-Python settings cell
  configs = [ns["config"]] if "config" in ns else list(ns["configs"].values())
  assert configs
  for raw in configs:
    cfg = C.from_dict(raw)
    assert not cfg.model.path.startswith("builtin:"), "real mode must use a real hub model"
    assert not cfg.data.files, "real mode reads its task from TFDS, not from local fixture files"
    assert cfg.eval.batch_size % 8 == 0 and cfg.train.batch_size % 8 == 0, (
      "batches must split evenly over the 8 cores of a Colab TPU v2-8"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_in_smoke_mode(name, tmp_path):
  from nbclient import NotebookClient

  if name in NEEDS_FIXTURES and not FIXTURES.exists():
    pytest.skip(f"{name} reads SST-2 from {FIXTURES} in smoke mode, which is absent")
  nb = _read(name)
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # plots must render inline
  env.update(
    JAXPROMPT_SMOKE="1",
    JAXPROMPT_FIXTURES=str(FIXTURES),
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_VERBOSITY="error",
    TF_CPP_MIN_LOG_LEVEL="2",
    # 8 CPU devices, like the 8 cores of a Colab TPU v2-8, so that sharding mistakes show up here
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    # compiled programs are shared with the test suite and across the notebooks' CLI calls
    JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
  )
  # run in a scratch directory (the notebooks write runs/ and exports/ where they run); JAXPROMPT_CACHE is left
  # alone so the built-in quickstart model is pre-trained once per machine, as for a user
  client = NotebookClient(
    nb, kernel_name="python3", timeout=CELL_TIMEOUT, allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
  )
  start = time.time()
  client.execute(env=env)
  print(f"{name}: {time.time() - start:.1f} s in smoke mode", file=sys.stderr)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no plot"
