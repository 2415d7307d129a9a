"""The Analyse tab's calibration views (issue 23): λ with its bootstrap band, λ against the sample count with
the settle line, and two calibration sets on one chart — on real analyses of a tiny pair."""

from __future__ import annotations

import json

import numpy as np
import pytest

from acm.errors import InputError
from acm.rules.bands import NO_BAND, analysis_band, analysis_curve
from components import calibration
from components.state import SessionState
from tests.fixtures import (
    make_pair,
    uploads_from_pytest_tmp,  # noqa: F401 - module autouse fixture (Gradio upload area)
)


def _cal(path, n: int, word: str) -> str:
    path.write_text("".join(json.dumps({"text": " ".join([word] * (3 + 3 * i)) + f" sample {i}"}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """The same tiny pair analysed on two calibration sets (the second saved as an upload would be)."""
    from components import analysis

    root = tmp_path_factory.mktemp("acm-bands")
    base, fts = make_pair(root, "llama", n_ft=1)
    st = SessionState()
    second = SessionState()
    kw = dict(cal_mode=calibration.UPLOAD, samples=10, clusters=3, max_tokens=64)
    analysis.run_analysis(second, str(base), [str(fts[0])], cal_upload=_cal(root / "b.jsonl", 30, "number"), **kw)
    other = root / "second_analysis.json"
    second.analysis.save(other)
    analysis.run_analysis(st, str(base), [str(fts[0])], cal_upload=_cal(root / "a.jsonl", 30, "word"), **kw)
    yield st, other
    st.close()
    second.close()


def test_the_analysis_records_each_samples_cluster(two_sets):
    st, _ = two_sets
    info = st.analysis.sample_info
    assert len(info["clusters"]) == len(info["tokens"]) == 10
    assert set(info["clusters"]) <= {0, 1, 2} and len(set(info["clusters"])) == 3     # every cluster drawn from


def test_lambda_curve_carries_the_band_and_the_table_its_bounds(two_sets):
    from components import analysis

    st, _ = two_sets
    fig, _, table = analysis.coefficient_view(st, 0.7, rule="acm")
    lam_line, band = fig.data[1], fig.data[-1]
    assert "t = 0.7" in lam_line["name"] and band["fill"] == "toself" and "90% band" in band["name"]
    b = analysis_band(st.analysis, 0.7)
    keys = table["groups"]
    assert band["x"] == [*keys, *reversed(keys)]
    assert np.allclose(band["y"][:len(keys)], b.hi[0]) and np.allclose(band["y"][len(keys):], b.lo[0][::-1])
    for row in table["models"][0]["groups"]:
        assert row["lambda_lo"] <= row["lambda"] + 1e-12 and row["lambda"] <= row["lambda_hi"] + 1e-12
    assert table["bands"]["resamples"] == 300 and fig.layout["meta"]["live"]["traces"] == [1]
    soft_fig, _, soft_table = analysis.coefficient_view(st, 1.0, rule="softmax")
    assert soft_table["bands"] == {"note": NO_BAND} and not any(d.get("fill") == "toself" for d in soft_fig.data)
    analysis.coefficient_view(st, 0.7, rule="acm")


def test_sample_count_chart_and_settle_line(two_sets):
    from components import analysis

    st, _ = two_sets
    fig, line = analysis.count_extras(st)
    curve = analysis_curve(st.analysis, 0.7)
    assert line == curve.line() and "per k-means cluster" in line
    assert len(fig.data) == len(curve.keys) and fig.data[0]["x"] == curve.counts
    assert np.allclose(fig.data[0]["y"], curve.lambdas[:, :, 0, 0].mean(axis=1))
    assert fig.layout["shapes"][0]["x0"] == curve.settle
    md = analysis.summary_markdown(st.analysis, t=0.7)
    assert f"λ vs samples: {curve.line()}" in md


def test_two_calibration_sets_on_one_chart(two_sets):
    from components import analysis

    st, other_path = two_sets
    fig, md = analysis.load_second_analysis(st, str(other_path), 0.7)
    fills = [d for d in fig.data if d.get("fill") == "toself"]
    lines = [d for d in fig.data if d.get("mode") == "lines+markers"]
    bars = [d for d in fig.data if d["type"] == "bar"]
    assert len(fills) == 2 and len(lines) == 2 and len(bars) == 1
    from acm.activations.result import AnalysisResult

    a, b = analysis_band(st.analysis, 0.7), analysis_band(AnalysisResult.load(other_path), 0.7)
    diff = np.abs(a.lam - b.lam).max(axis=0)
    assert np.allclose(bars[0]["y"], diff, atol=1e-6)
    assert f"Largest |Δλ| at **{a.keys[int(diff.argmax())]}**" in md
    assert "second_analysis" not in md and "b.jsonl" in lines[1]["name"] or "uploaded" in lines[1]["name"]


def test_a_mismatched_or_missing_second_analysis_is_one_line(two_sets, tmp_path):
    from components import analysis

    st, other_path = two_sets
    data = json.loads(other_path.read_text())
    data["sample_mi"]["point_groups"] = data["sample_mi"]["point_groups"][:-1] + ["other"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match="same pair"):
        analysis.load_second_analysis(st, str(bad), 0.7)
    with pytest.raises(InputError, match="Analyse"):
        analysis.load_second_analysis(SessionState(), str(other_path), 0.7)


def test_an_old_file_gets_the_one_line_instead_of_the_count_chart(two_sets):
    from components import analysis

    st, _ = two_sets
    old = type(st.analysis).from_dict(st.analysis.to_dict())
    for m in old.models:
        m.sample_mi = []
    fig, line = analysis.count_view(old, 0.7)
    assert "no per-sample MI" in line and fig.data == []


def test_a_shared_analysis_count_chart_is_drawn_once_per_t(two_sets, monkeypatch):
    """An analysis from the shared cache (it carries its cache key) draws its count chart once per t and
    clip: the sessions that got it together reuse that one chart; another t is drawn anew."""
    from components import analysis

    st, _ = two_sets
    shared = type(st.analysis).from_dict(st.analysis.to_dict())
    setattr(shared, analysis.SHARED_KEY_ATTR, "test-key-count-memo")
    drawn = []
    real = analysis._count_view
    monkeypatch.setattr(analysis, "_count_view", lambda *a: drawn.append(a[1]) or real(*a))
    first, again = analysis.count_view(shared, 0.7), analysis.count_view(shared, 0.7)
    assert again is first and drawn == [0.7]
    analysis.count_view(shared, 1.5)
    assert drawn == [0.7, 1.5]
    assert analysis.count_view(st.analysis, 0.7)[1] == first[1]      # the same line as the unshared result
