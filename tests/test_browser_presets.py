"""Real browser + loopback Hub: pick a preset, read its size and hardware before anything is fetched (no Hub
request), Check from headers (no weight file fetched whole), then Analyse end to end, every byte through
``huggingface_hub`` / ``datasets`` from a Hub on 127.0.0.1.

The paper's pairs (1.5B–32B) cannot be served here, so the test adds a tiny preset the way a Space owner
would (``ACM_PRESETS_FILE``): a pair and a calibration set published by ``tests.hub_server.LoopbackHub``.
``python app.py`` runs in a subprocess with ``HF_ENDPOINT`` pointing at that Hub (same harness as
test_browser.py: Debian chromium via Playwright, skipped with the reason when either is missing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from acm.sizes import format_bytes
from tests.fixtures import HUB_BASE, HUB_DATASET, HUB_FT
from tests.test_app_e2e import REPO, demo_assets_dir, free_port
from tests.test_browser import browser, open_app, save_shot, stop_app, wait_for_app  # noqa: F401 - module fixture

HEADER_READ = 100_001            # huggingface_hub reads a safetensors header with one `Range: bytes=0-100000`
PRESET_KEY = "loopback-tiny"
PRESET_LABEL = "Loopback tiny pair (test)"
CAL_KEY = "loopback-calib"


def _model_entry(repo: str, folder) -> dict:
    """A preset model entry for a tiny test model, its size read from its own safetensors headers."""
    from safetensors import safe_open

    params = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    cfg = json.loads((folder / "config.json").read_text())
    return {"repo": repo, "params": params, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
            "intermediate": cfg["intermediate_size"], "vocab": cfg["vocab_size"],
            "tied": bool(cfg.get("tie_word_embeddings")), "dtype": "float32",
            "sources": ["the test's own folder"]}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@pytest.fixture(scope="module")
def hub_app(hub_folders, tmp_path_factory):
    """A loopback Hub serving the tiny pair and calibration set, and ``python app.py`` pointed at it with a
    presets file naming them; yields (url, hub, expected download bytes)."""
    from tests.hub_server import LoopbackHub

    hub = LoopbackHub().start()
    hub.add_model(HUB_BASE, hub_folders["base"])
    hub.add_model(HUB_FT, hub_folders["ft"])
    hub.add_dataset(HUB_DATASET, hub_folders["calibration"])
    root = tmp_path_factory.mktemp("presets-app")
    base, ft = _model_entry(HUB_BASE, hub_folders["base"]), _model_entry(HUB_FT, hub_folders["ft"])
    presets = root / "presets.json"
    presets.write_text(json.dumps({
        "pairs": [{"key": PRESET_KEY, "label": PRESET_LABEL, "base": base, "ft": ft, "calibration": CAL_KEY}],
        "calibrations": [{"key": CAL_KEY, "label": "Loopback calibration (test)", "dataset": HUB_DATASET,
                          "split": "train", "field": "text", "rows": 24, "clusters": 2, "fraction": 0.5,
                          "max_tokens": 64}]}))
    env = dict(os.environ, **hub.env(root / "hf-home"), ACM_PRESETS_FILE=str(presets),
               ACM_ASSETS_DIR=str(demo_assets_dir(root)), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               ACM_CACHE_DIR=str(root / "result-cache"))
    env.pop("HF_TOKEN", None)
    port = free_port()
    log = root / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1", "--no-prewarm"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_app(proc, url, log)
        yield url, hub, 4 * (base["params"] + ft["params"]), log
    finally:
        stop_app(proc)
        hub.stop()


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).click()


def wait_or_explain(page, selector: str, text: str, timeout_ms: int, tmp_path, log, what: str) -> None:
    """Wait until ``selector`` shows ``text``; on failure, a screenshot and what the page and the app's log said."""
    try:
        page.locator(selector).get_by_text(text).wait_for(timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - say what the page showed instead
        save_shot(page, tmp_path, f"failed_{selector.lstrip('#')}.png")
        raise AssertionError(f"{what}: {page.locator(selector).inner_text()!r}\n{log.read_text()[-2000:]}") from None


def test_preset_from_the_hub_checks_and_analyses(browser, hub_app, hub_folders, tmp_path):  # noqa: F811 - pytest injects the imported fixture
    url, hub, download_bytes, log = hub_app
    page, errors = open_app(browser, url)
    # the bundled demo pair is the default, and the page's first Check of it fetched nothing from the Hub
    assert page.locator("#preset-select input").input_value().startswith("Bundled demo pair")
    page.locator("#check-md").get_by_text("Compatible").wait_for(timeout=60_000)
    # move t away from the paper's value first, so the preset visibly puts it back
    page.get_by_role("tab", name="3 · Analyse").click()
    box = page.locator("#t-slider input[type=number]")
    box.fill("1.5")
    box.press("Enter")
    page.get_by_role("tab", name="1 · Models").click()
    hub.reset_counts()

    _pick(page, "preset-select", PRESET_LABEL)
    info = page.locator("#preset-info")
    info.get_by_text("download:").wait_for(timeout=30_000)
    shown = info.inner_text()
    served_on_pick = len(hub.requests)
    assert "Compatible" not in page.locator("#check-md").inner_text(), "the demo pair's answer must not stay up"
    assert page.locator("#base-model input").input_value() == HUB_BASE
    page.locator("#ft-models").get_by_text(HUB_FT).wait_for(timeout=10_000)
    assert f"download: {format_bytes(download_bytes)}" in shown, shown
    assert "analyse on GPU" in shown and "merge" in shown
    save_shot(page, tmp_path, "preset_picked.png")

    page.locator("#check-btn").click()
    wait_or_explain(page, "#check-md", "Compatible", 120_000, tmp_path, log, "Check did not answer")
    check_text = page.locator("#check-md").inner_text()
    checked_repos = {r[1] for r in hub.requests}
    # Check reads metadata: at most one header read (Range 0-100000) per weight file, never a whole file
    weight_sizes = {(repo, f.name): f.stat().st_size for repo, folder in ((HUB_BASE, "base"), (HUB_FT, "ft"))
                    for f in hub_folders[folder].glob("*.safetensors")}
    check_bytes = {key: hub.bytes_served(*key) for key in weight_sizes}

    # the preset set the other tabs: tokenizer source (Merge), rule and t (Analyse), calibration (Calibration)
    page.get_by_role("tab", name="4 · Merge").click()
    assert page.get_by_label("Tokenizer & chat template from").input_value() == "fine-tuned 1"
    page.get_by_role("tab", name="2 · Calibration").click()
    assert page.locator("#calibration-preset input").input_value() == "Loopback calibration (test)"
    assert page.get_by_label("Hub dataset id").input_value() == HUB_DATASET
    page.get_by_role("tab", name="3 · Analyse").click()
    assert page.locator("#t-slider input[type=number]").input_value() == "0.7"
    assert page.locator("#rule-select input[value=acm]").is_checked()

    page.locator("#analyse-btn").click()
    wait_or_explain(page, "#analysis-summary", "Analysis ready", 240_000, tmp_path, log, "Analyse did not finish")
    summary = page.locator("#analysis-summary").inner_text()
    save_shot(page, tmp_path, "preset_analysed.png")

    assert served_on_pick == 0, f"picking a preset fetched {hub.requests[:served_on_pick]}"
    assert {HUB_BASE, HUB_FT} <= checked_repos, checked_repos
    assert re.search(r"Compatible", check_text) and "tiny-base" in check_text and "tiny-ft" in check_text, check_text
    weight_files = {(r[1], r[2]) for r in hub.requests if str(r[2]).endswith(".safetensors")}
    weights = sum(hub.bytes_served(repo, path) for repo, path in weight_files)
    assert all(check_bytes[k] <= min(HEADER_READ, size - 1) for k, size in weight_sizes.items()), check_bytes
    assert weights >= sum(weight_sizes.values()), "the analysis read the weights from the loopback Hub"
    assert hub.bytes_served(HUB_DATASET) > 0, "the calibration texts came from the loopback Hub dataset"
    assert "Analysis ready" in summary
    assert not errors, errors
    page.close()
