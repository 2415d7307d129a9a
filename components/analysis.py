"""Step 3 — Analyse: per-layer similarity (NMI by default; CKA, cosine on request; cached), and the
coefficient curve λₖ(t) redrawn live from the metric the user picks to drive λ.

``run_analysis`` is the only heavy call here (``acm.analysis.analyze``, all chosen metrics in one set of
passes); ``coefficient_view`` only reads the cached similarities and asks ``acm.coefficients`` for λ, so
moving t or α costs milliseconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from components import help as texts
from components import plots
from components.calibration import resolve_calibration
from components.common import gpu, log, none_if_auto, optional_float, progress_callback, ui_errors, unique_labels, uploaded_file, warn
from components.models import validate_selection
from components.state import SessionState, admit, reused_line, shared_cache

T_MAX = 40.0
# From the demo sweep (README "Demo results"); see components/merge.py.
DEFAULT_T = 1.0
DEFAULT_ALPHA = 0.7
T_GRID = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)   # the small-multiples view
DEFAULT_BINS = 64
DEFAULT_BATCH = 4
DEFAULT_SEED = 0
DEFAULT_METRICS = ("nmi",)


def metric_choices() -> list[tuple[str, str]]:
    """(label, key) of every registered similarity metric, for the checkbox group and the driver."""
    from acm.similarity import METRICS

    return [(spec.label, key) for key, spec in METRICS.items()]


def driver_metric(analysis, wanted: str | None) -> str:
    """The metric that drives λ: ``wanted`` when the analysis has it, else its first metric (NMI first)."""
    have = analysis.metrics() if analysis is not None else ["nmi"]
    return wanted if wanted in have else (have[0] if have else "nmi")


def _clip(clip_min, clip_max) -> tuple[float | None, float | None] | None:
    lo, hi = optional_float(clip_min), optional_float(clip_max)
    if lo is None and hi is None:
        return None
    if lo is not None and hi is not None and lo > hi:
        from acm.errors import InputError

        raise InputError(f"λ min ({lo:g}) is larger than λ max ({hi:g})")
    return (lo, hi)


def analysis_key(base: str, fts: list[str], calibration: dict, settings: dict) -> tuple:
    """What decides an analysis: models, calibration texts and every setting that changes NMI."""
    return (base, tuple(fts), calibration["identity"], tuple(sorted(settings.items())))


def run_analysis(state: SessionState, base: str | None, fts, *, trust_remote_code: bool = False,
                 device: str | None = "auto", dtype: str | None = "auto", cal_mode: str | None = None,
                 cal_upload: str | None = None, hub_id: str | None = None, split: str | None = None,
                 field: str | None = None, samples: int | None = 16, clusters: int = 4, fraction: float = 0.1,
                 max_tokens: int = 128, bins: int = DEFAULT_BINS, batch_size: int = DEFAULT_BATCH,
                 seed: int = DEFAULT_SEED, chat_template: bool = True, metrics=DEFAULT_METRICS,
                 progress: Callable[[float, str], None] | None = None) -> dict:
    """Analyse (or fetch from the session cache) and make it the session's current analysis.

    Returns ``{"analysis", "cached", "seconds", "calibration", "shared"}``; ``shared`` is None, or the
    shared-cache entry's ``{"hit", "waited", "age_s", "compute_s"}`` (another session's identical
    request — same model contents, calibration texts, settings and code — computed it already).
    """
    from acm.analysis import analyze
    from acm.similarity import parse_metrics

    base, fts = validate_selection(base, fts)
    metric_keys = parse_metrics(list(metrics or []) or None)
    cal = resolve_calibration(cal_mode, cal_upload, hub_id, split, field)
    samples = int(samples) if samples else None
    settings = dict(samples=samples, clusters=int(clusters), fraction=float(fraction), max_tokens=int(max_tokens),
                    bins=int(bins), batch_size=int(batch_size), seed=int(seed), chat_template=bool(chat_template),
                    device=none_if_auto(device), dtype=none_if_auto(dtype), trust=bool(trust_remote_code))
    if metric_keys != ["nmi"]:            # NMI-only keeps the cache keys it always had
        settings["metrics"] = ",".join(metric_keys)
    key = analysis_key(base, fts, cal, settings)
    with state.lock:
        cached = state.analysis_cache.get(key)
    if cached is not None:
        if progress:
            progress(1.0, "cached analysis")
        state.analysis, state.analysis_key = cached, key
        state.base, state.fts = base, fts
        return {"analysis": cached, "cached": True, "seconds": 0.0, "calibration": cal, "shared": None}
    t0 = time.perf_counter()

    def compute():
        return analyze(base, fts, cal["source"], field=cal["field"], split=cal["split"], samples=samples,
                       clusters=settings["clusters"], fraction=settings["fraction"],
                       max_tokens=settings["max_tokens"], bins=settings["bins"], batch_size=settings["batch_size"],
                       seed=settings["seed"], device=settings["device"], dtype=settings["dtype"],
                       chat_template=settings["chat_template"], trust_remote_code=settings["trust"],
                       metrics=metric_keys, progress=progress, show_progress=False)

    result, shared = shared_analysis(base, fts, cal, settings, compute)
    seconds = time.perf_counter() - t0
    with state.lock:
        state.analysis_cache[key] = result
        state.analysis, state.analysis_key, state.analysis_seconds = result, key, seconds
        state.base, state.fts = base, fts
    return {"analysis": result, "cached": bool(shared and shared["hit"]), "seconds": seconds, "calibration": cal,
            "shared": shared}


def shared_analysis_key(store, base: str, fts: list[str], cal: dict, settings: dict) -> str | None:
    """The shared-cache key of an analysis: model contents (folder hashes / Hub commits), the
    calibration texts' hash, every setting, the device kind and the code version. None when a model
    has no content identity (a Hub id offline and not cached): then nothing is shared."""
    from acm.cache import calibration_identity, make_key, model_identity

    ids = [model_identity(spec, hasher=store.hasher) for spec in [base, *fts]]
    if any(i is None for i in ids):
        return None
    texts = calibration_identity(cal["source"], field=cal["field"], split=cal["split"])
    import torch

    device = settings["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return make_key("analysis", {"base": [base, ids[0]], "fts": [[f, i] for f, i in zip(fts, ids[1:])],
                                 "calibration": {"texts": texts, "field": cal["field"], "split": cal["split"]},
                                 "settings": settings, "device": device})


def shared_analysis(base: str, fts: list[str], cal: dict, settings: dict, compute: Callable[[], object]):
    """(AnalysisResult, shared-cache info or None): from the shared cache, or computed once for all.

    A reused result names this session's own calibration source in its provenance (the texts are
    the same; the file name another visitor uploaded them under is not shown).
    """
    from acm.analysis import AnalysisResult
    from acm.calibration import describe_source

    store = shared_cache()
    key = shared_analysis_key(store, base, fts, cal, settings) if store is not None else None
    if key is None:
        return compute(), None
    made = {}

    def build(folder: Path) -> dict:
        made["started"] = True
        made["result"] = compute()
        made["result"].save(folder / "analysis.json")
        return {"what": "analysis", "base": base, "fts": fts}

    try:
        with store.get_or_create("analysis", key, build) as entry:
            result = made.get("result") or AnalysisResult.load(entry.path / "analysis.json")
            info = {"hit": entry.hit, "waited": entry.waited, "age_s": entry.age_s, "compute_s": entry.compute_s,
                    "key": key}
    except OSError as exc:
        # The cache only saves work: a full or broken cache disk must not cost the visitor their result.
        if "result" in made:
            log.warning("could not store the analysis in the shared cache: %s", exc)
            return made["result"], None
        if made.get("started"):
            raise                                   # the analysis itself failed
        log.warning("shared cache unavailable (%s); analysing without it", exc)
        return compute(), None
    if entry.hit:
        cal_prov = result.provenance.get("calibration")
        if isinstance(cal_prov, dict):
            cal_prov["source"] = describe_source(cal["source"])
    return result, info


def load_analysis_file(state: SessionState, path: str | None):
    """Make an uploaded analysis JSON the current analysis (skips the forward passes)."""
    from acm.analysis import AnalysisResult
    from acm.errors import InputError

    if not path:
        raise InputError("no analysis file given")
    path = str(uploaded_file(path, "analysis file"))      # only Gradio's upload area, never other paths
    try:
        result = AnalysisResult.load(path)
    except InputError:
        raise
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise InputError(f"{Path(path).name} is not an ACM analysis JSON ({type(exc).__name__}: {exc})") from None
    with state.lock:
        state.analysis, state.analysis_key = result, ("uploaded", str(path))
    return result


def save_analysis(state: SessionState) -> str | None:
    """Write the current analysis as JSON in the session workspace; returns its path."""
    if state.analysis is None:
        return None
    path = state.subdir("exports") / "acm_analysis.json"
    state.analysis.save(path)
    return str(path)


# ----------------------------------------------------------------------------- views


def model_labels(analysis) -> list[str]:
    return unique_labels([m.model for m in analysis.models])


def nmi_view(analysis, driver: str | None = None):
    """The per-layer similarity chart: the classic NMI chart for an NMI-only analysis, else every
    metric side by side on one [0, 1] axis with the λ driver emphasised."""
    from acm.similarity import metric_label

    labels = model_labels(analysis)
    keys = analysis.metrics()
    if keys == ["nmi"]:
        return plots.nmi_figure(analysis.groups, [(lab, m.nmi) for lab, m in zip(labels, analysis.models)])
    series = [{"label": lab, "metric": k, "metric_label": "NMI" if k == "nmi" else metric_label(k),
               "values": m.values(k)} for lab, m in zip(labels, analysis.models) for k in keys]
    return plots.similarity_figure(analysis.groups, series, driver=driver_metric(analysis, driver))


def coefficient_view(state: SessionState, t: float, alpha: float, clip_min=None, clip_max=None, *,
                     multi: bool = True, metric: str | None = None):
    """(λ curve figure, several-t figure, coefficient table dict) for the current analysis.

    No model work: the similarities are cached, λ comes from ``acm.coefficients``. Safe to call on
    every slider move; without an analysis it returns placeholders. ``metric``: which similarity
    drives λ (``None`` = the last choice; falls back to the analysis' first metric).
    """
    from acm.coefficients import coefficient_table, lambdas
    from acm.similarity import metric_label

    t, alpha = float(t or 0.0), float(DEFAULT_ALPHA if alpha is None else alpha)
    clip = _clip(clip_min, clip_max)
    analysis = state.analysis
    metric = driver_metric(analysis, metric or (state.coef_view or {}).get("metric"))
    state.coef_view = {"t": t, "alpha": alpha, "clip": clip, "metric": metric}
    if analysis is None:
        hint = "Run “Analyse” (or upload an analysis JSON) to see the coefficients"
        return plots.empty_figure(hint), plots.empty_figure(hint), {}
    label = "NMI" if metric == "nmi" else metric_label(metric)
    table = coefficient_table(analysis, t, alpha, clip=clip, metric=metric)
    labels = model_labels(analysis)
    series = [{"label": lab, "nmi": [g["similarity"] for g in m["groups"]],
               "lambdas": [g["lambda"] for g in m["groups"]]} for lab, m in zip(labels, table["models"])]
    coef_fig = plots.coefficient_figure(analysis.groups, series, t=t, alpha=alpha, clip=clip, metric_label=label)
    state.figures["coefficients"] = coef_fig
    if not multi:
        return coef_fig, None, table
    sim = analysis.similarity_matrix(metric)
    grid = lambdas(sim, list(T_GRID), alpha=alpha, clip=clip)   # [len(T), n_models, K]
    per_model = [{"label": lab, "nmi": list(sim[i]), "grid": [grid[j][i] for j in range(len(T_GRID))]}
                 for i, lab in enumerate(labels)]
    multi_fig = plots.multi_t_figure(analysis.groups, per_model, list(T_GRID), alpha=alpha, metric_label=label)
    state.figures["coefficients_multi_t"] = multi_fig
    return coef_fig, multi_fig, table


def summary_markdown(analysis, *, cached: bool = False, seconds: float | None = None,
                     calibration_label: str | None = None, shared: dict | None = None) -> str:
    prov = getattr(analysis, "provenance", {}) or {}
    cal = prov.get("calibration") or {}
    n = cal.get("size") or cal.get("samples") or cal.get("n")
    tokens = cal.get("tokens")
    if shared and shared.get("hit"):
        how = "— " + reused_line(shared["age_s"], shared.get("compute_s"))
    elif cached:
        how = "from the session cache (no model work)"
    else:
        how = f"in {seconds:.1f} s" if seconds else ""
    parts = [f"**Analysis ready** {how}".strip()]
    src = calibration_label or cal.get("source")
    if src:
        parts.append(f"calibration: {src}" + (f", {n} samples" if n else "") + (f", {tokens} tokens" if tokens else ""))
    parts.append(f"{len(analysis.groups)} layer groups")
    lines = [" · ".join(parts), ""]
    from acm.similarity import metric_label

    for lab, m in zip(model_labels(analysis), analysis.models):
        for key in m.metrics():
            vals = list(m.values(key))
            name = "NMI" if key == "nmi" else metric_label(key)
            lo = min(range(len(vals)), key=vals.__getitem__)
            hi = max(range(len(vals)), key=vals.__getitem__)
            lines.append(f"- `{lab}`: mean {name} {sum(vals) / len(vals):.3f}; most changed "
                         f"**{analysis.groups[lo]}** ({vals[lo]:.3f}), least changed **{analysis.groups[hi]}** "
                         f"({vals[hi]:.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- UI


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.ANALYSIS, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        analyse_btn = gr.Button("Analyse", variant="primary", scale=0, min_width=180, elem_id="analyse-btn")
        summary = gr.Markdown("Not analysed yet. With the defaults this takes a few seconds.",
                              elem_id="analysis-summary")
    metrics = gr.CheckboxGroup(choices=metric_choices(), value=list(DEFAULT_METRICS), label="Similarity metrics",
                               info="computed together in one analysis; NMI is the paper's measure",
                               elem_id="metrics-select")
    with gr.Accordion("Advanced analysis settings", open=False):
        with gr.Row():
            bins = gr.Slider(8, 256, value=DEFAULT_BINS, step=8, label="Histogram bins (B)")
            batch_size = gr.Slider(1, 64, value=DEFAULT_BATCH, step=1, label="Batch size")
            seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed")
            chat_template = gr.Checkbox(value=True, label="Apply chat template to calibration text")
    nmi_plot = gr.Plot(plots.empty_figure("Per-layer NMI appears here after “Analyse”"), label="Per-layer NMI",
                       show_label=False,
                       elem_id="nmi-plot")
    with gr.Group(elem_classes=["coef-controls"]):
        with gr.Row(equal_height=True):
            t = gr.Slider(0, T_MAX, value=DEFAULT_T, step=0.5, label="Sharpness t", elem_id="t-slider",
                          info="0 = plain method; larger = more contrast between layers", scale=3)
            alpha = gr.Slider(0.0, 2.0, value=DEFAULT_ALPHA, step=0.05, label="α (mean coefficient)",
                              elem_id="alpha-slider", scale=2)
            clip_min = gr.Textbox(value="", label="λ min", placeholder="none", scale=1, min_width=90,
                                  info="optional clip")
            clip_max = gr.Textbox(value="", label="λ max", placeholder="none", scale=1, min_width=90,
                                  info="optional clip")
            # Every registered metric at first, so an API call can ask for /analyse(metrics=[…, "cka"],
            # driver="cka") in one go; after an analysis the choices narrow to what it computed.
            driver = gr.Radio(choices=metric_choices(), value="nmi", label="λ driven by", scale=2,
                              elem_id="driver-select", info="which similarity sₖ sets λₖ")
    coef_plot = gr.Plot(plots.empty_figure("The coefficient curve λₖ(t) appears here"), label="Coefficients",
                        show_label=False,
                        elem_id="coef-plot")
    multi_plot = gr.Plot(plots.empty_figure("Several t at once"), label="Several t at once", show_label=False,
                         elem_id="multi-plot")
    with gr.Accordion("λ table (JSON)", open=False):
        table = gr.JSON(label="coefficient table")
    with gr.Row():
        download = gr.DownloadButton("Download analysis JSON", value=None, variant="secondary")
        upload = gr.UploadButton("Upload analysis JSON (skip analysis)", file_types=[".json"], variant="secondary")
    return SimpleNamespace(analyse_btn=analyse_btn, summary=summary, metrics=metrics, driver=driver,
                           bins=bins, batch_size=batch_size, seed=seed,
                           chat_template=chat_template, nmi_plot=nmi_plot, t=t, alpha=alpha, clip_min=clip_min,
                           clip_max=clip_max, coef_plot=coef_plot, multi_plot=multi_plot, table=table,
                           download=download, upload=upload)


def wire(ui) -> None:
    import gradio as gr

    a, m, c = ui.analysis, ui.models, ui.calibration
    coef_inputs = [ui.state, a.t, a.alpha, a.clip_min, a.clip_max, a.driver]
    outputs = [a.summary, a.nmi_plot, a.coef_plot, a.multi_plot, a.table, a.download]

    @gpu(duration=300)
    def analyse(state, base=None, fts=None, trust=False, device="auto", dtype="auto", cal_mode=None, cal_upload=None,
                hub_id=None, split=None, field=None, samples=None, clusters=4, fraction=0.1, max_tokens=128,
                bins=DEFAULT_BINS, batch_size=DEFAULT_BATCH, seed=DEFAULT_SEED, chat_template=True, t=DEFAULT_T,
                alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metrics=DEFAULT_METRICS, driver=None,
                progress=gr.Progress()):
        """Per-layer similarity (NMI by default; the chosen metrics) between the base and each fine-tuned
        model (cached per models + calibration + settings), then the coefficient curve at (t, α)."""
        progress(0.0, desc="loading models")
        out = run_analysis(state, base, fts, trust_remote_code=trust, device=device, dtype=dtype, cal_mode=cal_mode,
                           cal_upload=cal_upload, hub_id=hub_id, split=split, field=field, samples=samples,
                           clusters=clusters, fraction=fraction, max_tokens=max_tokens, bins=bins,
                           batch_size=batch_size, seed=seed, chat_template=chat_template, metrics=metrics,
                           progress=progress_callback(progress))
        res = out["analysis"]
        coef_fig, multi_fig, table = coefficient_view(state, t, alpha, clip_min, clip_max, metric=driver)
        nmi_fig = nmi_view(res, state.coef_view["metric"])
        state.figures["nmi"] = nmi_fig
        md = summary_markdown(res, cached=out["cached"], seconds=out["seconds"],
                              calibration_label=out["calibration"]["label"], shared=out.get("shared"))
        return md, nmi_fig, coef_fig, multi_fig, table, save_analysis(state)

    def admit_analysis():
        admit(ui.demo, "the analysis")

    # A light check first (no queue): a full queue is refused with when to retry, and a visitor
    # behind others is told where they stand; then the heavy job, whose queue position and ETA
    # Gradio shows on the summary and the NMI plot.
    analyse_event = a.analyse_btn.click(
        admit_analysis, None, None, queue=False, api_visibility="private", show_progress="hidden").success(
        ui_errors(analyse),
        [ui.state, m.base, m.fts, m.trust, m.device, m.dtype, c.mode, c.upload, c.hub_id, c.split, c.field,
         c.samples, c.clusters, c.fraction, c.max_tokens, a.bins, a.batch_size, a.seed, a.chat_template,
         a.t, a.alpha, a.clip_min, a.clip_max, a.metrics, a.driver],
        outputs, api_name="analyse", concurrency_id="heavy", concurrency_limit=1, show_progress_on=[a.summary, a.nmi_plot])

    def coefficients(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None):
        """λₖ(t) per layer group and fine-tuned model from the cached similarity (no model work; ``metric``
        drives λ, default NMI): the curve at t, the several-t view and the coefficient table."""
        return coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric)

    # α and clipping change every view; t only the curve and the table (the several-t view does
    # not depend on t), so a slider move re-renders one chart.
    gr.on([a.alpha.change, a.clip_min.submit, a.clip_max.submit, a.clip_min.blur, a.clip_max.blur],
          ui_errors(coefficients), coef_inputs, [a.coef_plot, a.multi_plot, a.table], api_name="coefficients",
          queue=False, show_progress="hidden", trigger_mode="always_last")

    def curve(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None):
        coef_fig, _, table = coefficient_view(state, t, alpha, clip_min, clip_max, multi=False, metric=metric)
        return coef_fig

    a.t.change(ui_errors(curve), coef_inputs, [a.coef_plot], api_visibility="undocumented", queue=False,
               show_progress="hidden", trigger_mode="always_last")

    def table_at(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None):
        return coefficient_view(state, t, alpha, clip_min, clip_max, multi=False, metric=metric)[2]

    # The λ table follows when the slider is released (re-rendering it on every step is what costs).
    a.t.release(ui_errors(table_at), coef_inputs, [a.table], api_visibility="private", queue=False,
                show_progress="hidden", trigger_mode="always_last")

    def upload_analysis(state, path=None, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None,
                        metric=None):
        """Use an analysis JSON saved earlier instead of running the models."""
        res = load_analysis_file(state, path)
        coef_fig, multi_fig, table = coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric)
        nmi_fig = nmi_view(res, state.coef_view["metric"])
        state.figures["nmi"] = nmi_fig
        md = summary_markdown(res, calibration_label=None) + "\n\n_Loaded from an uploaded file._"
        if state.base and list(getattr(m, "model", None) for m in res.models) != state.fts:
            warn("the uploaded analysis was made for other models than the ones selected; "
                 "merging uses it for the selected models")
        return md, nmi_fig, coef_fig, multi_fig, table, save_analysis(state)

    upload_event = a.upload.upload(ui_errors(upload_analysis),
                                   [ui.state, a.upload, a.t, a.alpha, a.clip_min, a.clip_max, a.driver], outputs,
                    api_name="upload_analysis")

    def driver_choices(state):
        """The "λ driven by" choices follow the metrics of the current analysis."""
        from acm.similarity import metric_label

        have = state.analysis.metrics() if state.analysis is not None else ["nmi"]
        value = driver_metric(state.analysis, (state.coef_view or {}).get("metric"))
        return gr.update(choices=[("NMI" if k == "nmi" else metric_label(k), k) for k in have], value=value)

    for event in (analyse_event, upload_event):
        event.success(driver_choices, [ui.state], [a.driver], queue=False, api_visibility="private",
                      show_progress="hidden")

    def switch_driver(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None):
        coef_fig, multi_fig, table = coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric)
        if state.analysis is None:
            return plots.empty_figure("Per-layer NMI appears here after “Analyse”"), coef_fig, multi_fig, table
        nmi_fig = nmi_view(state.analysis, state.coef_view["metric"])
        state.figures["nmi"] = nmi_fig
        return nmi_fig, coef_fig, multi_fig, table

    a.driver.input(ui_errors(switch_driver), coef_inputs, [a.nmi_plot, a.coef_plot, a.multi_plot, a.table],
                   api_name="lambda_driver", queue=False, show_progress="hidden", trigger_mode="always_last")
    ui.analysis_events = [analyse_event, upload_event]
