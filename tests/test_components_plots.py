"""Plot builders: pure functions of plain data; one point per layer group, hover carries the numbers."""

import json
import time

import numpy as np
import plotly.graph_objects as go

from components import plots

GROUPS = ["embed", "block.0", "block.1", "block.2", "head"]


def test_nmi_figure_one_line_per_model_groups_in_network_order():
    fig = plots.nmi_figure(GROUPS, [("long", [0.9, 0.8, 0.5, 0.7, 0.95]), ("short", [0.99, 0.9, 0.9, 0.9, 0.9])])
    assert [t["name"] for t in fig.data] == ["long", "short"]
    for trace in fig.data:
        assert trace["x"] == GROUPS and len(trace["y"]) == len(GROUPS)
        assert "NMI" in trace["hovertemplate"] and "%{x}" in trace["hovertemplate"]
    assert fig.layout["xaxis"]["categoryarray"] == GROUPS      # never re-sorted alphabetically
    assert json.loads(fig.to_json())["data"][0]["y"] == [0.9, 0.8, 0.5, 0.7, 0.95]


def test_specs_are_valid_plotly_figures():
    """Every builder's JSON is accepted by plotly's own validation (what exports use)."""
    grid = np.ones((2, len(GROUPS)))
    specs = [
        plots.nmi_figure(GROUPS, [("a", [0.5] * 5)]),
        plots.coefficient_figure(GROUPS, [{"label": "a", "nmi": [0.5] * 5, "lambdas": [1.0] * 5}], t=2, alpha=1,
                                 clip=(0.5, 1.5)),
        plots.multi_t_figure(GROUPS, [{"label": "a", "nmi": [0.5] * 5, "grid": grid},
                                      {"label": "b", "nmi": [0.5] * 5, "grid": grid}], [0.0, 4.0], alpha=1),
        plots.length_bar_figure(["a", "b"], [3, 4], [1, 1]),
        plots.eval_scatter([{"label": "m", "kind": "merged", "accuracy": 0.5, "mean_length": 10, "n": 4}]),
        plots.empty_figure("hint"),
    ]
    for spec in specs:
        fig = spec.figure()
        assert isinstance(fig, go.Figure) and len(fig.data) == len(spec.data)


def test_coefficient_figure_has_plain_reference_and_hover_fields():
    lam = [1.2, 1.1, 0.6, 0.9, 1.2]
    fig = plots.coefficient_figure(GROUPS, [{"label": "long", "nmi": [0.5, 0.6, 0.9, 0.7, 0.5], "lambdas": lam}],
                                   t=4.0, alpha=0.8)
    plain, curve = fig.data
    assert "plain" in plain["name"] and set(plain["y"]) == {0.8} and plain["line"]["dash"] == "dash"
    assert curve["y"] == lam and curve["x"] == GROUPS
    for field in ("λ", "NMI", "%{x}"):
        assert field in curve["hovertemplate"]
    assert [row[0] for row in curve["customdata"]] == [0.5, 0.6, 0.9, 0.7, 0.5]
    assert "t = 4" in fig.layout["title"]["text"]


def test_coefficient_figure_shows_clip_bounds():
    fig = plots.coefficient_figure(GROUPS, [{"label": "a", "nmi": [0.5] * 5, "lambdas": [1.0] * 5}], t=1, alpha=1,
                                   clip=(0.5, None))
    assert len(fig.layout["shapes"]) == 1 and fig.layout["shapes"][0]["y0"] == 0.5


def test_multi_t_figure_small_multiples():
    ts = [0.0, 2.0, 8.0]
    grid = np.ones((len(ts), len(GROUPS)))
    per_model = [{"label": "a", "nmi": [0.5] * 5, "grid": grid}, {"label": "b", "nmi": [0.6] * 5, "grid": grid}]
    fig = plots.multi_t_figure(GROUPS, per_model, ts, alpha=1.0)
    assert len(fig.data) == len(ts) * 2
    assert sum(bool(t["showlegend"]) for t in fig.data) == len(ts)              # one legend entry per t
    assert [t["line"]["dash"] for t in fig.data[:3]] == ["dash", "solid", "solid"]   # t = 0 is the plain method
    assert {t["xaxis"] for t in fig.data} == {"x", "x2"}
    assert fig.layout["xaxis"]["domain"][1] < fig.layout["xaxis2"]["domain"][0]


def test_length_bar_and_eval_scatter():
    bar = plots.length_bar_figure(["merged", "base"], [12.5, 40.0], [2, 2])
    assert bar.data[0]["y"] == [12.5, 40.0]
    empty = plots.eval_scatter([])
    assert empty.data == [] and empty.layout["annotations"]
    pts = [{"label": "base", "kind": "base", "accuracy": 0.2, "mean_length": 10, "n": 5},
           {"label": "#1", "kind": "merged", "accuracy": 0.5, "mean_length": 30, "n": 5},
           {"label": "#2", "kind": "merged", "accuracy": 0.6, "mean_length": 20, "n": 5}]
    fig = plots.eval_scatter(pts)
    merged = next(t for t in fig.data if t["name"] == "merged models")
    assert merged["x"] == [30, 20] and merged["y"] == [50.0, 60.0]
    assert len(fig.data) == 2


def test_empty_figure_carries_hint():
    assert plots.empty_figure("click Analyse").layout["annotations"][0]["text"] == "click Analyse"


def test_builders_are_cheap():
    """Reported, not asserted against a threshold: building + serialising the largest chart."""
    groups = ["embed"] + [f"block.{k}" for k in range(30)] + ["head"]
    grid = np.random.default_rng(0).uniform(0.5, 1.5, (6, len(groups)))
    per_model = [{"label": f"m{i}", "nmi": [0.5] * len(groups), "grid": grid} for i in range(3)]
    t0 = time.perf_counter()
    for _ in range(20):
        plots.multi_t_figure(groups, per_model, [0, 2, 5, 10, 20, 40], alpha=1.0).to_json()
    print(f"\n[plots] multi-t figure (32 groups × 3 models × 6 t): {(time.perf_counter() - t0) / 20 * 1000:.2f} ms")
