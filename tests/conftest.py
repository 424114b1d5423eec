"""Test setup: 8 simulated CPU devices, a persistent compilation cache, and the fixtures test modules share
(tiny models built once per session). Shared plain helpers live in helpers.py and helpers_hf.py."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' programs run for milliseconds and compile for seconds: most of the suite's time is XLA
# compiling. jax's "disable most optimizations" (LLVM -O0, no expensive passes; the same maths, checked by the same
# references) cut compile-bound files by a quarter to a third. Trainings of many steps (the quickstart's real
# run, trainings to an accuracy) run faster optimized: they run inside `helpers.fully_optimized()`. Users' runs and
# `jaxprompt bench` always compile fully optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Temporary files of the session (ours, pytest's, and those TFDS's mock_data leaves behind) in one folder,
# removed at the end, so the suite leaves nothing in /tmp.
_SESSION_TMP = tempfile.mkdtemp(prefix="jaxprompt-tests-")
os.environ["TMPDIR"] = _SESSION_TMP
tempfile.tempdir = None  # re-read TMPDIR
atexit.register(shutil.rmtree, _SESSION_TMP, True)

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# No persistent compilation cache inside the test processes themselves: in one process the in-memory cache already
# compiles each program once, and a cold CI run gains little from a disk cache there (two of the SIGSEGVs described
# at `_release_compiled_programs` surfaced inside its writes).
jax.config.update("jax_enable_compilation_cache", False)
# The processes tests start (CLI runs, multi-process training, notebook kernels) share one: a restarted training
# run then loads its programs instead of compiling them again.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

FIXTURES = ROOT.parent / "shared" / "fixtures"

# Test files, heaviest first (seconds of one full run, tests/file_seconds.json, written by
# `python .ci/file_seconds.py LOG` from a `pytest --durations=0` log). pytest-xdist's --dist loadfile hands files
# out in collection order; longest-first keeps both workers busy to the end instead of leaving one long file (the
# quickstart's training run has 2 tests, so xdist's own "most tests first" order put it last) running alone.
_FILE_SECONDS = ROOT / "tests" / "file_seconds.json"


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # our order (below), not xdist's count of tests per file


def pytest_collection_modifyitems(config, items):
  import json

  seconds = json.loads(_FILE_SECONDS.read_text()) if _FILE_SECONDS.exists() else {}
  first = {}
  for i, item in enumerate(items):
    first.setdefault(item.nodeid.split("::")[0], i)
  # a file stays in one piece and in its own order; unmeasured files (light ones, or new) after the measured ones
  items.sort(key=lambda it: (-seconds.get(it.nodeid.split("::")[0], 0.0), first[it.nodeid.split("::")[0]]))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Each test file's compiled programs are released when it ends. Every XLA:CPU executable keeps its own memory
  mappings (JIT code, constants): a pytest worker grew by ~19,000 mappings in 2.5 minutes of tests, and at the
  kernel's `vm.max_map_count` (65,530 here) the next compile or cache write dies of a SIGSEGV — what crashed an
  xdist worker three quarters of the way through the suite in stop 33's CI and in three runs here."""
  yield
  import gc

  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
  if not FIXTURES.exists():
    pytest.skip(f"real fixtures not found at {FIXTURES} (they live in ../shared/fixtures beside the repo)")
  return FIXTURES


@pytest.fixture(scope="session")
def byte_t5(tmp_path_factory):
  """A tiny random T5 over ByT5's byte vocabulary, with its tokenizer saved beside it."""
  from transformers import ByT5Tokenizer

  from tests.helpers_hf import write_t5

  folder = write_t5(tmp_path_factory.mktemp("byte_t5") / "m", "t5v11-gated-untied", vocab_size=384, seed=3)
  ByT5Tokenizer().save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def byte_llama(tmp_path_factory):
  """Llama 3 style: grouped-query attention, llama3 RoPE scaling, untied head."""
  from tests.helpers import write_byte_decoder

  return write_byte_decoder(tmp_path_factory.mktemp("byte_llama") / "m", "llama3-gqa-untied", seed=5)
