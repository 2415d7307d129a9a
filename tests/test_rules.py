"""Coefficient rules: the registry, the sigmoid rule's maths, its per-sample MI estimators, and the
one-command two-stage workflow (``acm merge --rule sigmoid``) end to end on tiny fixture models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import mutual_info_score

from acm.cli import main
from acm.errors import InputError
from acm.mi import mi_from_joint
from acm.rules import RULES, get_rule, sigmoid_scores
from acm.sigmoid_rule import BinnedMI, LabelMI, attach_points, make_estimator
from tests.fixtures import make_pair, make_tiny_model, one_torch_thread, write_calibration  # noqa: F401


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- registry + maths


def test_registry_defaults_and_one_line_errors():
    assert get_rule(None).key == "softmax" and set(RULES) == {"softmax", "sigmoid"}
    sig = get_rule("Sigmoid")
    assert sig.defaults()["theta"] == 0.7 and sig.defaults()["estimator"] == "labels"
    assert sig.needs == "merged" and len(sig.stages) == 3 and "derivative" in sig.source
    assert sig.validate({"theta": "1.5", "estimator": "BINNED"})["estimator"] == "binned"
    for bad, where in (({"theta": 0}, "θ"), ({"theta": float("nan")}, "θ"), ({"estimator": "knn"}, "estimator"),
                       ({"bins": 1}, "bins"), ({"max_values": 10}, "max values"), ({"t": 1}, "no parameter")):
        with pytest.raises(InputError) as e:
            sig.validate(bad)
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown coefficient rule"):
        get_rule("cosine")


def test_sigmoid_scores_hand_computed():
    mi = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [4.0, 0.0, 2.0]])
    s = sigmoid_scores(mi, 0.7)
    expect = [(_sig(-1.4) + _sig(-0.7) + _sig(0.0)) / 3, 0.5, (_sig(0.0) + _sig(-2.8) + _sig(-1.4)) / 3]
    assert s == pytest.approx(expect, rel=1e-12)
    # θ scales the gaps: a larger θ pushes s towards 0 (more delta kept) where samples differ.
    assert sigmoid_scores(mi, 5.0)[0] < s[0] and sigmoid_scores(mi, 5.0)[1] == pytest.approx(0.5)


def test_sigmoid_scores_bounds_half_to_all_of_the_delta_kept():
    rng = np.random.default_rng(0)
    for theta in (0.01, 0.7, 30.0):
        s = sigmoid_scores(rng.normal(0, 5, size=(40, 7)), theta)
        assert np.all(s > 0) and np.all(s <= 0.5)
        kept = 1 - s
        assert np.all(kept >= 0.5) and np.all(kept < 1)
    with pytest.raises(InputError, match="non-finite"):
        sigmoid_scores([[1.0, float("nan")]], 0.7)


# ----------------------------------------------------------------------------- estimators


def test_label_mi_equals_sklearn_on_bf16_labels():
    torch.manual_seed(0)
    x = torch.randn(3, 50) * 2
    y = x + 0.3 * torch.randn(3, 50)
    est = LabelMI(num_points=1, num_samples=2)
    est.keep(0, 0, x)
    est.keep(0, 1, x)
    est.update(0, 0, y)
    est.update(0, 1, x.clone())
    lx = x.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy()
    ly = y.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy()
    mi = est.mi()
    assert mi[0, 0] == pytest.approx(mutual_info_score(lx, ly), rel=1e-12)
    # Identical values: MI = H(labels), more than the noisy pair.
    assert mi[0, 1] == pytest.approx(mutual_info_score(lx, lx), rel=1e-12) and mi[0, 1] > mi[0, 0]
    assert est.state_bytes() == mi.nbytes    # kept labels are released once paired


def test_subset_is_the_same_in_both_passes():
    """With a cap below the size, pairing still lines up: identical activations give MI = H."""
    x = torch.arange(5000, dtype=torch.float32).reshape(50, 100) / 7
    est = LabelMI(1, 1, max_values=1024, seed=3)
    est.keep(0, 0, x)
    est.update(0, 0, x.clone())
    labels = LabelMI.labels(est.flat(0, 0, x))
    assert labels.size == 1024
    assert est.mi()[0, 0] == pytest.approx(mutual_info_score(labels, labels), rel=1e-12)


def test_binned_mi_per_sample():
    from acm.mi import bin_indices

    torch.manual_seed(1)
    x0, x1 = torch.randn(64, 32), torch.randn(64, 32)
    y0 = x0 * 2 + 0.01 * torch.randn_like(x0)                 # nearly a function of the base
    est = make_estimator("binned", 1, 2, bins=16)
    assert isinstance(est, BinnedMI)
    est.keep(0, 0, x0)
    est.keep(0, 1, x1)
    est.update(0, 0, y0)
    est.update(0, 1, torch.randn(64, 32))                      # independent of the base
    mi = est.mi()
    assert mi[0, 0] > 1.5 and mi[0, 1] < 0.2
    # Sample 0 is the plug-in MI of its own 16×16 histogram, with ranges fixed by the first sample.
    ix = bin_indices(x0, *est.x_range[0], 16).numpy()
    iy = bin_indices(y0, *est.y_range[0], 16).numpy()
    joint = np.zeros((16, 16))
    np.add.at(joint, (ix, iy), 1)
    assert mi[0, 0] == pytest.approx(mi_from_joint(joint)[0], rel=1e-12)


def test_activation_points_and_their_groups(tmp_path):
    from transformers import AutoModelForCausalLM

    for tied in (False, True):
        path = make_tiny_model(tmp_path / f"m{tied}", "llama", tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        seen: dict[int, tuple] = {}
        points = attach_points(model, lambda p, act, seen=seen: seen.setdefault(p, tuple(act.shape)))
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
        points.remove()
        assert points.names == ["embed", "block.0.mlp", "block.1.mlp", "final_norm", "logits"]
        assert points.groups == ["embed", "block.0", "block.1", "head", "embed" if tied else "head"]
        hidden, vocab = model.config.hidden_size, model.config.vocab_size
        assert seen[1] == (1, 5, hidden) and seen[3] == (1, 5, hidden) and seen[4] == (1, 5, vocab)


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    base, fts = make_pair(root, "llama")
    return str(base), str(fts[0]), str(write_calibration(root / "cal.jsonl", n=12))


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("estimator", ["labels", "binned"])
def test_two_stage_command_end_to_end(pair, tmp_path, capsys, estimator, one_torch_thread):  # noqa: F811
    from acm.grouping import build_group_map
    from acm.merge import MergeOptions, merge_models
    from acm.models import resolve_model

    base, ft, cal = pair
    out = tmp_path / "final"
    assert main(["merge", "--base", base, "--ft", ft, "--method", "ties", "--alpha", "0.7", "--density", "0.7",
                 "--rule", "sigmoid", "--theta", "0.7", "--rule-estimator", estimator, "--calibration", cal,
                 "--samples", "5", "--max-tokens", "16", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "stage 1/3" in captured.out and "stage 2/3" in captured.out and "stage 3/3" in captured.out
    assert "delta kept per group" in captured.out
    rec = json.loads((out / "acm_recipe.json").read_text())
    rule = rec["rule"]
    assert rec["method"] == "ties" and rule["key"] == "sigmoid" and rule["theta"] == 0.7
    assert rule["estimator"] == estimator and rule["calibration"]["samples"] == 5
    assert set(rule["s"]) == {"embed", "block.0", "block.1", "head"}
    assert all(0 < v <= 0.5 for v in rule["s"].values())
    assert [p.name for p in out.iterdir() if "stage" in p.name or p.name.startswith(".")] == []
    assert not [p for p in tmp_path.iterdir() if p.name != "final"]            # no temp dir left next to it
    card = (out / "README.md").read_text()
    assert "sigmoid rule" in card and "derivative" in card and "--rule sigmoid" in card
    assert "--calibration cal.jsonl --samples 5 --max-tokens 16" in card and str(Path(cal).parent) not in card
    # The final weights are base + (1 − s_g)·(plain merge − base), tensor by tensor.
    plain = tmp_path / "plain"
    merge_models(base, [ft], plain, MergeOptions(method="ties", alpha=0.7, density=0.7), show_progress=False)
    b, m, f = _load(base), _load(plain), _load(out)
    groups = build_group_map(resolve_model(base).config, list(b))
    assert set(f) == set(b)
    for name, tb in b.items():
        lam = 1.0 - rule["s"][groups[name]]
        torch.testing.assert_close(f[name], tb + lam * (m[name] - tb), rtol=1e-5, atol=1e-6)
    assert not torch.equal(f["model.layers.0.mlp.down_proj.weight"], m["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("extra, message", [
    (["--theta", "0.5"], "--theta belongs to the sigmoid rule"),
    (["--max-tokens", "8"], "--max-tokens belongs to the sigmoid rule"),
    (["--rule", "sigmoid"], "needs --calibration"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--theta", "-1"], "θ must be in"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--rule-estimator", "knn"], "estimator must be one of"),
    (["--rule", "cosine"], "unknown coefficient rule"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--acm", "a.json", "--t", "1"], "drop --acm"),
    (["--rule", "sigmoid", "--calibration", "missing.jsonl"], "calibration file not found"),
])
def test_bad_rule_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys, extra, message):
    base, ft, _ = pair
    out = tmp_path / "out"
    assert main(["merge", "--base", base, "--ft", ft, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("acm merge: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- tune / sweep


def test_tune_grid_has_a_rules_dimension():
    from acm.tune import Setting, expand_grid

    old = expand_grid(["ties"], [0.7], [1.0], [0.7])
    assert [s.key() for s in old] == ["ties|a=0.7|t=-|d=0.7|p=-", "ties|a=0.7|t=1|d=0.7|p=-"]   # keys as before
    grid = expand_grid(["ta", "ties"], [0.7], [1.0], [0.7], rules=["softmax", "sigmoid"], thetas=[0.7, 5],
                       estimators=["labels", "binned"])
    sig = [s for s in grid if s.rule == "sigmoid"]
    assert len(grid) == 2 * (2 + 4) and len(sig) == 8 and all(s.t is None and not s.acm for s in sig)
    assert len({s.key() for s in grid}) == len(grid)
    s = next(x for x in sig if x.method == "ties" and x.theta == 5 and x.estimator == "binned")
    assert s.label() == "TIES (α=0.7, d=0.7) + sigmoid (θ=5, binned)"
    assert Setting.from_dict(s.to_dict()) == s
    only = expand_grid(["ties"], [0.7], [1.0, 2.0], [0.7], rules=["sigmoid"])
    assert [x.rule for x in only] == [None, "sigmoid"]                   # the plain point + its rescaled twin
    with pytest.raises(InputError, match="unknown coefficient rule"):
        expand_grid(["ties"], [0.7], [1.0], [0.7], rules=["cosine"])
    with pytest.raises(InputError, match="θ must be in"):
        expand_grid(["ties"], [0.7], [1.0], [0.7], rules=["sigmoid"], thetas=[-1])


def test_demo_sweep_preset_compares_rules():
    from acm.demo.sweep import label, markdown, settings

    grid = settings([0.7], [1.0], [0.7], rules=("softmax", "sigmoid"), thetas=(0.7,), estimators=("labels", "binned"))
    labels = [label(s) for s in grid]
    assert labels == ["TA (α=0.7)", "ACM-TA (α=0.7, t=1)", "TA (α=0.7) + sigmoid (θ=0.7, labels)",
                      "TA (α=0.7) + sigmoid (θ=0.7, binned)", "TIES (α=0.7, d=0.7)", "ACM-TIES (α=0.7, d=0.7, t=1)",
                      "TIES (α=0.7, d=0.7) + sigmoid (θ=0.7, labels)", "TIES (α=0.7, d=0.7) + sigmoid (θ=0.7, binned)"]
    row = {"model": "x", "accuracy": 0.5, "mean_length": 4.0, "acc_per_1k_tokens": 125.0, "per_level": {}}
    table = markdown([row, {**row, "kept": {"embed": 0.5, "head": 0.7}}])
    assert "kept (1 − s)" in table and "0.60 (0.50–0.70)" in table and "| x | — | 0.500" in table
    assert "kept" not in markdown([row])                                  # softmax-only tables unchanged


def test_tune_runs_a_sigmoid_setting_and_records_its_scales(tmp_path, one_torch_thread):  # noqa: F811
    """A grid with the sigmoid rule on the demo pair: merged in one call per setting, s recorded, nothing left."""
    from acm.tune import expand_grid, read_results, run_tune

    root = Path(__file__).resolve().parents[1] / "assets"
    base, long = root / "demo-models" / "tiny-math-base", root / "demo-models" / "tiny-math-long"
    if not (base / "config.json").is_file():
        pytest.skip("demo models not built")
    grid = expand_grid(["ta"], [0.7], [], [], rules=["sigmoid"], estimators=["binned"])
    report = run_tune(str(base), [str(long)], tmp_path, grid, limit=4, holdout=0.0, max_new_tokens=8,
                      samples=4, show_progress=False)
    assert report["complete"] and report["done"] == 2
    recs = {r["key"]: r for r in read_results(tmp_path / "tune.jsonl") if r.get("kind") == "setting"}
    sig = recs["task_arithmetic|a=0.7|t=-|d=-|p=-|r=sigmoid|th=0.7|e=binned"]
    assert set(sig["rule_kept"]) == {"embed", *(f"block.{i}" for i in range(6)), "head"}
    assert all(0.5 <= v < 1 for v in sig["rule_kept"].values())
    assert "rule_kept" not in recs["task_arithmetic|a=0.7|t=-|d=-|p=-"]
    assert not list(tmp_path.glob(".tmp-merges-*")) and not (tmp_path / "analysis.json").exists()
