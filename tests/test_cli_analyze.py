"""``acm analyze`` → ``acm coefficients`` end to end on tiny fixture models, plus one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from acm.activations.result import AnalysisResult
from acm.cli import main
from acm.rules.coefficients import lambdas
from tests.fixtures import make_pair, make_tiny_model, write_calibration


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: intra-op threads only add synchronisation (10x slower on a busy 2-core box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


ROOT = Path(__file__).resolve().parents[1]
FAST = ["--samples", "8", "--clusters", "3", "--max-tokens", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, fts = make_pair(root, "llama", n_ft=2)
    cal = write_calibration(root / "cal.jsonl", n=20)
    return {"root": root, "base": str(base), "fts": [str(f) for f in fts], "cal": str(cal)}


@pytest.fixture(scope="module")
def analysis_path(world):
    out = world["root"] / "analysis.json"
    args = ["analyze", "--base", world["base"], "--ft", world["fts"][0], "--ft", world["fts"][1],
            "--calibration", world["cal"], *FAST, "--bins", "32", "--seed", "1", "--device", "cpu",
            "--pair-budget", "3000", "--out", str(out)]
    assert main(args) == 0
    return out


def test_analyze_writes_a_valid_analysis(analysis_path, world):
    result = AnalysisResult.load(analysis_path)
    assert result.groups == ["embed", "block.0", "block.1", "head"]
    assert [m.model for m in result.models] == world["fts"]
    assert result.provenance["bins"] == 32 and result.provenance["seed"] == 1
    assert result.provenance["calibration"]["samples"] == 8
    assert result.provenance["pair_budget"] == 3000 and result.provenance["subsampled_groups"] == result.groups
    assert result.provenance["memory"]["peak_rss_bytes"] > 0


def test_pair_budget_default_matches_the_library():
    from acm.activations.analysis import DEFAULT_PAIR_BUDGET
    from acm.commands.analyze import PAIR_BUDGET

    assert PAIR_BUDGET == DEFAULT_PAIR_BUDGET


def test_coefficients_json(analysis_path, capsys):
    capsys.readouterr()
    assert main(["coefficients", "--analysis", str(analysis_path), "--rule", "softmax", "--t", "4", "--alpha", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["t"] == 4.0 and data["alpha"] == 0.5
    analysis = AnalysisResult.load(analysis_path)
    expected = lambdas(analysis.nmi_matrix(), 4.0, 0.5)
    assert len(data["models"]) == 2
    for i, m in enumerate(data["models"]):
        assert m["model"] == analysis.models[i].model
        assert [g["name"] for g in m["groups"]] == ["embed", "block.0", "block.1", "head"]
        assert [g["nmi"] for g in m["groups"]] == analysis.models[i].nmi
        assert np.allclose([g["lambda"] for g in m["groups"]], expected[i])
        assert np.mean([g["lambda"] for g in m["groups"]]) == pytest.approx(0.5)


def test_coefficients_clip(analysis_path, capsys):
    capsys.readouterr()
    assert main(["coefficients", "--analysis", str(analysis_path), "--rule", "softmax", "--t", "30", "--clip-min",
                 "0.8", "--clip-max", "1.3"]) == 0
    data = json.loads(capsys.readouterr().out)
    values = [g["lambda"] for m in data["models"] for g in m["groups"]]
    assert min(values) >= 0.8 and max(values) <= 1.3 and data["clip"] == [0.8, 1.3]


def test_coefficients_yaml(analysis_path, capsys, world):
    capsys.readouterr()
    assert main(["coefficients", "--analysis", str(analysis_path), "--rule", "softmax", "--t", "2", "--format", "yaml",
                 "--method", "ties", "--density", "0.3"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load(out)
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == world["base"]
    assert [m["model"] for m in cfg["models"]] == world["fts"]
    analysis = AnalysisResult.load(analysis_path)
    lam = lambdas(analysis.nmi_matrix(), 2.0)
    for i, entry in enumerate(cfg["models"]):
        (blocks,) = [w["value"] for w in entry["parameters"]["weight"] if "filter" not in w]
        assert blocks == pytest.approx(lam[i][1:3].tolist(), rel=1e-5)
        assert entry["parameters"]["density"] == 0.3


def test_real_subprocess_end_to_end(world, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sub.json"
    small = write_calibration(tmp_path / "small.jsonl", n=4)     # --samples 4 of 4: no k-means needed
    proc = subprocess.run([sys.executable, "-m", "acm", "analyze", "--base", world["base"], "--ft", world["fts"][0],
                           "--calibration", str(small), "--samples", "4", "--max-tokens", "24",
                           "--no-chat-template", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    result = AnalysisResult.load(out)
    assert result.provenance["calibration"]["chat_template"] is False
    assert np.all((result.nmi_matrix() >= 0) & (result.nmi_matrix() <= 1))


def _bad(world, tmp_path, **over):
    args = {"--base": world["base"], "--ft": world["fts"][0], "--calibration": world["cal"],
            "--out": str(tmp_path / "x.json")}
    args.update(over)
    flat = ["analyze"]
    for k, v in args.items():
        flat += [k, v]
    return flat + FAST


def _one_line_exit_2(capsys, argv) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    return lines[0]


def test_missing_model(world, tmp_path, capsys):
    line = _one_line_exit_2(capsys, _bad(world, tmp_path, **{"--base": str(tmp_path / "no-such-model")}))
    assert "not found" in line


def test_mismatched_hidden_size(world, tmp_path, capsys):
    wide = make_tiny_model(tmp_path / "wide", "llama", hidden_size=32, intermediate_size=64)
    line = _one_line_exit_2(capsys, _bad(world, tmp_path, **{"--ft": str(wide)}))
    assert "hidden size" in line


def test_empty_calibration_file(world, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    line = _one_line_exit_2(capsys, _bad(world, tmp_path, **{"--calibration": str(empty)}))
    assert "empty" in line


def test_wrong_field(world, tmp_path, capsys):
    line = _one_line_exit_2(capsys, _bad(world, tmp_path, **{"--field": "question"}) )
    assert "'question'" in line and "text" in line


def test_t_out_of_each_rules_range(analysis_path, capsys):
    line = _one_line_exit_2(capsys, ["coefficients", "--analysis", str(analysis_path), "--t", "-3.5"])
    assert "--t must be in [-3, 3]" in line                                  # the acm rule (default)
    line = _one_line_exit_2(capsys, ["coefficients", "--analysis", str(analysis_path), "--rule", "softmax",
                                     "--t", "-0.5"])
    assert "--t must be in [0, 100]" in line


@pytest.mark.parametrize("argv_over, word", [
    ({"--bins": "1"}, "--bins"), ({"--fraction": "0"}, "--fraction"), ({"--samples": "0"}, "--samples"),
    ({"--batch-size": "0"}, "--batch-size"), ({"--max-tokens": "0"}, "--max-tokens"),
    ({"--pair-budget": "0"}, "--pair-budget"),
])
def test_range_checks(world, tmp_path, capsys, argv_over, word):
    argv = _bad(world, tmp_path)
    for k, v in argv_over.items():   # later flags win in argparse
        argv += [k, v]
    assert word in _one_line_exit_2(capsys, argv)


@pytest.mark.parametrize("extra, word", [(["--alpha", "0"], "--alpha"), (["--clip-min", "2", "--clip-max", "1"], "clip"),
                                         (["--format", "yaml", "--method", "linear"], "linear")])
def test_coefficient_argument_checks(analysis_path, capsys, extra, word):
    line = _one_line_exit_2(capsys, ["coefficients", "--analysis", str(analysis_path), "--t", "1", *extra])
    assert word in line


def test_missing_analysis_file(tmp_path, capsys):
    line = _one_line_exit_2(capsys, ["coefficients", "--analysis", str(tmp_path / "nope.json"), "--t", "1"])
    assert "not found" in line
