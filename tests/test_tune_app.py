"""The Tune tab: streamed points, frontier + recommendation, cancel, "use this setting", the /tune endpoint.

Handlers run on the bundled 0.7M demo pair with a few problems and few new tokens; the analysis is
hand-made (it is an input of the tune). The browser flow is in test_browser_tune.py.
"""

from __future__ import annotations

import copy
import json

import pytest

from acm.errors import InputError
from components import tune as panel
from components.state import SessionState
from tests.test_app_e2e import app_url  # noqa: F401 - module fixture: the app on a free port
from tests.test_tune import BASE, LONG, needs_demo

pytestmark = needs_demo


@pytest.fixture(scope="module")
def demo_analysis():
    """A real analysis of the demo pair on 4 calibration samples: NMI and the per-sample MI the paper's rule needs."""
    from acm.activations.analysis import analyze

    return analyze(str(BASE), [str(LONG)], None, samples=4, seed=0, show_progress=False)


@pytest.fixture()
def state(demo_analysis):
    st = SessionState()
    st.analysis = copy.deepcopy(demo_analysis)
    st.base, st.fts = str(BASE), [str(LONG)]
    yield st
    st.close()


SMALL = {"ts": "0.7, -1", "limit": 6, "max_new_tokens": 16}     # plain + the paper's rule at two t


def test_points_stream_in_before_the_grid_is_done_then_frontier_and_recommendation(state):
    steps = list(panel.iter_tune_ui(state, str(BASE), [str(LONG)], **SMALL))
    records, report, running = steps[-1]
    assert not running and report["complete"] and report["done"] == 3     # plain + the paper's rule at 0.7 and −1
    partial = [rep["done"] for _, rep, run in steps if run and 0 < rep["done"] < 3]
    assert partial, "points must appear before the whole grid is done"
    fig = panel.tune_figure(records, report).to_dict()
    names = [t["name"] for t in fig["data"]]
    assert {"base", "fine-tuned", "recommended"} <= set(names)
    assert "plain" in names or "ACM (paper's rule)" in names
    assert all(s["setting"]["rule"] == "acm" for s in report["settings"] if s["setting"]["t"] is not None)
    assert len(panel.table_rows(report)) == 3
    md = panel.recommendation_markdown(report)
    assert "Recommended:" in md and "Held out" in md
    assert [key for _, key in panel.choices(report)] == [s["key"] for s in report["settings"]]


def test_cancel_stops_between_settings_and_keeps_the_finished_ones(state):
    final = None
    for _records, report, running in panel.iter_tune_ui(state, str(BASE), [str(LONG)], **SMALL):
        if report["done"] >= 1 and running:
            state.tune["cancel"] = True
        final = report
    assert final["stopped"] == "cancelled" and 1 <= final["done"] < 3
    assert "cancelled" in panel.status_line(final, state.tune["records"], running=False)


def test_use_this_setting_makes_it_the_merged_model(state):
    from acm.rules.coefficients import compute

    list(panel.iter_tune_ui(state, str(BASE), [str(LONG)], **SMALL))
    report = state.tune["report"]
    acm_row = next(s for s in report["settings"] if s["setting"]["t"] == -1.0)
    merged, setting = panel.use_setting(state, acm_row["key"])
    assert state.merged is merged and merged.model is not None and setting.paper
    assert merged.settings["rule"] == "acm" and merged.settings["t"] == -1.0
    assert (merged.settings["against"], merged.settings["applies"]) == ("fine-tuned", "task-vectors")
    assert merged.lambdas == pytest.approx(compute(state.analysis, "acm", -1.0).by_model())
    assert merged.report["lambdas"][0] == pytest.approx(compute(state.analysis, "acm", -1.0).weights()[0])
    assert setting.label() == acm_row["label"] == "ACM-TIES (d=0.7, t=-1)"
    assert state.merge_history[-1]["rule"] == "acm"
    # the Merge tab's controls follow it (those the tab has; no α for Eq. 3)
    controls = {"method", "mode", "alpha", "density", "t", "rule", "against", "applies", "estimator"}
    vals = panel.merge_tab_values(setting.to_dict(), controls)
    assert vals == {"method": "ties", "mode": panel_merge_acm(), "density": 0.7, "rule": "acm", "t": -1.0,
                    "against": "fine-tuned", "applies": "task-vectors"}
    assert set(panel.merge_tab_values(setting.to_dict(), {"method", "t"})) == {"method", "t"}
    # no key: the recommended one
    merged2, s2 = panel.use_setting(state, None)
    assert s2.key() == report["recommended"]["key"] and state.merged is merged2


def panel_merge_acm() -> str:
    from components.merge import ACM

    return ACM


def test_both_rules_side_by_side_and_the_switches(state):
    steps = list(panel.iter_tune_ui(state, str(BASE), [str(LONG)], ts="0.7", softmax_ts="2", plain=False,
                                    rules=["acm", "softmax"], applies=["task-vectors", "merged-delta"],
                                    limit=4, holdout=0.0, max_new_tokens=8))
    _, report, _ = steps[-1]
    labels = sorted(s["label"] for s in report["settings"])
    assert labels == ["ACM-TIES (d=0.7, t=0.7)", "ACM-TIES (α=0.7, d=0.7, t=0.7, on merged delta)",
                      "ACM-TIES (α=0.7, d=0.7, t=2, softmax)"]
    names = [t["name"] for t in panel.tune_figure(state.tune["records"], report).to_dict()["data"]]
    assert "ACM (paper's rule)" in names and "softmax (this project's rule)" in names
    # a staged point (λ on the plain merge's delta) through the Merge step's staged path
    row = next(r for r in report["settings"] if r["setting"].get("applies") == "merged-delta")
    merged, s = panel.use_setting(state, row["key"])
    assert merged.settings["applies"] == "merged-delta" and merged.settings["alpha"] == 0.7 and state.merged is merged
    assert merged.report["stage_seconds"].keys() >= {"merge", "final"}


def test_bad_grid_and_nothing_to_use_are_one_line(state):
    with pytest.raises(InputError, match=r"t \(acm rule\) must be in \[-3, 3\]"):
        next(panel.iter_tune_ui(state, str(BASE), [str(LONG)], ts="1, 4"))
    with pytest.raises(InputError, match=r"t \(softmax rule\) must be in \[0, 100\]"):
        next(panel.iter_tune_ui(state, str(BASE), [str(LONG)], rules=["softmax"], softmax_ts="1, -2"))
    with pytest.raises(InputError, match="maximum of 60"):
        next(panel.iter_tune_ui(state, str(BASE), [str(LONG)], rules=["softmax"],
                                softmax_ts=" ".join(str(i) for i in range(1, 30)), alphas="0.5 0.7 0.9"))
    with pytest.raises(InputError, match="run a tune first"):
        panel.use_setting(SessionState(), None)


def test_tune_endpoint_via_gradio_client(app_url):  # noqa: F811 - pytest injects the imported module fixture by name
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    # plain-only grid (no t values): needs no analysis, so the call is quick
    out = client.predict(methods=["ties"], alphas="0.6, 0.7", ts="", limit=6, max_new_tokens=16, api_name="/tune")
    status, _plot, _table, recommendation, _pick, raw = out
    raw = raw if isinstance(raw, dict) else json.loads(raw)
    assert status.startswith("✓ done: 2 of 2") and raw["complete"] and raw["recommended"]["key"]
    assert "Recommended:" in recommendation
    text, merge_summary = client.predict(key=None, api_name="/tune_use")
    assert "is now the merged model" in text and "merged in" in merge_summary


def test_tune_jobs_take_the_heavy_slot_and_cancel_is_wired():
    import app

    demo = app.build_app(prewarm=False)
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    for name in ("tune", "tune_use"):
        assert deps[name].concurrency_id == "heavy" and deps[name].concurrency_limit == 1, name
        assert deps[name].api_visibility == "public", name
    tune_fn = next(i for i, d in demo.fns.items() if d.api_name == "tune")
    assert any(tune_fn in (d.cancels or []) for d in demo.fns.values())    # the Cancel button's click
    assert [t for t, _ in app.STEPS][6:] == ["7 · Tune", "8 · Export"]


def test_tune_points_follow_the_lambda_driver_of_step_3(state):
    """With "λ driven by" set to cosine in step 3, the grid's softmax points (and "use this setting") use it."""
    from acm.rules.coefficients import compute

    m = state.analysis.models[0]
    m.similarity["cosine"] = [0.98, 0.89, 0.88, 0.87, 0.86, 0.84, 0.78, 0.66]
    state.coef_view = {"t": 1.0, "alpha": 0.7, "clip": None, "metric": "cosine"}
    list(panel.iter_tune_ui(state, str(BASE), [str(LONG)], **{**SMALL, "ts": "", "softmax_ts": "4",
                                                              "rules": ["softmax"]}))
    report = state.tune["report"]
    acm_row = next(s for s in report["settings"] if s["setting"]["t"] == 4.0)
    assert acm_row["setting"]["metric"] == "cosine" and "softmax by cosine" in acm_row["label"]
    state.coef_view["metric"] = "nmi"                  # the point keeps its own metric when used later
    merged, _ = panel.use_setting(state, acm_row["key"])
    want = compute(state.analysis, "softmax", 4.0, 0.7, metric="cosine").weights()[0]
    assert merged.report["lambdas"][0] == pytest.approx(want)
