"""Coefficient rules: the registry, the per-sample MI estimators and activation points, and the acm rule's
staged workflow (``acm merge --against merged``, formerly ``--rule sigmoid``) end to end on tiny models.
The rule's maths against an independent reference: tests/test_acm_rule.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import mutual_info_score

from acm.activations.capture import attach_points
from acm.activations.mi import mi_from_joint
from acm.activations.sample_mi import BinnedMI, LabelMI, bf16_labels, discrete_mi, make_estimator
from acm.cli import main
from acm.errors import InputError
from acm.rules import RULES, alias_params, get_rule
from tests.fixtures import make_pair, make_tiny_model, one_torch_thread, write_calibration  # noqa: F401

# ----------------------------------------------------------------------------- registry


def test_registry_defaults_and_one_line_errors():
    assert get_rule(None).key == "acm" and set(RULES) == {"acm", "softmax", "fim"}
    acm = get_rule("ACM")
    d = acm.defaults()
    assert d["t"] == 0.7 and d["against"] == "fine-tuned" and d["applies"] == "task-vectors"
    assert d["estimator"] == "labels" and "2505.14009" in acm.source
    assert "alternative" in get_rule("softmax").label and "not the paper" in get_rule("softmax").source
    assert get_rule("sigmoid") is acm and alias_params("sigmoid") == {"against": "merged", "applies": "merged-delta"}
    assert acm.validate({"t": "-1.5", "estimator": "BINNED", "max_values": 0})["max_values"] is None
    for bad, where in (({"t": 3.5}, "t must be in [-3, 3]"), ({"t": float("nan")}, "t must be"),
                       ({"estimator": "knn"}, "estimator"), ({"against": "base"}, "MI against"),
                       ({"applies": "all"}, "λ applies to"), ({"bins": 1}, "bins"), ({"max_values": 10}, "max values"),
                       ({"theta": 1}, "no parameter")):
        with pytest.raises(InputError) as e:
            acm.validate(bad)
        assert where in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match="unknown coefficient rule"):
        get_rule("cosine")


# ----------------------------------------------------------------------------- estimators


def test_label_mi_equals_sklearn_on_bf16_labels():
    torch.manual_seed(0)
    x = torch.randn(3, 50) * 2
    y = x + 0.3 * torch.randn(3, 50)
    est = LabelMI(num_points=1, num_samples=2)
    est.keep(0, 0, x)
    est.keep(0, 1, x)
    est.update(0, 0, 0, y)
    est.update(0, 0, 1, x.clone())
    lx = x.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy()
    ly = y.to(torch.bfloat16).view(torch.int16).reshape(-1).numpy()
    mi = est.mi()
    assert mi[0, 0] == pytest.approx(mutual_info_score(lx, ly), rel=1e-12)
    # Identical values: MI = H(labels), more than the noisy pair.
    assert mi[0, 1] == pytest.approx(mutual_info_score(lx, lx), rel=1e-12) and mi[0, 1] > mi[0, 0]
    est.clear()
    assert est.state_bytes() == est._mi.nbytes    # kept labels are released after the last model's pass
    assert discrete_mi(torch.tensor(lx), torch.tensor(ly)) == pytest.approx(mutual_info_score(lx, ly), rel=1e-12)
    # −0 and +0 are one value (one label), as scikit-learn sees them on floats.
    assert bf16_labels(torch.tensor([-0.0]))[0] == bf16_labels(torch.tensor([0.0]))[0]


def test_subset_is_the_same_in_both_passes():
    """With a cap below the size, pairing still lines up: identical activations give MI = H."""
    x = torch.arange(5000, dtype=torch.float32).reshape(50, 100) / 7
    est = LabelMI(1, 1, max_values=1024, seed=3)
    est.keep(0, 0, x)
    est.update(0, 0, 0, x.clone())
    labels = bf16_labels(est.flat(0, 0, x)).numpy()
    assert labels.size == 1024
    assert est.mi()[0, 0] == pytest.approx(mutual_info_score(labels, labels), rel=1e-12)


def test_binned_mi_per_sample():
    from acm.activations.mi import bin_indices

    torch.manual_seed(1)
    x0, x1 = torch.randn(64, 32), torch.randn(64, 32)
    y0 = x0 * 2 + 0.01 * torch.randn_like(x0)                 # nearly a function of the base
    est = make_estimator("binned", 1, 2, bins=16)
    assert isinstance(est, BinnedMI)
    est.keep(0, 0, x0)
    est.keep(0, 1, x1)
    est.update(0, 0, 0, y0)
    est.update(0, 0, 1, torch.randn(64, 32))                   # independent of the base
    mi = est.mi()
    assert mi[0, 0] > 1.5 and mi[0, 1] < 0.2
    # Sample 0 is the plug-in MI of its own 16×16 histogram, with ranges fixed by the first sample.
    ix = bin_indices(x0, *est.x_range[0], 16).numpy()
    iy = bin_indices(y0, *est.y_range[0][0], 16).numpy()
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
        assert points.groups == ["embed", "block.0", "block.1", "head.norm", "head"]
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
def test_staged_command_end_to_end(pair, tmp_path, capsys, estimator, one_torch_thread):  # noqa: F811
    """``--rule sigmoid`` (the alias) = plain merge → per-sample MI base vs merged → base + λ·(merged − base)."""
    from acm.checkpoints.grouping import build_group_map
    from acm.checkpoints.models import resolve_model
    from acm.merging.engine import MergeOptions, merge_models

    base, ft, cal = pair
    out = tmp_path / "final"
    assert main(["merge", "--base", base, "--ft", ft, "--method", "ties", "--alpha", "0.7", "--density", "0.7",
                 "--rule", "sigmoid", "--theta", "0.7", "--rule-estimator", estimator, "--calibration", cal,
                 "--samples", "5", "--max-tokens", "16", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "stage 1/3" in captured.out and "stage 2/3" in captured.out and "stage 3/3" in captured.out
    assert "MI against merged, λ applied to merged-delta" in captured.out and "λ per layer" in captured.out
    rec = json.loads((out / "acm_recipe.json").read_text())
    entry = rec["acm_analysis"]
    assert rec["method"] == "ties" and entry["rule"] == "acm" and entry["t"] == 0.7
    assert entry["estimator"] == estimator and entry["analysis"]["calibration"]["samples"] == 5
    assert entry["against"] == "merged" and entry["applies"] == "merged-delta"
    lam = rec["lambdas"][0]["lambda"]
    assert set(lam) == {"embed", "block.0", "block.1", "head.norm", "head"}
    assert all(0.5 <= v < 1 for v in lam.values())
    assert [p.name for p in out.iterdir() if "stage" in p.name or p.name.startswith(".")] == []
    assert not [p for p in tmp_path.iterdir() if p.name != "final"]            # no temp dir left next to it
    card = (out / "README.md").read_text()
    assert "acm rule" in card and "--against merged" in card and "--applies merged-delta" in card
    assert "--calibration cal.jsonl --samples 5 --max-tokens 16" in card and str(Path(cal).parent) not in card
    # The final weights are base + λ_g·(plain merge − base), tensor by tensor.
    plain = tmp_path / "plain"
    merge_models(base, [ft], plain, MergeOptions(method="ties", alpha=0.7, density=0.7), show_progress=False)
    b, m, f = _load(base), _load(plain), _load(out)
    groups = build_group_map(resolve_model(base).config, list(b))
    assert set(f) == set(b)
    for name, tb in b.items():
        key = "head.norm" if name == "model.norm.weight" else groups[name]
        torch.testing.assert_close(f[name], tb + lam[key] * (m[name] - tb), rtol=1e-5, atol=1e-6)
    assert not torch.equal(f["model.layers.0.mlp.down_proj.weight"], m["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("extra, message", [
    (["--theta", "0.5"], "--t sets ACM coefficients: pass --acm"),
    (["--max-tokens", "8"], "--max-tokens belongs to the acm rule with MI against a plain merge"),
    (["--rule", "sigmoid"], "needs --calibration"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--theta", "-4"], "t must be in [-3, 3]"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--rule-estimator", "knn"], "estimator must be one of"),
    (["--rule", "cosine", "--acm", "a.json"], "unknown coefficient rule"),
    (["--rule", "sigmoid", "--calibration", "bundled", "--acm", "a.json"], "drop --acm"),
    (["--rule", "sigmoid", "--calibration", "missing.jsonl"], "calibration file not found"),
    (["--acm", "a.json", "--against", "sideways"], "MI against must be one of"),
    (["--acm", "a.json", "--rule", "softmax", "--applies", "merged-delta"], "belongs to the acm rule, not softmax"),
    (["--acm", "a.json", "--metric", "cka"], "--metric picks the softmax rule"),
    (["--acm", "a.json", "--calibration", "bundled"], "--calibration belongs to --against merged"),
    (["--acm", "a.json", "--rule", "softmax", "--t", "-1"], "t must be in [0, 100]"),
])
def test_bad_rule_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys, extra, message):
    base, ft, _ = pair
    out = tmp_path / "out"
    assert main(["merge", "--base", base, "--ft", ft, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("acm merge: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
