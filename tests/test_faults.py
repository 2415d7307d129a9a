"""Faults (issue 6): a killed merge, a failed merge in the app, out-of-memory during analysis.

Nothing here may leave a half-written model that looks complete, lose the app's previous
merged model, or crash the app: each failure is one line with what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import pytest
import torch

import acm.activations.analysis
from acm.cli import main
from components import analysis, calibration, common, merge
from components.state import SessionState
from tests.fixtures import make_pair, write_calibration

REPO = Path(__file__).resolve().parent.parent

# A merge driver whose writer sleeps after every tensor, so a SIGKILL lands mid-write; tiny
# shards (--shard-size 2000 bytes) make it flush several shard files before that.
SLOW_MERGE = """
import sys, time
import acm.checkpoints.shards as shards
_add = shards.ShardWriter.add
def slow_add(self, name, tensor):
    _add(self, name, tensor)
    time.sleep(0.15)
shards.ShardWriter.add = slow_add
from acm.cli import main
sys.exit(main(sys.argv[1:]))
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    base, (ft,) = make_pair(root, "llama", n_ft=1, num_hidden_layers=4)
    return base, ft, root


@pytest.fixture()
def uploads(tmp_path, monkeypatch):
    monkeypatch.setenv(common.UPLOAD_ROOTS_ENV, str(tmp_path))
    return tmp_path


# ----------------------------------------------------------------------------- SIGKILL mid-merge


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _kill_mid_write(argv: list[str], parent: Path, name: str) -> None:
    """Start a slowed merge, wait until its temp folder holds shard files, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *argv], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            temps = [p for p in parent.glob(f".{name}.tmp-*") if p.is_dir()]
            if temps and len(list(temps[0].iterdir())) >= 2:
                break
            assert proc.poll() is None, "the merge finished before it could be killed; slow it down more"
            time.sleep(0.02)
        else:
            pytest.fail("the merge never started writing")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


def _looks_complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def _merge_argv(base, ft, out, *extra) -> list[str]:
    return ["merge", "--base", str(base), "--ft", str(ft), "--method", "ties", "--density", "0.5",
            "--shard-size", "2000", *extra, "--out", str(out)]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigkill_mid_merge_leaves_nothing_that_looks_complete_and_a_rerun_succeeds(pair, tmp_path, capsys):
    base, ft, _ = pair
    out = tmp_path / "merged"
    _kill_mid_write(_merge_argv(base, ft, out), tmp_path, out.name)
    assert not out.exists()                                           # the final name never appeared
    leftovers = [p for p in tmp_path.iterdir() if p.name != out.name]
    assert leftovers and all(p.name.startswith(f".{out.name}.tmp-") for p in leftovers)   # hidden temp only
    assert not any(_looks_complete(p) for p in tmp_path.iterdir())    # no config + weights anywhere

    assert main(_merge_argv(base, ft, out)) == 0                      # a plain rerun works
    assert _looks_complete(out)
    assert not any(p.exists() for p in leftovers)                     # and removed the killed writer's temp
    assert not (out / ".acm-writer").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / shard).is_file() for shard in set(index["weight_map"].values()))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)                         # loads: the rerun is whole


def test_sigkill_during_force_overwrite_keeps_the_previous_output(pair, tmp_path):
    base, ft, _ = pair
    out = tmp_path / "merged"
    assert main(_merge_argv(base, ft, out)) == 0
    before = _digest(out)
    _kill_mid_write(_merge_argv(base, ft, out, "--force", "--density", "0.3"), tmp_path, out.name)
    assert _digest(out) == before                                     # the old model is untouched


# ----------------------------------------------------------------------------- failed merge in the app


def test_failed_merge_in_the_app_keeps_the_previous_merged_model(pair, monkeypatch):
    """A merge that dies mid-write (disk full) or on a broken checkpoint (NaN) reaches the user as
    one line; the previous merged model stays loaded, on disk and usable for chat."""
    import acm.checkpoints.shards as shards

    base, ft, root = pair
    st = SessionState()
    try:
        first = merge.run_merge(st, str(base), [str(ft)], mode=merge.PLAIN, method="task_arithmetic", alpha=0.5)
        before = _digest(first.out_dir)
        handler = common.ui_errors(merge.run_merge)

        calls = {"n": 0}
        real_add = shards.ShardWriter.add

        def disk_full_after_three(self, name, tensor):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(28, "No space left on device")
            return real_add(self, name, tensor)

        monkeypatch.setattr(shards.ShardWriter, "add", disk_full_after_three)
        with pytest.raises(gr.Error, match="No space left on device"):
            handler(st, str(base), [str(ft)], mode=merge.PLAIN, method="ties", alpha=1.0)
        monkeypatch.undo()

        nan = root / "nan-ft"
        if not nan.exists():
            _nan_copy(ft, nan)
        with pytest.raises(gr.Error, match="NaN/Inf values"):
            handler(st, str(base), [str(nan)], mode=merge.PLAIN, method="dare_ta", alpha=1.0)

        assert st.merged is first and first.model is not None and first.tokenizer is not None
        assert _digest(first.out_dir) == before
        assert sorted(p.name for p in (st.workspace / "merges").iterdir()) == [first.out_dir.name]
        ids = first.tokenizer("what is 1 plus 2?", return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            assert torch.isfinite(first.model(input_ids=ids).logits).all()      # still usable
        assert st.merge_history[-1]["label"] == first.label
    finally:
        st.close()


def _nan_copy(src: Path, dst: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    key = next(k for k in state if k.endswith("layers.1.self_attn.q_proj.weight"))
    state[key][1, 1] = float("nan")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


# ----------------------------------------------------------------------------- out of memory


OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79 GiB total)"),
    "cpu-allocator": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                                          "enough memory: you tried to allocate 21474836480 bytes."),
    "python": lambda: MemoryError(),
}


def _oom_in_forward(monkeypatch, make_error) -> None:
    """The first forward pass of the analysis raises ``make_error()`` (as a too-large batch would)."""
    real_register = acm.activations.analysis.attach_groups

    def register(model, capture):
        handles = real_register(model, capture)

        def boom(*_):
            raise make_error()
        handles.append(model.register_forward_pre_hook(boom))
        return handles

    monkeypatch.setattr(acm.activations.analysis, "attach_groups", register)


@pytest.mark.parametrize("kind", list(OOM_ERRORS))
def test_oom_during_analysis_cli_gives_advice(kind, pair, tmp_path, monkeypatch, capsys):
    base, ft, _ = pair
    cal = write_calibration(tmp_path / "cal.jsonl", n=6)
    _oom_in_forward(monkeypatch, OOM_ERRORS[kind])
    rc = main(["analyze", "--base", str(base), "--ft", str(ft), "--calibration", str(cal), "--samples", "4",
               "--batch-size", "2", "--max-tokens", "24", "--out", str(tmp_path / "a.json")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory on cpu while running the analysis (batch size 2, 4 samples" in err
    assert "smaller batch size (--batch-size), fewer samples (--samples)" in err
    assert not (tmp_path / "a.json").exists()


@pytest.mark.parametrize("kind", list(OOM_ERRORS))
def test_oom_during_analysis_in_the_app_gives_advice_and_the_app_carries_on(kind, pair, uploads, monkeypatch):
    base, ft, _ = pair
    cal = write_calibration(uploads / "cal.jsonl", n=6)
    st = SessionState()
    run = common.ui_errors(analysis.run_analysis)
    kwargs = dict(cal_mode=calibration.UPLOAD, cal_upload=str(cal), samples=4, clusters=2, max_tokens=24,
                  batch_size=2)
    try:
        _oom_in_forward(monkeypatch, OOM_ERRORS[kind])
        with pytest.raises(gr.Error) as info:
            run(st, str(base), [str(ft)], **kwargs)
        msg = info.value.message
        assert "out of memory" in msg and "smaller batch size" in msg and "fewer samples" in msg, msg
        assert "\n" not in msg and st.analysis is None
        monkeypatch.undo()
        monkeypatch.setenv(common.UPLOAD_ROOTS_ENV, str(uploads))
        out = run(st, str(base), [str(ft)], **kwargs)                  # the same session carries on
        assert not out["cached"] and st.analysis is out["analysis"]
    finally:
        st.close()


def test_oom_outside_the_analysis_is_still_one_line(pair, tmp_path, monkeypatch, capsys):
    """An OOM the library did not anticipate (here: in the merge) reaches the CLI's last line of
    defence and the app's error translation as advice, not a traceback."""
    import acm.merging.engine

    base, ft, _ = pair

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9999999999 bytes.")

    monkeypatch.setattr(acm.merging.engine, "merge_models", oom)
    rc = main(["merge", "--base", str(base), "--ft", str(ft), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "out of memory" in err and "--device cpu" in err and "Traceback" not in err

    st = SessionState()
    try:
        with pytest.raises(gr.Error, match="out of memory: use a smaller batch size"):
            common.ui_errors(merge.run_merge)(st, str(base), [str(ft)], mode=merge.PLAIN)
    finally:
        st.close()
