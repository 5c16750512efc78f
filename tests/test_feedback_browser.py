"""A real browser (Debian's Chromium driven by Playwright) logs in, rates, undoes, ranks by dragging,
chooses A vs B, edits, and the export holds exactly those answers.

Chromium is installed by tests/setup_browser.sh when missing. If it cannot be, the test fails (set
RLHFKIT_SKIP_BROWSER=1 to skip it on purpose). Screenshots go to $RLHFKIT_SCREENSHOTS (or the test's
tmp dir).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhfkit.feedback.export import records
from rlhfkit.feedback.store import Store
from tests.conftest import CHROMIUM_FLAGS as FLAGS
from tests.feedback_server import LiveServer

pytestmark = pytest.mark.browser

def _setup_db(path: Path) -> Store:
    st = Store(str(path))
    st.import_samples([{"prompt": "How was dinner?", "completion": "The food was great <script>alert(1)</script>"}],
                      project="demo", kinds=("rate",))
    st.import_samples([{"prompt": "Describe the weather", "completion": c}
                       for c in ("It rains.", "Sunny and warm, a lovely day.", "Weather.")],
                      project="demo", round=1, kinds=("rank",), group_size=3)
    st.import_samples([{"prompt": "Greet me", "completion": c} for c in ("Hello there!", "go away")],
                      project="demo", round=1, kinds=("pair",))
    st.import_samples([{"prompt": "Say thanks", "completion": "thx"}], project="demo", round=1, kinds=("edit",))
    st.add_annotator("ann", "correct horse")
    st.add_annotator("boss", "admin password", admin=True)
    return st


def test_annotate_in_browser_and_export(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("RLHFKIT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    db = tmp_path / "fb.db"
    st = _setup_db(db)
    server = LiveServer(str(db))
    problems: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            # (the wrong password below is answered with 401, which Chromium logs as a console error)
            page.on("console", lambda m: m.type == "error" and "401" not in m.text
                    and problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

            page.goto(server.url + "/")
            page.fill("input[name=name]", "ann")
            page.fill("input[name=password]", "wrong password")
            page.click("button[type=submit]")
            assert "Wrong name or password" in page.content()
            page.fill("input[name=name]", "ann")
            page.fill("input[name=password]", "correct horse")
            page.click("button[type=submit]")

            # Rate with the keyboard: 4, Enter. Then undo (U) and rate 2 instead.
            _ready(page, ".task[data-kind=rate]")
            assert "<script>alert(1)</script>" in page.inner_text(".response .text")  # shown as text
            page.keyboard.press("4")
            page.screenshot(path=str(shots / "annotate_rate.png"), full_page=True)
            page.keyboard.press("Enter")
            _ready(page, ".task[data-kind=rank]")
            assert "Saved." in page.inner_text(".flash")
            page.keyboard.press("u")
            _ready(page, ".task[data-kind=rate]")
            assert "Undone" in page.inner_text(".flash")
            page.click("label.opt:nth-child(2)")          # the rating 2
            page.click("#submit")

            # Rank by dragging the middle response ("Sunny...") to the top, then "Weather." above "It rains."
            _ready(page, ".task[data-kind=rank]")
            _drag(page, ".rankcard:nth-child(2)", ".rankcard:nth-child(1)", above=True)
            _drag(page, ".rankcard:nth-child(3)", ".rankcard:nth-child(2)", above=True)
            order = [t.strip() for t in page.locator(".rankcard .text").all_inner_texts()]
            assert order == ["Sunny and warm, a lovely day.", "Weather.", "It rains."]
            page.screenshot(path=str(shots / "annotate_rank.png"), full_page=True)
            page.click("#submit")

            # A vs B with the keyboard: A.
            _ready(page, ".task[data-kind=pair]")
            page.screenshot(path=str(shots / "annotate_pair.png"), full_page=True)
            page.keyboard.press("a")

            # Edit, submit with Ctrl+Enter.
            _ready(page, ".task[data-kind=edit]")
            page.fill("#edited", "Thank you very much!")
            page.screenshot(path=str(shots / "annotate_edit.png"), full_page=True)
            page.keyboard.press("Control+Enter")
            _ready(page, "text=All done")
            assert "4 / 4 done" in page.inner_text("#progress-text")

            # The admin view: counts and export links.
            page.click("button:has-text('Log out')")
            page.fill("input[name=name]", "boss")
            page.fill("input[name=password]", "admin password")
            page.click("button[type=submit]")
            page.goto(server.url + "/admin")
            text = page.inner_text("main")
            assert "ann\thuman\t4\t0\t0" in text and "4 / 4" in text   # 4 tasks, all answered
            page.screenshot(path=str(shots / "admin.png"), full_page=True)
            browser.close()
    finally:
        server.stop()

    assert problems == []
    recs = records(st, "demo")
    strip = lambda rs, keep: [{k: r[k] for k in keep} for r in rs]
    assert strip(recs["ratings"], ("prompt", "completion", "rating", "annotator")) == [
        {"prompt": "How was dinner?", "completion": "The food was great <script>alert(1)</script>",
         "rating": 2.0, "annotator": "ann"}]
    assert strip(recs["rankings"], ("prompt", "completions", "annotator")) == [
        {"prompt": "Describe the weather", "annotator": "ann",
         "completions": ["Sunny and warm, a lovely day.", "Weather.", "It rains."]}]
    assert strip(recs["edits"], ("prompt", "original", "edited", "annotator")) == [
        {"prompt": "Say thanks", "original": "thx", "edited": "Thank you very much!", "annotator": "ann"}]
    pairs = strip(recs["pairs"], ("prompt", "chosen", "rejected", "source", "tie"))
    assert sorted(pairs, key=str) == sorted([
        {"prompt": "Greet me", "chosen": "Hello there!", "rejected": "go away", "source": "pair", "tie": False},
        {"prompt": "Describe the weather", "chosen": "Sunny and warm, a lovely day.", "rejected": "Weather.",
         "source": "ranking", "tie": False},
        {"prompt": "Describe the weather", "chosen": "Sunny and warm, a lovely day.", "rejected": "It rains.",
         "source": "ranking", "tie": False},
        {"prompt": "Describe the weather", "chosen": "Weather.", "rejected": "It rains.", "source": "ranking",
         "tie": False},
        {"prompt": "Say thanks", "chosen": "Thank you very much!", "rejected": "thx", "source": "edit",
         "tie": False}], key=str)


def _drag(page, src: str, dst: str, above: bool) -> None:
    """Press on one card, move in steps over another (to its upper or lower quarter), release."""
    a, b = page.locator(src).bounding_box(), page.locator(dst).bounding_box()
    page.mouse.move(a["x"] + 20, a["y"] + a["height"] / 2)
    page.mouse.down()
    y = b["y"] + (b["height"] * 0.25 if above else b["height"] * 0.75)
    page.mouse.move(b["x"] + 20, y, steps=8)
    page.mouse.up()


def _ready(page, selector: str) -> None:
    """Wait for the page's element and for app.js to have run (keys pressed earlier would be lost)."""
    page.wait_for_selector(selector)
    page.wait_for_selector("html[data-ready='1']", state="attached")
