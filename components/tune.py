"""Step 7 — Tune: sweep the rule's t (the paper's rule by default; switches, α, density, method), watch the
accuracy-vs-length frontier grow, use a point.

The work is ``acm.tune.iter_tune`` (merge → evaluate → remove, one setting at a time, streamed to a
``tune.jsonl`` in the session workspace); this panel only turns each finished record into an
updated scatter, table and recommendation. Runs in the shared "heavy" queue slot; **Cancel**
stops between settings and keeps what finished. **Use this setting** merges the picked point
through the Merge step's own code (plain, softmax, the paper's rule with its switches), so Chat /
Evaluate / Export see it as the current merge, and sets the Merge tab's controls to that point.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from acm.merging import methods as registry
from acm.tune import DEFAULT_ACM_TS
from acm.tune import DEFAULT_SOFTMAX_TS as DEFAULT_SOFTMAX_TS_VALUES
from components import plots
from components import steps as plan
from components.common import (
    bundled_eval,
    gpu,
    none_if_auto,
    progress_callback,
    ui_errors,
    uploaded_file,
)
from components.models import validate_selection
from components.state import SessionState

METHOD_CHOICES = [(s.short, k) for k, s in registry.SPECS.items() if s.acm]      # acm.merging.methods
DEFAULT_METHODS = ["ties"]
RULE_CHOICES = [("ACM — the paper's rule (Eq. 2–3)", "acm"), ("softmax — this project's alternative rule", "softmax"),
                ("FIM — data-free Fisher rule (t = 0.5, 1, 2)", "fim")]
DEFAULT_RULES = ["acm"]
DEFAULT_TS = ", ".join(f"{t:g}" for t in DEFAULT_ACM_TS)             # the paper's 0.7, its ablation's ends, −1
DEFAULT_SOFTMAX_TS = ", ".join(f"{t:g}" for t in DEFAULT_SOFTMAX_TS_VALUES)
AGAINST_CHOICES = [("the fine-tuned models (the paper)", "fine-tuned"), ("a plain merge (derivative)", "merged")]
APPLIES_CHOICES = [("task vectors, 1/N (Eq. 3)", "task-vectors"), ("the plain merge's delta (derivative)",
                                                                     "merged-delta")]
DEFAULT_LIMIT = 40
DEFAULT_HOLDOUT = 0.5
DEFAULT_MAX_NEW_TOKENS = 256
UI_MAX_SETTINGS = 60              # a Space visitor's grid; the CLI allows more (acm.tune.MAX_SETTINGS)
OBJECTIVE_CHOICES = [("shortest answers within tolerance", "shortest"), ("accuracy per 1k tokens", "acc-per-1k"),
                     ("max accuracy", "max-accuracy")]
TABLE_HEADERS = ["setting", "accuracy %", "mean length", "acc. per 1k tokens", "frontier", "seconds"]
HELP = """
**Tune** sweeps the coefficient rule's **t** (and its switches, α, density, drop rate, method): each setting is
merged into a temporary folder, evaluated greedily on part of the problems, and removed. The default is **the
paper's rule** (ACM, Eq. 2–3: λ = 1 − mean σ(t·(MI − max MI)), t ∈ [−3, 3]; the paper uses t = 0.7) at its
ablation's t plus −1; **softmax** is this project's alternative rule, with its own t values (≥ 0). *MI against a
plain merge* runs one extra analysis per setting, on the bundled calibration set. Points appear as they finish;
the line is the **Pareto frontier** (nothing is both more accurate and shorter), the star the **recommended**
setting. The recommendation is then re-measured on the **held-out** problems it was not picked on. *Use this
setting* merges the chosen point for Chat / Evaluate / Export. At most 60 settings per run here; larger grids,
resumable runs and Hub evaluation sets: `python -m acm tune`.
"""


_RAY: Any = None      # the Ray cluster of ACM_RAY_ADDRESS, connected once per process (acm.tune_ray)


def ray_executor():
    """Where the Tune tab's settings run: None (this process, the default), or a ``acm.tune_ray.RayExecutor`` on
    the cluster at ``ACM_RAY_ADDRESS`` when that is set (points then arrive as its tasks finish)."""
    global _RAY
    import os

    address = os.environ.get("ACM_RAY_ADDRESS", "").strip()
    if not address:
        return None
    if _RAY is None or _RAY.address != address:
        from acm.tune_ray import RayExecutor

        _RAY = RayExecutor(address)
    return _RAY


def _tune(state: SessionState) -> dict:
    """This panel's slice of the session state (kept here, not in ``SessionState``)."""
    tune = getattr(state, "tune", None)
    if tune is None:
        tune = {"runs": 0, "records": [], "report": None, "grid": [], "cancel": False, "out": None}
        state.tune = tune
    return tune


# ----------------------------------------------------------------------------- views


def tune_figure(records: list[dict], report: dict | None) -> plots.PlotSpec:
    """Accuracy vs mean length: base / fine-tuned references, plain and ACM points, frontier, recommended."""
    from acm.tune import pareto_front

    refs = [r for r in records if r["kind"] == "reference" and r["split"] == "tune"]
    pts = [r for r in records if r["kind"] == "setting"]
    if not refs and not pts:
        return plots.empty_figure("Run a tune to see the accuracy-vs-length frontier here")
    data: list[dict] = []

    def trace(name, items, **style):
        data.append({"type": "scatter", "mode": "markers", "name": name,
                     "x": [float(p["mean_length"]) for p in items], "y": [100 * float(p["accuracy"]) for p in items],
                     "customdata": [[p["label"], int(p.get("n") or 0)] for p in items],
                     "hovertemplate": "<b>%{customdata[0]}</b><br>accuracy %{y:.1f}%<br>mean length %{x:.1f} tokens"
                                      "<br>n = %{customdata[1]}<extra></extra>", **style})

    base = [r for r in refs if r["key"] == "base"]
    fts = [r for r in refs if r["key"] != "base"]
    if base:
        trace("base", base, marker={"color": plots.BASE_COLOR, "symbol": "square", "size": 12})
    if fts:
        trace("fine-tuned", fts, marker={"color": plots.PALETTE[0], "symbol": "diamond", "size": 13})
    plain = [p for p in pts if p["setting"].get("t") is None]
    paper = [p for p in pts if p["setting"].get("t") is not None and p["setting"].get("rule") == "acm"]
    softmax = [p for p in pts if p["setting"].get("t") is not None and p["setting"].get("rule") not in ("acm", "fim")]
    fim = [p for p in pts if p["setting"].get("t") is not None and p["setting"].get("rule") == "fim"]
    if plain:
        trace("plain", plain, marker={"color": plots.PLAIN_COLOR, "symbol": "circle-open", "size": 11,
                                      "line": {"width": 2}})
    if paper:
        trace("ACM (paper's rule)", paper, marker={
            "color": [float(p["setting"]["t"]) for p in paper], "colorscale": "Viridis", "reversescale": True,
            "size": 11, "symbol": "circle", "colorbar": {"title": {"text": "t"}, "thickness": 10, "len": 0.6},
            "line": {"width": 1, "color": "white"}})
    if softmax:   # its t is another scale (≥ 0): one colour, t in the hover label
        trace("softmax (this project's rule)", softmax, marker={"color": plots.PALETTE[1], "symbol": "triangle-up",
                                                                 "size": 11, "line": {"width": 1, "color": "white"}})
    if fim:       # the data-free rule: its own marker, t in the hover label
        trace("FIM (data-free rule)", fim, marker={"color": plots.PALETTE[3], "symbol": "diamond-open", "size": 11,
                                                   "line": {"width": 2}})
    front = pareto_front(pts)
    if len(front) > 1:
        data.append({"type": "scatter", "mode": "lines", "name": "frontier", "line": {"shape": "hv", "width": 2,
                     "color": plots.MERGED_COLOR, "dash": "dot"}, "hoverinfo": "skip",
                     "x": [float(p["mean_length"]) for p in front], "y": [100 * float(p["accuracy"]) for p in front]})
    key = ((report or {}).get("recommended") or {}).get("key")
    rec = [p for p in pts if p["key"] == key]
    if rec:
        trace("recommended", rec, marker={"color": "#f59f00", "symbol": "star", "size": 20,
                                          "line": {"width": 1, "color": "#343a40"}})
    layout = plots._layout(f"Tune: accuracy vs answer length ({len(pts)} setting(s), tune split; up-left is better)",
                           height=440, xaxis=plots._axis("mean answer length (tokens)", rangemode="tozero"),
                           yaxis=plots._axis("accuracy (%)", range=[-3, 108]))
    return plots.PlotSpec(data, layout)


def table_rows(report: dict | None) -> list[list]:
    rows = []
    for s in (report or {}).get("settings", []):
        rows.append([s["label"], round(100 * s["accuracy"], 1), s["mean_length"],
                     round(s.get("accuracy_per_1k_tokens") or 0.0, 1), "✓" if s["on_frontier"] else "",
                     None if s.get("seconds") is None else round(s["seconds"], 1)])
    return rows


def recommendation_markdown(report: dict | None) -> str:
    if not report:
        return "No tune yet."
    r = report["recommended"]
    if not r.get("key"):
        return f"No recommendation yet: {r['why']}."
    t = r["tune"]
    lines = [f"**Recommended: {r['label']}** — {r['why']}.",
             (f"On the tune split ({report.get('n_tune')} problems): accuracy **{100 * t['accuracy']:.1f}%**, "
             f"mean length **{t['mean_length']:.1f}** tokens.")]
    h = r.get("holdout")
    if h:
        lines.append(f"**Held out** ({report.get('n_holdout')} other problems): accuracy **{100 * h['accuracy']:.1f}%**, "
                     f"mean length **{h['mean_length']:.1f}** tokens.")
        refs = " · ".join(f"{v.get('label') or k}: {100 * v['holdout']['accuracy']:.1f}% / "
                          f"{v['holdout']['mean_length']:.1f} tokens"
                          for k, v in report["references"].items() if v.get("holdout"))
        if refs:
            lines.append(f"Held-out references — {refs}.")
    elif report.get("n_holdout"):
        lines.append("The held-out check runs when the grid is done.")
    return "\n\n".join(lines)


def status_line(report: dict | None, records: list[dict], *, running: bool, note: str = "") -> str:
    done = sum(1 for r in records if r["kind"] == "setting")
    total = (report or {}).get("grid_size") or "?"
    if running:
        return f"⏳ running: {done} of {total} settings done{note}"
    stopped = (report or {}).get("stopped")
    if stopped == "cancelled":
        return f"■ cancelled: {done} of {total} settings done (the finished ones are kept){note}"
    return f"✓ done: {done} of {total} settings in {(report or {}).get('seconds', 0):.0f} s{note}"


def choices(report: dict | None) -> list[tuple[str, str]]:
    return [(("★ " if s["key"] == (report or {}).get("recommended", {}).get("key") else "") + s["label"], s["key"])
            for s in (report or {}).get("settings", [])]


# ----------------------------------------------------------------------------- handlers


def _eval_path(upload: str | None) -> str:
    """An uploaded .jsonl (only from Gradio's upload area), else the bundled problems."""
    if upload:
        return str(uploaded_file(upload, "evaluation file"))
    return str(bundled_eval())


def _grid(methods, alphas, ts, densities, drop_rates, plain, rules, softmax_ts, against, applies) -> list:
    """The checked grid (``acm.tune.expand_grid``: one-line errors for bad values)."""
    from acm.tune import expand_grid, parse_values

    return expand_grid(methods or DEFAULT_METHODS, parse_values(alphas), parse_values(ts), parse_values(densities),
                       parse_values(drop_rates), plain=bool(plain), rules=rules or DEFAULT_RULES,
                       softmax_ts=parse_values(softmax_ts), against=against or ["fine-tuned"],
                       applies=applies or ["task-vectors"], max_settings=UI_MAX_SETTINGS)


def _analysis_for(state: SessionState, grid: list, base: str, fts, *, device, dtype, trust_remote_code, progress):
    """The session's analysis when it covers these models (and has per-sample MI if the paper's rule needs it),
    else a fresh one (cached for later merges); then the grid with step 3's metric on its softmax points."""
    if not any(s.needs_analysis for s in grid):
        return None, grid
    from components.analysis import driver_metric

    analysis = state.analysis
    needs_mi = any(s.paper and s.needs_analysis for s in grid)
    if (analysis is None or state.base != base or list(state.fts) != list(fts)
            or (needs_mi and not analysis.has_sample_mi())):
        from components.analysis import run_analysis

        if progress:
            progress(0.0, "analysing the models first (cached for later merges)")
        analysis = run_analysis(state, base, fts, device=device, dtype=dtype,
                                trust_remote_code=trust_remote_code)["analysis"]
    if any(s.acm and not s.paper for s in grid) and analysis.metrics():
        metric = driver_metric(analysis, (state.coef_view or {}).get("metric"))
        if metric != "nmi":
            grid = [replace(s, metric=metric) if s.acm and not s.paper else s for s in grid]
    return analysis, grid


def iter_tune_ui(state: SessionState, base: str | None, fts, *, methods=None, alphas: str = "0.7",
                 ts: str = DEFAULT_TS, densities: str = "0.7", drop_rates: str = "0.3", plain: bool = True,
                 limit: int | None = DEFAULT_LIMIT, holdout: float = DEFAULT_HOLDOUT,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, objective: str = "shortest",
                 tolerance: float = 0.05, upload: str | None = None, device: str | None = "auto",
                 dtype: str | None = "auto", trust_remote_code: bool = False, progress=None, rules=None,
                 softmax_ts: str = DEFAULT_SOFTMAX_TS, against=None, applies=None):
    """Validate the grid, make sure there is an analysis, then yield ``(records, report, running)``
    after every finished setting (the Gradio handler turns each into figures).

    ``ts`` are the paper's rule's t values (−3…3), ``softmax_ts`` the softmax rule's (≥ 0); ``rules``
    picks which run (default: the paper's), ``against`` / ``applies`` its switches (each a grid dimension).
    """
    from acm.tune import TuneOptions, build_report, iter_tune

    base, fts = validate_selection(base, fts)
    grid = _grid(methods, alphas, ts, densities, drop_rates, plain, rules, softmax_ts, against, applies)
    options = TuneOptions(data=_eval_path(upload), limit=int(limit) if limit else None, holdout=float(holdout),
                          max_new_tokens=int(max_new_tokens), objective=objective, tolerance=float(tolerance),
                          device=none_if_auto(device), executor=ray_executor())
    options.validate()   # cheap checks before the analysis
    analysis, grid = _analysis_for(state, grid, base, fts, device=device, dtype=dtype,
                                   trust_remote_code=trust_remote_code, progress=progress)
    tune = _tune(state)
    tune["runs"] += 1
    out = state.subdir("tune") / f"run-{tune['runs']:02d}"
    tune.update(records=[], report=None, grid=grid, cancel=False, out=out, base=base, fts=fts)
    report = build_report([], grid, objective=objective, tolerance=float(tolerance))
    tune["report"] = report
    yield tune["records"], report, True
    for rec in iter_tune(base, fts, out, grid, replace(options, analysis=analysis), show_progress=False,
                         progress=progress, should_stop=lambda: tune.get("cancel", False)):
        if rec["kind"] == "report":
            report = {k: v for k, v in rec.items() if k != "kind"}
            tune["report"] = report
            break
        if rec["kind"] not in ("reference", "setting", "holdout"):
            continue
        tune["records"].append(rec)
        report = build_report(tune["records"], grid, objective=objective, tolerance=float(tolerance))
        tune["report"] = report
        yield tune["records"], report, True
    yield tune["records"], report, False


def use_setting(state: SessionState, key: str | None, *, device: str | None = "auto", dtype: str | None = "auto",
                trust_remote_code: bool = False, progress=None):
    """Merge the picked point (default: the recommended one) as the session's current merged model."""
    from acm.errors import InputError
    from acm.tune import Setting

    tune = _tune(state)
    report = tune.get("report") or {}
    key = key or (report.get("recommended") or {}).get("key")
    if not key:
        raise InputError("run a tune first, then pick a setting from the list")
    row = next((s for s in report.get("settings", []) if s["key"] == key), None)
    if row is None:
        raise InputError(f"setting {key!r} is not in the last tune's results; pick one from the list")
    s = Setting.from_dict(row["setting"])
    if s.needs_analysis and state.analysis is None:
        raise InputError(f"this setting needs an analysis: {plan.how_to_get(plan.ANALYSIS, markdown=False)}")
    base, fts = tune.get("base") or state.base, tune.get("fts") or state.fts
    return _run_merge(state, base, fts, s, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                      progress=progress), s


def merge_tab_values(setting: dict, controls: set[str]) -> dict[str, Any]:
    """The Merge tab's control values for a used setting, for the controls that tab has (``controls``):
    method, mode, α, density / drop rate, the rule and its t, and the paper's rule's switches."""
    from acm.tune import Setting
    from components.merge import ACM, PLAIN

    s = Setting.from_dict(setting)
    out: dict[str, Any] = {"method": s.method, "mode": ACM if s.acm else PLAIN, "alpha": s.alpha,
                           "density": s.density, "drop_rate": s.drop_rate}
    if s.acm:
        out.update(rule="fim" if s.rule == "fim" else "acm" if s.paper else "softmax", t=s.t)
    if s.paper:
        out.update(against=s.against, applies=s.applies, estimator=s.estimator)
    return {k: v for k, v in out.items() if k in controls and v is not None}


def _run_merge(state: SessionState, base, fts, s, **kw):
    """Any point through the Merge step's own ``run_merge``: plain, softmax (its metric) or the paper's rule
    with its switches (MI against a merge on the bundled calibration set, as the tune measured it)."""
    from components.calibration import resolve_calibration
    from components.merge import ACM, DEFAULT_DENSITY, PLAIN, run_merge

    rule = {"rule": "fim" if s.rule == "fim" else "acm" if s.paper else "softmax"} if s.acm else {}
    if s.paper:
        rule.update(against=s.against, applies=s.applies, estimator=s.estimator or "labels")
        if s.against == "merged":
            rule["calibration"] = resolve_calibration("bundled")
    return run_merge(state, base, fts, method=s.method, mode=ACM if s.acm else PLAIN, t=s.t,
                     alpha=1.0 if s.alpha is None else s.alpha,
                     density=s.density if s.density is not None else DEFAULT_DENSITY,
                     drop_rate=s.drop_rate if s.drop_rate is not None else 0.3,
                     metric=s.metric if s.acm and not s.paper and s.rule != "fim" else None, **rule, **kw)


# ----------------------------------------------------------------------------- UI


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(HELP, elem_classes=["step-help"])
    with gr.Row():
        methods = gr.CheckboxGroup(METHOD_CHOICES, value=DEFAULT_METHODS, label="Methods", scale=2)
        plain = gr.Checkbox(value=True, label="include the plain method (λ = α)", scale=1)
    with gr.Row():
        rules = gr.CheckboxGroup(RULE_CHOICES, value=DEFAULT_RULES, label="Coefficient rules", scale=2,
                                 elem_id="tune-rules")
        against = gr.CheckboxGroup(AGAINST_CHOICES, value=["fine-tuned"], label="ACM: MI against", scale=2,
                                   elem_id="tune-against")
        applies = gr.CheckboxGroup(APPLIES_CHOICES, value=["task-vectors"], label="ACM: λ applies to", scale=2,
                                   elem_id="tune-applies")
    with gr.Row():
        ts = gr.Textbox(DEFAULT_TS, label="t values (ACM, −3…3)",
                        info="comma-separated; the paper uses 0.7 (ablation 0.5–0.9)", elem_id="tune-ts")
        softmax_ts = gr.Textbox(DEFAULT_SOFTMAX_TS, label="t values (softmax, ≥ 0)", info="t = 0 equals plain",
                                elem_id="tune-softmax-ts")
        alphas = gr.Textbox("0.7", label="α values", info="plain, softmax and the merged-delta/-MI variants; "
                            "follows the Merge tab", elem_id="tune-alphas")
        densities = gr.Textbox("0.7", label="densities (TIES)", info="follows the Merge tab")
        drop_rates = gr.Textbox("0.3", label="drop rates (DARE)")
    with gr.Row():
        limit = gr.Slider(4, 300, value=DEFAULT_LIMIT, step=1, label="Problems (spread over levels)",
                          elem_id="tune-limit")
        holdout = gr.Slider(0.0, 0.8, value=DEFAULT_HOLDOUT, step=0.05, label="Held-out share",
                            info="the recommendation is re-measured on these")
        max_new = gr.Slider(16, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=16, label="Max new tokens",
                            elem_id="tune-max-new")
    with gr.Row():
        objective = gr.Dropdown(OBJECTIVE_CHOICES, value="shortest", label="Objective")
        tolerance = gr.Number(0.05, label="Tolerance vs fine-tuned accuracy (fraction)", minimum=0, maximum=1)
        upload = gr.File(label="Own problems (.jsonl, optional)", file_types=[".jsonl", ".json"], type="filepath")
    with gr.Row():
        run_btn = gr.Button("Run tune", variant="primary", scale=0, min_width=180, elem_id="tune-btn")
        cancel_btn = gr.Button("Cancel", variant="stop", scale=0, min_width=120, elem_id="tune-cancel")
    status = gr.Markdown("No tune yet.", elem_id="tune-status")
    scatter = gr.Plot(tune_figure([], None), show_label=False, elem_id="tune-scatter")
    recommendation = gr.Markdown("No tune yet.", elem_id="tune-recommendation")
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="Settings (tune split)", max_height=320,
                         elem_id="tune-table")
    with gr.Row(equal_height=True):
        pick = gr.Dropdown([], label="Setting to use (★ recommended)", scale=3, elem_id="tune-pick")
        use_btn = gr.Button("Use this setting", scale=0, min_width=180, elem_id="tune-use")
    use_status = gr.Markdown("", elem_id="tune-use-status")
    with gr.Accordion("Frontier report (JSON)", open=False):
        raw = gr.JSON()
    return SimpleNamespace(methods=methods, plain=plain, rules=rules, against=against, applies=applies, ts=ts,
                           softmax_ts=softmax_ts, alphas=alphas, densities=densities,
                           drop_rates=drop_rates, limit=limit, holdout=holdout, max_new=max_new, objective=objective,
                           tolerance=tolerance, upload=upload, run_btn=run_btn, cancel_btn=cancel_btn, status=status,
                           scatter=scatter, recommendation=recommendation, table=table, pick=pick, use_btn=use_btn,
                           use_status=use_status, raw=raw)


def _outputs(records, report, running, note: str = "") -> tuple:
    import gradio as gr
    import pandas as pd

    opts = choices(report)
    rec_key = ((report or {}).get("recommended") or {}).get("key")
    return (status_line(report, records, running=running, note=note), tune_figure(records, report),
            pd.DataFrame(table_rows(report), columns=TABLE_HEADERS), recommendation_markdown(report),
            gr.update(choices=opts, value=rec_key if rec_key else None), _jsonable(report))


def _jsonable(obj: Any):
    import json

    return json.loads(json.dumps(obj, default=str)) if obj is not None else None


def cancelled_outputs(state: SessionState) -> tuple:
    """The tab's outputs once a run was cancelled (its finished settings kept), for the Cancel button and
    for a last update of the running job that races with it."""
    tune_state = _tune(state)
    report = dict(tune_state.get("report") or {}, stopped="cancelled")
    if report.get("settings") is not None:
        tune_state["report"] = report
    return _outputs(tune_state["records"], report if report.get("settings") is not None else None, False)


def wire(ui) -> None:
    import gradio as gr

    u, m = ui.tune, ui.models
    g = getattr(ui, "merge", None)
    if g is not None:   # the grid follows the Merge tab's α / density (client-side, no round trip)
        g.alpha.change(None, g.alpha, u.alphas, js="(v) => String(v)", api_visibility="private", queue=False)
        g.density.change(None, g.density, u.densities, js="(v) => String(v)", api_visibility="private", queue=False)

    @gpu(duration=1800)
    def tune(state, base=None, fts=None, methods=None, alphas="0.7", ts=DEFAULT_TS, densities="0.7",
             drop_rates="0.3", plain=True, limit=DEFAULT_LIMIT, holdout=DEFAULT_HOLDOUT,
             max_new_tokens=DEFAULT_MAX_NEW_TOKENS, objective="shortest", tolerance=0.05, upload=None,
             device="auto", dtype="auto", trust=False, rules=None, softmax_ts=DEFAULT_SOFTMAX_TS, against=None,
             applies=None, progress=gr.Progress()):
        """Sweep the rule's t (and its switches, α, density, method): merge + evaluate each setting, stream the
        frontier, recommend one. Default: the paper's rule (acm) at t = −1, 0.5, 0.7, 0.9, plus plain."""
        progress(0.0, desc="preparing the grid")
        for records, report, running in iter_tune_ui(
                state, base, fts, methods=methods, alphas=alphas, ts=ts, densities=densities, drop_rates=drop_rates,
                plain=plain, limit=limit, holdout=holdout, max_new_tokens=max_new_tokens, objective=objective,
                tolerance=tolerance, upload=upload, device=device, dtype=dtype, trust_remote_code=trust,
                rules=rules, softmax_ts=softmax_ts, against=against, applies=applies,
                progress=progress_callback(progress)):
            if _tune(state).get("cancel"):      # Cancel was pressed: never show "running" again after it
                yield cancelled_outputs(state)
                return
            yield _outputs(records, report, running)

    outputs = [u.status, u.scatter, u.table, u.recommendation, u.pick, u.raw]
    event = u.run_btn.click(
        ui_errors(tune), [ui.state, m.base, m.fts, u.methods, u.alphas, u.ts, u.densities, u.drop_rates, u.plain,
                          u.limit, u.holdout, u.max_new, u.objective, u.tolerance, u.upload, m.device, m.dtype,
                          m.trust, u.rules, u.softmax_ts, u.against, u.applies],
        outputs, api_name="tune", concurrency_id="heavy", concurrency_limit=1, show_progress_on=[u.status])

    def cancel(state):
        """Stop the running tune between settings; finished settings are kept."""
        _tune(state)["cancel"] = True
        return cancelled_outputs(state)

    u.cancel_btn.click(cancel, ui.state, outputs, cancels=[event], api_name="tune_cancel", queue=False)

    @gpu(duration=600)
    def use(state, key=None, device="auto", dtype="auto", trust=False, progress=gr.Progress()):
        """Merge the picked tune setting (default: the recommended one) for Chat / Evaluate / Export."""
        from components.merge import summary_markdown

        progress(0.0, desc="merging the chosen setting")
        merged, s = use_setting(state, key, device=device, dtype=dtype, trust_remote_code=trust,
                                progress=progress_callback(progress))
        _tune(state)["used"] = s.to_dict()
        text = (f"✓ **{merged.label}** ({s.label()}) is now the merged model: try it in "
                f"{plan.links(['chat', 'evaluate', 'export'])}.")
        return text, summary_markdown(merged)

    merge_summary = g.summary if g is not None else gr.Markdown(visible=False)
    used = u.use_btn.click(ui_errors(use), [ui.state, u.pick, m.device, m.dtype, m.trust],
                           [u.use_status, merge_summary], api_name="tune_use", concurrency_id="heavy",
                           concurrency_limit=1, show_progress_on=[u.use_status])
    _wire_merge_tab_sync(used, ui)


def _merge_tab_controls(g) -> dict:
    """The Merge tab's controls a used setting sets, by name (those that exist)."""
    import gradio as gr

    r = getattr(g, "rule", None)
    found = {"method": getattr(g, "method", None), "mode": getattr(g, "mode", None),
             "rule": getattr(g, "rule_radio", None), "t": getattr(g, "t", None), "alpha": getattr(g, "alpha", None),
             "density": getattr(g, "density", None), "drop_rate": getattr(g, "drop_rate", None),
             "against": getattr(r, "against", None), "applies": getattr(r, "applies", None),
             "estimator": getattr(r, "estimator", None)}
    return {k: c for k, c in found.items() if isinstance(c, gr.components.Component)}


def _wire_merge_tab_sync(used, ui) -> None:
    """After "Use this setting": the Merge tab shows that setting. t goes last and, when the rule changed,
    after the Merge tab's own reset of t to the new rule's default (its rule radio's change event)."""
    import time

    import gradio as gr

    controls = _merge_tab_controls(getattr(ui, "merge", None))
    names = [n for n in controls if n != "t"]
    if not names:
        return

    def sync(state, current_rule=None):
        tune = _tune(state)
        values = merge_tab_values(tune.get("used") or {}, set(controls)) if tune.get("used") else {}
        tune["pending_t"] = (values.get("t"), values.get("rule") not in (None, current_rule))
        return tuple(gr.update(value=values[n]) if n in values else gr.update() for n in names)

    def sync_t(state):
        t, rule_changed = _tune(state).pop("pending_t", (None, False))
        if t is not None and rule_changed:
            time.sleep(0.5)        # let the rule radio's reset of t (a queue-less event) land first
        return gr.update() if t is None else gr.update(value=t)

    inputs = [ui.state] + ([controls["rule"]] if "rule" in controls else [])
    step = used.success(sync, inputs, [controls[n] for n in names], api_visibility="private", queue=False)
    if "t" in controls:
        step.then(sync_t, ui.state, controls["t"], api_visibility="private", queue=False)
