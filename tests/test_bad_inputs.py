"""The bad-input matrix (issue 6): every way a user can hand us something wrong, CLI and app.

Read the two tables below as the specification:

* ``CLI_CASES``: (case, the ``python -m acm`` command, pattern of the one stderr line). Every row
  must exit with code 2 and print exactly one line, no traceback.
* ``UI_CASES``: (case, the app handler call, pattern of the message). Every row must reach the
  user as one readable ``gr.Error`` line (what ``ui_errors`` makes of it), never a traceback.

A few cases exist only on one side: uploads are an app concept (the CLI takes the user's own
paths by design); the app always writes into its own per-session folder, so "output exists"
is a CLI case while "output not writable" is both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from acm.activations.result import AnalysisResult, ModelNMI
from acm.cli import main
from components import analysis, calibration, common, evaluate, merge, models
from components.state import SessionState
from tests.fixtures import VOCAB_SIZE, make_pair, make_tiny_model, write_calibration

REPO = Path(__file__).resolve().parent.parent
GROUPS = ["embed", "block.0", "block.1", "head"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the bad inputs


def _copy_with_state(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder whose safetensors state dict went through ``edit(state)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _poison(value: float):
    def edit(state):
        key = next(k for k in state if "layers.0.mlp.up_proj" in k)
        state[key][0, 0] = value
    return edit


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """Healthy models and every broken variant, built once (a few thousand parameters each)."""
    root = tmp_path_factory.mktemp("bad")
    base, (ft,) = make_pair(root, "llama", n_ft=1)
    ns = SimpleNamespace(root=root, base=base, ft=ft)
    ns.qwen = make_tiny_model(root / "qwen2", "qwen2", seed=5)                         # other architecture
    ns.layers3 = make_tiny_model(root / "layers3", "llama", seed=5, num_hidden_layers=3)
    ns.hidden32 = make_tiny_model(root / "hidden32", "llama", seed=5, hidden_size=32)
    ns.vocab = make_tiny_model(root / "vocab70", "llama", seed=5, init_from=base, vocab_size=VOCAB_SIZE + 7)
    ns.nan = _copy_with_state(ft, root / "nan", _poison(float("nan")))
    ns.inf = _copy_with_state(ft, root / "inf", _poison(float("inf")))
    ns.truncated = root / "truncated"
    shutil.copytree(ft, ns.truncated)
    data = (ns.truncated / "model.safetensors").read_bytes()
    (ns.truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    ns.binonly = root / "binonly"                    # plain tensors, but pickle: refused by default
    shutil.copytree(ft, ns.binonly)
    from safetensors.torch import load_file

    torch.save(load_file(ns.binonly / "model.safetensors"), ns.binonly / "pytorch_model.bin")
    (ns.binonly / "model.safetensors").unlink()

    ns.uploads = root / "uploads"                    # stands in for Gradio's upload folder
    ns.uploads.mkdir()
    ns.cal = write_calibration(ns.uploads / "cal.jsonl", n=8)
    ns.empty = ns.uploads / "empty.jsonl"
    ns.empty.write_bytes(b"")
    ns.binary = ns.uploads / "binary.jsonl"
    ns.binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    ns.huge = ns.uploads / "huge.jsonl"              # sparse: 201 MiB by size, no disk blocks
    with open(ns.huge, "wb") as fh:
        fh.truncate(201 * 2**20)
    ns.wrongfield = ns.uploads / "wrongfield.jsonl"
    ns.wrongfield.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(4)) + "\n")
    ns.outside = root / "not-uploaded"               # a real file, but not from an upload
    ns.outside.mkdir()
    ns.secret = write_calibration(ns.outside / "server_secret.jsonl", n=3)
    (ns.outside / "analysis.json").write_text("{}")
    ns.analysis = root / "analysis.json"
    _analysis([ns.ft]).save(ns.analysis)
    ns.existing = root / "existing-out"
    ns.existing.mkdir()
    ns.readonly = root / "readonly"
    ns.readonly.mkdir()
    ns.a_file = root / "a-file"
    ns.a_file.write_text("x")
    return ns


def _analysis(fts) -> AnalysisResult:
    """A hand-made analysis of the fixture pair (no model work)."""
    return AnalysisResult(groups=list(GROUPS), models=[
        ModelNMI(model=str(f), nmi=[0.9, 0.5, 0.6, 0.8], mi=[1.0] * 4) for f in fts])


def _deny_writes(mp: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` unwritable: chmod for ordinary users, and ``os.access`` for root (CI
    containers run as root, for whom permission bits do not apply)."""
    folder.chmod(0o555)
    real = os.access

    def access(path, mode, *a, **k):
        if Path(path).resolve() == folder.resolve() and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    mp.setattr(os, "access", access)


# ----------------------------------------------------------------------------- CLI matrix


def analyze(w, out=None, **over):
    args = dict(base=w.base, ft=w.ft, calibration=w.cal, samples=4, clusters=2, max_tokens=24)
    args.update(over)
    argv = ["analyze", "--base", str(args["base"]), "--ft", str(args["ft"]), "--calibration",
            str(args["calibration"]), "--samples", str(args["samples"]), "--clusters", str(args["clusters"]),
            "--max-tokens", str(args["max_tokens"]), "--out", str(out or w.root / "out" / "analysis.json")]
    if args.get("field"):
        argv += ["--field", args["field"]]
    return argv


def merge_cmd(w, *extra, base=None, ft=None, out=None):
    return ["merge", "--base", str(base or w.base), "--ft", str(ft or w.ft), *extra,
            "--out", str(out or w.root / "out" / "merged")]


def coefficients(w, *extra):
    return ["coefficients", "--analysis", str(w.analysis), *extra]


CLI_CASES = [
    # case                            the command (w = the fixture world, mp = monkeypatch)                  the one stderr line
    ("missing-local-path/analyze",    lambda w, mp: analyze(w, base=w.root / "no-such-model"),              r"model folder not found: .*no-such-model"),
    ("missing-local-path/merge",      lambda w, mp: merge_cmd(w, ft=w.root / "nope" / "ft"),                r"model folder not found: .*nope/ft"),
    ("hub-id-offline/model",          lambda w, mp: merge_cmd(w, base="some-org/some-model"),               r"cannot download 'some-org/some-model'.*offline"),
    ("hub-id-offline/calibration",    lambda w, mp: analyze(w, calibration="some-org/some-dataset"),        r"Hub dataset 'some-org/some-dataset'.*offline"),
    ("architecture-mismatch",         lambda w, mp: merge_cmd(w, ft=w.qwen),                                r"architecture differs: .*LlamaForCausalLM.*Qwen2ForCausalLM"),
    ("layer-count-mismatch",          lambda w, mp: analyze(w, ft=w.layers3),                               r"layer count differs: base .* has 2, fine-tuned .*layers3 has 3"),
    ("hidden-size-mismatch",          lambda w, mp: merge_cmd(w, ft=w.hidden32),                            r"hidden size differs: base .* has 16, fine-tuned .*hidden32 has 32"),
    ("only-bin-weights",              lambda w, mp: merge_cmd(w, ft=w.binonly),                             r"only pickle \(\.bin\) weights.*--allow-pickle"),
    ("truncated-safetensors/merge",   lambda w, mp: merge_cmd(w, ft=w.truncated),                           r"model\.safetensors in .*truncated: it looks corrupt or truncated"),
    ("truncated-safetensors/analyze", lambda w, mp: analyze(w, ft=w.truncated),                             r"corrupt or truncated"),
    ("nan-weights/merge",             lambda w, mp: merge_cmd(w, ft=w.nan),                                 r"fine-tuned model .*nan has NaN/Inf values in tensor model\.layers\.0\.mlp\.up_proj"),
    ("nan-weights/analyze",           lambda w, mp: analyze(w, ft=w.nan),                                   r"fine-tuned model .*nan has NaN/Inf values in model\.layers\.0\.mlp\.up_proj"),
    ("inf-weights/analyze",           lambda w, mp: analyze(w, ft=w.inf),                                   r"fine-tuned model .*inf has NaN/Inf values"),
    ("empty-calibration",             lambda w, mp: analyze(w, calibration=w.empty),                        r"calibration file empty\.jsonl is empty"),
    ("binary-calibration",            lambda w, mp: analyze(w, calibration=w.binary),                       r"binary\.jsonl looks binary"),
    ("oversize-calibration",          lambda w, mp: analyze(w, calibration=w.huge),                         r"huge\.jsonl is 201 MiB, over the 200 MiB limit"),
    ("oversize-calibration/env-limit", lambda w, mp: mp.setenv("ACM_MAX_CALIBRATION_MB", "0.0002") or analyze(w),
                                                                                                            r"cal\.jsonl is \d+ B, over the 209 B limit.*ACM_MAX_CALIBRATION_MB"),
    ("calibration-wrong-field",       lambda w, mp: analyze(w, field="prompt"),                             r"field 'prompt' not found in cal\.jsonl; available fields: text"),
    ("calibration-no-text-field",     lambda w, mp: analyze(w, calibration=w.wrongfield),                   r"no text field found in wrongfield\.jsonl.*available fields: body; pass --field"),
    ("t-range/coefficients",          lambda w, mp: coefficients(w, "--t", "-4"),                           r"--t must be in \[-3, 3\], got -4"),
    ("t-nan/coefficients",            lambda w, mp: coefficients(w, "--t", "nan"),                          r"--t must be in \[-3, 3\], got nan"),
    ("t-negative/softmax",            lambda w, mp: coefficients(w, "--rule", "softmax", "--t", "-1"),      r"--t must be in \[0, 100\], got -1"),
    ("t-range/merge",                 lambda w, mp: merge_cmd(w, "--acm", str(w.analysis), "--t", "4"),     r"t must be in \[-3, 3\], got 4"),
    ("alpha-zero/coefficients",       lambda w, mp: coefficients(w, "--t", "1", "--alpha", "0"),            r"--alpha must be a finite number > 0, got 0"),
    ("alpha-negative/merge",          lambda w, mp: merge_cmd(w, "--alpha", "-1"),                          r"alpha must be a finite number >= 0, got -1"),
    ("alpha-inf/merge",               lambda w, mp: merge_cmd(w, "--alpha", "inf"),                         r"alpha must be a finite number >= 0, got inf"),
    ("density-zero",                  lambda w, mp: merge_cmd(w, "--method", "ties", "--density", "0"),     r"density must be in \(0, 1\], got 0"),
    ("density-above-1",               lambda w, mp: merge_cmd(w, "--method", "ties", "--density", "1.5"),   r"density must be in \(0, 1\], got 1\.5"),
    ("drop-rate-1",                   lambda w, mp: merge_cmd(w, "--method", "dare_ta", "--drop-rate", "1"), r"drop rate must be in \[0, 1\), got 1"),
    ("drop-rate-negative",            lambda w, mp: merge_cmd(w, "--method", "dare_ties", "--drop-rate", "-0.1"), r"drop rate must be in \[0, 1\), got -0\.1"),
    ("output-exists",                 lambda w, mp: merge_cmd(w, out=w.existing),                           r"output folder .*existing-out already exists; pass --force"),
    ("output-not-writable/merge",     lambda w, mp: _deny_writes(mp, w.readonly) or merge_cmd(w, out=w.readonly / "m"),
                                                                                                            r"parent .*readonly is not writable"),
    ("output-not-writable/analyze",   lambda w, mp: _deny_writes(mp, w.readonly) or analyze(w, out=w.readonly / "a.json"),
                                                                                                            r"--out folder .*readonly is not writable"),
    ("output-under-a-file/merge",     lambda w, mp: merge_cmd(w, out=w.a_file / "m"),                       r"cannot create the output's parent folder .*a-file"),
    ("output-is-a-folder/analyze",    lambda w, mp: analyze(w, out=w.existing),                             r"--out .*existing-out is a folder"),
]


@pytest.mark.parametrize("case,command,expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, command, expected, w, capsys, monkeypatch):
    shutil.rmtree(w.root / "out", ignore_errors=True)        # cases are independent
    (w.root / "out").mkdir()
    argv = command(w, monkeypatch)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (case, err)
    assert len(lines) == 1, (case, err)
    assert "Traceback" not in err and lines[0].startswith(f"acm {argv[0]}: error: ")
    assert re.search(expected, lines[0]), (case, lines[0])
    assert not (w.root / "out" / "merged").exists() and not (w.root / "out" / "analysis.json").exists()
    if case.startswith("output-not-writable"):
        w.readonly.chmod(0o755)


SUBPROCESS_CASES = ["hub-id-offline/model", "truncated-safetensors/analyze", "binary-calibration"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_bad_input_in_a_real_process(case, w, monkeypatch):
    """A real interpreter: library warnings or progress bars must not add lines to stderr."""
    command = dict((c[0], c[1]) for c in CLI_CASES)[case]
    (w.root / "out").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "acm", *command(w, monkeypatch)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_hub_retry_chatter_stays_off_stderr(w):
    """With the Hub unreachable (not offline mode), huggingface_hub logs "Retrying in 8s" lines
    through its own handler (twice, with the root's); the CLI still prints exactly one line.
    A real process: pytest's own capturing would hide the library's handler."""
    script = f"""
import logging, sys, datasets
def unreachable(*a, **k):
    for n in (1, 2):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in %ds [Retry %d/5].", n, n)
    raise ConnectionError("Couldn't reach 'some-org/some-dataset' on the Hub")
datasets.load_dataset = unreachable
from acm.cli import main
sys.exit(main({analyze(w, calibration="some-org/some-dataset", out=w.root / "chatter.json")!r}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_VERBOSITY", None)
    env.pop("DATASETS_VERBOSITY", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unreachable" in proc.stderr and "Retrying" not in proc.stderr


def test_cli_different_vocabulary_is_handled_and_reported(w, tmp_path, capsys):
    """Per docs/design.md: vocab may differ; extra rows come from the fine-tuned model, and it is said."""
    assert main(merge_cmd(w, ft=w.vocab, out=tmp_path / "m")) == 0
    out = capsys.readouterr().out
    assert f"note: {w.vocab} has vocabulary {VOCAB_SIZE + 7} vs base {VOCAB_SIZE}: extra rows are taken" in out
    assert main(analyze(w, ft=w.vocab, out=tmp_path / "a.json")) == 0
    out = capsys.readouterr().out
    assert f"note: {w.vocab} has vocabulary {VOCAB_SIZE + 7} vs base {VOCAB_SIZE}" in out
    assert AnalysisResult.load(tmp_path / "a.json").provenance["vocab_notes"]


# ----------------------------------------------------------------------------- app (UI handler) matrix


def _st(w, analysed: bool = False) -> SessionState:
    st = SessionState()
    if analysed:
        st.analysis = _analysis([w.ft])
    return st


def check(w, ft, base=None):
    return lambda st: models.check_models(st, str(base or w.base), [str(ft)])


def preview_upload(path, field=None):
    return lambda st: calibration.preview(calibration.UPLOAD, str(path), field=field)


def run_merge(w, ft=None, **kw):
    kw.setdefault("mode", merge.PLAIN)
    return lambda st: merge.run_merge(st, str(w.base), [str(ft or w.ft)], **kw)


def run_analysis(w, ft=None, **kw):
    return lambda st: analysis.run_analysis(st, str(w.base), [str(ft or w.ft)], cal_mode=calibration.UPLOAD,
                                            cal_upload=str(w.cal), samples=4, clusters=2, max_tokens=24, **kw)


UI_CASES = [
    # case                            the handler call (st = a fresh session)                                 the message
    ("missing-local-path",            lambda w: check(w, w.root / "no-such-model"),                           r"model folder not found: .*no-such-model"),
    ("hub-id-offline/model",          lambda w: check(w, "some-org/some-model"),                              r"cannot download 'some-org/some-model'.*offline"),
    ("hub-id-offline/calibration",    lambda w: lambda st: calibration.preview(calibration.HUB, hub_id="some-org/some-dataset"),
                                                                                                              r"Hub dataset 'some-org/some-dataset'.*offline"),
    ("architecture-mismatch",         lambda w: check(w, w.qwen),                                             r"architecture differs"),
    ("layer-count-mismatch",          lambda w: check(w, w.layers3),                                          r"layer count differs: base .* has 2, fine-tuned .* has 3"),
    ("hidden-size-mismatch",          lambda w: check(w, w.hidden32),                                         r"hidden size differs: base .* has 16, fine-tuned .* has 32"),
    ("only-bin-weights",              lambda w: check(w, w.binonly),                                          r"only pickle \(\.bin\) weights, which can execute code"),
    ("truncated-safetensors",         lambda w: check(w, w.truncated),                                        r"model\.safetensors .* looks corrupt or truncated"),
    ("nan-weights/merge",             lambda w: run_merge(w, w.nan),                                          r"NaN/Inf values in tensor model\.layers\.0\.mlp\.up_proj"),
    ("nan-weights/analyse",           lambda w: run_analysis(w, w.nan),                                       r"NaN/Inf values in model\.layers\.0\.mlp\.up_proj"),
    ("empty-calibration",             lambda w: preview_upload(w.empty),                                      r"calibration file empty\.jsonl is empty"),
    ("binary-calibration",            lambda w: preview_upload(w.binary),                                     r"binary\.jsonl looks binary"),
    ("oversize-calibration",          lambda w: preview_upload(w.huge),                                       r"huge\.jsonl is 201 MiB, over the 200 MiB limit"),
    ("calibration-wrong-field",       lambda w: preview_upload(w.cal, field="prompt"),                        r"field 'prompt' not found in cal\.jsonl; available fields: text"),
    ("calibration-no-text-field",     lambda w: preview_upload(w.wrongfield),                                 r"no text field found in wrongfield\.jsonl"),
    ("t-range/coefficients",          lambda w: lambda st: analysis.coefficient_view(st, -4.0, 1.0),          r"t must be in \[-3, 3\], got -4"),
    ("t-negative/softmax",            lambda w: lambda st: analysis.coefficient_view(st, -1.0, 1.0, rule="softmax"), r"t must be in \[0, 100\], got -1"),
    ("t-negative/merge",              lambda w: run_merge(w, mode=merge.ACM, t=-3.0, rule="softmax"),         r"t must be in \[0, 100\], got -3"),
    ("alpha-zero/coefficients",       lambda w: lambda st: analysis.coefficient_view(st, 2.0, 0.0, rule="softmax"), r"alpha must be a finite number > 0"),
    ("alpha-negative/merge",          lambda w: run_merge(w, alpha=-1.0),                                     r"alpha must be a finite number >= 0, got -1"),
    ("density-zero",                  lambda w: run_merge(w, method="ties", density=0.0),                     r"density must be in \(0, 1\], got 0"),
    ("drop-rate-1",                   lambda w: run_merge(w, method="dare_ta", drop_rate=1.0),                r"drop rate must be in \[0, 1\), got 1"),
    ("upload-name-dotdot/calibration", lambda w: preview_upload(f"{w.uploads}/../not-uploaded/server_secret.jsonl"),
                                                                                                              r"refusing calibration file 'server_secret\.jsonl': its path contains '\.\.'"),
    ("upload-absolute-path/calibration", lambda w: preview_upload(w.secret),                                  r"refusing calibration file 'server_secret\.jsonl': it is not a file uploaded"),
    ("upload-absolute-path/system",   lambda w: preview_upload("/etc/passwd.txt"),                            r"refusing calibration file 'passwd\.txt': it is not a file uploaded"),
    ("upload-absolute-path/analysis", lambda w: lambda st: analysis.load_analysis_file(st, str(w.outside / "analysis.json")),
                                                                                                              r"refusing analysis file 'analysis\.json': it is not a file uploaded"),
    ("upload-dotdot/evaluation",      lambda w: lambda st: evaluate._data(evaluate.UPLOAD, "../../etc/passwd"),
                                                                                                              r"refusing evaluation file 'passwd': its path contains '\.\.'"),
    ("hub-box-given-a-local-path",    lambda w: lambda st: calibration.preview(calibration.HUB, hub_id=str(w.secret)),
                                                                                                              r"is not a Hub dataset id \(org/name\); local paths are not accepted"),
    ("hub-box-given-dotdot",          lambda w: lambda st: calibration.preview(calibration.HUB, hub_id="../not-uploaded"),
                                                                                                              r"local paths are not accepted"),
]


@pytest.fixture()
def uploads_are(w, monkeypatch):
    """Gradio's upload folder is ``w.uploads`` for these tests."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(w.uploads))
    monkeypatch.delenv("ACM_UPLOAD_ROOTS", raising=False)


def ui_message(call, st) -> str:
    """What the user sees: the one line of the gr.Error that ``ui_errors`` raises."""
    with pytest.raises(gr.Error) as info:
        common.ui_errors(call)(st)
    message = info.value.message
    assert "\n" not in message and "Traceback" not in message and not message.startswith("unexpected"), message
    return message


@pytest.mark.parametrize("case,make_call,expected", UI_CASES, ids=[c[0] for c in UI_CASES])
def test_ui_bad_input(case, make_call, expected, w, uploads_are):
    st = _st(w, analysed=True)
    try:
        message = ui_message(make_call(w), st)
        assert re.search(expected, message), (case, message)
        assert st.merged is None
        merges = st.workspace / "merges"
        assert not merges.exists() or not any(merges.iterdir()), "a failed merge left a folder behind"
    finally:
        st.close()


def test_ui_output_not_writable(w, monkeypatch):
    """The app writes only into its own session folder; if that is unwritable, it says so."""
    st = SessionState()
    try:
        _deny_writes(monkeypatch, st.subdir("merges"))
        message = ui_message(run_merge(w), st)
        assert re.search(r"parent .*merges is not writable", message), message
    finally:
        st.subdir("merges").chmod(0o755)
        st.close()


def test_ui_vocabulary_difference_is_a_note_not_an_error(w):
    st = SessionState()
    md = models.check_models(st, str(w.base), [str(w.vocab)])
    assert "✓ **Compatible**" in md and f"⚠ {w.vocab} has vocabulary {VOCAB_SIZE + 7} vs base {VOCAB_SIZE}" in md
    st.close()


def test_ui_upload_size_limit_is_enforced_by_gradio_too(monkeypatch):
    """Uploads over the calibration limit are refused by Gradio before a handler sees them."""
    import app
    from acm.activations.calibration import MAX_FILE_BYTES

    assert app.launch_kwargs()["max_file_size"] == MAX_FILE_BYTES
    monkeypatch.setenv("ACM_MAX_CALIBRATION_MB", "5")
    assert app.launch_kwargs()["max_file_size"] == 5 * 2**20

