"""Analyse tab add-on — the data-free ``fim`` rule beside the paper's: the Fisher pass, its chart, both rules' λ.

The fim rule (``acm.rules.fim``; docs/formulas.md "The fim rule") needs no calibration text: one backward
pass per random-token sequence through the base (``acm.activations.fisher``) and ‖δ‖² per layer from the
checkpoints. Here a button adds that Fisher pass to the session's analysis (a copy: cached analyses are
shared), a chart shows the Fisher per layer and each task vector's ‖δ‖² beside the MI chart, and one chart
shows the task-vector weights of both rules (acm: λ/N, fim: α) at their current t. Without an analysis of the
selected models the Fisher pass becomes the session's analysis on its own. No maths here.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from components import plots
from components.common import gpu, none_if_auto, progress_callback, ui_errors, unique_labels
from components.state import SessionState

DEFAULT_SEQUENCES = 8
DEFAULT_LENGTH = 64
NO_FISHER = "No Fisher pass yet: “Fisher pass” adds it to the analysis (no calibration text needed)"


def run_fisher(state: SessionState, base: str | None = None, fts=None, sequences=DEFAULT_SEQUENCES,
               length=DEFAULT_LENGTH, seed=0, loss: str = "lm", device: str | None = "auto", dtype: str | None = "auto",
               progress=None):
    """The Fisher pass on the base and ‖δ‖² of the fine-tuned models (``base``/``fts``: the selection; None =
    the session's). Added to (a copy of) the session's analysis when it covers these models, else it becomes
    the session's analysis on its own (no calibration text needed: the fim rule works, the MI views say why not)."""
    from acm.activations.fisher import FisherSettings, fisher_analysis
    from acm.errors import InputError
    from components.models import validate_selection

    if base is None and fts is None:
        base, fts = state.base, state.fts
    if not base:
        raise InputError("choose the base and fine-tuned models in step 1 first")
    base, fts = validate_selection(base, fts)
    settings = FisherSettings(int(sequences), int(length), int(seed), loss).checked()
    fim = fisher_analysis(base, fts, settings, device=none_if_auto(device), dtype=none_if_auto(dtype),
                          progress=progress)
    with state.lock:
        same = (state.analysis is not None and state.base == base
                and [m.model for m in state.analysis.models] == list(fts))
        if same:
            state.analysis = dataclasses.replace(state.analysis, fisher=fim.fisher)   # cached analyses are shared
        else:
            state.analysis, state.analysis_key, state.base, state.fts = fim, None, base, list(fts)
    return state.analysis


def fisher_view(analysis):
    """The Fisher per λ key and each fine-tuned model's ‖δ‖² (or a placeholder without a Fisher pass)."""
    if analysis is None or not analysis.has_fisher():
        return plots.empty_figure(NO_FISHER, height=320)
    keys, fisher, delta = analysis.fisher_arrays()
    labels = unique_labels([m.model for m in analysis.models])
    return plots.fisher_figure(keys, fisher, [{"label": lab, "delta_sq": d} for lab, d in zip(labels, delta)])


def both_rules_view(analysis, acm_t: float | None = None, fim_t: float | None = None, score: str = "fisher-delta"):
    """Task-vector weights of the acm rule (λ/N, from the per-sample MI) and the fim rule (α) per λ key."""
    from acm.errors import InputError
    from acm.rules import check_t
    from acm.rules.coefficients import compute

    if analysis is None:
        return plots.empty_figure("Both rules appear here after “Analyse” and “Fisher pass”", height=340)
    labels = unique_labels([m.model for m in analysis.models])
    series, keys, parts = [], None, []
    for rule, t, dash, symbol in (("acm", acm_t, "solid", "circle"), ("fim", fim_t, "dash", "diamond")):
        try:
            check_t(rule, t)
        except InputError:
            t = None                         # a t of the other rule's range: this rule's default
        try:
            c = compute(analysis, rule, t, score=score)
        except InputError:
            continue
        keys = keys or c.keys
        parts.append(f"{rule} t = {c.params['t']:g}")
        for i, (lab, w) in enumerate(zip(labels, c.weights())):
            name = f"{lab}: {'acm λ/N' if rule == 'acm' else 'fim α'}"
            series.append({"label": name, "values": [w.get(k, float("nan")) for k in keys], "model": i,
                           "dash": dash, "symbol": symbol})
    if not series:
        return plots.empty_figure(NO_FISHER, height=340)
    return plots.rules_figure(keys, series, title="Task-vector weight per layer, both rules: " + ", ".join(parts))


def side_views(state: SessionState, t=None, rule=None):
    """(Fisher chart, both-rules chart) at the Analyse tab's t for its rule (the other rule at its default)."""
    from acm.rules import get_rule

    view = state.coef_view or {}
    rule = get_rule(rule or view.get("rule")).key
    t = view.get("t") if t is None else t
    fig_f = fisher_view(state.analysis)
    fig_b = both_rules_view(state.analysis, t if rule == "acm" else None, t if rule == "fim" else None)
    state.figures["fisher"], state.figures["both_rules"] = fig_f, fig_b
    return fig_f, fig_b


def build() -> SimpleNamespace:
    import gradio as gr

    with gr.Accordion("Data-free rule (fim): the base's Fisher information beside the MI", open=True,
                      elem_id="fisher-accordion"):
        gr.Markdown("The **fim** rule (this project's reading of FIM-Merging, arXiv 2603.21705) needs no calibration "
                    "text: random-token sequences go forward and backward through the base only; a layer that is "
                    "sensitive (high Fisher) and moved far (large ‖δ‖²) gets a small α. Choose it as the "
                    "coefficient rule above (and in Merge) once the pass has run.", elem_classes=["muted"])
        with gr.Row(equal_height=True):
            button = gr.Button("Fisher pass", variant="secondary", scale=0, min_width=160, elem_id="fisher-btn")
            sequences = gr.Slider(1, 64, value=DEFAULT_SEQUENCES, step=1, label="Random sequences S",
                                  elem_id="fisher-sequences")
            length = gr.Slider(8, 512, value=DEFAULT_LENGTH, step=8, label="Tokens per sequence L",
                               elem_id="fisher-length")
        status = gr.Markdown("", elem_id="fisher-status")
        with gr.Row(equal_height=False):
            fisher_plot = gr.Plot(plots.empty_figure(NO_FISHER, height=320), show_label=False, elem_id="fisher-plot")
            both_plot = gr.Plot(plots.empty_figure("Both rules appear here after “Analyse” and “Fisher pass”",
                                                   height=340), show_label=False, elem_id="both-rules-plot")
    return SimpleNamespace(button=button, sequences=sequences, length=length, status=status,
                           fisher_plot=fisher_plot, both_plot=both_plot)


def wire(ui):
    """Wire the button and the refreshes; returns the Fisher pass event (the Analyse tab chains its download)."""
    import gradio as gr

    a, m = ui.analysis, ui.models
    f = a.fim

    @gpu(duration=120)
    def fisher_pass(state, base=None, fts=None, sequences=DEFAULT_SEQUENCES, length=DEFAULT_LENGTH, seed=0,
                    device="auto", dtype="auto", progress=gr.Progress()):
        """The fim rule's Fisher pass on the base (S random sequences of L tokens, seeded) and ‖δ‖² per layer,
        added to the current analysis of these models (or the analysis on its own); the status line and charts."""
        res = run_fisher(state, base, fts, sequences, length, seed, device=device, dtype=dtype,
                         progress=progress_callback(progress))
        fb = res.fisher
        line = (f"Fisher pass: {fb['sequences']} sequences × {fb['length']} random tokens (seed {fb['seed']}) in "
                f"{fb['seconds']:.1f} s on {fb['device']}. Choose **fim** as the coefficient rule to see its α.")
        return (line, *side_views(state))

    event = f.button.click(ui_errors(fisher_pass), [ui.state, m.base, m.fts, f.sequences, f.length, a.seed, m.device, m.dtype],
                   [f.status, f.fisher_plot, f.both_plot], api_name="fisher_pass", concurrency_id="heavy",
                   concurrency_limit=1)
    refresh = ui_errors(side_views, warm=False)
    kw = dict(queue=False, api_visibility="private", show_progress="hidden")
    for event in getattr(ui, "analysis_events", []):
        event.success(refresh, [ui.state, a.t, a.rule], [f.fisher_plot, f.both_plot], **kw)
    gr.on([a.t.release, a.rule.input], refresh, [ui.state, a.t, a.rule], [f.fisher_plot, f.both_plot],
          trigger_mode="always_last", **kw)
    return event


__all__ = ["both_rules_view", "build", "fisher_view", "run_fisher", "side_views", "wire"]
