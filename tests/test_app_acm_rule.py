"""The app on the paper's rule (issue 19): the default everywhere, its t range, the live λ grid, per-sample MI
and MI-vs-tokens views, the calibration-token download, and old analysis files without per-sample MI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from acm.errors import InputError
from components import calibration, common, plots
from components.state import SessionState
from tests.fixtures import (
    make_pair,
    uploads_from_pytest_tmp,  # noqa: F401 - module autouse fixture (Gradio upload area)
    write_calibration,
)

KEYS = ["embed", "block.0", "block.1", "head.norm", "head"]
POINTS = ["embed", "block.0.mlp", "block.1.mlp", "final_norm", "logits"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One real analysis of a tiny pair on calibration texts of different lengths."""
    from components import analysis

    root = tmp_path_factory.mktemp("acm-app")
    base, fts = make_pair(root, "llama", n_ft=2)
    cal = root / "cal.jsonl"
    cal.write_text("".join(json.dumps({"text": " ".join(["word"] * (3 + 4 * i)) + f" sample {i}"}) + "\n"
                           for i in range(8)))
    st = SessionState()
    out = analysis.run_analysis(st, str(base), [str(f) for f in fts], cal_mode=calibration.UPLOAD,
                                cal_upload=str(cal), samples=8, clusters=2, max_tokens=64)
    yield st, out, (str(base), [str(f) for f in fts])
    st.close()


def test_the_app_opens_on_the_paper_rule_at_t_0_7():
    import app
    from acm.rules import PAPER_T
    from components import analysis, merge

    assert analysis.DEFAULT_T == PAPER_T == 0.7 and SessionState().coef_view["rule"] == "acm"
    assert analysis.ACM_T_GRID == (0.5, 0.6, 0.7, 0.8, 0.9)                 # the paper's ablation
    acm, soft = analysis.t_slider_settings("acm"), analysis.t_slider_settings("softmax")
    assert (acm["minimum"], acm["maximum"], acm["step"], acm["value"]) == (-3, 3, 0.05, 0.7)
    assert (soft["minimum"], soft["maximum"], soft["value"]) == (0, 40, 1.0)
    demo = app.build_app(prewarm=False)
    a, g = demo.ui.analysis, demo.ui.merge
    assert a.rule.value == "acm" and (a.t.minimum, a.t.maximum, a.t.step, a.t.value) == (-3, 3, 0.05, 0.7)
    assert a.alpha.visible is False and a.driver.visible is False                # softmax-only controls
    assert g.rule_radio.value == "acm" and g.t.value == 0.7 and g.alpha.visible is False
    assert g.rule.against.value == "fine-tuned" and g.rule.applies.value == "task-vectors"
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    for name in ("analyse", "coefficients", "merge", "merge_sigmoid", "upload_analysis", "lambda_driver"):
        assert name in deps
    assert [type(o).__name__ for o in deps["analyse"].outputs] == ["Markdown", "Plot", "Plot", "Plot", "JSON",
                                                                    "DownloadButton"]
    assert merge.normalize_mode(None) == merge.ACM


def test_rule_and_t_validation():
    from components import analysis

    assert analysis.rule_key(None) == "acm" and analysis.rule_key("sigmoid") == "acm"
    assert analysis.rule_key("Softmax") == "softmax"
    with pytest.raises(InputError, match="unknown coefficient rule"):
        analysis.rule_key("fancy")
    assert analysis.rule_t("acm", -1) == -1.0 and analysis.rule_t("acm", None) == 0.7
    with pytest.raises(InputError, match=r"t must be in \[-3, 3\].*rule='softmax'"):
        analysis.rule_t("acm", 20)
    assert analysis.rule_t("softmax", 20) == 20.0
    with pytest.raises(InputError, match="t must be in"):
        analysis.rule_t("softmax", -1)


def test_acm_view_table_live_grid_and_several_t(analysed):
    from acm.rules.coefficients import compute
    from components import analysis

    st, out, _ = analysed
    fig, multi, table = analysis.coefficient_view(st, None, None)          # the defaults: acm, t = 0.7
    assert table["rule"] == "acm" and table["t"] == 0.7 and table["groups"] == KEYS
    coef = compute(st.analysis, "acm", 0.7)
    assert [g["lambda"] for g in table["models"][1]["groups"]] == pytest.approx(coef.lambdas[1])
    assert fig.data[1]["y"] == pytest.approx(coef.lambdas[0]) and fig.data[0]["y"] == [0.5] * len(KEYS)
    assert "t = 0.7" in fig.layout["title"]["text"]
    live = fig.layout["meta"]["live"]
    assert live["t0"] == -3 and live["step"] == 0.05 and len(live["lambdas"]) == 121 and live["traces"] == [1, 2]
    assert "{t}" in live["title"] and all("{t}" in n for n in live["names"])
    at_minus_one = live["lambdas"][round((-1 - live["t0"]) / live["step"])]
    assert np.asarray(at_minus_one) == pytest.approx(compute(st.analysis, "acm", -1).lambdas, abs=1e-6)
    lo, hi = fig.layout["yaxis"]["range"]                                   # one axis for every t on the grid
    assert lo <= np.min(live["lambdas"]) and hi >= np.max(live["lambdas"]) and lo < 0.5 < hi
    assert [d["name"] for d in multi.data[:5]] == [f"t = {t:g}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert "ablation" in multi.layout["title"]["text"]
    _, _, m1 = analysis.coefficient_view(st, -1.0, None)
    assert all(0 < g["lambda"] <= 0.5 for g in m1["models"][0]["groups"])    # t < 0: λ in (0, ½]
    _, _, clipped = analysis.coefficient_view(st, 3.0, None, "", "0.52")
    assert all(g["lambda"] <= 0.52 + 1e-12 for g in clipped["models"][0]["groups"])
    soft_fig, _, soft = analysis.coefficient_view(st, 4.0, 1.0, rule="softmax")
    assert soft["rule"] == "softmax" and soft_fig.layout["meta"]["live"]["step"] == 0.5
    assert st.coef_view["rule"] == "softmax"
    analysis.coefficient_view(st, 0.7, None, rule="acm")


def test_per_sample_mi_view_summary_and_mi_vs_tokens(analysed):
    from components import analysis

    st, out, _ = analysed
    res = st.analysis
    fig = analysis.layer_view(res, "acm")
    mean = fig.data[2]
    mi = res.sample_mi_matrix()
    assert mean["x"] == KEYS and mean["y"] == pytest.approx(mi[0].mean(axis=-1))
    assert mean["error_y"]["array"] == pytest.approx(mi[0].std(axis=-1))
    assert fig.data[0]["y"] == pytest.approx(mi[0].max(axis=-1)) and fig.data[1]["fill"] == "tonexty"
    assert [c[0] for c in mean["customdata"]] == POINTS
    assert analysis.layer_view(res, "softmax").data[0]["name"].startswith("llama-ft0")     # the NMI chart
    md = analysis.summary_markdown(res, seconds=1.0)
    assert "per-sample MI (labels)" in md and "mean NMI" in md
    rows = analysis.mi_token_correlation(res)
    tokens = np.asarray(res.sample_info["tokens"], dtype=float)
    assert len(set(tokens)) > 1 and len(rows) == 2 * len(KEYS)
    expect = np.corrcoef(np.log(tokens), mi[1][0])[0, 1]
    assert rows[len(KEYS)]["r"] == pytest.approx(expect) and rows[len(KEYS)]["key"] == "embed"
    tfig, line = analysis.mi_tokens_view(res)
    assert "Pearson r median" in line and tfig.layout["xaxis"]["type"] == "log"
    assert tfig.data[0]["x"] == pytest.approx(tokens.tolist()) and "r = " in tfig.data[0]["name"]


def test_calibration_download_holds_the_exact_tokens(analysed):
    from components import analysis

    st, out, _ = analysed
    path = Path(analysis.calibration_download(st))
    assert path.parent == st.workspace / "exports" and path.name == "calibration-tokens-cal.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(st.analysis.sample_info["tokens"])
    assert [len(r["input_ids"]) for r in rows] == st.analysis.sample_info["tokens"]     # real tokens, no padding
    assert [(r["input_ids"], r["text"]) for r in rows] == [(list(i), t) for i, t in st.analysis.calibration]
    assert all(isinstance(i, int) for r in rows for i in r["input_ids"])
    fig, line, download = analysis.extras(st)
    assert download["visible"] and download["value"] == str(path) and "Pearson" in line


def test_calibration_file_name_is_sanitised(analysed):
    from components import analysis

    st, _, _ = analysed
    res = st.analysis
    keep = res.provenance["calibration"]["source"]
    try:
        res.provenance["calibration"]["source"] = "../../etc/pass wd;rm.jsonl"
        name = Path(analysis.calibration_download(st)).name
        assert name == "calibration-tokens-pass_wd_rm.jsonl"
    finally:
        res.provenance["calibration"]["source"] = keep


def test_an_old_analysis_file_says_how_to_rerun_and_softmax_still_works(analysed, tmp_path):
    import gradio as gr

    from components import analysis, merge

    st, _, (base, fts) = analysed
    data = json.loads(Path(analysis.save_analysis(st)).read_text())
    data.pop("sample_mi")
    for m in data["models"]:
        m.pop("sample_mi", None)
    old = tmp_path / "old_analysis.json"
    old.write_text(json.dumps(data))
    fresh = SessionState()
    try:
        res = analysis.load_analysis_file(fresh, str(old))
        line = analysis.old_file_line(res)
        assert "no per-sample MI" in line and "acm analyze" in line
        fig, multi, table = analysis.coefficient_view(fresh, 0.7, None)
        assert table == {"rule": "acm", "error": line} and fig.layout["annotations"][0]["text"] == line
        assert analysis.layer_view(res, "acm").layout["annotations"][0]["text"] == line
        assert f"⚠ {line}" in analysis.summary_markdown(res)
        _, _, soft = analysis.coefficient_view(fresh, 4.0, 1.0, rule="softmax")
        assert soft["rule"] == "softmax" and len(soft["models"]) == 2
        assert analysis.calibration_download(fresh) is None                     # a file carries no tokens
        assert "paper's rule needs a new analysis" in merge.acm_status_line(fresh)
        with pytest.raises(InputError, match="no per-sample MI"):
            merge.run_merge(fresh, base, fts, method="ties")
        with pytest.raises(gr.Error, match="no per-sample MI"):                   # one line through the UI wrapper
            common.ui_errors(merge.run_merge)(fresh, base, fts, method="ties")
        merged = merge.run_merge(fresh, base, fts, method="ties", t=2.0, rule="softmax")
        assert merged.label == "#1 TIES softmax t=2 α=0.7"
    finally:
        fresh.close()


def test_paper_merge_uses_the_library_entry_and_lambda_over_n(analysed):
    from acm.rules.coefficients import compute
    from components import analysis, export, merge

    st, _, (base, fts) = analysed
    merged = merge.run_merge(st, base, fts, method="task_arithmetic", mode="acm", t=0.7, alpha=0.3)
    coef = compute(st.analysis, "acm", 0.7)
    assert merged.label.endswith("ACM-TA t=0.7") and merged.settings["alpha"] == 1.0       # Eq. 3 has no α
    assert merged.lambdas == [pytest.approx(d) for d in coef.by_model()]
    rec = json.loads((Path(merged.out_dir) / "acm_recipe.json").read_text())
    expect = json.loads(json.dumps(coef.entry(), default=str))
    assert rec["acm_analysis"]["lambda"] == expect["lambda"] and rec["acm_analysis"]["rule"] == "acm"
    assert rec["acm_analysis"]["scale"] == pytest.approx(0.5)
    used = {d["model"]: d["lambda"] for d in rec["lambdas"]}                     # what the merge applied: λ/N
    assert used[fts[0]]["block.0"] == pytest.approx(coef.lambdas[0][1] / 2, rel=1e-5)
    assert "λ/2 (Eq. 3)" in merge.summary_markdown(merged)
    assert "The paper's rule" in export.mergekit_yaml(st)
    analysis.coefficient_view(st, 0.7, None)


def test_plot_builders_are_valid_plotly():
    series = [{"label": "a", "mean": [5.0] * 5, "std": [0.1] * 5, "min": [4.8] * 5, "max": [5.2] * 5, "n": 8}]
    grid = {"t0": -3.0, "step": 0.05, "lambdas": np.full((121, 1, 5), 0.6)}
    specs = [plots.sample_mi_figure(KEYS, POINTS, series, estimator="labels"),
             plots.acm_coefficient_figure(KEYS, POINTS, [{"label": "a", "mi": [5.0] * 5, "lambdas": [0.6] * 5}],
                                          t=0.7, n_models=1, clip=(0.5, None), live=grid),
             plots.mi_tokens_figure([{"label": "embed", "tokens": [10, 20, 40], "mi": [3.0, 3.5, 4.0], "r": 0.99},
                                     {"label": "head", "tokens": [10, 20, 40], "mi": [3.0, 3.0, 3.0], "r": None}],
                                    summary="median r = 0.99"),
             plots.multi_t_figure(KEYS, [{"label": "a", "nmi": [5.0] * 5, "grid": np.ones((2, 5))}], [-1.0, 0.7],
                                  alpha=1.0, title="x")]
    for spec in specs:
        fig = spec.figure()
        assert isinstance(fig, go.Figure) and len(fig.data) == len(spec.data)
        json.loads(spec.to_json())
    assert specs[1].layout["meta"]["live"]["names"] == ["a (t = {t})"]
    assert specs[2].data[1]["name"] == "head (r n/a)" and specs[3].layout["title"]["text"] == "x"
    assert plots.attach_live(specs[0], None, traces=[], t=0.7) is specs[0]


def test_session_analysis_cache_keeps_the_calibration_tokens_of_a_shared_hit(tmp_path, monkeypatch):
    """A result reused from the shared cache still offers the exact token download (stored beside it)."""
    from components import analysis

    monkeypatch.setenv("ACM_CACHE_DIR", str(tmp_path / "cache"))
    base, fts = make_pair(tmp_path / "m", "llama")
    cal = write_calibration(tmp_path / "cal.jsonl", n=8)
    first, second = SessionState(), SessionState()
    try:
        kw = dict(cal_mode=calibration.UPLOAD, cal_upload=str(cal), samples=4, clusters=2, max_tokens=32)
        a = analysis.run_analysis(first, str(base), [str(f) for f in fts], **kw)
        b = analysis.run_analysis(second, str(base), [str(f) for f in fts], **kw)
        assert b["shared"] and b["shared"]["hit"] and b["analysis"] is not a["analysis"]
        assert b["analysis"].calibration == [(list(i), t) for i, t in a["analysis"].calibration]
        assert Path(analysis.calibration_download(second)).read_text() == \
            Path(analysis.calibration_download(first)).read_text()
    finally:
        first.close()
        second.close()
