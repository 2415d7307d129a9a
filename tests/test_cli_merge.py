"""``acm merge`` end to end on tiny fixture models: every method, bad inputs (exit 2, one line), a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acm.cli import main
from tests.fixtures import make_pair, make_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, fts = make_pair(tmp_path_factory.mktemp("cli"), "llama", n_ft=2)
    return str(base), [str(f) for f in fts]


def _args(pair, out, *extra, n_ft=2):
    base, fts = pair
    args = ["merge", "--base", base]
    for f in fts[:n_ft]:
        args += ["--ft", f]
    return args + ["--out", str(out), *extra]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ta", "dare_ties"])
def test_merge_each_method(method, pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(pair, out, "--method", method, "--alpha", "0.8", "--shard-size", "10KB")) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert str(out) in captured.out and "shard(s)" in captured.out
    assert (out / "model.safetensors.index.json").is_file() and (out / "README.md").is_file()
    rec = json.loads((out / "acm_recipe.json").read_text())
    assert rec["method"] == method and rec["acm"] is False and len(rec["lambdas"]) == 2


def test_merge_options_reach_the_engine(pair, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(pair, out, "--method", "dare_ties", "--density", "0.5", "--drop-rate", "0.1",
                      "--trim-scope", "global", "--normalize", "--seed", "4", "--dtype", "bfloat16",
                      "--device", "cpu", "--threads", "1")) == 0
    o = json.loads((out / "acm_recipe.json").read_text())["options"]
    assert o["threads"] == 1
    assert (o["density"], o["drop_rate"], o["trim_scope"], o["normalize"], o["seed"], o["dtype"]) == \
        (0.5, 0.1, "global", True, 4, "bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    out2 = tmp_path / "lin"
    assert main(_args(pair, out2, "--method", "linear", "--weights", "1", "3")) == 0
    lam = json.loads((out2 / "acm_recipe.json").read_text())["lambdas"]
    assert lam[1]["lambda"]["embed"] == pytest.approx(0.75)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_missing_model(pair, tmp_path, capsys):
    base, fts = pair
    assert main(["merge", "--base", str(tmp_path / "nope"), "--ft", fts[0], "--out", str(tmp_path / "o")]) == 2
    assert "not found" in _one_line_error(capsys)


def test_mismatched_hidden_size(pair, tmp_path, capsys):
    other = make_tiny_model(tmp_path / "wide", "llama", seed=3, hidden_size=32)
    capsys.readouterr()  # building the fixture prints transformers' progress bars
    assert main(["merge", "--base", pair[0], "--ft", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "hidden size" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_existing_output_dir(pair, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert main(_args(pair, out, n_ft=1)) == 2
    assert "--force" in _one_line_error(capsys)
    assert main(_args(pair, out, "--force", n_ft=1)) == 0
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("extra, pattern", [
    (["--density", "1.5"], "density"), (["--density", "0"], "density"), (["--drop-rate", "1"], "drop rate"),
    (["--alpha", "-1"], "alpha"), (["--t", "1"], "--t sets ACM coefficients: pass --acm"),
    (["--acm", "x.json"], "analysis file not found"),
    (["--method", "linear", "--acm", "x.json", "--t", "1"], "linear"), (["--shard-size", "big"], "shard size"),
    (["--weights", "1", "2"], "linear only"), (["--device", "tpu9"], "device"),
])
def test_bad_parameters(extra, pattern, pair, tmp_path, capsys):
    assert main(_args(pair, tmp_path / "o", *extra)) == 2
    assert pattern in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["merge", "--base", pair[0], "--ft", pair[1][0]])      # no --out
    assert exc.value.code == 2
    assert "--out" in _one_line_error(capsys)
    # --ft may come from --preset, so a missing one is the command's own one-line error (exit 2)
    assert main(["merge", "--base", pair[0], "--out", str(tmp_path / "o")]) == 2
    assert "--ft is required" in _one_line_error(capsys)


def test_acm_merge_from_analysis_file(pair, tmp_path, capsys):
    analysis = pytest.importorskip("acm.activations.analysis")
    pytest.importorskip("acm.rules.coefficients")
    groups = ["embed", "block.0", "block.1", "head"]
    result = analysis.AnalysisResult(
        groups=groups, models=[analysis.ModelNMI(model=f, nmi=[0.9, 0.5, 0.2, 0.7], mi=[1.0, 0.6, 0.3, 0.8])
                               for f in pair[1]],
        provenance={"calibration": {"source": "unit-test", "samples": 3}, "bins": 64, "seed": 0})
    path = tmp_path / "analysis.json"
    result.save(path)
    out = tmp_path / "acm"
    assert main(_args(pair, out, "--method", "ties", "--acm", str(path), "--rule", "softmax", "--t", "4",
                      "--alpha", "1.0")) == 0
    rec = json.loads((out / "acm_recipe.json").read_text())
    assert rec["acm"] is True and rec["acm_analysis"]["t"] == 4.0
    lam = rec["lambdas"][0]["lambda"]
    assert lam["block.1"] > lam["block.0"] > lam["embed"]      # lower NMI → larger λ
    assert sum(lam.values()) / len(lam) == pytest.approx(1.0)
    assert "ACM" in (out / "README.md").read_text()
    # t = 0 is the plain method, bit for bit
    a, b = tmp_path / "t0", tmp_path / "plain"
    assert main(_args(pair, a, "--method", "ties", "--acm", str(path), "--rule", "softmax", "--t", "0")) == 0
    assert main(_args(pair, b, "--method", "ties")) == 0
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # the analysis must cover the same number of models
    assert main(_args(pair, tmp_path / "bad", "--acm", str(path), "--rule", "softmax", "--t", "1", n_ft=1)) == 2
    assert "analyses 2" in _one_line_error(capsys)
    # the paper's rule (the default) needs per-sample MI, which this file lacks: one line that says how to re-run
    assert main(_args(pair, tmp_path / "old", "--acm", str(path))) == 2
    assert "no per-sample MI" in _one_line_error(capsys) and not (tmp_path / "old").exists()


def test_real_subprocess(pair, tmp_path):
    out = tmp_path / "sub"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "acm", *_args(pair, out, "--method", "ties")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and "wrote" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr   # no progress bar when stderr is not a terminal
