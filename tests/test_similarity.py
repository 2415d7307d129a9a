"""Similarity metrics (acm.activations.similarity): protocol, known answers, CKA sketch error, bounded state,
the cosine map, several metrics in one analysis, old result files, and the CLI's --metric."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from acm.activations import capture as capture_mod
from acm.activations.analysis import analyze
from acm.activations.calibration import pad_batches
from acm.activations.result import AnalysisResult
from acm.activations.similarity import (
    METRICS,
    CKAEstimator,
    CosineEstimator,
    SimilarityEstimator,
    TwoPhaseEstimator,
    cosine_to_unit,
    get_metric,
    parse_metrics,
)
from acm.cli import main
from acm.errors import InputError
from acm.rules.coefficients import coefficient_table, lambdas, lambdas_by_group
from tests.fixtures import group_rows, make_pair, write_calibration

OLD_FILE = Path(__file__).parent / "data" / "analysis_v1_nmi_only.json"   # written by the pre-metrics code


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def exact_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA from the definition (all rows at once, float64)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((x.t() @ y).pow(2).sum() / ((x.t() @ x).norm() * (y.t() @ y).norm()))


def related(n: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-like rows (a few strong directions + isotropic noise) and a perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
    y = x @ (torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)) + noise * x.std() * torch.randn(n, d, generator=g)
    return x, y


# ----------------------------------------------------------------------------- registry + protocol


def test_registry_and_protocol():
    assert list(METRICS)[:3] == ["nmi", "cka", "cosine"]
    for key, spec in METRICS.items():
        assert spec.key == key and spec.label and spec.formula and spec.description
        est = spec.make(3)
        assert isinstance(est, SimilarityEstimator)
        if spec.pairs == "rows":
            assert isinstance(est, TwoPhaseEstimator)       # usable by the one-model-resident analysis
        assert np.isnan(est.similarity()).all()             # no data yet
    assert get_metric(" CKA ").key == "cka"
    with pytest.raises(InputError, match="unknown similarity metric 'mutual'; choose from nmi, cka, cosine"):
        get_metric("mutual")
    assert parse_metrics(None) == ["nmi"]
    assert parse_metrics(["cka,nmi", "cosine", "cka"]) == ["cka", "nmi", "cosine"]
    with pytest.raises(InputError, match="at least one"):
        parse_metrics([" , "])


@pytest.mark.parametrize("key", list(METRICS))
def test_identical_activations_give_one(key):
    x, _ = related(600, 40, 0.0, seed=1)
    est = METRICS[key].make(2)
    for chunk in torch.split(x, 128):
        est.update(1, chunk, chunk.clone())
    sim = est.similarity()
    assert np.isnan(sim[0]) and sim[1] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("key", ["nmi", "cka"])
def test_independent_activations_give_near_zero(key):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4000, 16, generator=g), torch.randn(4000, 16, generator=g)
    est = METRICS[key].make(1, bins=16)
    est.update(0, x, y)
    assert 0.0 <= est.similarity()[0] < 0.02


def test_cosine_of_unrelated_rows_is_near_zero_and_anti_aligned_rows_clamp_to_zero():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g)
    est = CosineEstimator(2)
    est.update(0, x, y)
    est.update(1, x, -x)
    assert abs(est.mean_cosine()[0]) < 0.01 and est.mean_cosine()[1] == pytest.approx(-1.0)
    assert est.similarity()[1] == 0.0


def test_cosine_map_is_max_zero_cos():
    np.testing.assert_allclose(cosine_to_unit(np.array([-0.5, 0.0, 0.3, 1.0])), [0.0, 0.0, 0.3, 1.0])
    assert np.isnan(cosine_to_unit(np.nan))
    x, y = related(300, 20, 0.5, seed=4)
    est = CosineEstimator(1)
    est.update(0, x, y)
    exact = float(torch.nn.functional.cosine_similarity(x.double(), y.double()).mean())
    assert est.similarity()[0] == pytest.approx(max(0.0, exact), abs=1e-9)      # d ≤ sketch: exact


# ----------------------------------------------------------------------------- CKA: exact and sketched


def test_cka_is_exact_when_the_group_is_narrower_than_the_sketch():
    x, y = related(1500, 96, 1.0, seed=5)
    est = CKAEstimator(1, sketch_dim=128)
    for a, b in zip(torch.split(x, 256), torch.split(y, 256)):      # streaming == one batch
        est.update(0, a, b)
    assert est.similarity()[0] == pytest.approx(exact_cka(x, y), abs=1e-9)


def test_cka_sketch_error_vs_exact():
    """The stated error: with the default k = 128 the one-sided sketch stays within 0.05 of exact CKA
    on activation-like rows 4–16× wider than k (measured max here: see the assertion message)."""
    errors = []
    for d in (512, 2048):
        for seed, noise in enumerate((0.1, 0.5, 1.0, 3.0)):
            x, y = related(3000, d, noise, seed=10 + seed)
            est = CKAEstimator(1)                                  # sketch_dim = 128
            for a, b in zip(torch.split(x, 1000), torch.split(y, 1000)):
                est.update(0, a, b)
            errors.append(abs(est.similarity()[0] - exact_cka(x, y)))
    assert max(errors) < 0.05, f"max |sketched − exact CKA| = {max(errors):.3f}"
    # the naive two-sided sketch (project both sides, CKA of the sketches) is what this avoids
    x, y = related(3000, 2048, 0.1, seed=10)
    r = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0)) / 128 ** 0.5
    assert exact_cka(x, y) - exact_cka(x @ r, y @ r) > 0.1


def test_state_size_does_not_grow_with_calibration_size():
    for key, spec in METRICS.items():
        sizes = []
        for n in (200, 5000):
            x, y = related(n, 300, 0.5, seed=7)
            est = spec.make(2)
            for a, b in zip(torch.split(x, 100), torch.split(y, 100)):
                est.update(0, a, b)
            sizes.append(est.state_bytes())
        assert sizes[0] == sizes[1] > 0, (key, sizes)


def test_per_sample_use_one_estimator_per_sample():
    """What a per-(sample, layer) rule needs: independent estimators, one per calibration sample."""
    x, y = related(400, 24, 0.5, seed=8)
    per_sample = [METRICS["nmi"].make(1, bins=16) for _ in range(4)]
    for est, a, b in zip(per_sample, torch.split(x, 100), torch.split(y, 100)):
        est.update(0, a, b)
    mi = np.array([est.mi()[0] for est in per_sample])
    assert mi.shape == (4,) and np.all(mi > 0)


# ----------------------------------------------------------------------------- analysis


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    base, fts = make_pair(root, "llama", n_ft=1)
    cal = write_calibration(root / "cal.jsonl", n=16)
    return {"root": root, "base": str(base), "ft": str(fts[0]), "cal": str(cal)}


FAST = dict(samples=6, clusters=2, max_tokens=24, batch_size=3, device="cpu", show_progress=False)


@pytest.fixture(scope="module")
def three(world):
    return analyze(world["base"], [world["ft"]], world["cal"], metrics=["nmi", "cka", "cosine"], **FAST)


def test_one_analysis_computes_several_metrics(three, world):
    assert three.metrics() == ["nmi", "cka", "cosine"]
    nmi_only = analyze(world["base"], [world["ft"]], world["cal"], **FAST)
    np.testing.assert_array_equal(three.nmi_matrix(), nmi_only.nmi_matrix())     # NMI path unchanged
    for key in ("cka", "cosine"):
        m = three.similarity_matrix(key)
        assert m.shape == (1, len(three.groups)) and np.all((m >= 0) & (m <= 1))
    assert three.provenance["metrics"] == ["nmi", "cka", "cosine"]
    assert three.provenance["row_metrics"]["rows_per_group"][0] == three.provenance["calibration"]["tokens"]
    with pytest.raises(InputError, match="no 'cka' values"):
        nmi_only.similarity_matrix("cka")


def _reference_rows(base: str, ft: str, texts: list[str], *, max_tokens: int, batch_size: int, seed: int = 0):
    """Both models loaded together, every real token's rows of every group fed straight into one CKA
    and one cosine estimator (the protocol's one-pass ``update``)."""
    from acm.activations.calibration import encode
    from acm.checkpoints.grouping import find_group_modules
    from acm.checkpoints.models import load_causal_lm, resolve_model

    (mb, tok), (mf, _) = [load_causal_lm(resolve_model(p), device="cpu") for p in (base, ft)]
    ids = [x for x in encode(texts, tok, max_tokens=max_tokens) if x]
    head_ids = capture_mod.head_ids(int(mb.get_output_embeddings().weight.shape[0]), seed)
    n_groups = find_group_modules(mb).num_layers + 2
    ests = {"cka": CKAEstimator(n_groups, seed=seed), "cosine": CosineEstimator(n_groups, seed=seed)}

    for inp, mask in pad_batches(ids, batch_size, tok.pad_token_id):
        for g, (x, y) in enumerate(zip(group_rows(mb, inp, mask, head_ids), group_rows(mf, inp, mask, head_ids))):
            for est in ests.values():
                est.update(g, x, y)
    return {k: e.similarity() for k, e in ests.items()}


def test_analysis_row_metrics_equal_both_models_at_once(world):
    """The one-model-resident passes (base sketch stored, then the fine-tuned pass) give the estimator
    fed with both models' rows together, to round-off; a model against itself gives 1."""
    texts = [json.loads(line)["text"] for line in Path(world["cal"]).read_text().splitlines()][:5]
    kw = dict(max_tokens=24, batch_size=2)
    res = analyze(world["base"], [world["ft"]], texts, metrics=["cka", "cosine"], samples=len(texts), clusters=1,
                  fraction=1.0, device="cpu", show_progress=False, **kw)
    ref = _reference_rows(world["base"], world["ft"], texts, **kw)
    for key in ("cka", "cosine"):
        np.testing.assert_allclose(res.similarity_matrix(key)[0], ref[key], rtol=0, atol=1e-6)
    same = analyze(world["base"], [world["base"]], texts, metrics=["cka", "cosine"], samples=len(texts),
                   clusters=1, fraction=1.0, device="cpu", show_progress=False, **kw)
    np.testing.assert_allclose(same.similarity_matrix("cka"), 1.0, atol=1e-9)
    np.testing.assert_allclose(same.similarity_matrix("cosine"), 1.0, atol=1e-6)


def test_row_budget_subsamples_and_stays_deterministic(world):
    kw = dict(FAST, metrics=["cka"], row_budget=20)
    a = analyze(world["base"], [world["ft"]], world["cal"], **kw)
    b = analyze(world["base"], [world["ft"]], world["cal"], **kw)
    assert a.provenance["row_metrics"]["rows_subsampled"] is True
    assert max(a.provenance["row_metrics"]["rows_per_group"]) <= 20 + 3
    np.testing.assert_array_equal(a.similarity_matrix("cka"), b.similarity_matrix("cka"))
    same = analyze(world["base"], [world["base"]], world["cal"], **kw)
    np.testing.assert_allclose(same.similarity_matrix("cka"), 1.0)        # rows line up across passes


def test_metric_only_analysis_without_nmi(world, tmp_path):
    res = analyze(world["base"], [world["ft"]], world["cal"], metrics="cosine", **FAST)
    assert res.metrics() == ["cosine"] and res.models[0].nmi == []
    back = AnalysisResult.load(res.save(tmp_path / "a.json"))
    assert back.metrics() == ["cosine"]
    with pytest.raises(InputError, match="no 'nmi' values .*holds: cosine"):
        back.nmi_matrix()
    lam = lambdas_by_group(back, 2.0, 0.7, metric="cosine", rule="softmax")
    assert np.mean(list(lam[0].values())) == pytest.approx(0.7)


# ----------------------------------------------------------------------------- files + coefficients


def test_old_nmi_only_file_still_loads_and_drives_lambda():
    old = AnalysisResult.load(OLD_FILE)
    raw = json.loads(OLD_FILE.read_text())
    assert raw["format_version"] == 1 and "similarity" not in raw["models"][0]
    assert old.metrics() == ["nmi"]
    np.testing.assert_array_equal(old.similarity_matrix("nmi"), old.nmi_matrix())
    table = coefficient_table(old, 1.0, 0.7, rule="softmax")
    assert table["metric"] == "nmi" and table["models"][0]["groups"][0]["nmi"] == raw["models"][0]["nmi"][0]
    # an NMI-only result writes the same keys as before (older readers load it)
    assert json.loads(old.to_json())["models"][0].keys() == raw["models"][0].keys()


def test_round_trip_keeps_version_and_every_metric(three, tmp_path):
    path = three.save(tmp_path / "three.json")
    d = json.loads(path.read_text())
    assert d["format_version"] == 1 and set(d["models"][0]["similarity"]) == {"cka", "cosine"}
    back = AnalysisResult.load(path)
    for key in ("nmi", "cka", "cosine"):
        np.testing.assert_array_equal(back.similarity_matrix(key), three.similarity_matrix(key))
    d["models"][0]["similarity"]["cka"][0] = 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match="invalid cka for group embed"):
        AnalysisResult.load(bad)


def test_the_chosen_metric_drives_lambda(three):
    for key in ("nmi", "cka", "cosine"):
        table = coefficient_table(three, 2.0, 0.7, metric=key, rule="softmax")
        got = [g["lambda"] for g in table["models"][0]["groups"]]
        np.testing.assert_allclose(got, lambdas(three.similarity_matrix(key)[0], 2.0, 0.7))
        assert table["models"][0]["groups"][0][key] == table["models"][0]["groups"][0]["similarity"]
    assert not np.allclose(lambdas_by_group(three, 2.0, metric="cka", rule="softmax")[0]["embed"],
                           lambdas_by_group(three, 2.0, metric="nmi", rule="softmax")[0]["embed"])


# ----------------------------------------------------------------------------- CLI


def test_cli_analyze_metric_then_coefficients_and_merge(world, tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["analyze", "--base", world["base"], "--ft", world["ft"], "--calibration", world["cal"],
            "--samples", "6", "--clusters", "2", "--max-tokens", "24", "--device", "cpu",
            "--metric", "nmi,cka", "--metric", "cosine", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean linear CKA" in printed and "mean cosine" in printed
    res = AnalysisResult.load(out)
    assert res.metrics() == ["nmi", "cka", "cosine"]
    assert main(["coefficients", "--analysis", str(out), "--rule", "softmax", "--t", "2", "--metric", "cka"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["metric"] == "cka"
    np.testing.assert_allclose([g["lambda"] for g in table["models"][0]["groups"]],
                               lambdas(res.similarity_matrix("cka")[0], 2.0, 1.0))
    assert main(["coefficients", "--analysis", str(out), "--rule", "softmax", "--t", "2", "--metric", "cosine",
                 "--format", "yaml"]) == 0
    assert "s = cosine similarity" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", "--base", world["base"], "--ft", world["ft"], "--acm", str(out), "--rule", "softmax",
                 "--t", "2", "--metric", "cosine", "--device", "cpu", "--out", str(merged)]) == 0
    assert "by cosine" in capsys.readouterr().out
    recipe = json.loads((merged / "acm_recipe.json").read_text())
    expected = lambdas_by_group(res, 2.0, metric="cosine", rule="softmax")[0]
    assert recipe["lambdas"][0]["lambda"] == pytest.approx(expected)
    assert recipe["acm_analysis"]["metric"] == "cosine"
    assert "sₖ = cosine similarity" in (merged / "README.md").read_text()
    shutil.rmtree(merged)


@pytest.mark.parametrize("argv, msg", [
    (["analyze", "--metric", "mutual"], "unknown similarity metric 'mutual'"),
    (["analyze", "--sketch-dim", "0"], "--sketch-dim must be at least 1"),
    (["coefficients", "--rule", "softmax", "--metric", "cka"], "no 'cka' values"),
    (["coefficients", "--metric", "cka"], "--metric picks the softmax rule's similarity"),
    (["merge", "--metric", "cka"], "--metric sets ACM coefficients: pass --acm"),
])
def test_cli_metric_errors_are_one_line(world, tmp_path, capsys, argv, msg):
    cmd = argv[0]
    if cmd == "analyze":
        argv = argv + ["--base", world["base"], "--ft", world["ft"], "--calibration", world["cal"],
                       "--out", str(tmp_path / "x.json")]
    elif cmd == "coefficients":
        argv = argv + ["--analysis", str(OLD_FILE), "--t", "1"]
    else:
        argv = argv + ["--base", world["base"], "--ft", world["ft"], "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"acm {cmd}: error:") and msg in err[0]


# ----------------------------------------------------------------------------- app handlers


def test_app_analysis_with_several_metrics_and_the_lambda_driver(world, tmp_path, monkeypatch):
    from components import analysis, calibration, common
    from components.state import SessionState

    monkeypatch.setenv(common.UPLOAD_ROOTS_ENV, str(Path(world["cal"]).parent))
    st = SessionState()
    try:
        out = analysis.run_analysis(st, world["base"], [world["ft"]], cal_mode=calibration.UPLOAD,
                                    cal_upload=world["cal"], samples=6, clusters=2, max_tokens=24,
                                    metrics=["nmi", "cka", "cosine"])
        res = out["analysis"]
        assert res.metrics() == ["nmi", "cka", "cosine"]
        md = analysis.summary_markdown(res)
        assert "mean NMI" in md and "mean linear CKA" in md and "mean cosine" in md
        # one chart, every metric side by side on [0, 1]; the driver is emphasised
        fig = analysis.nmi_view(res, "cka")
        assert [t["name"] for t in fig.data] == [f"{lab} · {name}" + (" (drives λ)" if name == "linear CKA" else "")
                                                 for lab in analysis.model_labels(res)
                                                 for name in ("NMI", "linear CKA", "cosine")]
        assert fig.layout["yaxis"]["range"] == [0, 1.02]
        # the chosen metric drives λ, and the charts stop saying NMI
        coef, multi, table = analysis.coefficient_view(st, 2.0, 0.7, metric="cka", rule="softmax")
        assert table["metric"] == "cka" and st.coef_view["metric"] == "cka"
        np.testing.assert_allclose([g["lambda"] for g in table["models"][0]["groups"]],
                                   lambdas(res.similarity_matrix("cka")[0], 2.0, 0.7))
        assert "linear CKA" in coef.data[1]["hovertemplate"] and "NMI" not in coef.data[1]["hovertemplate"]
        assert "driven by linear CKA" in coef.layout["title"]["text"]
        assert "linear CKA" in multi.data[0]["hovertemplate"]
        # a t-slider move keeps the driver (metric=None = the last choice)
        _, _, again = analysis.coefficient_view(st, 3.0, 0.7, multi=False)
        assert again["metric"] == "cka"
        # NMI-only analyses keep the classic chart; an unavailable driver falls back to the first metric
        st.analysis = AnalysisResult.load(OLD_FILE)
        assert analysis.nmi_view(st.analysis).layout["title"]["text"].startswith("Per-layer NMI")
        _, _, table = analysis.coefficient_view(st, 2.0, 0.7, metric="cosine", rule="softmax")
        assert table["metric"] == "nmi"
    finally:
        st.close()


def test_app_merge_uses_the_chosen_driver(world, tmp_path, three):
    from components import merge
    from components.state import SessionState

    st = SessionState()
    try:
        st.analysis = three
        st.coef_view = {"t": 2.0, "alpha": 0.7, "clip": None, "metric": "cosine", "rule": "softmax"}
        merged = merge.run_merge(st, world["base"], [world["ft"]], method="task_arithmetic", mode=merge.ACM,
                                 t=2.0, alpha=0.7, device="cpu", rule="softmax")
        expected = lambdas_by_group(three, 2.0, 0.7, metric="cosine", rule="softmax")[0]
        assert merged.report["lambdas"][0] == pytest.approx(expected)
        assert merged.label.endswith("TA softmax t=2 α=0.7 by cosine"), merged.label   # the summary says so
    finally:
        st.close()


# ----------------------------------------------------------------------------- tune / demo sweep


def test_tune_grid_has_a_metric_dimension_and_nmi_keys_are_unchanged():
    from acm.demo.sweep import label, settings
    from acm.tune import Setting, expand_grid

    grid = expand_grid(["ties"], [0.7], [1.0, 2.0], [0.7], metrics=["nmi", "cka,cosine"], rules=["softmax"])
    assert len(grid) == 1 + 2 * 3                                       # plain once, ACM per (t, metric)
    assert [s.metric for s in grid if s.acm] == ["nmi", "cka", "cosine"] * 2
    nmi_point, cka_point = grid[1], grid[2]
    assert nmi_point.key() == "ties|a=0.7|t=1|d=0.7|p=-"                # resumes old tune.jsonl files
    assert cka_point.key() == "ties|a=0.7|t=1|d=0.7|p=-|m=cka"
    assert cka_point.label() == "ACM-TIES (α=0.7, d=0.7, t=1, softmax by cka)"
    assert Setting.from_dict(cka_point.to_dict()) == cka_point
    assert Setting.from_dict({"method": "ties", "alpha": 0.7, "t": 1.0, "density": 0.7}).metric == "nmi"
    with pytest.raises(InputError, match="unknown similarity metric"):
        expand_grid(["ties"], [0.7], [1.0], [0.7], metrics=["kl"])
    demo = settings([0.7], [1.0], [0.7], metrics=["nmi", "cka"], methods=["ties"], rules=["softmax"])
    assert [label(s) for s in demo] == ["TIES (α=0.7, d=0.7)", "ACM-TIES (α=0.7, d=0.7, t=1, softmax)",
                                        "ACM-TIES (α=0.7, d=0.7, t=1, softmax by cka)"]


def test_tune_analysis_must_hold_every_metric_of_the_grid(three, tmp_path, world):
    from acm.tune import _ensure_analysis

    got, _ = _ensure_analysis(world["base"], [world["ft"]], three, tmp_path, calibration=None, samples=None,
                              device="cpu", progress=None, metrics=["cka", "nmi"])
    assert got is three
    old = tmp_path / "old.json"
    shutil.copy(OLD_FILE, old)
    with pytest.raises(InputError, match="has no cka values .*--metric nmi,cka"):
        _ensure_analysis(world["base"], [world["ft"]], str(old), tmp_path, calibration=None, samples=None,
                         device="cpu", progress=None, metrics=["nmi", "cka"])


def test_adding_a_metric_is_one_registry_entry(world, monkeypatch, tmp_path):
    """The recipe of docs/ARCHITECTURE.md: a class + a METRICS entry, and analysis, result file and λ take it."""
    from acm.activations.similarity import MetricSpec

    class SignAgreement:               # share of values with the same sign in both models
        def __init__(self, num_groups, **_):
            self.n, self.same = np.zeros(num_groups), np.zeros(num_groups)

        def base_rows(self, group, base_act):
            return base_act.float().clone()

        def update_stored(self, group, base_rows, other_act):
            self.same[group] += float((torch.sign(base_rows) == torch.sign(other_act.float())).sum())
            self.n[group] += base_rows.numel()

        def update(self, group, base_act, other_act):
            self.update_stored(group, self.base_rows(group, base_act), other_act)

        def similarity(self):
            return np.where(self.n > 0, self.same / np.maximum(self.n, 1), np.nan)

        def state_bytes(self):
            return int(self.n.nbytes + self.same.nbytes)

    monkeypatch.setitem(METRICS, "signs", MetricSpec("signs", "sign agreement", "share of equal signs", "test",
                                                     make=SignAgreement))
    res = analyze(world["base"], [world["ft"]], world["cal"], metrics="nmi,signs", **FAST)
    back = AnalysisResult.load(res.save(tmp_path / "signs.json"))
    assert back.metrics() == ["nmi", "signs"]
    s = back.similarity_matrix("signs")
    assert np.all((s > 0.5) & (s <= 1))                        # a fine-tuned descendant mostly keeps signs
    assert coefficient_table(back, 1.0, metric="signs", rule="softmax")["metric"] == "signs"
