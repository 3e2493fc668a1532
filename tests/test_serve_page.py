"""The page of `pegasus-x serve` in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PEGASUS_X_CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.slow

pytest.importorskip("starlette", reason='the page test needs the serve extra: pip install -e ".[serve,test]"')
sync_api = pytest.importorskip("playwright.sync_api", reason='the page test needs Playwright: pip install -e ".[test]"')
if not Path(CHROMIUM).is_file():
    pytest.skip(f"the page test needs chromium at {CHROMIUM}: apt-get install -y chromium (or set "
                "PEGASUS_X_CHROMIUM to a Chromium binary)", allow_module_level=True)

import httpx  # noqa: E402
from playwright.sync_api import expect  # noqa: E402

from pegasus_x.serve import ServeOptions, create_app  # noqa: E402
from pegasus_x.summarize import Summarizer  # noqa: E402

from _serve_helpers import live  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = (ROOT / "examples" / "sample.txt").read_text()
SHORT = ("The join command joins the lines of two files on a common field. For each pair of input lines with "
         "identical join fields, it writes a line to standard output.")


@pytest.fixture(scope="module")
def url():
    summarizer = Summarizer(None, max_input_tokens=256)
    with live(create_app(summarizer, ServeOptions())) as base:
        yield base


@pytest.fixture
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1000, "height": 760})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = context.new_page()
        page.goto(url + "/")
        yield page
        browser.close()


def api_summary(url: str, text: str) -> dict:
    return httpx.post(f"{url}/v1/summarize", json={"text": text, "num_beams": 1}, timeout=60).json()


def test_paste_stream_copy_and_screenshot(url, page, tmp_path):
    expected = api_summary(url, SHORT)
    # Count the changes of the summary box: a streamed summary arrives in several. (Checks use `expect`, not
    # wait_for_function: the page's Content-Security-Policy forbids evaluating strings.)
    page.evaluate("""() => { window.updates = 0; new MutationObserver((m) => { window.updates += m.length; })
        .observe(document.getElementById('summary'), {childList: true, characterData: true, subtree: true}); }""")
    page.fill("#text", SHORT)
    page.select_option("#beams", "1")
    page.keyboard.press("Control+Enter")  # the keyboard alone
    expect(page.locator("#stats")).to_contain_text("Input:", timeout=60_000)
    assert page.inner_text("#summary") == expected["summary"]
    assert page.evaluate("window.updates") > 2
    assert f"Input: {expected['input_tokens']} tokens" in page.inner_text("#stats")
    assert page.is_hidden("#dropped") and page.is_hidden("#error")
    page.click("#copy")
    assert page.evaluate("navigator.clipboard.readText()") == expected["summary"]
    shot = tmp_path / "serve-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_long_input_warns_about_dropped_tokens(url, page, tmp_path):
    expected = api_summary(url, SAMPLE)
    assert expected["dropped_tokens"] > 0
    page.fill("#text", SAMPLE)
    page.select_option("#beams", "1")
    page.click("#submit")
    page.wait_for_selector("#dropped", state="visible", timeout=60_000)
    warning = page.inner_text("#dropped")
    assert "Warning" in warning and f"{expected['dropped_tokens']} tokens were dropped" in warning
    assert page.inner_text("#summary") == expected["summary"]
    page.screenshot(path=str(tmp_path / "serve-page-dropped.png"), full_page=True)


def test_file_and_errors(url, page, tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text(f"# Notes\n\n{SHORT}\n")
    page.set_input_files("#file", str(doc))
    assert "notes.md" in page.inner_text("#file-name")
    page.click("#submit")
    expect(page.locator("#stats")).to_contain_text("Input:", timeout=60_000)
    assert page.inner_text("#summary")
    page.click("#clear-file")
    page.fill("#text", "")
    page.click("#submit")
    assert "Paste a text" in page.inner_text("#error")
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\x89PNG\x00\x01")
    page.set_input_files("#file", str(binary))  # the server refuses it; the page says why
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("binary", timeout=60_000)
