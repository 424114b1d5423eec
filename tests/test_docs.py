"""The documentation site (docs/, mkdocs.yml): its runnable examples run, it builds in strict mode, and every
relative link in README.md and docs/ resolves.

Every ```python block in docs/ says on its first line what becomes of it:
  `# doc-test`                  executed here, in a temporary folder that holds configs/;
  `# tested by tests/FILE.py`   executed by that test file (which must read the page), with its own assertions;
  `# not run ...: REASON`       cannot run offline (a model folder, the network, a GPU) and says why.
"""

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUN, TESTED_BY, NOT_RUN = "# doc-test", "# tested by ", "# not run"

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _python_blocks():
  """(page, line of the block's first code line, code) for every ```python block in docs/."""
  for page in PAGES:
    text = page.read_text()
    for m in FENCE.finditer(text):
      if m.group(1).strip().split(" ")[0] in ("python", "py"):
        yield page, text[: m.start(2)].count("\n") + 1, m.group(2)


BLOCKS = list(_python_blocks())
RUNNABLE = [b for b in BLOCKS if b[2].split("\n", 1)[0].strip() == RUN]


def _id(block) -> str:
  page, line, _ = block
  return f"{page.relative_to(DOCS)}:{line}"


def test_every_python_block_says_whether_it_runs():
  assert BLOCKS, "no python examples found in docs/"
  for page, line, code in BLOCKS:
    first = code.split("\n", 1)[0].strip()
    where = f"docs/{page.relative_to(DOCS)}:{line}"
    assert first == RUN or first.startswith(TESTED_BY) or first.startswith(NOT_RUN), (
      f"{where}: a python block's first line must be `{RUN}`, `{TESTED_BY}tests/FILE.py` or `{NOT_RUN}...: why`"
    )
    if first.startswith(TESTED_BY):
      test_file = ROOT / first[len(TESTED_BY) :].split()[0]
      assert test_file.is_file(), f"{where}: {test_file} does not exist"
      assert page.name in test_file.read_text(), f"{where}: {test_file.name} does not read {page.name}"
    if first.startswith(NOT_RUN):
      assert ":" in first, f"{where}: say why the example is not run (`{NOT_RUN} ...: reason`)"


@pytest.fixture
def user_cache(monkeypatch):
  # the user's cache, as the other tests use it: the quickstart base is pre-trained at most once per machine
  monkeypatch.setenv(
    "JAXPROMPT_CACHE",
    os.environ.get("JAXPROMPT_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxprompt"),
  )


@pytest.mark.parametrize("block", RUNNABLE, ids=[_id(b) for b in RUNNABLE])
def test_runnable_example(block, tmp_path, monkeypatch, user_cache):
  page, line, code = block
  monkeypatch.chdir(tmp_path)  # examples write runs/ where they run and read configs/ from there
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  # padded so that a traceback names the page's own line numbers
  exec(compile("\n" * (line - 1) + code, str(page), "exec"), {"__name__": "__doc_test__"})


def test_the_site_builds_in_strict_mode(tmp_path):
  missing = [
    m
    for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
    if importlib.util.find_spec(m.split(".")[0]) is None
  ]
  if missing:
    pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]' (CI does)")
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  proc = subprocess.run(
    [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert (tmp_path / "site" / "reference" / "api" / "index.html").exists()
  api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
  assert "load_config" in api and "TrainResult" in api, "the API reference page has no generated content"


def _strip_code(text: str) -> str:
  text = FENCE.sub("", text)
  return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
  """The anchor mkdocs (toc's default slugify) and GitHub give a heading made of plain words."""
  heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  heading = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
  return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def _anchors(page: Path) -> set[str]:
  return {_slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  bad = []
  for target in LINK.findall(_strip_code(page.read_text())):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
      continue
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
      bad.append(f"{target} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      bad.append(f"{target} (no heading #{anchor} in {dest.name})")
  assert not bad, f"{page.relative_to(ROOT)}: broken links: {bad}"
