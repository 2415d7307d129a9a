"""Plotly figure builders. Pure functions of plain data (lists / arrays in, ``go.Figure`` out).

They draw what the library computed; they compute nothing themselves (λ values come from
``acm.coefficients``). Every builder is cheap enough to run on each slider move.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import plotly.graph_objects as go

# One colour per role, reused everywhere so a model keeps its colour across charts.
PALETTE = ["#e8590c", "#0c8599", "#5f3dc4", "#2b8a3e", "#c2255c"]   # fine-tuned models / misc
MERGED_COLOR = "#7048e8"
BASE_COLOR = "#868e96"
PLAIN_COLOR = "#495057"
FONT = dict(family="Inter, system-ui, -apple-system, Segoe UI, sans-serif", size=13)


def _layout(fig: go.Figure, *, title: str, xtitle: str | None = None, ytitle: str | None = None,
            height: int = 360, legend: bool = True) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)),
        template="plotly_white", font=FONT, height=height,
        margin=dict(l=56, r=16, t=56, b=48),
        hovermode="closest", showlegend=legend,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    if xtitle is not None:
        fig.update_xaxes(title_text=xtitle)
    if ytitle is not None:
        fig.update_yaxes(title_text=ytitle)
    fig.update_xaxes(showgrid=False, zeroline=False)
    fig.update_yaxes(gridcolor="#eceff3", zeroline=False)
    return fig


def empty_figure(message: str, *, height: int = 300) -> go.Figure:
    """A blank chart carrying a one-line hint (what to click to fill it)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#868e96"))
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=16, r=16, t=16, b=16), font=FONT)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def model_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _category_axis(fig: go.Figure, groups: Sequence[str], **kwargs) -> None:
    """Groups on the x-axis in network order (embed, block.0 …, head), never re-sorted."""
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(groups), tickangle=-45
                     if len(groups) > 16 else 0, **kwargs)


def nmi_figure(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]) -> go.Figure:
    """Per-layer NMI between base and each fine-tuned model: one line per fine-tuned model."""
    fig = go.Figure()
    for i, (label, nmi) in enumerate(series):
        fig.add_trace(go.Scatter(
            x=list(groups), y=[float(v) for v in nmi], mode="lines+markers", name=label,
            line=dict(color=model_color(i), width=2.5), marker=dict(size=7),
            customdata=[[label]] * len(groups),
            hovertemplate="<b>%{x}</b><br>%{customdata[0]}<br>NMI %{y:.4f}<extra></extra>"))
    _layout(fig, title="Per-layer NMI (base vs fine-tuned)", xtitle="layer group (network order)",
            ytitle="NMI (1 = unchanged)")
    _category_axis(fig, groups)
    return fig


def coefficient_figure(groups: Sequence[str], series: Sequence[dict], *, t: float, alpha: float,
                       clip: tuple[float | None, float | None] | None = None) -> go.Figure:
    """λₖ(t) per layer group for each fine-tuned model, with the plain method (t = 0, λ = α) dashed.

    ``series``: ``[{"label", "nmi": [K], "lambdas": [K]}]``.
    """
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=list(groups), y=[float(alpha)] * len(groups), mode="lines", name=f"plain (t = 0): λ = α = {alpha:g}",
        line=dict(color=PLAIN_COLOR, width=1.5, dash="dash"), hoverinfo="skip"))
    for i, s in enumerate(series):
        lam = [float(v) for v in s["lambdas"]]
        nmi = [float(v) for v in s["nmi"]]
        fig.add_trace(go.Scatter(
            x=list(groups), y=lam, mode="lines+markers", name=f"{s['label']} (t = {t:g})",
            line=dict(color=model_color(i), width=2.5), marker=dict(size=7),
            customdata=[[n, s["label"]] for n in nmi],
            hovertemplate="<b>%{x}</b><br>%{customdata[1]}<br>NMI %{customdata[0]:.4f}"
                          "<br>λ %{y:.4f}<extra></extra>"))
    if clip:
        for bound, name in zip(clip, ("λ min", "λ max")):
            if bound is not None:
                fig.add_hline(y=float(bound), line=dict(color="#adb5bd", width=1, dash="dot"),
                              annotation_text=name, annotation_position="top left")
    _layout(fig, title=f"Merge coefficients λₖ(t) at t = {t:g}, α = {alpha:g}", xtitle="layer group",
            ytitle="λ (coefficient)")
    _category_axis(fig, groups)
    return fig


def multi_t_figure(groups: Sequence[str], per_model: Sequence[dict], t_values: Sequence[float], *,
                   alpha: float) -> go.Figure:
    """Small multiples: one panel per fine-tuned model, one line per t (darker = larger t).

    ``per_model``: ``[{"label", "nmi": [K], "grid": [len(t_values)][K]}]``.
    """
    from plotly.colors import sample_colorscale
    from plotly.subplots import make_subplots

    n = max(1, len(per_model))
    fig = make_subplots(rows=1, cols=n, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[m["label"] for m in per_model] or [""])
    tmax = max(t_values) if t_values else 1.0
    colors = sample_colorscale("Viridis", [0.9 - 0.85 * (t / tmax if tmax else 0) for t in t_values])
    for col, m in enumerate(per_model, start=1):
        nmi = [float(v) for v in m["nmi"]]
        for j, t in enumerate(t_values):
            fig.add_trace(go.Scatter(
                x=list(groups), y=[float(v) for v in m["grid"][j]], mode="lines",
                name=f"t = {t:g}", legendgroup=f"t{j}", showlegend=col == 1,
                line=dict(color=colors[j], width=2, dash="dash" if t == 0 else "solid"),
                customdata=[[v, t] for v in nmi],
                hovertemplate="<b>%{x}</b><br>t = %{customdata[1]:g}<br>NMI %{customdata[0]:.4f}"
                              "<br>λ %{y:.4f}<extra></extra>"), row=1, col=col)
        _category_axis(fig, groups, row=1, col=col)
    _layout(fig, title=f"λₖ for several t at once (α = {alpha:g}; dashed: t = 0, the plain method)",
            ytitle="λ", height=340)
    fig.update_xaxes(showticklabels=len(groups) <= 12)
    return fig


def length_bar_figure(labels: Sequence[str], means: Sequence[float], counts: Sequence[int],
                      colors: Sequence[str] | None = None) -> go.Figure:
    """Mean reply length (tokens) per model over the conversation so far."""
    colors = list(colors or [model_color(i) for i in range(len(labels))])
    fig = go.Figure(go.Bar(
        x=list(labels), y=[float(m) for m in means], marker_color=colors,
        text=[f"{m:.0f}" for m in means], textposition="outside", cliponaxis=False,
        customdata=[[c] for c in counts],
        hovertemplate="<b>%{x}</b><br>mean %{y:.1f} tokens<br>%{customdata[0]} replies<extra></extra>"))
    _layout(fig, title="Mean reply length so far (tokens)", ytitle="tokens", height=280, legend=False)
    return fig


def eval_scatter(points: Iterable[dict]) -> go.Figure:
    """Accuracy vs mean answer length, one marker per evaluated model (accumulated per session).

    ``points``: ``[{"label", "kind": "merged"|"base"|"fine-tuned", "accuracy", "mean_length", "n"}]``.
    Up and to the left is better: more accurate with shorter answers.
    """
    points = list(points)
    if not points:
        return empty_figure("Run an evaluation to add points here")
    styles = {"merged": dict(color=MERGED_COLOR, symbol="circle", size=12),
              "base": dict(color=BASE_COLOR, symbol="square", size=12),
              "fine-tuned": dict(color=PALETTE[0], symbol="diamond", size=13)}
    fig = go.Figure()
    for kind in ("base", "fine-tuned", "merged"):
        pts = [p for p in points if p.get("kind") == kind]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[p["mean_length"] for p in pts], y=[100 * p["accuracy"] for p in pts], mode="markers+text",
            name={"merged": "merged models", "base": "base", "fine-tuned": "fine-tuned"}[kind],
            text=[p["label"] for p in pts], textposition="top center", textfont=dict(size=11),
            marker=dict(line=dict(width=1, color="white"), opacity=0.9, **styles[kind]),
            customdata=[[p["label"], p.get("n", 0)] for p in pts],
            hovertemplate="<b>%{customdata[0]}</b><br>accuracy %{y:.1f}%<br>mean length %{x:.1f} tokens"
                          "<br>n = %{customdata[1]}<extra></extra>"))
    _layout(fig, title="Accuracy vs answer length (up-left is better)", xtitle="mean answer length (tokens)",
            ytitle="accuracy (%)", height=420)
    fig.update_yaxes(rangemode="tozero")
    fig.update_xaxes(rangemode="tozero", showgrid=True, gridcolor="#f1f3f5")
    return fig
