"""Real browser: Debian chromium driven by Playwright loads the app, analyses, moves the t slider.

``python app.py`` runs in a subprocess exactly as a user starts it; the test measures the time from
process start to an interactive page and from a slider move to the redrawn chart (printed, not
asserted), and saves screenshots under the test's tmp dir (and ``$ACM_SCREENSHOT_DIR`` if set).
Skipped, with the reason, when chromium or playwright is missing. Never runs ``playwright install``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_app_e2e import REPO, demo_assets_dir, free_port

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def chromium_path() -> str | None:
    for cand in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the browser test needs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright); the browser test needs it")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        except Exception as exc:  # noqa: BLE001 - any launch failure is an environment problem: skip, saying why
            pytest.skip(f"chromium at {exe} could not be started by playwright: {str(exc).splitlines()[0]}")
        yield b
        b.close()


def save_shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("ACM_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python app.py --port N`` as a user runs it; yields (url, start time, process)."""
    assets = demo_assets_dir(tmp_path_factory.mktemp("browser"))
    port = free_port()
    env = dict(os.environ, ACM_ASSETS_DIR=str(assets), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    log = tmp_path_factory.mktemp("browser-log") / "app.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not serve {url} within 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        server_up = time.perf_counter() - start
        yield url, start, proc, server_up
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_analyse_and_move_the_t_slider(browser, server, tmp_path):
    url, start, _, server_up = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.get_by_role("button", name="Check compatibility").wait_for(state="visible", timeout=60_000)
    interactive_s = time.perf_counter() - start
    save_shot(page, tmp_path, "01_models.png")

    page.get_by_role("tab", name="3 · Analyse").click()
    page.locator("#analyse-btn").click()
    try:
        page.locator("#analysis-summary").get_by_text("Analysis ready").wait_for(timeout=120_000)
    except Exception:
        save_shot(page, tmp_path, "failed_analyse.png")
        raise
    page.locator("#nmi-plot .main-svg").first.wait_for(timeout=30_000)
    nmi_points = page.locator("#nmi-plot .scatterlayer .trace .points path").count()
    from components.analysis import DEFAULT_ALPHA, DEFAULT_T

    a = f"α = {DEFAULT_ALPHA:g}"
    page.get_by_text(f"at t = {DEFAULT_T:g}, {a}").first.wait_for(timeout=30_000)

    slider = page.locator("#t-slider input[type=range]")
    t0 = time.perf_counter()
    slider.fill("20")
    page.get_by_text(f"at t = 20, {a}").first.wait_for(timeout=30_000)
    redraw_ms = (time.perf_counter() - t0) * 1000
    slider.fill("2")
    page.get_by_text(f"at t = 2, {a}").first.wait_for(timeout=30_000)
    slider.fill("20")
    page.get_by_text(f"at t = 20, {a}").first.wait_for(timeout=30_000)
    shot = save_shot(page, tmp_path, "02_analysis_t20.png")

    assert nmi_points >= 3                       # embed, ≥ 1 block, head
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    print(f"\n[browser] launch→serving {server_up:.1f} s · launch→interactive {interactive_s:.1f} s · t-slider move→redrawn chart "
          f"{redraw_ms:.0f} ms "
          f"· screenshots in {tmp_path}")
    page.close()
