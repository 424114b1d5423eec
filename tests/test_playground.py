"""The playground page (GET /) in a real headless browser: Debian's chromium driven by playwright (no browser is
downloaded). The page lists the served prompts, streams a completion into the page in more than one piece (the
same text as the non-streamed greedy answer), shows /v1/classify's scores for a prompt whose task records labels,
shows live metrics, and logs no console error. The server binds 127.0.0.1 on a free port; server and browser are
always stopped. Skips only where no chromium is installed (`.ci/run` installs it)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from playwright.sync_api import sync_playwright  # noqa: E402  (the dev extra)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
  CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium; .ci/run installs it)"
)
LABELS = ["good", "bad"]
CANDIDATES = ["max: 3 7 1 8 2", "hello there", "min: 9 4", "a", "the film was dull", "1 2 3 4"]


@pytest.fixture(scope="module")
def url(byte_llama, tmp_path_factory):
  from jaxprompt.serve.server import build, serving

  prompts = tmp_path_factory.mktemp("playground")
  rng = np.random.default_rng(4)
  for name in ("plain", "sentiment"):
    np.save(prompts / f"{name}.npy", rng.normal(size=(4, 32)).astype(np.float32))
  (prompts / "sentiment.json").write_text(json.dumps({"task": {"name": "sentiment", "labels": LABELS}}))
  app, _, problems = build(
    str(byte_llama), prompts=str(prompts), name="base", max_batch=2, max_tokens=32, max_input_tokens=32
  )
  assert problems == []
  with serving(app) as url:
    yield url


def _long_completion(url: str) -> tuple[str, str, dict]:
  """(input, its greedy text, its classify scores) for the first candidate input whose completion under
  "sentiment" runs past one decoding chunk (so it streams in several pieces)."""
  with httpx.Client(timeout=120) as c:
    for text in CANDIDATES:
      r = c.post(url + "/v1/completions", json=dict(model="sentiment", prompt=text, max_tokens=24, temperature=0))
      assert r.status_code == 200, r.text
      if r.json()["usage"]["completion_tokens"] > 16 and len(r.json()["choices"][0]["text"]) >= 3:
        scores = c.post(url + "/v1/classify", json=dict(model="sentiment", input=text)).json()["data"][0]["scores"]
        return text, r.json()["choices"][0]["text"], scores
  raise AssertionError("no candidate input gives a completion longer than one chunk")


def test_the_page_streams_a_completion_shows_scores_and_metrics_and_logs_no_console_error(url):
  text, want, scores = _long_completion(url)
  errors: list[str] = []
  with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
    try:
      page = browser.new_page()
      page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
      page.on("pageerror", lambda e: errors.append(str(e)))
      page.goto(url + "/", timeout=30_000)
      page.wait_for_function("document.querySelectorAll('#model option').length === 3", timeout=30_000)
      assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["base", "plain", "sentiment"]
      page.select_option("#model", "sentiment")
      assert "good" in page.text_content("#labels-note")
      page.fill("#input", text)
      page.fill("#max-tokens", "24")
      page.evaluate(
        "window.pieces = 0; new MutationObserver((rs) => { window.pieces += rs.filter(r => r.addedNodes.length)"
        ".length; }).observe(document.getElementById('output'), {childList: true})"
      )
      page.click("#run")
      page.wait_for_function("document.body.dataset.state === 'done'", timeout=120_000)
      assert page.text_content("#error") == "" and page.is_hidden("#error")
      assert page.text_content("#output") == want
      assert page.evaluate("window.pieces") >= 2  # streamed: the text arrived in pieces
      assert "finish_reason" in page.text_content("#finish")
      assert page.is_visible("#classify")
      rows = page.eval_on_selector_all(
        "#scores tr", "rs => rs.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
      )
      assert [label for label, _ in rows] == LABELS
      for label, shown in rows:
        assert abs(float(shown) - scores[label]) <= 5e-4, (label, shown, scores)
      page.wait_for_function(
        "[...document.querySelectorAll('#metrics dt')].some(dt => dt.textContent === 'tokens generated'"
        " && Number(dt.nextElementSibling.textContent) > 0)",
        timeout=15_000,
      )
    finally:
      browser.close()
  assert errors == []
