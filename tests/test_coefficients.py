"""NMI → λ(t) (acm.rules.coefficients): the properties docs/design.md pins, tables and the mergekit YAML."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml

from acm.activations.result import AnalysisResult, ModelNMI
from acm.errors import InputError
from acm.merging.mergekit import to_mergekit_yaml
from acm.rules.coefficients import coefficient_table, lambdas, lambdas_by_group

NMI = np.array([0.92, 0.55, 0.31, 0.47, 0.80])


def make_analysis(nmis=((0.92, 0.55, 0.31, 0.80), (0.70, 0.60, 0.50, 0.40))) -> AnalysisResult:
    groups = ["embed", "block.0", "block.1", "head"]
    models = [ModelNMI(model=f"org/ft{i}", nmi=list(n), mi=[0.1] * len(n)) for i, n in enumerate(nmis)]
    prov = {"models": {"base": {"model": "org/base"}},
            "group_tensors": {"embed": ["model.embed_tokens.weight"], "head": ["lm_head.weight", "model.norm.weight"]}}
    return AnalysisResult(groups=groups, models=models, provenance=prov)


@pytest.mark.parametrize("t", [0.0, 0.5, 3.0, 20.0, 500.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5])
def test_mean_lambda_is_alpha(t, alpha):
    lam = lambdas(NMI, t, alpha)
    assert lam.shape == NMI.shape
    assert lam.mean() == pytest.approx(alpha, rel=1e-12)
    assert np.all(np.isfinite(lam)) and np.all(lam >= 0)


def test_t_zero_is_the_plain_method():
    assert np.allclose(lambdas(NMI, 0.0, 0.7), 0.7, rtol=0, atol=1e-15)


@pytest.mark.parametrize("t", [0.1, 1.0, 7.0])
def test_lower_nmi_never_gets_smaller_lambda(t):
    lam = lambdas(NMI, t)
    order = np.argsort(NMI)
    assert np.all(np.diff(lam[order]) <= 1e-15)     # NMI ascending → λ non-increasing


def test_contrast_grows_with_t():
    ts = np.linspace(0, 30, 61)
    grid = lambdas(NMI, ts)
    contrast = grid.max(axis=-1) / grid.min(axis=-1)
    assert contrast[0] == pytest.approx(1.0)
    assert np.all(np.diff(contrast) > 0)


def test_ties_get_equal_lambda():
    nmi = np.array([0.4, 0.4, 0.9, 0.9, 0.1])
    lam = lambdas(nmi, 5.0)
    assert lam[0] == lam[1] and lam[2] == lam[3]


def test_single_group_is_alpha_for_any_t():
    for t in (0.0, 1.0, 1e3):
        assert lambdas([0.37], t, 1.7).tolist() == [pytest.approx(1.7)]


def test_vectorised_grid_equals_loop_and_is_fast():
    nmi = np.random.default_rng(0).uniform(0, 1, size=(3, 30))     # 3 models × 30 groups
    ts = np.linspace(0, 20, 81)
    grid = lambdas(nmi, ts, 0.8, clip=(0.2, 2.0))
    assert grid.shape == (81, 3, 30)
    for i, t in enumerate(ts):
        assert np.allclose(grid[i], lambdas(nmi, float(t), 0.8, clip=(0.2, 2.0)), rtol=1e-13, atol=0)
    start = time.perf_counter()
    for _ in range(100):
        lambdas(nmi, ts, 0.8)
    assert (time.perf_counter() - start) / 100 < 0.01     # far under a slider frame


def test_numerically_stable_for_huge_t():
    lam = lambdas(NMI, 1e6)
    assert np.all(np.isfinite(lam)) and lam.mean() == pytest.approx(1.0)
    assert lam[np.argmin(NMI)] == pytest.approx(len(NMI))     # all weight on the least-redundant group


def test_clip_is_applied_after():
    raw = lambdas(NMI, 4.0, 1.0)
    clipped = lambdas(NMI, 4.0, 1.0, clip=(0.5, 1.5))
    assert np.array_equal(clipped, np.clip(raw, 0.5, 1.5))
    assert lambdas(NMI, 4.0, clip=(None, 1.2)).max() <= 1.2
    assert lambdas(NMI, 4.0, clip=(0.9, None)).min() >= 0.9


@pytest.mark.parametrize("kwargs, match", [
    (dict(t=-0.1), "t must"), (dict(t=float("nan")), "t must"), (dict(t=float("inf")), "t must"),
    (dict(t=1.0, alpha=0.0), "alpha"), (dict(t=1.0, alpha=-1.0), "alpha"), (dict(t=1.0, alpha=float("inf")), "alpha"),
    (dict(t=1.0, clip=(2.0, 1.0)), "clip"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        lambdas(NMI, **kwargs)


def test_nan_nmi_is_rejected():
    with pytest.raises(InputError, match="finite"):
        lambdas([0.1, float("nan")], 1.0)


def test_coefficient_table_and_lambdas_by_group():
    analysis = make_analysis()
    table = coefficient_table(analysis, 3.0, 0.5, rule="softmax")
    assert table["t"] == 3.0 and table["alpha"] == 0.5
    assert [m["model"] for m in table["models"]] == ["org/ft0", "org/ft1"]
    for m, row in zip(table["models"], analysis.models):
        assert [g["name"] for g in m["groups"]] == ["embed", "block.0", "block.1", "head"]
        assert [g["nmi"] for g in m["groups"]] == row.nmi
        assert np.mean([g["lambda"] for g in m["groups"]]) == pytest.approx(0.5)
    by_group = lambdas_by_group(analysis, 3.0, 0.5, rule="softmax")
    assert by_group[1]["head"] == pytest.approx(table["models"][1]["groups"][3]["lambda"])
    clipped = coefficient_table(analysis, 3.0, 0.5, clip=(0.45, None), rule="softmax")
    g0 = clipped["models"][0]["groups"][0]
    assert g0["clipped"] and g0["lambda"] == 0.45 and g0["lambda_unclipped"] < 0.45


@pytest.mark.parametrize("method, mk", [("task_arithmetic", "task_arithmetic"), ("ties", "ties"),
                                        ("dare_ta", "dare_linear"), ("dare_ties", "dare_ties")])
def test_mergekit_yaml_reproduces_every_group(method, mk):
    analysis = make_analysis()
    text = to_mergekit_yaml(analysis, 2.0, 1.0, method=method, density=0.4, rule="softmax")
    assert text.startswith("# ACM")
    cfg = yaml.safe_load(text)
    assert cfg["merge_method"] == mk and cfg["base_model"] == "org/base"
    if method.startswith("dare"):     # 1/(1 − p) as lambda; mergekit's own rescale would match the L1 norm instead
        assert cfg["parameters"] == {"normalize": False, "rescale": False, "lambda": 2.5}
    else:
        assert cfg["parameters"] == {"normalize": False}
    expected = lambdas_by_group(analysis, 2.0, 1.0, rule="softmax")
    for entry, lam in zip(cfg["models"], expected):
        weight = entry["parameters"]["weight"]
        by_filter = {w["filter"]: w["value"] for w in weight if "filter" in w}
        assert by_filter["model.embed_tokens"] == pytest.approx(lam["embed"], rel=1e-5)
        assert by_filter["lm_head"] == pytest.approx(lam["head"], rel=1e-5)
        assert by_filter["model.norm"] == pytest.approx(lam["head"], rel=1e-5)
        (blocks,) = [w["value"] for w in weight if "filter" not in w]
        assert blocks == pytest.approx([lam["block.0"], lam["block.1"]], rel=1e-5)
        if method == "task_arithmetic":
            assert "density" not in entry["parameters"]
        else:
            assert entry["parameters"]["density"] == 0.4


def test_mergekit_yaml_rejects_linear():
    with pytest.raises(InputError, match="linear"):
        to_mergekit_yaml(make_analysis(), 1.0, method="linear", rule="softmax")


@pytest.mark.parametrize("method, trim, drop, expect", [
    ("dare_ta", None, 0.4, 0.6),            # mergekit's density is the random keep fraction 1 − p
    ("dare_ties", 1.0, 0.25, 0.75),         # no magnitude trim: mergekit's dare_ties is the same merge
    ("dare_ties", 0.7, 0.25, None),         # random drop AND magnitude trim: no mergekit equivalent
])
def test_mergekit_yaml_dare_density_follows_the_drop_rate(method, trim, drop, expect):
    text = to_mergekit_yaml(make_analysis(), 2.0, 1.0, method=method, density=trim, drop_rate=drop, rule="softmax")
    if expect is None:
        assert text.startswith("# ACM (Activation-Guided Consensus Merging): NO mergekit config")
        assert yaml.safe_load(text) is None and "magnitude" in text
    else:
        cfg = yaml.safe_load(text)
        assert [m["parameters"]["density"] for m in cfg["models"]] == pytest.approx([expect] * len(cfg["models"]))
