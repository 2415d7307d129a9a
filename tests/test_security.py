"""Security guarantees (issue 6), each shown by a test that would catch its loss.

* model code runs only with an explicit trust_remote_code (and the app warns when it is ticked);
* no pickle by default, and even an allowed pickle is never unpickled beyond plain tensors;
* exported file names are sanitised (nothing lands outside the export folder);
* a Hub token never reaches stderr, logs, UI messages, session state or exported files.
Uploads coming only from Gradio's upload area are in the matrix of ``test_bad_inputs.py`` and,
over HTTP, in ``test_app_e2e.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import gradio as gr
import pytest
import torch

from acm.cli import main
from acm.errors import InputError, redact
from components import common, export, merge, models
from components.state import MergedModel, SessionState
from tests.fixtures import make_pair, write_calibration

REPO = Path(__file__).resolve().parent.parent
# Token-shaped but fake; assembled at run time so no token-like literal sits in the repository
# (secret scanners would flag it, and users would rightly ask whether it is real).
FAKE_TOKEN = "hf" + "_" + "FAKE" + "0123456789" * 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    base, (ft,) = make_pair(root, "llama", n_ft=1)
    return base, ft, root


# ----------------------------------------------------------------------------- remote code


CUSTOM_CONFIG = """
from pathlib import Path
Path({marker!r}).write_text("model code ran")           # the side effect that must never happen
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "acm_evil"
"""


@pytest.fixture()
def remote_code_model(pair, tmp_path):
    """A model folder whose config needs its own Python code; importing that code drops a marker."""
    _, ft, _ = pair
    folder = tmp_path / "needs-code"
    shutil.copytree(ft, folder)
    marker = tmp_path / "CODE_RAN"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="acm_evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_evil.py").write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    return folder, marker


def test_model_code_is_not_run_without_trust_remote_code(pair, remote_code_model, tmp_path, capsys):
    from acm.checkpoints.models import resolve_model

    base, _, _ = pair
    folder, marker = remote_code_model
    with pytest.raises(InputError, match="needs its own model code; pass --trust-remote-code only if you trust"):
        resolve_model(str(folder))
    cal = write_calibration(tmp_path / "cal.jsonl", n=4)
    assert main(["analyze", "--base", str(base), "--ft", str(folder), "--calibration", str(cal),
                 "--out", str(tmp_path / "a.json")]) == 2
    assert main(["merge", "--base", str(base), "--ft", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "needs its own model code" in capsys.readouterr().err
    st = SessionState()
    with pytest.raises(gr.Error, match="needs its own model code"):
        common.ui_errors(models.check_models)(st, str(base), [str(folder)], False)
    st.close()
    assert not marker.exists()


def test_the_marker_does_detect_model_code_when_trust_is_given(remote_code_model, tmp_path):
    """Control for the test above: with trust_remote_code the code does run (so its absence there
    means something). A fresh process with its own module cache, to keep the runner clean."""
    folder, marker = remote_code_model
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = f"from acm.checkpoints.models import resolve_model; resolve_model({str(folder)!r}, trust_remote_code=True)"
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, timeout=300, check=True, capture_output=True)
    assert marker.read_text() == "model code ran"


def test_app_trust_remote_code_is_off_by_default_and_warns_when_ticked(monkeypatch):
    import app

    seen = []
    monkeypatch.setattr(models, "warn", seen.append)
    demo = app.build_app(prewarm=False)
    trust = demo.ui.models.trust
    assert trust.value is False
    update = models.trust_toggled(True)
    assert update["visible"] is True and seen and "run their own Python code" in seen[0]
    assert models.trust_toggled(False)["visible"] is False and len(seen) == 1
    assert "runs Python code shipped with the model repository" in demo.ui.models.trust_md.value


# ----------------------------------------------------------------------------- pickle


def _evil_pickle_model(ft: Path, folder: Path, marker: Path) -> Path:
    """A .bin checkpoint whose unpickling would run ``touch marker``."""
    from safetensors.torch import load_file

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shutil.copytree(ft, folder)
    state = dict(load_file(folder / "model.safetensors"))
    state["payload"] = Evil()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_is_refused_by_default_and_never_executed_even_when_allowed(pair, tmp_path, capsys):
    base, ft, _ = pair
    marker = tmp_path / "PICKLE_RAN"
    evil = _evil_pickle_model(ft, tmp_path / "evil", marker)
    assert main(["merge", "--base", str(base), "--ft", str(evil), "--out", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err
    assert "only pickle (.bin) weights, which can execute code" in err and "--allow-pickle" in err
    assert main(["merge", "--base", str(base), "--ft", str(evil), "--allow-pickle", "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "refusing the pickle (.bin) weights" in err and "were not unpickled" in err
    st = SessionState()
    with pytest.raises(gr.Error, match="only pickle"):
        common.ui_errors(models.check_models)(st, str(base), [str(evil)])
    st.close()
    assert not marker.exists() and not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_plain_tensor_pickle_merges_when_allowed(pair, tmp_path, capsys):
    from safetensors.torch import load_file

    base, ft, _ = pair
    folder = tmp_path / "bin"
    shutil.copytree(ft, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["merge", "--base", str(base), "--ft", str(folder), "--allow-pickle", "--out", str(tmp_path / "m")]) == 0


# ----------------------------------------------------------------------------- exported names


def test_exported_file_names_are_sanitised(tmp_path):
    from components import plots

    st = SessionState()
    try:
        nasty = st.subdir("merges") / "..merge 01;rm -rf ~ <b>"
        shutil.copytree(make_pair(tmp_path, "llama")[1][0], nasty)
        st.set_merged(MergedModel(1, "#1", nasty, {"out_dir": str(nasty)},
                                  {"base": "b", "fts": ["f"], "method": "task_arithmetic", "acm": False, "t": None,
                                   "alpha": 1.0, "density": 0.2, "clip": None}, [{"embed": 1.0}], 0.1))
        escape = f"escaped-{uuid.uuid4().hex[:8]}"
        st.figures[f"../../../{escape}"] = plots.empty_figure("x")
        st.figures["/abs/chart"] = plots.empty_figure("y")
        st.figures["<img src=x onerror=alert(1)>"] = plots.empty_figure("z")
        charts = st.workspace / "exports" / "charts"
        would_be = [Path(os.path.normpath(charts / f"../../../{escape}.html")), Path("/abs/chart.html"),
                    Path(os.path.normpath(charts / f"../../../{escape}.png")), Path("/abs/chart.png")]
        files, _ = export.export_all(st, include_model=True)
        exports = (st.workspace / "exports").resolve()
        for f in files:
            p = Path(f).resolve()
            assert exports in p.parents, f
            assert all(c.isalnum() or c in "._-" for c in p.name) and not p.name.startswith("."), p.name
        assert not any(p.exists() for p in would_be)
        names = {Path(f).name for f in files}
        assert {"merge_01_rm_-rf_b.zip", "merge_01_rm_-rf_b.recipe.json", "merge_01_rm_-rf_b.charts.html"} <= names
        page = (exports / "merge_01_rm_-rf_b.charts.html").read_text()
        assert f'id="chart-{escape}"' in page and 'id="chart-chart"' in page     # names reach the page sanitised
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page   # headings escaped
    finally:
        st.close()


@pytest.mark.parametrize("name,expected", [("../../etc/passwd", "passwd"), ("/abs/x.json", "x.json"),
                                           ("..", "file"), (".hidden", "hidden"), ("a b<c>|d.zip", "a_b_c_d.zip"),
                                           ("C:\\\\Users\\\\x.txt", "x.txt"), ("ok-name_1.2", "ok-name_1.2")])
def test_safe_filename(name, expected):
    assert common.safe_filename(name) == expected


# ----------------------------------------------------------------------------- Hub token


def _http_error(status: int, message: str):
    import httpx
    from huggingface_hub import errors as hub_errors

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/x"))
    return hub_errors.HfHubHTTPError(message, response=response)


def _files_text(*folders: Path) -> str:
    chunks = []
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file():
                chunks.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(chunks)


def test_redact_masks_hub_tokens():
    assert redact(f"Authorization: Bearer {FAKE_TOKEN} failed") == "Authorization: Bearer *** failed"
    assert redact("user-given secret s3cr3t-value", "s3cr3t-value") == "user-given secret ***"
    assert redact("no token here: hf_ab") == "no token here: hf_ab"


def test_cli_never_echoes_a_hub_token(pair, tmp_path, monkeypatch, capsys, caplog):
    """HF_TOKEN in the environment (as for a gated download) reaches no output, log or file, even
    when a Hub error quotes the request's Authorization header."""
    import huggingface_hub

    base, ft, _ = pair
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    cal = write_calibration(tmp_path / "cal.jsonl", n=6)
    outs = tmp_path / "outs"
    outs.mkdir()
    assert main(["analyze", "--base", str(base), "--ft", str(ft), "--calibration", str(cal), "--samples", "4",
                 "--clusters", "2", "--max-tokens", "24", "--out", str(outs / "a.json")]) == 0
    assert main(["coefficients", "--analysis", str(outs / "a.json"), "--t", "2", "--format", "yaml"]) == 0
    assert main(["merge", "--base", str(base), "--ft", str(ft), "--acm", str(outs / "a.json"), "--t", "2",
                 "--out", str(outs / "merged")]) == 0

    def leaky_download(repo_id, **kw):
        raise _http_error(500, f"500 Server Error for https://huggingface.co/api/models/{repo_id} "
                               f"(headers: Authorization: Bearer {FAKE_TOKEN})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", leaky_download)
    assert main(["merge", "--base", "org/private-model", "--ft", str(ft), "--out", str(outs / "m2")]) == 2
    out, err = capsys.readouterr()
    assert "cannot download 'org/private-model'" in err and "Bearer ***" in err
    everything = out + err + caplog.text + _files_text(outs)
    assert FAKE_TOKEN not in everything and FAKE_TOKEN[:12] not in everything


def test_app_never_echoes_stores_or_exports_the_push_token(pair, monkeypatch, caplog):
    import huggingface_hub

    base, ft, _ = pair
    caplog.set_level(logging.DEBUG)
    st = SessionState()
    try:
        merge.run_merge(st, str(base), [str(ft)], mode=merge.PLAIN, method="task_arithmetic", alpha=0.5)
        failures = iter([ValueError(f"bad header Authorization: Bearer {FAKE_TOKEN}"),
                         _http_error(500, f"500 for token={FAKE_TOKEN}"),
                         RuntimeError(f"upload of {FAKE_TOKEN} failed\nsecond line")])

        class FakeApi:
            def __init__(self, token=None):
                self.token = token

            def create_repo(self, repo_id, **kw):
                return f"https://huggingface.co/{repo_id}"

            def upload_folder(self, **kw):
                raise next(failures)

        monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
        push = common.ui_errors(export.push_to_hub)
        messages = []
        for _ in range(3):
            with pytest.raises(gr.Error) as info:
                push(st, FAKE_TOKEN, "me/merged", True)
            messages.append(info.value.message)
        assert all(m.startswith("upload failed") for m in messages), messages
        files, _ = export.export_all(st, include_model=True)
        exported = _files_text(st.workspace)
        import zipfile

        zipped = "".join(zipfile.ZipFile(f).read(n).decode("utf-8", "replace") for f in files if f.endswith(".zip")
                         for n in zipfile.ZipFile(f).namelist())
        state_dump = json.dumps(vars(st), default=str)
        everything = "\n".join(messages) + caplog.text + exported + zipped + state_dump
        assert FAKE_TOKEN not in everything and FAKE_TOKEN[:12] not in everything
    finally:
        st.close()


def test_unexpected_app_errors_are_logged_with_tokens_masked(caplog):
    caplog.set_level(logging.DEBUG)

    def boom():
        raise KeyError(f"cannot find {FAKE_TOKEN}")

    with pytest.raises(gr.Error) as info:
        common.ui_errors(boom)()
    assert "***" in info.value.message and FAKE_TOKEN not in info.value.message
    assert "Traceback" in caplog.text and FAKE_TOKEN not in caplog.text
