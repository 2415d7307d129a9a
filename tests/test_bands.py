"""Bootstrap bands on λ and λ against the calibration sample count (acm.rules.bands; issue 23)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from acm.activations.result import AnalysisResult, ModelNMI
from acm.cli import main
from acm.errors import InputError
from acm.rules import acm_lambdas
from acm.rules.bands import (
    NO_BAND,
    analysis_band,
    analysis_curve,
    bootstrap_band,
    compare,
    count_curve,
    settle_count,
    supports_bands,
)
from acm.rules.coefficients import compute

KEYS = ["embed", "block.0", "block.1", "head.norm", "head"]
POINTS = ["embed", "block.0.mlp", "block.1.mlp", "final_norm", "logits"]


def make_analysis(mi: np.ndarray, clusters=None, names=("org/ft0",)) -> AnalysisResult:
    """An analysis holding per-sample MI [models, points, samples] (no model work)."""
    mi = np.asarray(mi, dtype=np.float64)
    models = [ModelNMI(model=n, nmi=[0.5] * mi.shape[1], mi=[0.1] * mi.shape[1], sample_mi=m.tolist())
              for n, m in zip(names, mi)]
    info = {"estimator": "labels", "unit": "nats", "points": POINTS[:mi.shape[1]], "point_groups": KEYS[:mi.shape[1]],
            "tokens": [10] * mi.shape[-1], "max_values": 0, "bins": None, "values_per_point": [], "seed": 0}
    if clusters is not None:
        info["clusters"] = list(clusters)
    return AnalysisResult(groups=KEYS[:mi.shape[1]], models=models, provenance={"models": {"base": {"model": "b"}}},
                          sample_info=info)


def random_mi(samples: int, seed: int = 1) -> np.ndarray:
    """Per-sample MI uniform on [3, 5] nats (bounded, as discrete MI is: ≤ log of the values per sample)."""
    return np.random.default_rng(seed).uniform(3.0, 5.0, size=(1, 5, samples))


def test_band_shrinks_as_samples_grow():
    widths = []
    for n in (10, 40, 160, 640):
        lo, hi = bootstrap_band(random_mi(n), 0.7, level=0.9, resamples=300, seed=0)
        widths.append(float((hi - lo).mean()))
    assert all(b < a for a, b in zip(widths, widths[1:])), widths
    assert widths[-1] < widths[0] / 3, widths            # ~1/√n: 64× the samples, far narrower


def test_identical_samples_give_a_zero_width_band():
    mi = np.full((2, 5, 12), 3.7)
    lo, hi = bootstrap_band(mi, 0.7, resamples=200, seed=3)
    assert np.array_equal(lo, hi) and np.allclose(lo, 0.5)      # λ = 1 − σ(0) on every resample
    band = analysis_band(make_analysis(mi, names=("a", "b")), 0.7)
    assert band.to_dict()["max_width"] == 0.0 and np.allclose(band.lam, 0.5)


def test_band_holds_the_full_set_lambda_and_is_seeded():
    mi = random_mi(30)
    a = analysis_band(make_analysis(mi), 0.7, resamples=300, seed=7)
    b = analysis_band(make_analysis(mi), 0.7, resamples=300, seed=7)
    c = analysis_band(make_analysis(mi), 0.7, resamples=300, seed=8)
    assert a.to_dict() == b.to_dict() and a.to_dict() != c.to_dict()
    assert a.lo.shape == a.lam.shape == (1, 5) and np.all(a.lo <= a.hi)
    assert np.all(a.hi - a.lo > 0)


# Two clusters: A = 8 samples with MI 1.0, B = 2 samples with MI 0.0 (one model, one point), t = 1.
# Inside a cluster every sample is alike, so a subset's λ depends only on how many it takes from each
# cluster — calibration.allocate's counts: n=1 → (1,0); 2 → (1,1); 3 → (2,1); 4 → (3,1); 5 → (4,1);
# 6 → (5,1); 7 → (5,2); 8 → (6,2); 9 → (7,2); 10 → (8,2). λ = 1 − (a·σ(0) + b·σ(−1))/n.
SIG = 1.0 / (1.0 + np.exp(1.0))                                    # σ(−1) = 0.268941
BY_HAND = {n: 1 - (a * 0.5 + b * SIG) / n for n, (a, b) in
           {1: (1, 0), 2: (1, 1), 3: (2, 1), 4: (3, 1), 5: (4, 1), 6: (5, 1), 7: (5, 2), 8: (6, 2), 9: (7, 2),
            10: (8, 2)}.items()}
# |λ(n) − λ(10)|: .046 .069 .031 .0116 0 .0077 .0198 .0116 .0051 0 → within 0.01 from n = 9 on;
# within 0.02 from n = 4 on.
TWO_CLUSTERS = (np.array([[[1.0] * 8 + [0.0] * 2]]), [0] * 8 + [1] * 2)


@pytest.mark.parametrize("seed", [0, 5])
def test_subset_lambdas_follow_the_per_cluster_draw(seed):
    mi, labels = TWO_CLUSTERS
    counts, lam = count_curve(mi, 1.0, labels=labels, counts=range(1, 11), seeds=3, seed=seed)
    assert counts == list(range(1, 11))
    for i, n in enumerate(counts):
        assert np.allclose(lam[i], BY_HAND[n], atol=1e-12), (n, lam[i].ravel(), BY_HAND[n])


@pytest.mark.parametrize(("tol", "expected"), [(0.01, 9), (0.02, 4), (0.1, 1)])
def test_settle_count_equals_the_hand_computed_one(tol, expected):
    mi, labels = TWO_CLUSTERS
    curve = analysis_curve(make_analysis(mi, clusters=labels), 1.0, tol=tol, counts=range(1, 11), seeds=4)
    assert curve.clustered and curve.settle == expected
    assert f"settle at ≈ {expected} samples" in curve.line() or expected == 10


def test_settle_count_is_the_first_count_from_which_on_all_stay_within():
    assert settle_count([2, 4, 8, 16], [0.05, 0.001, 0.02, 0.0], 0.01) == 16
    assert settle_count([2, 4, 8, 16], [0.05, 0.001, 0.009, 0.0], 0.01) == 4
    assert settle_count([2, 4, 8], [0.0, 0.0, 0.0], 0.01) == 2


def test_curve_is_reproducible_and_ends_at_the_full_set():
    mi = random_mi(40)
    labels = np.arange(40) % 4
    a = analysis_curve(make_analysis(mi, clusters=labels), 0.7, seed=2)
    b = analysis_curve(make_analysis(mi, clusters=labels), 0.7, seed=2)
    assert np.array_equal(a.lambdas, b.lambdas) and a.settle == b.settle
    assert a.counts[-1] == 40 and a.deviation()[-1] < 1e-12
    assert np.allclose(a.full, acm_lambdas(mi, 0.7))


def test_old_files_without_clusters_draw_uniformly_and_say_so():
    curve = analysis_curve(make_analysis(random_mi(12)), 0.7)
    assert not curve.clustered and "uniformly (one cluster, or none recorded)" in curve.line()


def test_softmax_says_in_one_line_that_it_has_no_band():
    assert supports_bands("acm") and supports_bands("sigmoid") and not supports_bands("softmax")
    assert "\n" not in NO_BAND and "softmax" in NO_BAND


def test_an_analysis_without_per_sample_mi_is_refused_in_one_line():
    a = make_analysis(random_mi(5))
    for m in a.models:
        m.sample_mi = []
    with pytest.raises(InputError, match="no per-sample MI"):
        analysis_band(a, 0.7)


def test_bad_settings_are_refused():
    a = make_analysis(random_mi(5))
    with pytest.raises(InputError, match="level"):
        analysis_band(a, 0.7, level=1.5)
    with pytest.raises(InputError, match="resamples"):
        analysis_band(a, 0.7, resamples=3)


def test_two_calibration_sets_compare_per_group():
    base = random_mi(30)
    other = base.copy()
    other[0, 4] -= np.linspace(0, 2.0, 30)                        # 'head' spreads on the second set
    a, b = analysis_band(make_analysis(base), 0.7), analysis_band(make_analysis(other), 0.7)
    cmp = compare(a, b)
    assert cmp["largest"] == "head" and cmp["max_diff"][:4] == [0.0] * 4 and cmp["largest_diff"] > 0.01
    assert cmp["overlap"][:4] == [True] * 4
    with pytest.raises(InputError, match="same pair"):
        compare(a, analysis_band(make_analysis(base[:, :3]), 0.7))


def test_the_recipe_entry_records_the_band():
    a = make_analysis(random_mi(20))
    entry = compute(a, "acm", 0.7).entry()
    band = entry["band"]
    assert band["level"] == 0.9 and band["resamples"] == 300 and band["seed"] == 0
    assert band == analysis_band(a, 0.7).to_dict()
    assert all(lo <= lam <= hi for lo, lam, hi in zip(band["lo"]["org/ft0"], entry["lambda"]["org/ft0"],
                                                       band["hi"]["org/ft0"]))
    assert "band" not in compute(a, "softmax", 1.0).entry()


def test_cli_prints_bands_and_the_settle_line(tmp_path, capsys):
    path = tmp_path / "a.json"
    make_analysis(random_mi(24), clusters=[i % 3 for i in range(24)]).save(path)
    assert main(["coefficients", "--analysis", str(path), "--bands", "--resamples", "200", "--seed", "1"]) == 0
    out = capsys.readouterr()
    table = json.loads(out.out)
    row = table["models"][0]["groups"][0]
    assert row["lambda_lo"] <= row["lambda"] <= row["lambda_hi"]
    assert table["bands"]["level"] == 0.9 and table["bands"]["resamples"] == 200
    assert table["settle"]["settle"] in table["settle"]["counts"]
    assert "90% band" in out.err and "coefficients settle at" in out.err or "do not settle" in out.err
    assert main(["coefficients", "--analysis", str(path), "--bands", "0.8", "--resamples", "200", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["bands"]["level"] == 0.8


def test_cli_softmax_says_no_band_and_bad_level_is_one_line(tmp_path, capsys):
    path = tmp_path / "a.json"
    make_analysis(random_mi(8)).save(path)
    assert main(["coefficients", "--analysis", str(path), "--rule", "softmax", "--bands"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["bands"] == {"note": NO_BAND} and NO_BAND in out.err
    assert main(["coefficients", "--analysis", str(path), "--bands", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--bands" in err and len(err.splitlines()) == 1


def test_recorded_clusters_match_the_calibration_draw():
    """The clusters recorded with the samples are the ones the calibration draw used: the selected samples'
    clusters hold exactly the counts ``allocate`` gave each cluster, and asking for labels changes no draw."""
    from acm.activations.calibration import allocate, cluster_select

    emb = np.random.default_rng(0).normal(size=(120, 8)) + np.repeat(np.eye(8)[:4] * 6, 30, axis=0)
    for samples, fraction in ((None, 0.1), (17, 0.1)):
        idx, labels = cluster_select(emb, clusters=6, fraction=fraction, samples=samples, seed=4, return_labels=True)
        assert idx == cluster_select(emb, clusters=6, fraction=fraction, samples=samples, seed=4)
        sizes = [int((labels == c).sum()) for c in range(6)]
        got = [int((labels[idx] == c).sum()) for c in range(6)]
        assert got == allocate(sizes, fraction=fraction, samples=samples)


def test_old_analysis_files_still_load_and_new_ones_keep_clusters(tmp_path):
    a = make_analysis(random_mi(6), clusters=[0, 0, 1, 1, 2, 2])
    a.save(tmp_path / "new.json")
    assert AnalysisResult.load(tmp_path / "new.json").sample_info["clusters"] == [0, 0, 1, 1, 2, 2]
    make_analysis(random_mi(6)).save(tmp_path / "old.json")
    assert "clusters" not in AnalysisResult.load(tmp_path / "old.json").sample_info
