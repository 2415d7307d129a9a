"""Plotly chart builders. Pure functions of plain data (lists in, a ``PlotSpec`` out).

They draw what the library computed; they compute nothing themselves (λ values come from
``acm.rules.coefficients``). Charts are written as plain plotly JSON rather than ``go.Figure`` objects:
building a validated ``go.Figure`` costs hundreds of milliseconds on a small CPU, which would make
the t slider sluggish; a ``PlotSpec`` costs about a millisecond and ``gr.Plot`` renders it the same
way (it calls ``to_json()``). ``PlotSpec.figure()`` gives the full ``go.Figure`` for exports.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# One colour per role, reused everywhere so a model keeps its colour across charts.
PALETTE = ["#e8590c", "#0c8599", "#5f3dc4", "#2b8a3e", "#c2255c"]   # fine-tuned models / misc
MERGED_COLOR = "#7048e8"
BASE_COLOR = "#868e96"
PLAIN_COLOR = "#495057"
GRID_COLOR = "#eceff3"
FONT = {"family": "Inter, system-ui, -apple-system, Segoe UI, sans-serif", "size": 13, "color": "#343a40"}
# Sequential colours for several t values (light = small t, dark = large t): viridis stops.
T_COLORS = ["#b5de2b", "#6ece58", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989", "#482878", "#440154"]


class PlotSpec:
    """A plotly figure as plain JSON (``{"data": [...], "layout": {...}}``), ready for ``gr.Plot``."""

    def __init__(self, data: list[dict], layout: dict):
        self.data = data
        self.layout = layout

    def to_dict(self) -> dict:
        return {"data": self.data, "layout": self.layout}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False, default=_jsonable)

    def figure(self):
        """The equivalent ``plotly.graph_objects.Figure`` (for HTML/PNG export; slow to build)."""
        import plotly.graph_objects as go

        return go.Figure(self.to_dict())

    def write_html(self, path: str, **kwargs) -> None:
        self.figure().write_html(path, **kwargs)

    def write_image(self, path: str, **kwargs) -> None:
        self.figure().write_image(path, **kwargs)


def _jsonable(value: Any):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _f(values: Iterable) -> list[float]:
    return [float(v) for v in values]


def _axis(title: str | None = None, **kw) -> dict:
    ax = {"showgrid": True, "gridcolor": GRID_COLOR, "zeroline": False, "linecolor": "#ced4da",
          "ticks": "", "automargin": True}
    if title:
        ax["title"] = {"text": title}
    ax.update(kw)
    return ax


def _category(groups: Sequence[str], title: str | None = None, **kw) -> dict:
    """Groups on the x-axis in network order (embed, block.0 …, head), never re-sorted."""
    return _axis(title, type="category", categoryorder="array", categoryarray=list(groups), showgrid=False,
                 tickangle=-45 if len(groups) > 16 else 0, **kw)


def _layout(title: str, *, height: int = 360, legend: bool = True, **kw) -> dict:
    layout = {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        "font": FONT, "height": height, "paper_bgcolor": "white", "plot_bgcolor": "white",
        "margin": {"l": 56, "r": 16, "t": 56, "b": 48}, "hovermode": "closest", "showlegend": legend,
        "hoverlabel": {"bgcolor": "white", "font": {"size": 12}},
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
    }
    layout.update(kw)
    return layout


def empty_figure(message: str, *, height: int = 300) -> PlotSpec:
    """A blank chart carrying a one-line hint (what to click to fill it)."""
    return PlotSpec([], {
        "height": height, "paper_bgcolor": "white", "plot_bgcolor": "white", "font": FONT,
        "margin": {"l": 16, "r": 16, "t": 16, "b": 16},
        "xaxis": {"visible": False}, "yaxis": {"visible": False},
        "annotations": [{"text": message, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False,
                         "font": {"size": 14, "color": "#868e96"}}]})


def model_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nmi_figure(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]) -> PlotSpec:
    """Per-layer NMI between base and each fine-tuned model: one line per fine-tuned model."""
    data = [{"type": "scatter", "mode": "lines+markers", "name": label, "x": list(groups), "y": _f(nmi),
             "line": {"color": model_color(i), "width": 2.5}, "marker": {"size": 7},
             "customdata": [[label]] * len(groups),
             "hovertemplate": "<b>%{x}</b><br>%{customdata[0]}<br>NMI %{y:.4f}<extra></extra>"}
            for i, (label, nmi) in enumerate(series)]
    return PlotSpec(data, _layout("Per-layer NMI (base vs fine-tuned)",
                                  xaxis=_category(groups, "layer group (network order)"),
                                  yaxis=_axis("NMI (1 = unchanged)")))


# Line style per similarity metric in the side-by-side chart (the model keeps its colour).
METRIC_DASH = ["solid", "dash", "dot", "dashdot", "longdash"]


def similarity_figure(groups: Sequence[str], series: Sequence[dict], *, driver: str | None = None) -> PlotSpec:
    """Several similarity metrics side by side on one [0, 1] axis (1 = unchanged): colour = model,
    line style = metric; the metric that drives λ is drawn thicker.

    ``series``: ``[{"label", "metric", "metric_label", "values": [K]}]``. Every registered metric is
    already a similarity in [0, 1] (``acm.activations.similarity``), so no rescaling hides the raw values.
    """
    metrics = list(dict.fromkeys(s["metric"] for s in series))
    models = list(dict.fromkeys(s["label"] for s in series))
    data = []
    for s in series:
        i, j = models.index(s["label"]), metrics.index(s["metric"])
        lead = s["metric"] == driver
        data.append({
            "type": "scatter", "mode": "lines+markers", "name": f"{s['label']} · {s['metric_label']}"
            + (" (drives λ)" if lead else ""), "x": list(groups), "y": _f(s["values"]),
            "line": {"color": model_color(i), "width": 3 if lead else 1.8, "dash": METRIC_DASH[j % len(METRIC_DASH)]},
            "marker": {"size": 7 if lead else 5}, "customdata": [[s["label"], s["metric_label"]]] * len(groups),
            "hovertemplate": "<b>%{x}</b><br>%{customdata[0]}<br>%{customdata[1]} %{y:.4f}<extra></extra>"})
    names = " · ".join(dict.fromkeys(s["metric_label"] for s in series))
    return PlotSpec(data, _layout(f"Per-layer similarity (base vs fine-tuned): {names}",
                                  xaxis=_category(groups, "layer group (network order)"),
                                  yaxis=_axis("similarity in [0, 1] (1 = unchanged)", range=[0, 1.02])))


def coefficient_figure(groups: Sequence[str], series: Sequence[dict], *, t: float, alpha: float,
                       clip: tuple[float | None, float | None] | None = None, metric_label: str = "NMI",
                       live: dict | None = None) -> PlotSpec:
    """λₖ(t) per layer group for each fine-tuned model, with the plain method (t = 0, λ = α) dashed.

    ``series``: ``[{"label", "nmi": [K], "lambdas": [K]}]`` ("nmi" holds the driving similarity,
    named ``metric_label`` in the hover text). ``live``: λ on a t grid for the browser's redraw
    (``attach_live``).
    """
    data = [{"type": "scatter", "mode": "lines", "name": f"plain (t = 0): λ = α = {alpha:g}", "x": list(groups),
             "y": [float(alpha)] * len(groups), "line": {"color": PLAIN_COLOR, "width": 1.5, "dash": "dash"},
             "hoverinfo": "skip"}]
    for i, s in enumerate(series):
        data.append({
            "type": "scatter", "mode": "lines+markers", "name": f"{s['label']} (t = {t:g})", "x": list(groups),
            "y": _f(s["lambdas"]), "line": {"color": model_color(i), "width": 2.5}, "marker": {"size": 7},
            "customdata": [[float(n), s["label"]] for n in s["nmi"]],
            "hovertemplate": f"<b>%{{x}}</b><br>%{{customdata[1]}}<br>{metric_label} %{{customdata[0]:.4f}}"
                             "<br>λ %{y:.4f}<extra></extra>"})
    shapes, notes = [], []
    for bound, name in zip(clip or (), ("λ min", "λ max")):
        if bound is not None:
            shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": float(bound),
                           "y1": float(bound), "line": {"color": "#adb5bd", "width": 1, "dash": "dot"}})
            notes.append({"text": name, "xref": "paper", "x": 0, "xanchor": "left", "yref": "y", "y": float(bound),
                          "yanchor": "bottom", "showarrow": False, "font": {"size": 11, "color": "#868e96"}})
    by = "" if metric_label == "NMI" else f" (driven by {metric_label})"
    spec = PlotSpec(data, _layout(f"softmax rule (ours): λₖ(t) at t = {t:g}, α = {alpha:g}{by}",
                                  xaxis=_category(groups, "layer group"), yaxis=_axis("λ (coefficient)"),
                                  shapes=shapes, annotations=notes))
    return attach_live(spec, live, traces=list(range(1, 1 + len(series))), t=t)


LIVE_T = "{t}"     # where a live figure's title and trace names carry t (filled in by the browser)


def attach_live(spec: PlotSpec, live: dict | None, *, traces: list[int], t: float) -> PlotSpec:
    """Store λ on a grid of t in ``layout.meta.live`` so the page redraws the curve itself on a slider
    move (no server round trip; see ``components.analysis.LIVE_JS``).

    ``live``: ``{"t0", "step", "lambdas": [T][models][K]}`` from the library (``acm_curve`` /
    ``lambdas``); the title and the ``traces``' names become templates with ``{t}`` in place of t.
    """
    if not live:
        return spec
    import numpy as np

    shown = f"t = {t:g}"
    meta = {"t0": float(live["t0"]), "step": float(live["step"]), "traces": list(traces),
            "lambdas": np.round(np.asarray(live["lambdas"], dtype=np.float64), 6).tolist(),
            "title": spec.layout["title"]["text"].replace(shown, f"t = {LIVE_T}"),
            "names": [spec.data[i]["name"].replace(shown, f"t = {LIVE_T}") for i in traces]}
    spec.layout["meta"] = {"live": meta}
    # One y range for every t on the grid: the curve visibly moves as t changes (an autoranged axis would
    # rescale to hide it), and the browser skips recomputing the axis on each step (half the redraw time).
    grid = np.asarray(meta["lambdas"])
    lo = float(min(grid.min(), *(min(spec.data[i]["y"]) for i in traces)))
    hi = float(max(grid.max(), *(max(spec.data[i]["y"]) for i in traces)))
    for trace in spec.data:
        if trace.get("hoverinfo") == "skip":           # the reference line (½ or α) stays in view
            lo, hi = min([lo, *trace["y"]]), max([hi, *trace["y"]])
    pad = 0.06 * (hi - lo) or 0.05
    spec.layout["yaxis"] = {**spec.layout.get("yaxis", {}), "range": [lo - pad, hi + pad], "autorange": False}
    return spec


def _rgba(color: str, alpha: float) -> str:
    c = color.lstrip("#")
    return f"rgba({int(c[0:2], 16)},{int(c[2:4], 16)},{int(c[4:6], 16)},{alpha:g})"


def sample_mi_figure(keys: Sequence[str], points: Sequence[str], series: Sequence[dict], *,
                     estimator: str | None = None) -> PlotSpec:
    """Per-sample MI per activation point (the acm rule's input): the mean over calibration samples as a
    line, ±1 std as error bars, the samples' min–max as a shaded band; one colour per fine-tuned model.

    ``series``: ``[{"label", "mean": [K], "std": [K], "min": [K], "max": [K], "n": samples}]``; ``keys``
    are the λ keys on the x-axis (network order), ``points`` the activation points shown on hover.
    """
    data = []
    for i, s in enumerate(series):
        color = model_color(i)
        group = f"m{i}"
        data.append({"type": "scatter", "mode": "lines", "x": list(keys), "y": _f(s["max"]), "name": "max",
                     "legendgroup": group, "showlegend": False, "line": {"width": 0, "color": color},
                     "hoverinfo": "skip"})
        data.append({"type": "scatter", "mode": "lines", "x": list(keys), "y": _f(s["min"]),
                     "name": f"{s['label']}: min–max over samples", "legendgroup": group, "fill": "tonexty",
                     "fillcolor": _rgba(color, 0.14), "line": {"width": 0, "color": color}, "hoverinfo": "skip"})
        data.append({
            "type": "scatter", "mode": "lines+markers", "name": f"{s['label']}: mean ± std ({s.get('n', '?')} samples)",
            "legendgroup": group, "x": list(keys), "y": _f(s["mean"]),
            "error_y": {"type": "data", "array": _f(s["std"]), "visible": True, "color": color, "thickness": 1.2},
            "line": {"color": color, "width": 2.5}, "marker": {"size": 7},
            "customdata": [[p, float(sd), float(lo), float(hi), s["label"]]
                           for p, sd, lo, hi in zip(points, s["std"], s["min"], s["max"])],
            "hovertemplate": "<b>%{x}</b> (%{customdata[0]})<br>%{customdata[4]}<br>mean MI %{y:.4f} nats"
                             "<br>std %{customdata[1]:.4f} · min %{customdata[2]:.4f} · max %{customdata[3]:.4f}"
                             "<extra></extra>"})
    est = f" ({estimator} estimator)" if estimator else ""
    layout = _layout(f"Per-sample MI per layer, base vs fine-tuned{est}",
                     xaxis=_category(keys, "activation point (network order)"), yaxis=_axis("MI per sample (nats)"))
    layout["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.25, "xanchor": "left", "x": 0.0}
    layout["margin"] = {"l": 56, "r": 16, "t": 48, "b": 96}
    layout["height"] = 400
    return PlotSpec(data, layout)


def _weight_lines(keys: Sequence[str], series: Sequence[dict], t: float, symbol: str, hover: str,
                  customdata: Callable[[dict], list]) -> list[dict]:
    """A rule's weight per key for each model at ``t`` (``series[i]["lambdas"]``), over the dashed ½ line that
    both sigmoid rules give at t = 0; ``customdata(s)`` feeds the rule's own ``hover`` text."""
    data = [{"type": "scatter", "mode": "lines", "name": f"t = 0: {symbol} = ½ everywhere", "x": list(keys),
             "y": [0.5] * len(keys), "line": {"color": PLAIN_COLOR, "width": 1.5, "dash": "dash"},
             "hoverinfo": "skip"}]
    for i, s in enumerate(series):
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"{s['label']} (t = {t:g})", "x": list(keys),
                     "y": _f(s["lambdas"]), "line": {"color": model_color(i), "width": 2.5}, "marker": {"size": 7},
                     "customdata": customdata(s), "hovertemplate": hover})
    return data


def acm_coefficient_figure(keys: Sequence[str], points: Sequence[str], series: Sequence[dict], *, t: float,
                           n_models: int, clip: tuple[float | None, float | None] | None = None,
                           live: dict | None = None, band: dict | None = None) -> PlotSpec:
    """The paper's λₖ(t) (Eq. 2) per λ key for each fine-tuned model, with λ = ½ (t = 0) dashed.

    ``series``: ``[{"label", "mi": [K] (mean per-sample MI), "lambdas": [K]}]``; the merge weights
    each task vector by λ/N (Eq. 3), shown on hover. ``live``: as in ``attach_live``.
    """
    hover = ("<b>%{x}</b> (%{customdata[0]})<br>%{customdata[2]}<br>mean MI %{customdata[1]:.4f} "
             f"nats<br>λ %{{y:.4f}} · task-vector weight λ/{n_models}<extra></extra>")
    data = _weight_lines(keys, series, t, "λ", hover,
                         lambda s: [[p, float(m), s["label"]] for p, m in zip(points, s["mi"])])
    shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": float(b), "y1": float(b),
               "line": {"color": "#adb5bd", "width": 1, "dash": "dot"}} for b in (clip or ()) if b is not None]
    spec = PlotSpec(data, _layout(f"The paper's rule: λₖ(t) at t = {t:g} (Eq. 2; weight λ/N per task vector, Eq. 3)",
                                  xaxis=_category(keys, "λ key (layer group)"),
                                  yaxis=_axis("λ (½ at t = 0)"), shapes=shapes))
    spec.data += band_traces(keys, series, band)         # after the λ lines: the live redraw's indices stay
    return attach_live(spec, live, traces=list(range(1, 1 + len(series))), t=t)


def band_traces(keys: Sequence[str], series: Sequence[dict], band: dict | None, *, offset: int = 0,
                name: str = "") -> list[dict]:
    """Shaded bootstrap bands of λ (``acm.rules.bands``): one filled polygon per series.

    ``band``: ``{"level", "resamples", "samples", "lo": [[K] per series], "hi": [...]}`` or None.
    """
    if not band:
        return []
    out = []
    for i, (s, lo, hi) in enumerate(zip(series, band["lo"], band["hi"])):
        color = model_color(i + offset)
        out.append({"type": "scatter", "mode": "lines", "x": [*keys, *reversed(keys)],
                    "y": [*_f(hi), *reversed(_f(lo))], "fill": "toself", "fillcolor": _rgba(color, 0.18),
                    "line": {"width": 0, "color": color}, "hoverinfo": "skip", "legendgroup": f"band{i + offset}",
                    "name": f"{name or s['label']}: {band['level']:.0%} band ({band['resamples']} resamples "
                            f"of {band['samples']} samples)"})
    return out


def sample_count_figure(counts: Sequence[int], keys: Sequence[str], per_model: Sequence[dict], *, settle: int,
                        tol: float, t: float, clustered: bool = True) -> PlotSpec:
    """λ per λ key against the number of calibration samples (mean over seeds as a line, the seeds'
    min–max on hover), with the count from which every λ stays within ``tol`` of its full-set value.

    ``per_model``: ``[{"label", "mean": [C][K], "min": [C][K], "max": [C][K]}]``.
    """
    import numpy as np

    data = []
    dashes = ["solid", "dash", "dot"]
    for m, pm in enumerate(per_model):
        mean, lo, hi = (np.asarray(pm[k], dtype=np.float64) for k in ("mean", "min", "max"))
        for k, key in enumerate(keys):
            color = T_COLORS[k * (len(T_COLORS) - 1) // max(1, len(keys) - 1)]
            data.append({"type": "scatter", "mode": "lines+markers", "x": list(map(int, counts)), "y": _f(mean[:, k]),
                         "name": key + (f" · {pm['label']}" if len(per_model) > 1 else ""),
                         "line": {"color": color, "width": 1.8, "dash": dashes[m % len(dashes)]},
                         "marker": {"size": 4}, "customdata": [[float(a), float(b)] for a, b in zip(lo[:, k], hi[:, k])],
                         "hovertemplate": f"<b>{key}</b><br>%{{x}} samples<br>λ %{{y:.4f}} (seeds %{{customdata[0]:.4f}}"
                                          "–%{customdata[1]:.4f})<extra></extra>"})
    how = "per k-means cluster" if clustered else "uniformly"
    shapes = [{"type": "line", "xref": "x", "x0": settle, "x1": settle, "yref": "paper", "y0": 0, "y1": 1,
               "line": {"color": PLAIN_COLOR, "width": 1.5, "dash": "dash"}}]
    notes = [{"x": settle, "y": 1.0, "xref": "x", "yref": "paper", "text": f"settles at ≈ {settle} (±{tol:g})",
              "showarrow": False, "xanchor": "left", "yanchor": "top", "font": {"size": 12}}]
    layout = _layout(f"λ against the number of calibration samples (t = {t:g}; subsets drawn {how})",
                     xaxis=_axis("calibration samples", type="log" if max(counts) > 30 else "linear"),
                     yaxis=_axis("λ"), shapes=shapes, annotations=notes, height=380)
    layout["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0}
    layout["margin"] = {"l": 56, "r": 16, "t": 48, "b": 96}
    return PlotSpec(data, layout)


def compare_bands_figure(keys: Sequence[str], sets: Sequence[dict], diff: Sequence[float], *, t: float) -> PlotSpec:
    """Two calibration sets on one chart: λ of each with its band, and the largest |λa − λb| per group
    as bars on a second axis. ``sets``: ``[{"label", "lam": [K], "lo": [K], "hi": [K], "level", "resamples",
    "samples"}]`` (one fine-tuned model's view per set, or the mean over models)."""
    data = []
    for i, s in enumerate(sets):
        band = {"level": s["level"], "resamples": s["resamples"], "samples": s["samples"], "lo": [s["lo"]],
                "hi": [s["hi"]]}
        data += band_traces(keys, [s], band, offset=i)
        data.append({"type": "scatter", "mode": "lines+markers", "x": list(keys), "y": _f(s["lam"]),
                     "name": f"λ · {s['label']}", "line": {"color": model_color(i), "width": 2.5},
                     "marker": {"size": 7}, "hovertemplate": f"<b>%{{x}}</b><br>{s['label']}<br>λ %{{y:.4f}}"
                                                             "<extra></extra>"})
    data.append({"type": "bar", "x": list(keys), "y": _f(diff), "yaxis": "y2", "name": "largest |Δλ| per group",
                 "marker": {"color": _rgba(PLAIN_COLOR, 0.35)}, "hovertemplate": "<b>%{x}</b><br>|Δλ| %{y:.4f}"
                                                                                "<extra></extra>"})
    layout = _layout(f"Two calibration sets: λ at t = {t:g} with bootstrap bands, and their difference",
                     xaxis=_category(keys, "λ key (layer group)"), yaxis=_axis("λ"),
                     yaxis2=_axis("largest |Δλ|", overlaying="y", side="right", showgrid=False, rangemode="tozero"),
                     height=400, barmode="overlay")
    layout["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0}
    layout["margin"] = {"l": 56, "r": 56, "t": 48, "b": 96}
    return PlotSpec(data, layout)


def mi_tokens_figure(series: Sequence[dict], *, summary: str = "") -> PlotSpec:
    """Per-sample MI against the sample's real token count (log x): does the estimator track length?

    ``series``: ``[{"label", "tokens": [S], "mi": [S], "r": Pearson r of MI with log(tokens) or None}]``.
    """
    symbols = ["circle", "diamond", "square", "triangle-up", "x"]
    data = []
    for i, s in enumerate(series):
        r = s.get("r")
        data.append({"type": "scatter", "mode": "markers", "x": _f(s["tokens"]), "y": _f(s["mi"]),
                     "name": f"{s['label']} (r = {r:.2f})" if r is not None else f"{s['label']} (r n/a)",
                     "marker": {"size": 7, "opacity": 0.8, "color": PALETTE[i % len(PALETTE)],
                                "symbol": symbols[(i // len(PALETTE)) % len(symbols)]},
                     "hovertemplate": f"{s['label']}<br>%{{x:.0f}} tokens<br>MI %{{y:.4f}} nats<extra></extra>"})
    title = "Per-sample MI vs tokens" + (f" — {summary}" if summary else "")
    layout = _layout(title, height=400, xaxis=_axis("real tokens per sample (log)", type="log"),
                     yaxis=_axis("MI (nats)"))
    layout["title"]["font"] = {"size": 13}
    layout["legend"] = {"orientation": "h", "yanchor": "top", "y": -0.3, "xanchor": "left", "x": 0.0}
    layout["margin"] = {"l": 56, "r": 16, "t": 48, "b": 110}
    return PlotSpec(data, layout)


def multi_t_figure(groups: Sequence[str], per_model: Sequence[dict], t_values: Sequence[float], *,
                   alpha: float, metric_label: str = "NMI", title: str | None = None) -> PlotSpec:
    """Small multiples: one panel per fine-tuned model, one line per t (darker = larger t).

    ``per_model``: ``[{"label", "nmi": [K], "grid": [len(t_values)][K]}]``; ``title`` replaces the
    softmax rule's (which names α and the t = 0 reference).
    """
    n = max(1, len(per_model))
    gap = 0.04
    width = (1 - gap * (n - 1)) / n
    tmin = min(min(t_values), 0.0) if len(t_values) else 0.0
    span = (max(t_values) - tmin) if len(t_values) else 1.0
    colors = [T_COLORS[min(len(T_COLORS) - 1, round(((t - tmin) / span if span else 0) * (len(T_COLORS) - 1)))]
              for t in t_values]
    data, layout_axes, titles = [], {}, []
    for col, m in enumerate(per_model):
        suffix = "" if col == 0 else str(col + 1)
        nmi = _f(m["nmi"])
        for j, t in enumerate(t_values):
            data.append({
                "type": "scatter", "mode": "lines", "name": f"t = {t:g}", "legendgroup": f"t{j}",
                "showlegend": col == 0, "x": list(groups), "y": _f(m["grid"][j]), "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "line": {"color": colors[j], "width": 2, "dash": "dash" if t == 0 else "solid"},
                "customdata": [[v, float(t)] for v in nmi],
                "hovertemplate": f"<b>%{{x}}</b><br>t = %{{customdata[1]:g}}<br>{metric_label} %{{customdata[0]:.4f}}"
                                 "<br>λ %{y:.4f}<extra></extra>"})
        x0 = col * (width + gap)
        layout_axes[f"xaxis{suffix}"] = _category(groups, domain=[x0, x0 + width], anchor=f"y{suffix}",
                                                  showticklabels=len(groups) <= 12)
        layout_axes[f"yaxis{suffix}"] = _axis("λ" if col == 0 else None, anchor=f"x{suffix}",
                                              **({} if col == 0 else {"matches": "y", "showticklabels": False}))
        titles.append({"text": f"<b>{m['label']}</b>", "x": x0 + width / 2, "xref": "paper", "y": 1.0,
                       "yref": "paper", "yanchor": "bottom", "showarrow": False, "font": {"size": 12}})
    layout = _layout(title or f"λₖ for several t at once (α = {alpha:g}; dashed: t = 0, the plain method)", height=340,
                     annotations=titles if len(per_model) > 1 else [], **layout_axes)
    layout["legend"] = {"orientation": "v", "x": 1.01, "xanchor": "left", "y": 1.0, "yanchor": "top"}
    layout["margin"] = {"l": 56, "r": 90, "t": 64, "b": 40}
    return PlotSpec(data, layout)


def length_bar_figure(labels: Sequence[str], means: Sequence[float], counts: Sequence[int],
                      colors: Sequence[str] | None = None) -> PlotSpec:
    """Mean reply length (tokens) per model over the conversation so far."""
    colors = list(colors or [model_color(i) for i in range(len(labels))])
    data = [{"type": "bar", "x": list(labels), "y": _f(means), "marker": {"color": colors},
             "text": [f"{m:.0f}" for m in means], "textposition": "outside", "cliponaxis": False,
             "customdata": [[int(c)] for c in counts],
             "hovertemplate": "<b>%{x}</b><br>mean %{y:.1f} tokens<br>%{customdata[0]} replies<extra></extra>"}]
    return PlotSpec(data, _layout("Mean reply length so far (tokens)", height=280, legend=False,
                                  xaxis=_axis(showgrid=False), yaxis=_axis("tokens", rangemode="tozero")))


def _eval_hover_extra(p: dict) -> str:
    """Hover lines for a thinking model (thinking + answer tokens) and for truncated replies."""
    extra = ""
    if p.get("thinking_length") is not None:
        extra += f"<br>thinking {float(p['thinking_length']):.1f} + answer {float(p.get('answer_length') or 0):.1f} tokens"
    if p.get("truncated"):
        extra += f"<br>hit max tokens: {int(p['truncated'])}"
        if p.get("truncated_in_thinking"):
            extra += f" ({int(p['truncated_in_thinking'])} while thinking, counted wrong)"
    return extra


def eval_scatter(points: Iterable[dict]) -> PlotSpec:
    """Accuracy vs mean answer length, one marker per evaluated model (accumulated per session).

    ``points``: ``[{"label", "kind": "merged"|"base"|"fine-tuned", "accuracy", "mean_length", "n"}]``, optionally
    ``thinking_length``/``answer_length`` (models that think) and ``truncated``/``truncated_in_thinking``.
    Up and to the left is better: more accurate with shorter answers.
    """
    points = list(points)
    if not points:
        return empty_figure("Run an evaluation to add points here")
    styles = {"merged": {"color": MERGED_COLOR, "symbol": "circle", "size": 12},
              "base": {"color": BASE_COLOR, "symbol": "square", "size": 12},
              "fine-tuned": {"color": PALETTE[0], "symbol": "diamond", "size": 13}}
    names = {"merged": "merged models", "base": "base", "fine-tuned": "fine-tuned"}
    data = []
    for kind in ("base", "fine-tuned", "merged"):
        pts = [p for p in points if p.get("kind") == kind]
        if not pts:
            continue
        data.append({
            "type": "scatter", "mode": "markers+text", "name": names[kind],
            "x": _f(p["mean_length"] for p in pts), "y": [100 * float(p["accuracy"]) for p in pts],
            "text": [p["label"] for p in pts], "textposition": "top center", "textfont": {"size": 11},
            "marker": {"line": {"width": 1, "color": "white"}, "opacity": 0.9, **styles[kind]},
            "customdata": [[p["label"], int(p.get("n") or 0), _eval_hover_extra(p)] for p in pts],
            "hovertemplate": "<b>%{customdata[0]}</b><br>accuracy %{y:.1f}%<br>mean length %{x:.1f} tokens"
                             "%{customdata[2]}<br>n = %{customdata[1]}<extra></extra>"})
    return PlotSpec(data, _layout("Accuracy vs answer length (up-left is better)", height=420,
                                  xaxis=_axis("mean answer length (tokens)", rangemode="tozero"),
                                  yaxis=_axis("accuracy (%)", range=[-3, 108])))


def fisher_figure(keys: Sequence[str], fisher: Sequence[float], series: Sequence[dict]) -> PlotSpec:
    """The fim rule's inputs per λ key: the base's Fisher Fₖ (bars, log axis) and each fine-tuned model's
    ‖δₖ‖² (lines, right log axis). ``series``: ``[{"label", "delta_sq": [K]}]``."""
    data = [{"type": "bar", "name": "Fisher F (base, random tokens)", "x": list(keys), "y": _f(fisher),
             "marker": {"color": BASE_COLOR}, "hovertemplate": "<b>%{x}</b><br>F %{y:.3g}<extra></extra>"}]
    for i, s in enumerate(series):
        data.append({"type": "scatter", "mode": "lines+markers", "name": f"‖δ‖² {s['label']}", "x": list(keys),
                     "y": _f(s["delta_sq"]), "yaxis": "y2", "line": {"color": model_color(i), "width": 2},
                     "hovertemplate": f"<b>%{{x}}</b><br>{s['label']}<br>‖δ‖² %{{y:.3g}}<extra></extra>"})
    return PlotSpec(data, _layout("fim rule: the base's Fisher per layer and each task vector's ‖δ‖²", height=320,
                                  xaxis=_category(keys, "λ key (layer group)"), yaxis=_axis("Fisher F", type="log"),
                                  yaxis2={"title": {"text": "‖δ‖²"}, "type": "log", "overlaying": "y",
                                          "side": "right", "showgrid": False}))


def fim_coefficient_figure(keys: Sequence[str], series: Sequence[dict], *, t: float,
                           clip: tuple[float | None, float | None] | None = None, live: dict | None = None) -> PlotSpec:
    """The fim rule's αₖ(t) per λ key for each fine-tuned model, with α = ½ (t = 0) dashed.

    ``series``: ``[{"label", "score": [K], "lambdas": [K]}]`` (score = F·‖δ‖² or F); ``live`` as in ``attach_live``.
    """
    hover = "<b>%{x}</b><br>%{customdata[1]}<br>score %{customdata[0]:.3g}<br>α %{y:.4f} (task-vector weight)<extra></extra>"
    data = _weight_lines(keys, series, t, "α", hover, lambda s: [[float(v), s["label"]] for v in s["score"]])
    shapes = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": float(b), "y1": float(b),
               "line": {"color": "#adb5bd", "width": 1, "dash": "dot"}} for b in (clip or ()) if b is not None]
    spec = PlotSpec(data, _layout(f"fim rule: αₖ(t) at t = {t:g} (σ of the standardised log Fisher score)",
                                  xaxis=_category(keys, "λ key (layer group)"), yaxis=_axis("α (½ at t = 0)"),
                                  shapes=shapes))
    return attach_live(spec, live, traces=list(range(1, 1 + len(series))), t=t)


def rules_figure(keys: Sequence[str], series: Sequence[dict], *, title: str) -> PlotSpec:
    """Task-vector weights of several rules on one chart. ``series``: ``[{"label", "values": [K], "dash"?}]``
    (one colour per fine-tuned model, one dash style per rule)."""
    data = [{"type": "scatter", "mode": "lines+markers", "name": s["label"], "x": list(keys), "y": _f(s["values"]),
             "line": {"color": model_color(int(s.get("model", 0))), "width": 2.5, "dash": s.get("dash", "solid")},
             "marker": {"size": 7, "symbol": s.get("symbol", "circle")},
             "hovertemplate": f"<b>%{{x}}</b><br>{s['label']}<br>%{{y:.4f}}<extra></extra>"} for s in series]
    return PlotSpec(data, _layout(title, height=340, xaxis=_category(keys, "λ key (layer group)"),
                                  yaxis=_axis("task-vector weight")))
