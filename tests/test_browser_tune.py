"""Real browser, Tune tab: a small grid of the paper's rule (the default) runs end to end with points appearing
before it is done, "use this setting" loads that merge, and Cancel stops a second run mid-grid.

Same harness as test_browser.py (``python app.py`` in a subprocess, Debian chromium via Playwright;
skipped with the reason when either is missing). Screenshots go to the test's tmp dir and to
``$ACM_SCREENSHOT_DIR`` when set (docs/tune_tab.png comes from ``03_tune_done.png``).
"""

from __future__ import annotations

import re
import time

from tests.test_browser import browser, open_app, save_shot, server  # noqa: F401 - module fixtures


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _set_text(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea").fill(value)


def _status(page) -> str:
    return page.locator("#tune-status").inner_text()


def test_tune_tab_streams_uses_and_cancels(browser, server, tmp_path):  # noqa: F811 - pytest injects the imported module fixtures by name
    url, *_ = server
    page, errors = open_app(browser, url)
    page.get_by_role("tab", name="7 · Tune").click()

    # 1. a small grid to the end: the paper's rule (ACM-TIES) at its default t ∈ {−1, 0.5, 0.7, 0.9} plus plain
    assert page.locator("#tune-ts textarea").input_value() == "-1, 0.5, 0.7, 0.9"
    _set_text(page, "tune-ts", "-1, 0.5, 0.7, 0.9")
    _set_slider(page, "tune-limit", 16)
    _set_slider(page, "tune-max-new", 128)
    page.locator("#tune-btn").click()
    t0 = time.perf_counter()
    try:
        # the analysis runs first (this session has none), then settings finish one by one
        page.locator("#tune-status").get_by_text(re.compile(r"running: [1-4] of 5 settings done")).wait_for(
            timeout=240_000)
        partial = _status(page)
        points_partial = page.locator("#tune-scatter .scatterlayer .trace .points path").count()
        save_shot(page, tmp_path, "03_tune_partial.png")
        page.locator("#tune-status").get_by_text("done: 5 of 5").wait_for(timeout=240_000)
    except Exception:
        save_shot(page, tmp_path, "failed_tune.png")
        raise
    full_s = time.perf_counter() - t0
    assert points_partial >= 3, "base, fine-tuned and at least one setting before the grid is done"
    page.locator("#tune-recommendation").get_by_text("Held out").wait_for(timeout=30_000)
    page.locator("#tune-scatter .main-svg").first.wait_for(timeout=30_000)
    page.locator("#tab-tune").scroll_into_view_if_needed()
    save_shot(page, tmp_path, "03_tune_done.png")
    table = page.locator("#tune-table").inner_text()

    # 2. use a picked setting (the paper's rule at t = −1): it becomes the merged model of the session and the
    #    Merge tab shows its rule and t
    page.locator("#tune-pick input").click()
    page.get_by_role("option", name=re.compile(r"ACM-TIES \(d=0\.7, t=-1\)")).click()
    page.locator("#tune-use").click()
    page.locator("#tune-use-status").get_by_text("is now the merged model").wait_for(timeout=120_000)
    page.get_by_role("tab", name="4 · Merge").click()
    page.get_by_text(re.compile(r"merged in [0-9.]+ s")).first.wait_for(timeout=30_000)
    merge_t = page.locator("#merge-t-slider input[type=number]").input_value()
    merge_rule = page.locator("#merge-rule-select input:checked").get_attribute("value")

    # 3. a second, longer grid, cancelled after its first point
    page.get_by_role("tab", name="7 · Tune").click()
    # with MI against a plain merge too (the derivative's switch): those settings merge, analyse and merge again,
    # slow enough to cancel mid-grid
    page.locator("#tune-against").get_by_label("a plain merge (derivative)").check()
    _set_text(page, "tune-ts", "-1, 0.5, 0.7, 0.9")
    _set_slider(page, "tune-limit", 40)
    _set_slider(page, "tune-max-new", 256)
    page.locator("#tune-btn").click()
    page.locator("#tune-status").get_by_text(re.compile(r"running: [1-8] of 9 settings done")).wait_for(
        timeout=240_000)
    page.locator("#tune-cancel").click()
    page.locator("#tune-status").get_by_text("cancelled").wait_for(timeout=60_000)
    cancelled = _status(page)
    done = int(re.search(r"(\d+) of 9", cancelled).group(1))
    time.sleep(3)   # a cancelled job must not keep updating the page
    assert "cancelled" in _status(page)
    save_shot(page, tmp_path, "04_tune_cancelled.png")

    assert "running" in partial
    assert all(f"t={t}" in table for t in ("-1", "0.5", "0.7", "0.9")) and "TIES (α=0.7, d=0.7)" in table
    assert "ACM-TIES (d=0.7, t=0.7)" in table and "softmax" not in table
    assert float(merge_t) == -1.0 and merge_rule == "acm", (merge_t, merge_rule)
    assert 1 <= done < 9, cancelled
    assert not errors, errors
    print(f"\n[browser] tune tab: 5-setting grid (16 problems, with the analysis) in {full_s:.0f} s; "
          f"first points at '{partial}'; cancelled at {done} of 9; screenshots in {tmp_path}")
    page.close()
