"""The app on the data-free fim rule (issue 22): the Fisher pass added to the session's analysis, the Fisher /
‖δ‖² chart, both rules' weights on one chart, fim in the Analyse and Merge rule choices and as a Tune rule."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
from safetensors.torch import load_file

from acm.errors import InputError
from components import calibration
from components.state import SessionState
from tests.fixtures import (
    make_pair,
    uploads_from_pytest_tmp,  # noqa: F401 - module autouse fixture (Gradio upload area)
)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A real analysis of a tiny pair, then the Fisher pass through the app's handler."""
    from components import analysis, fisher

    root = tmp_path_factory.mktemp("fim-app")
    base, fts = make_pair(root, "llama", n_ft=1)
    cal = root / "cal.jsonl"
    cal.write_text("".join(json.dumps({"text": f"sample {i} " + "word " * (2 + i)}) + "\n" for i in range(6)))
    st = SessionState()
    with pytest.raises(InputError, match="step 1"):
        fisher.run_fisher(st)                                          # no models chosen
    alone = fisher.run_fisher(st, str(base), [str(f) for f in fts], sequences=2, length=16, device="cpu")
    assert alone.has_fisher() and not alone.has_sample_mi() and st.analysis is alone   # no calibration needed
    out = analysis.run_analysis(st, str(base), [str(f) for f in fts], cal_mode=calibration.UPLOAD,
                                cal_upload=str(cal), samples=6, clusters=2, max_tokens=32)
    before = out["analysis"]
    fisher.run_fisher(st, sequences=2, length=16, device="cpu")
    yield st, before, (str(base), [str(f) for f in fts])
    st.close()


def test_fisher_pass_is_added_to_a_copy_of_the_analysis(session):
    st, before, _ = session
    assert not before.has_fisher()                                     # the cached (shared) object is untouched
    assert st.analysis.has_fisher() and st.analysis.has_sample_mi()
    fb = st.analysis.fisher
    assert fb["sequences"] == 2 and fb["length"] == 16 and fb["keys"][-2:] == ["head.norm", "head"]


def test_fisher_chart_and_both_rules_chart(session):
    from acm.rules.coefficients import compute
    from components import fisher

    st, _, _ = session
    fig_f, fig_b = fisher.side_views(st, 0.7, "acm")
    go.Figure(fig_f.to_dict()); go.Figure(fig_b.to_dict())            # noqa: E702 - valid plotly
    keys, f, d = st.analysis.fisher_arrays()
    assert fig_f.data[0]["x"] == keys and np.allclose(fig_f.data[0]["y"], f)
    assert np.allclose(fig_f.data[1]["y"], d[0])
    names = [tr["name"] for tr in fig_b.data]
    assert any("acm λ/N" in n for n in names) and any("fim α" in n for n in names)
    acm_w = compute(st.analysis, "acm", 0.7).weights()[0]
    fim_w = compute(st.analysis, "fim", None).weights()[0]
    acm_tr = next(tr for tr in fig_b.data if "acm" in tr["name"])
    fim_tr = next(tr for tr in fig_b.data if "fim" in tr["name"])
    assert np.allclose(acm_tr["y"], [acm_w[k] for k in acm_tr["x"]])
    assert np.allclose(fim_tr["y"], [fim_w[k] for k in fim_tr["x"]])
    assert "t = 0.7" in fig_b.layout["title"]["text"] and "fim t = 1" in fig_b.layout["title"]["text"]


def test_fim_as_the_analyse_rule(session):
    from components import analysis

    st, _, _ = session
    s = analysis.t_slider_settings("fim")
    assert (s["minimum"], s["maximum"], s["value"]) == (0.0, 10.0, 1.0)
    assert "fim" in [v for _, v in analysis.RULE_CHOICES]
    coef, multi, table = analysis.coefficient_view(st, 2.0, rule="fim")
    assert table["rule"] == "fim" and table["t"] == 2.0
    from acm.rules.coefficients import compute

    lam = compute(st.analysis, "fim", 2.0).lambdas[0]
    assert np.allclose([g["lambda"] for g in table["models"][0]["groups"]], lam)
    assert np.allclose(coef.data[1]["y"], lam) and coef.layout["meta"]["live"]["lambdas"]
    assert len(multi.data) == len(analysis.FIM_T_GRID)
    bare = SessionState()
    bare.analysis = session[1]                                          # no Fisher pass: one line, no crash
    _, _, t2 = analysis.coefficient_view(bare, 1.0, rule="fim")
    assert "no Fisher pass" in t2["error"]


def test_merge_with_the_fim_rule_in_the_app(session):
    from components import merge

    st, _, (base, fts) = session
    merged = merge.run_merge(st, base, fts, method="ties", density=0.5, rule="fim", t=1.5, device="cpu", dtype="auto")
    rec = json.loads((merged.out_dir / "acm_recipe.json").read_text())
    assert rec["acm_analysis"]["rule"] == "fim" and rec["acm_analysis"]["t"] == 1.5
    assert merged.label.endswith("FIM-TIES t=1.5") and rec["options"]["alpha"] == 1.0
    assert load_file(str(next(merged.out_dir.glob("*.safetensors"))))
    card = (merged.out_dir / "README.md").read_text()
    assert "fim rule" in card and "--rule fim" in card


def test_fim_as_a_tune_dimension():
    from acm.tune import DEFAULT_FIM_TS, Setting, expand_grid
    from components import tune

    assert "fim" in [v for _, v in tune.RULE_CHOICES]
    grid = expand_grid(["ties"], [0.7, 1.0], None, [0.5], rules=["acm", "fim"])
    fim = [s for s in grid if s.rule == "fim"]
    assert [s.t for s in fim] == list(DEFAULT_FIM_TS) and all(s.alpha is None for s in fim)
    assert fim[0].label() == "FIM-TIES (d=0.5, t=0.5)" and fim[0].key().endswith("|r=fim")
    assert Setting.from_dict(fim[0].to_dict()) == fim[0]
    assert tune.merge_tab_values(fim[0].to_dict(), {"rule", "t", "mode"})["rule"] == "fim"
    with pytest.raises(InputError, match=r"t \(fim rule\)"):
        expand_grid(["ties"], [0.7], None, [0.5], rules=["fim"], fim_ts=[-1])


def test_the_app_wires_the_fisher_pass():
    import app

    demo = app.build_app(prewarm=False)
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    assert [type(o).__name__ for o in deps["fisher_pass"].outputs] == ["Markdown", "Plot", "Plot"]
    assert "fim" in [v for _, v in demo.ui.analysis.rule.choices] and "fim" in [v for _, v in demo.ui.merge.rule_radio.choices]
