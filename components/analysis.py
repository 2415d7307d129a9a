"""Step 3 — Analyse: per-layer per-sample MI (the paper's rule, the default) and similarity (NMI by
default; CKA, cosine on request) in one cached analysis, and the coefficient curve λₖ(t) redrawn live.

``run_analysis`` is the only heavy call here (``acm.activations.analysis.analyze``: the per-sample MI and all chosen
metrics in one set of passes); ``coefficient_view`` only reads the cached values and asks
``acm.rules.coefficients`` for λ, so moving t or α costs milliseconds. The λ curve carries λ on the whole t grid
(``acm.rules.coefficients.acm_curve`` / ``lambdas``), and the page redraws it itself on a slider move
(``LIVE_JS``): no server round trip per step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from acm.rules import ABLATION_TS, DEFAULT_RULE, PAPER_T, T_RANGE
from components import help as texts
from components import plots
from components.calibration import resolve_calibration
from components.common import (
    gpu,
    log,
    none_if_auto,
    optional_float,
    progress_callback,
    safe_filename,
    t_slider,
    ui_errors,
    unique_labels,
    uploaded_file,
    warn,
)
from components.models import validate_selection
from components.state import (
    SessionState,
    SharedMemo,
    light_first,
    reused_line,
    same_request_key,
    serve_light,
    shared_cache,
)

# The rule the app opens on: the paper's (acm.rules.ACM) at t = 0.7, t ∈ [−3, 3] in steps of 0.05.
RULE_CHOICES = [("ACM — the paper's rule (Eq. 2–3)", "acm"),
                ("softmax over similarity — this project's alternative rule", "softmax"),
                ("FIM — data-free Fisher rule (a reading of arXiv 2603.21705)", "fim")]
FIM_T_STEP = 0.1
FIM_T_GRID = (0.0, 0.5, 1.0, 2.0, 4.0)        # the fim rule's several-t view (t = 1 is its default)
DEFAULT_T = PAPER_T
ACM_T_STEP = 0.05
ACM_T_GRID = tuple(ABLATION_TS)               # the several-t view: the paper's ablation (its Figure 4)
# The softmax rule (ours) keeps its own t range, default and several-t grid (docs/demo_results.md).
T_MAX = 40.0
SOFTMAX_T = 1.0
SOFTMAX_T_STEP = 0.5
DEFAULT_ALPHA = 0.7
T_GRID = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)   # the softmax rule's small-multiples view
DEFAULT_BINS = 64
DEFAULT_BATCH = 4
DEFAULT_SEED = 0
DEFAULT_METRICS = ("nmi",)
NO_ANALYSIS = "Run “Analyse” (or upload an analysis JSON) to see the coefficients"

# The page's own redraw of the λ curve on a t-slider move: pick λ at t from the grid the figure carries
# (``plots.attach_live``) and hand Gradio the new figure. Timings land in ``window.__acmRedraw``.
LIVE_JS = """(t) => {
  const start = performance.now();
  const gd = document.querySelector('#coef-plot .js-plotly-plot');
  const live = gd && gd.layout && gd.layout.meta && gd.layout.meta.live;
  if (!live || !window.Plotly) return [];
  const n = live.lambdas.length;
  const i = Math.max(0, Math.min(n - 1, Math.round((Number(t) - live.t0) / live.step)));
  const shown = String(Number((live.t0 + i * live.step).toFixed(4)));
  window.Plotly.update(gd, {y: live.traces.map((k, m) => live.lambdas[i][m]),
                            name: live.names.map(name => name.replace('{t}', shown))},
                       {'title.text': live.title.replace('{t}', shown)}, live.traces);
  window.__acmRedraw = {t: shown, start: start, drawn: performance.now()};
  return [];
}"""


def rule_key(rule: str | None) -> str:
    """``acm`` / ``softmax`` from a radio value or an API caller's name (``sigmoid``, ``paper`` → acm)."""
    from acm.rules import get_rule

    return get_rule(rule or DEFAULT_RULE).key


def rule_t(rule: str, t) -> float:
    """t checked against the rule's range; an acm t outside [−3, 3] says how to ask for softmax."""
    from acm.errors import InputError
    from acm.rules import check_t

    try:
        return check_t(rule, t)
    except InputError as exc:
        if rule == "acm":
            raise InputError(f"{exc} (the paper's rule; 0.7 in the paper) — for this project's softmax rule "
                             "pass rule='softmax'") from None
        raise


def t_slider_settings(rule: str) -> dict:
    """Range, step, default value, label and help of the t slider for ``rule``."""
    if rule_key(rule) == "acm":
        return dict(minimum=T_RANGE[0], maximum=T_RANGE[1], step=ACM_T_STEP, value=DEFAULT_T,
                    label="t (the paper's rule)",
                    info="0.7 in the paper; t > 0: λ in [½, 1), more where MI is below the samples' maximum")
    if rule_key(rule) == "fim":
        from acm.rules.fim import DEFAULT_SHARPNESS, FIM_T_RANGE

        return dict(minimum=FIM_T_RANGE[0], maximum=FIM_T_RANGE[1], step=FIM_T_STEP, value=DEFAULT_SHARPNESS,
                    label="t (fim sigmoid sharpness)",
                    info="1 = default (one std of the log score → α ≈ 0.27 / 0.73); 0 = α ½ everywhere")
    return dict(minimum=0.0, maximum=T_MAX, step=SOFTMAX_T_STEP, value=SOFTMAX_T, label="Sharpness t (softmax)",
                info="0 = plain method; larger = more contrast between layers")


def metric_choices() -> list[tuple[str, str]]:
    """(label, key) of every registered similarity metric, for the checkbox group and the driver."""
    from acm.activations.similarity import METRICS

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
                 progress: Callable[[float, str], None] | None = None, compute: bool = True) -> dict | None:
    """Analyse (or fetch from the session cache) and make it the session's current analysis.

    Returns ``{"analysis", "cached", "seconds", "calibration", "shared"}``; ``shared`` is None, or the
    shared-cache entry's ``{"hit", "waited", "age_s", "compute_s"}`` (another session's identical
    request — same model contents, calibration texts, settings and code — computed it already).
    ``compute=False``: only what the session or the shared cache already holds (no model work);
    None when neither has it — the light path's question before it hands over to the heavy slot.
    """
    base, fts, metric_keys, cal, settings, key = _prepare(
        base, fts, trust_remote_code=trust_remote_code, device=device, dtype=dtype, cal_mode=cal_mode,
        cal_upload=cal_upload, hub_id=hub_id, split=split, field=field, samples=samples, clusters=clusters,
        fraction=fraction, max_tokens=max_tokens, bins=bins, batch_size=batch_size, seed=seed,
        chat_template=chat_template, metrics=metrics)
    with state.lock:
        cached = state.analysis_cache.get(key)
    if cached is not None:
        if progress:
            progress(1.0, "cached analysis")
        state.analysis, state.analysis_key = cached, key
        state.base, state.fts = base, fts
        return {"analysis": cached, "cached": True, "seconds": 0.0, "calibration": cal, "shared": None}
    t0 = time.perf_counter()
    if not compute:
        found = cached_analysis(base, fts, cal, settings)
        if found is None:
            return None
        result, shared = found
    else:
        result, shared = shared_analysis(base, fts, cal, settings, _analysis_job(base, fts, cal, settings,
                                                                                 metric_keys, progress))
    seconds = time.perf_counter() - t0
    with state.lock:
        state.analysis_cache[key] = result
        state.analysis, state.analysis_key, state.analysis_seconds = result, key, seconds
        state.base, state.fts = base, fts
    return {"analysis": result, "cached": bool(shared and shared["hit"]), "seconds": seconds, "calibration": cal,
            "shared": shared}


def _prepare(base: str | None, fts, *, trust_remote_code: bool, device: str | None, dtype: str | None,
             cal_mode: str | None, cal_upload: str | None, hub_id: str | None, split: str | None, field: str | None,
             samples: int | None, clusters: int, fraction: float, max_tokens: int, bins: int, batch_size: int,
             seed: int, chat_template: bool, metrics) -> tuple:
    """(base, fts, metric keys, calibration, settings, session key) of a request, checked."""
    from acm.activations.similarity import parse_metrics

    base, fts = validate_selection(base, fts)
    metric_keys = parse_metrics(list(metrics or []) or None)
    cal = resolve_calibration(cal_mode, cal_upload, hub_id, split, field)
    samples = int(samples) if samples else None
    settings = dict(samples=samples, clusters=int(clusters), fraction=float(fraction), max_tokens=int(max_tokens),
                    bins=int(bins), batch_size=int(batch_size), seed=int(seed), chat_template=bool(chat_template),
                    device=none_if_auto(device), dtype=none_if_auto(dtype), trust=bool(trust_remote_code))
    if metric_keys != ["nmi"]:            # NMI-only keeps the cache keys it always had
        settings["metrics"] = ",".join(metric_keys)
    return base, fts, metric_keys, cal, settings, analysis_key(base, fts, cal, settings)


def analysis_available(state: SessionState, base: str | None, fts, *, progress=None, **request) -> bool:
    """Whether the session or the shared cache holds this analysis, or this process is computing it now
    (then a light event waits for that one computation). No waiting, no model work, the session unchanged:
    the page's check before it picks the light or the heavy event."""
    base, fts, _, cal, settings, key = _prepare(base, fts, **request)
    with state.lock:
        if key in state.analysis_cache:
            return True
    store = shared_cache()
    shared_key = shared_analysis_key(store, base, fts, cal, settings) if store is not None else None
    if shared_key is None:
        return False
    try:
        return store.has("analysis", shared_key) or store.in_flight(shared_key)
    except OSError:
        return False


def _analysis_job(base: str, fts: list[str], cal: dict, settings: dict, metric_keys: list[str],
                  progress: Callable[[float, str], None] | None) -> Callable[[], object]:
    """The model work of one analysis, as a call (run by ``shared_analysis`` once for everyone)."""
    from acm.activations.analysis import analyze

    def compute():
        return analyze(base, fts, cal["source"], field=cal["field"], split=cal["split"], samples=settings["samples"],
                       clusters=settings["clusters"], fraction=settings["fraction"],
                       max_tokens=settings["max_tokens"], bins=settings["bins"], batch_size=settings["batch_size"],
                       seed=settings["seed"], device=settings["device"], dtype=settings["dtype"],
                       chat_template=settings["chat_template"], trust_remote_code=settings["trust"],
                       metrics=metric_keys, progress=progress, show_progress=False)

    return compute


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


def cached_analysis(base: str, fts: list[str], cal: dict, settings: dict):
    """(AnalysisResult, shared-cache info) when the shared cache already holds this analysis, else None.

    No model work: a light event answers a hit with it, and hands a miss over to the heavy slot. An
    entry this process is computing right now is waited for (single flight) and then read.
    """
    store = shared_cache()
    key = shared_analysis_key(store, base, fts, cal, settings) if store is not None else None
    if key is None:
        return None
    try:
        entry = store.lookup("analysis", key)
        if entry is None and store.wait_in_flight(key):     # another request is computing it: wait, then read
            entry = store.lookup("analysis", key)
    except OSError as exc:
        log.warning("shared cache unavailable (%s)", exc)
        return None
    if entry is None:
        return None
    store.record_hit()
    with entry:
        result = _load_entry(entry)
        info = {"hit": True, "waited": False, "age_s": entry.age_s, "compute_s": entry.compute_s, "key": key}
    setattr(result, SHARED_KEY_ATTR, key)
    return _as_reused(result, cal), info


def _load_entry(entry):
    from acm.activations.result import AnalysisResult

    result = AnalysisResult.load(entry.path / "analysis.json")
    if result.calibration is None:
        result.calibration = _read_calibration(entry.path / CALIBRATION_FILE)
    return result


def _as_reused(result, cal: dict):
    """A reused result names this session's own calibration source (the texts are the same; the file
    name another visitor uploaded them under is not shown)."""
    from acm.activations.calibration import describe_source

    cal_prov = result.provenance.get("calibration")
    if isinstance(cal_prov, dict):
        cal_prov["source"] = describe_source(cal["source"])
    return result


def shared_analysis(base: str, fts: list[str], cal: dict, settings: dict, compute: Callable[[], object]):
    """(AnalysisResult, shared-cache info or None): from the shared cache, or computed once for all.

    A reused result names this session's own calibration source in its provenance (the texts are
    the same; the file name another visitor uploaded them under is not shown).
    """
    store = shared_cache()
    key = shared_analysis_key(store, base, fts, cal, settings) if store is not None else None
    if key is None:
        return compute(), None
    made = {}

    def build(folder: Path) -> dict:
        made["started"] = True
        made["result"] = compute()
        made["result"].save(folder / "analysis.json")
        if made["result"].calibration is not None:        # the token download works for a reused result too
            made["result"].save_calibration(folder / CALIBRATION_FILE)
        return {"what": "analysis", "base": base, "fts": fts}

    try:
        with store.get_or_create("analysis", key, build) as entry:
            result = made.get("result") or _load_entry(entry)
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
    setattr(result, SHARED_KEY_ATTR, key)
    return (_as_reused(result, cal) if entry.hit else result), info


CALIBRATION_FILE = "calibration.jsonl"


def _read_calibration(path: Path) -> list[tuple[list[int], str]] | None:
    """The token sequences a cached analysis was computed on (``save_calibration``'s JSON lines), if kept."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [(list(d["input_ids"]), d.get("text", "")) for d in map(json.loads, filter(str.strip, lines))]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_analysis_file(state: SessionState, path: str | None):
    """Make an uploaded analysis JSON the current analysis (skips the forward passes)."""
    from acm.activations.result import AnalysisResult
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
    from acm.activations.similarity import metric_label

    labels = model_labels(analysis)
    keys = analysis.metrics()
    if keys == ["nmi"]:
        return plots.nmi_figure(analysis.groups, [(lab, m.nmi) for lab, m in zip(labels, analysis.models)])
    series = [{"label": lab, "metric": k, "metric_label": "NMI" if k == "nmi" else metric_label(k),
               "values": m.values(k)} for lab, m in zip(labels, analysis.models) for k in keys]
    return plots.similarity_figure(analysis.groups, series, driver=driver_metric(analysis, driver))


def old_file_line(analysis) -> str | None:
    """The library's one line (what is missing, how to re-run) when the analysis has no per-sample MI."""
    from acm.errors import InputError

    try:
        analysis.sample_mi_matrix()
    except InputError as exc:
        return str(exc)
    return None


def sample_mi_view(analysis):
    """Per-sample MI per activation point (mean, std, min–max over samples) for each fine-tuned model."""
    line = old_file_line(analysis)
    if line:
        return plots.empty_figure(line)
    info = analysis.sample_info
    mi = analysis.sample_mi_matrix()                                   # [models, points, samples]
    series = [{"label": lab, "mean": m.mean(axis=-1), "std": m.std(axis=-1), "min": m.min(axis=-1),
               "max": m.max(axis=-1), "n": m.shape[-1]} for lab, m in zip(model_labels(analysis), mi)]
    return plots.sample_mi_figure(info.get("point_groups") or [], info.get("points") or [], series,
                                  estimator=info.get("estimator"))


def layer_view(analysis, rule: str | None = None, driver: str | None = None):
    """The top chart of the tab: per-sample MI under the paper's rule, the similarity under softmax."""
    return sample_mi_view(analysis) if rule_key(rule) == "acm" else nmi_view(analysis, driver)


def mi_token_correlation(analysis) -> list[dict]:
    """Pearson r of per-sample MI with log(real tokens), per fine-tuned model and activation point.

    Why: discrete MI of continuous values grows with the number of distinct values (≈ log n when most are
    unique), so it may track sequence length more than dependence (issue 19, item 4). ``r`` is None when
    every sample has the same length (no spread to correlate with).
    """
    import numpy as np

    if old_file_line(analysis):
        return []
    info = analysis.sample_info
    tokens = np.asarray(info.get("tokens") or [], dtype=np.float64)
    mi = analysis.sample_mi_matrix()
    if tokens.size != mi.shape[-1] or tokens.size < 3:
        return []
    logt = np.log(np.maximum(tokens, 1.0))
    out = []
    for lab, per_model in zip(model_labels(analysis), mi):
        for key, point, row in zip(info.get("point_groups") or [], info.get("points") or [], per_model):
            ok = np.ptp(logt) > 0 and np.ptp(row) > 0
            r = float(np.corrcoef(logt, row)[0, 1]) if ok else None
            out.append({"model": lab, "key": key, "point": point, "r": r, "tokens": tokens.tolist(),
                        "mi": row.tolist()})
    return out


def mi_tokens_view(analysis):
    """(chart, one line): per-sample MI vs tokens for a few activation points, and the correlation."""
    import numpy as np

    rows = mi_token_correlation(analysis)
    if not rows:
        line = old_file_line(analysis) or "too few samples to relate MI to the token count"
        return plots.empty_figure(line, height=220), line
    keys = list(dict.fromkeys(r["key"] for r in rows))
    picked = {keys[0], keys[len(keys) // 2], keys[-1]}              # embedding, a middle block, the logits
    multi = len({r["model"] for r in rows}) > 1
    series = [{"label": (f"{r['model']} · " if multi else "") + r["key"], "tokens": r["tokens"], "mi": r["mi"],
               "r": r["r"]} for r in rows if r["key"] in picked]
    rs = [r["r"] for r in rows if r["r"] is not None]
    if not rs:
        return plots.mi_tokens_figure(series, summary="r n/a"), \
            "MI vs log(tokens): no correlation to compute (every sample has the same length)"
    med = float(np.median(rs))
    line = (f"MI vs log(tokens): Pearson r median **{med:.2f}** over {len(rs)} activation points "
            f"(range {min(rs):.2f} … {max(rs):.2f}); |r| near 1 means the per-sample MI mostly follows sequence length")
    return plots.mi_tokens_figure(series, summary=f"median r = {med:.2f}"), line


def _clip_arr(arr, clip):
    import numpy as np

    if clip is None:
        return arr
    return np.clip(arr, -np.inf if clip[0] is None else clip[0], np.inf if clip[1] is None else clip[1])


def acm_view(analysis, t: float, clip, *, multi: bool = True):
    """(λ curve, several-t view, table) of the paper's rule; an old file gets its one line instead.

    Memoised for analyses from the shared cache (keyed by its content key, t, clip): a crowd on the same
    analysis redraws the same t at the same moment, and the figures are only read afterwards (shown, exported).
    """
    return _shared_view(analysis, ("acm", float(t), tuple(clip) if clip else None, bool(multi)),
                        lambda: _acm_view(analysis, t, clip, multi=multi))


SHARED_KEY_ATTR = "_acm_shared_key"        # set on an AnalysisResult that came from / went into the shared cache
_VIEW_MEMO = SharedMemo(64)


def _shared_view(analysis, view: tuple, draw: Callable[[], Any]) -> Any:
    """``draw()``, memoised per (the analysis' shared-cache key, ``view``) when it has one: the sessions
    that got one analysis at once draw its views at once, and the figures are only read afterwards."""
    key = getattr(analysis, SHARED_KEY_ATTR, None)
    return _VIEW_MEMO.get((key, *view), draw) if key else draw()


def _acm_view(analysis, t: float, clip, *, multi: bool = True):
    import numpy as np

    from acm.rules.coefficients import acm_curve, coefficient_table

    line = old_file_line(analysis)
    if line:
        return plots.empty_figure(line), plots.empty_figure(line), {"rule": "acm", "error": line}
    table = coefficient_table(analysis, t, clip=clip, rule="acm")
    info, labels = analysis.sample_info, model_labels(analysis)
    keys, points = table["groups"], info.get("points") or table["groups"]
    ts = np.round(np.arange(T_RANGE[0], T_RANGE[1] + ACM_T_STEP / 2, ACM_T_STEP), 4)
    grid = _clip_arr(acm_curve(analysis, ts), clip)                  # [T, models, points]
    series = [{"label": lab, "mi": [g["mi_mean"] for g in m["groups"]], "lambdas": [g["lambda"] for g in m["groups"]]}
              for lab, m in zip(labels, table["models"])]
    live = {"t0": float(ts[0]), "step": ACM_T_STEP, "lambdas": grid}
    band = band_of(analysis, t, clip, table)
    coef_fig = plots.acm_coefficient_figure(keys, points, series, t=t, n_models=len(labels), clip=clip, live=live,
                                            band=band)
    if not multi:
        return coef_fig, None, table
    few = _clip_arr(acm_curve(analysis, list(ACM_T_GRID)), clip)    # [len(ACM_T_GRID), models, points]
    mi_mean = analysis.sample_mi_matrix().mean(axis=-1)
    per_model = [{"label": lab, "nmi": mi_mean[i].tolist(), "grid": few[:, i, :].tolist()} for i, lab in enumerate(labels)]
    ts_text = ", ".join(f"{x:g}" for x in ACM_T_GRID)
    multi_fig = plots.multi_t_figure(keys, per_model, list(ACM_T_GRID), alpha=1.0, metric_label="mean MI (nats)",
                                     title=f"λₖ for several t at once (the paper's ablation: t = {ts_text})")
    return coef_fig, multi_fig, table


def fim_view(analysis, t: float, clip, *, multi: bool = True):
    """(α curve, several-t view, table) of the data-free fim rule; without a Fisher pass, its one line."""
    import numpy as np

    from acm.rules import fim_lambdas
    from acm.rules.coefficients import coefficient_table
    from acm.rules.fim import FIM_T_RANGE

    if not analysis.has_fisher():
        line = "this analysis has no Fisher pass: press “Fisher pass” under the MI charts (no calibration text needed)"
        return plots.empty_figure(line), plots.empty_figure(line), {"rule": "fim", "error": line}
    table = coefficient_table(analysis, t, clip=clip, rule="fim")
    labels, keys = model_labels(analysis), table["groups"]
    scores = np.array([[g["score"] for g in m["groups"]] for m in table["models"]])
    ts = np.round(np.arange(FIM_T_RANGE[0], FIM_T_RANGE[1] + FIM_T_STEP / 2, FIM_T_STEP), 4)
    series = [{"label": lab, "score": scores[i].tolist(), "lambdas": [g["lambda"] for g in m["groups"]]}
              for i, (lab, m) in enumerate(zip(labels, table["models"]))]
    live = {"t0": float(ts[0]), "step": FIM_T_STEP, "lambdas": _clip_arr(fim_lambdas(scores, ts), clip)}
    coef_fig = plots.fim_coefficient_figure(keys, series, t=t, clip=clip, live=live)
    if not multi:
        return coef_fig, None, table
    few = _clip_arr(fim_lambdas(scores, list(FIM_T_GRID)), clip)
    per_model = [{"label": lab, "nmi": np.log(np.maximum(scores[i], 1e-300)).tolist(), "grid": few[:, i, :].tolist()}
                 for i, lab in enumerate(labels)]
    multi_fig = plots.multi_t_figure(keys, per_model, list(FIM_T_GRID), alpha=0.5, metric_label="log score",
                                     title="fim rule: αₖ for several t at once (dashed: t = 0, α = ½)")
    return coef_fig, multi_fig, table


def band_of(analysis, t: float, clip, table: dict | None = None) -> dict:
    """The acm rule's bootstrap band at t (``acm.rules.bands``, seeded: 90 %, 300 resamples) for the chart;
    also written into ``table`` (``lambda_lo``/``lambda_hi`` per row, ``bands``) when given."""
    from acm.rules.bands import analysis_band

    b = analysis_band(analysis, t, clip=clip)
    info = b.to_dict()
    if table is not None:
        for i, m in enumerate(table.get("models") or []):
            for k, row in enumerate(m["groups"]):
                row["lambda_lo"], row["lambda_hi"] = float(b.lo[i, k]), float(b.hi[i, k])
        table["bands"] = {k: v for k, v in info.items() if k not in ("lo", "hi")}
    return {"level": b.level, "resamples": b.resamples, "samples": b.samples, "lo": b.lo.tolist(), "hi": b.hi.tolist()}


def count_view(analysis, t: float, clip=None):
    """(λ-vs-sample-count chart, settle line) of the acm rule; the one line instead when it cannot be drawn.
    Memoised like ``acm_view``: the sessions that got one analysis at once draw this chart at once too."""
    return _shared_view(analysis, ("count", float(t), tuple(clip) if clip else None),
                        lambda: _count_view(analysis, t, clip))


def _count_view(analysis, t: float, clip=None):
    from acm.rules.bands import analysis_curve

    line = old_file_line(analysis)
    if line:
        return plots.empty_figure(line, height=240), line
    c = analysis_curve(analysis, t, clip=clip)
    per_model = [{"label": lab, "mean": c.lambdas[:, :, i].mean(axis=1), "min": c.lambdas[:, :, i].min(axis=1),
                  "max": c.lambdas[:, :, i].max(axis=1)} for i, lab in enumerate(model_labels(analysis))]
    fig = plots.sample_count_figure(c.counts, c.keys, per_model, settle=c.settle, tol=c.tol, t=c.t,
                                    clustered=c.clustered)
    return fig, c.line()


def settle_markdown(analysis, t: float | None, memo_key: str | None = None) -> str:
    """The summary's line "coefficients settle at ≈ N samples" (acm rule; empty for an old file).

    ``memo_key``: the shared-cache key of the analysis. The line is a function of the stored result and
    t, and λ over sample subsets is most of a cache hit's own work, so a crowd on the same analysis
    computes it once per t.
    """
    from acm.rules.bands import analysis_curve

    t = DEFAULT_T if t is None else float(t)

    def line() -> str:
        return "" if old_file_line(analysis) else f"- λ vs samples: {analysis_curve(analysis, t).line()}"

    return _SETTLE_MEMO.get((memo_key, t), line) if memo_key else line()


_SETTLE_MEMO = SharedMemo(256)


def compare_view(analysis, other, t: float, clip=None, labels: tuple[str, str] = ("this set", "second set")):
    """(chart, markdown): λ of two analyses of the same pair on different calibration sets, with bands,
    and the largest |Δλ| per group (the reviewers' "quality of the calibration data" question)."""
    from acm.rules.bands import analysis_band, compare

    for a in (analysis, other):
        line = old_file_line(a)
        if line:
            return plots.empty_figure(line, height=240), line
    bands = [analysis_band(a, t, clip=clip) for a in (analysis, other)]
    cmp = compare(*bands)
    sets = [{"label": f"{lab} ({b.samples} samples)", "lam": b.lam[0], "lo": b.lo[0], "hi": b.hi[0],
             "level": b.level, "resamples": b.resamples, "samples": b.samples} for lab, b in zip(labels, bands)]
    fig = plots.compare_bands_figure(cmp["keys"], sets, cmp["max_diff"], t=t)
    apart = [k for k, ok in zip(cmp["keys"], cmp["overlap"]) if not ok]
    md = (f"Largest |Δλ| at **{cmp['largest']}**: {cmp['largest_diff']:.4f} (t = {t:g}); "
          + (f"bands disjoint at {', '.join(apart)}: the sets disagree beyond resampling noise there"
             if apart else "the bands overlap at every group: the difference is within resampling noise"))
    if len(bands[0].models) > 1:
        md += f" · chart: {model_labels(analysis)[0]}; |Δλ| over all fine-tuned models"
    return fig, md


def load_second_analysis(state: SessionState, path: str | None, t=DEFAULT_T, clip_min=None, clip_max=None):
    """Compare the current analysis with an uploaded one (same pair, another calibration set)."""
    from acm.activations.result import AnalysisResult
    from acm.errors import InputError

    if state.analysis is None:
        raise InputError("run “Analyse” (or upload an analysis) first: the second set is compared with it")
    if not path:
        raise InputError("no analysis file given")
    other = AnalysisResult.load(str(uploaded_file(path, "analysis file")))
    src = lambda a: ((a.provenance or {}).get("calibration") or {}).get("source") or "?"  # noqa: E731
    labels = (f"current: {Path(str(src(state.analysis))).name}", f"uploaded: {Path(str(src(other))).name}")
    t = rule_t("acm", t if t is not None else DEFAULT_T)
    fig, md = compare_view(state.analysis, other, t, _clip(clip_min, clip_max), labels)
    state.figures["calibration_compare"] = fig
    return fig, md


def softmax_view(analysis, t: float, alpha: float, clip, metric: str, *, multi: bool = True):
    """(λ curve, several-t view, table) of this project's softmax rule over the chosen similarity."""
    import numpy as np

    from acm.activations.similarity import metric_label
    from acm.rules.coefficients import coefficient_table, lambdas

    label = "NMI" if metric == "nmi" else metric_label(metric)
    from acm.rules.bands import NO_BAND

    table = coefficient_table(analysis, t, alpha, clip=clip, metric=metric, rule="softmax")
    table["bands"] = {"note": NO_BAND}                     # the one line: softmax keeps no per-sample values
    labels = model_labels(analysis)
    sim = analysis.similarity_matrix(metric)
    ts = np.round(np.arange(0.0, T_MAX + SOFTMAX_T_STEP / 2, SOFTMAX_T_STEP), 4)
    live = {"t0": 0.0, "step": SOFTMAX_T_STEP, "lambdas": lambdas(sim, ts, alpha=alpha, clip=clip)}
    series = [{"label": lab, "nmi": [g["similarity"] for g in m["groups"]],
               "lambdas": [g["lambda"] for g in m["groups"]]} for lab, m in zip(labels, table["models"])]
    coef_fig = plots.coefficient_figure(analysis.groups, series, t=t, alpha=alpha, clip=clip, metric_label=label,
                                        live=live)
    if not multi:
        return coef_fig, None, table
    grid = lambdas(sim, list(T_GRID), alpha=alpha, clip=clip)   # [len(T), n_models, K]
    per_model = [{"label": lab, "nmi": sim[i].tolist(), "grid": grid[:, i, :].tolist()} for i, lab in enumerate(labels)]
    multi_fig = plots.multi_t_figure(analysis.groups, per_model, list(T_GRID), alpha=alpha, metric_label=label)
    return coef_fig, multi_fig, table


def coefficient_view(state: SessionState, t: float | None, alpha: float | None = DEFAULT_ALPHA, clip_min=None,
                     clip_max=None, *, multi: bool = True, metric: str | None = None, rule: str | None = None):
    """(λ curve figure, several-t figure, coefficient table dict) for the current analysis.

    No model work: the per-sample MI and similarities are cached, λ comes from ``acm.rules.coefficients``.
    Safe to call on every slider move; without an analysis it returns placeholders. ``rule``: ``acm``
    (the paper's, default) or ``softmax`` (``None`` = the last choice); ``metric``: which similarity
    drives the softmax rule (``None`` = the last choice; falls back to the analysis' first metric).
    """
    view = state.coef_view or {}
    rule = rule_key(rule or view.get("rule"))
    t = rule_t(rule, t)
    alpha = float(DEFAULT_ALPHA if alpha is None else alpha)
    clip = _clip(clip_min, clip_max)
    analysis = state.analysis
    metric = driver_metric(analysis, metric or view.get("metric"))
    state.coef_view = {"t": t, "alpha": alpha, "clip": clip, "metric": metric, "rule": rule}
    if analysis is None:
        return plots.empty_figure(NO_ANALYSIS), plots.empty_figure(NO_ANALYSIS), {}
    if rule == "acm":
        coef_fig, multi_fig, table = acm_view(analysis, t, clip, multi=multi)
    elif rule == "fim":
        coef_fig, multi_fig, table = fim_view(analysis, t, clip, multi=multi)
    else:
        coef_fig, multi_fig, table = softmax_view(analysis, t, alpha, clip, metric, multi=multi)
    state.figures["coefficients"] = coef_fig
    if multi_fig is not None:
        state.figures["coefficients_multi_t"] = multi_fig
    return coef_fig, multi_fig, table


def summary_markdown(analysis, *, cached: bool = False, seconds: float | None = None,
                     calibration_label: str | None = None, shared: dict | None = None, t: float | None = None) -> str:
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
    from acm.activations.similarity import metric_label

    line = old_file_line(analysis)
    for i, (lab, m) in enumerate(zip(model_labels(analysis), analysis.models)):
        if not line:
            lines.append(_mi_line(analysis, i, lab))
        for key in m.metrics():
            vals = list(m.values(key))
            name = "NMI" if key == "nmi" else metric_label(key)
            lo = min(range(len(vals)), key=vals.__getitem__)
            hi = max(range(len(vals)), key=vals.__getitem__)
            lines.append(f"- `{lab}`: mean {name} {sum(vals) / len(vals):.3f}; most changed "
                         f"**{analysis.groups[lo]}** ({vals[lo]:.3f}), least changed **{analysis.groups[hi]}** "
                         f"({vals[hi]:.3f})")
    if line:
        lines.append(f"- ⚠ {line}")
    else:
        lines.append(settle_markdown(analysis, t, (shared or {}).get("key")))
    return "\n".join(lines)


def _mi_line(analysis, i: int, label: str) -> str:
    """One summary line on model ``i``'s per-sample MI (what the paper's rule reads)."""
    mi = analysis.sample_mi_matrix()[i]                       # [points, samples]
    info = analysis.sample_info
    keys = info.get("point_groups") or [str(k) for k in range(mi.shape[0])]
    means = mi.mean(axis=-1)
    lo = int(means.argmin())
    return (f"- `{label}`: per-sample MI ({info.get('estimator')}) mean {means.mean():.3f} nats over "
            f"{mi.shape[-1]} samples, lowest at **{keys[lo]}** ({means[lo]:.3f}); λ depends on how far each "
            "point's samples sit below its largest one, not on this level")


def calibration_download(state: SessionState) -> str | None:
    """The exact token sequences of the current analysis as JSON lines in the session's export folder
    (``AnalysisResult.save_calibration``), or None when the analysis carries none (an uploaded file)."""
    analysis = state.analysis
    if analysis is None or getattr(analysis, "calibration", None) is None:
        return None
    src = ((analysis.provenance or {}).get("calibration") or {}).get("source") or "calibration"
    stem = safe_filename(Path(str(src)).stem, default="calibration")
    path = state.subdir("exports") / f"calibration-tokens-{stem}.jsonl"
    analysis.save_calibration(path)
    return str(path)


# ----------------------------------------------------------------------------- UI


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.ANALYSIS, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        analyse_btn = gr.Button("Analyse", variant="primary", scale=0, min_width=180, elem_id="analyse-btn")
        summary = gr.Markdown("Not analysed yet. With the defaults this takes a few seconds.",
                              elem_id="analysis-summary")
    metrics = gr.CheckboxGroup(choices=metric_choices(), value=list(DEFAULT_METRICS),
                               label="Similarity metrics (for the softmax rule)",
                               info="computed in the same passes as the per-sample MI the paper's rule reads",
                               elem_id="metrics-select")
    with gr.Accordion("Advanced analysis settings", open=False):
        with gr.Row():
            bins = gr.Slider(8, 256, value=DEFAULT_BINS, step=8, label="Histogram bins (B)")
            batch_size = gr.Slider(1, 64, value=DEFAULT_BATCH, step=1, label="Batch size")
            seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed")
            chat_template = gr.Checkbox(value=True, label="Apply chat template to calibration text")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=420):
            nmi_plot = gr.Plot(plots.empty_figure("Per-layer per-sample MI appears here after “Analyse”"),
                               label="Per-layer MI", show_label=False, elem_id="nmi-plot")
        with gr.Column(scale=2, min_width=300):
            tokens_plot = gr.Plot(plots.empty_figure("Per-sample MI vs tokens", height=220),
                                  label="MI vs tokens", show_label=False, elem_id="mi-tokens-plot")
            tokens_line = gr.Markdown("", elem_id="mi-tokens-line", elem_classes=["muted"])
    from components import fisher

    fim = fisher.build()             # the data-free rule's Fisher pass and charts, beside the MI (components/fisher.py)
    rule = gr.Radio(RULE_CHOICES, value=DEFAULT_RULE, label="Coefficient rule", elem_id="rule-select",
                    info="the paper's λ = 1 − meanⱼ σ(t·(MIⱼ − maxⱼ MIⱼ)), or softmax over NMI/CKA/cosine (ours)")
    slider = t_slider_settings(DEFAULT_RULE)
    with gr.Group(elem_classes=["coef-controls"]):
        with gr.Row(equal_height=True):
            t = t_slider(slider["minimum"], slider["maximum"], value=slider["value"], step=slider["step"],
                         label=slider["label"], info=slider["info"], elem_id="t-slider", scale=3)
            alpha = gr.Slider(0.0, 2.0, value=DEFAULT_ALPHA, step=0.05, label="α (mean coefficient)",
                              elem_id="alpha-slider", scale=2, visible=False)
            clip_min = gr.Textbox(value="", label="λ min", placeholder="none", scale=1, min_width=90,
                                  info="optional clip")
            clip_max = gr.Textbox(value="", label="λ max", placeholder="none", scale=1, min_width=90,
                                  info="optional clip")
            # Every registered metric at first, so an API call can ask for /analyse(metrics=[…, "cka"],
            # driver="cka") in one go; after an analysis the choices narrow to what it computed.
            driver = gr.Radio(choices=metric_choices(), value="nmi", label="λ driven by", scale=2,
                              elem_id="driver-select", info="which similarity sₖ sets λₖ", visible=False)
    coef_plot = gr.Plot(plots.empty_figure("The coefficient curve λₖ(t) appears here"), label="Coefficients",
                        show_label=False, elem_id="coef-plot")
    multi_plot = gr.Plot(plots.empty_figure("Several t at once"), label="Several t at once", show_label=False,
                         elem_id="multi-plot")
    count_plot = gr.Plot(plots.empty_figure("λ against the number of calibration samples appears here", height=240),
                         label="λ vs samples", show_label=False, elem_id="count-plot")
    count_line = gr.Markdown("", elem_id="settle-line", elem_classes=["muted"])
    with gr.Accordion("Compare two calibration sets", open=False, elem_id="compare-accordion"):
        gr.Markdown("Analyse the same pair on another calibration set (here with another set, then “Download "
                    "analysis JSON”, or `acm analyze --calibration …`) and upload that analysis: λ of both sets "
                    "with their 90 % bootstrap bands on one chart, and the largest |Δλ| per group.")
        compare_upload = gr.UploadButton("Upload a second analysis JSON", file_types=[".json"], variant="secondary",
                                         elem_id="compare-upload")
        compare_plot = gr.Plot(plots.empty_figure("Upload a second analysis of the same pair", height=240),
                               label="Two calibration sets", show_label=False, elem_id="compare-plot")
        compare_line = gr.Markdown("", elem_id="compare-line")
    with gr.Accordion("λ table (JSON)", open=False):
        table = gr.JSON(label="coefficient table", elem_id="coef-table")
    with gr.Row():
        download = gr.DownloadButton("Download analysis JSON", value=None, variant="secondary")
        cal_download = gr.DownloadButton("Download calibration tokens (JSONL)", value=None, variant="secondary",
                                         visible=False, elem_id="calibration-download")
        upload = gr.UploadButton("Upload analysis JSON (skip analysis)", file_types=[".json"], variant="secondary")
    return SimpleNamespace(fim=fim, analyse_btn=analyse_btn, summary=summary, metrics=metrics, driver=driver, rule=rule,
                           bins=bins, batch_size=batch_size, seed=seed, chat_template=chat_template,
                           nmi_plot=nmi_plot, tokens_plot=tokens_plot, tokens_line=tokens_line, t=t, alpha=alpha,
                           clip_min=clip_min, clip_max=clip_max, coef_plot=coef_plot, multi_plot=multi_plot,
                           table=table, download=download, cal_download=cal_download, upload=upload,
                           count_plot=count_plot, count_line=count_line, compare_upload=compare_upload,
                           compare_plot=compare_plot, compare_line=compare_line)


def rule_controls(rule: str | None):
    """Visibility of the softmax-only controls (α, λ driver) for ``rule``."""
    import gradio as gr

    soft = rule_key(rule) == "softmax"
    return gr.update(visible=soft), gr.update(visible=soft)


def extras(state: SessionState):
    """After an analysis or an upload: MI-vs-tokens chart and line, the calibration-token download."""
    import gradio as gr

    if state.analysis is None:
        return plots.empty_figure("Per-sample MI vs tokens", height=220), "", gr.update(value=None, visible=False)
    fig, line = mi_tokens_view(state.analysis)
    state.figures["mi_vs_tokens"] = fig
    path = calibration_download(state)
    return fig, line, gr.update(value=path, visible=path is not None)


def count_extras(state: SessionState):
    """After an analysis or an upload: λ against the sample count at the current t, and the settle line."""
    if state.analysis is None:
        return plots.empty_figure(NO_ANALYSIS, height=240), ""
    view = state.coef_view or {}
    fig, line = count_view(state.analysis, view.get("t", DEFAULT_T) if view.get("rule", "acm") == "acm" else DEFAULT_T,
                           view.get("clip") if view.get("rule", "acm") == "acm" else None)
    state.figures["lambda_vs_samples"] = fig
    return fig, line


def _args(params: dict) -> dict:
    """An event's own arguments from its ``locals()`` (without the closure names CPython adds)."""
    return {k: v for k, v in params.items() if k in _EVENT_PARAMS}


_EVENT_PARAMS = ("state", "base", "fts", "trust", "device", "dtype", "cal_mode", "cal_upload", "hub_id", "split",
                 "field", "samples", "clusters", "fraction", "max_tokens", "bins", "batch_size", "seed",
                 "chat_template", "t", "alpha", "clip_min", "clip_max", "metrics", "driver", "rule", "progress")


def _request(args: dict, progress=None) -> dict:
    """``run_analysis`` keyword arguments from an event's arguments (the names the UI / API use)."""
    return dict(base=args["base"], fts=args["fts"], trust_remote_code=args["trust"], device=args["device"],
                dtype=args["dtype"], cal_mode=args["cal_mode"], cal_upload=args["cal_upload"], hub_id=args["hub_id"],
                split=args["split"], field=args["field"], samples=args["samples"], clusters=args["clusters"],
                fraction=args["fraction"], max_tokens=args["max_tokens"], bins=args["bins"],
                batch_size=args["batch_size"], seed=args["seed"], chat_template=args["chat_template"],
                metrics=args["metrics"], progress=progress)


def _outputs(state: SessionState, out: dict, args: dict, rule: str) -> tuple:
    """Summary, per-layer plot, λ curve, several-t view, λ table, download: one analysis' outputs."""
    res, t = out["analysis"], args["t"]
    coef_fig, multi_fig, table = coefficient_view(state, t, args["alpha"], args["clip_min"], args["clip_max"],
                                                  metric=args["driver"], rule=rule)
    top = layer_view(res, rule, state.coef_view["metric"])
    state.figures["per_layer"] = top
    md = summary_markdown(res, cached=out["cached"], seconds=out["seconds"],
                          calibration_label=out["calibration"]["label"], shared=out.get("shared"),
                          t=t if rule == "acm" else None)
    return md, top, coef_fig, multi_fig, table, save_analysis(state)


def wire(ui) -> None:
    import gradio as gr

    a, m, c = ui.analysis, ui.models, ui.calibration
    coef_inputs = [ui.state, a.t, a.alpha, a.clip_min, a.clip_max, a.driver, a.rule]
    outputs = [a.summary, a.nmi_plot, a.coef_plot, a.multi_plot, a.table, a.download]

    @gpu(duration=300)
    def analyse(state, base=None, fts=None, trust=False, device="auto", dtype="auto", cal_mode=None, cal_upload=None,
                hub_id=None, split=None, field=None, samples=None, clusters=4, fraction=0.1, max_tokens=128,
                bins=DEFAULT_BINS, batch_size=DEFAULT_BATCH, seed=DEFAULT_SEED, chat_template=True, t=DEFAULT_T,
                alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metrics=DEFAULT_METRICS, driver=None,
                rule=DEFAULT_RULE, progress=gr.Progress()):
        """The heavy job: per-sample MI and similarities (or the stored result), then λ at t."""
        args = _args(locals())
        rule = rule_key(rule)
        rule_t(rule, t)                                         # a bad t is refused before the model work
        progress(0.0, desc="loading models")
        out = run_analysis(state, **_request(args, progress_callback(progress)))
        return _outputs(state, out, args, rule)

    def analyse_light(state, base=None, fts=None, trust=False, device="auto", dtype="auto", cal_mode=None,
                      cal_upload=None, hub_id=None, split=None, field=None, samples=None, clusters=4, fraction=0.1,
                      max_tokens=128, bins=DEFAULT_BINS, batch_size=DEFAULT_BATCH, seed=DEFAULT_SEED,
                      chat_template=True, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None,
                      metrics=DEFAULT_METRICS, driver=None, rule=DEFAULT_RULE, progress=gr.Progress()):
        """Per-sample MI per layer (the paper's rule, default) and the chosen similarity metrics between the
        base and each fine-tuned model (cached per models + calibration + settings), then λ at t."""
        args = _args(locals())
        rule = rule_key(rule)
        rule_t(rule, t)
        # A cache hit is drawn here, outside the heavy slot; a miss (an API caller, or evicted since the page
        # asked) runs the heavy job in the heavy slot.
        return serve_light(lambda: run_analysis(state, **_request(args), compute=False), lambda: analyse(**args),
                           lambda out: _outputs(state, out, args, rule), progress_callback(progress),
                           request_key=same_request_key("analysis", _request(args)))

    def cached(state, *values) -> bool:
        kwargs = dict(zip(_EVENT_PARAMS, [state, *values]))
        rule_t(rule_key(kwargs["rule"]), kwargs["t"])
        return analysis_available(state, **_request(kwargs))

    inputs = [ui.state, m.base, m.fts, m.trust, m.device, m.dtype, c.mode, c.upload, c.hub_id, c.split, c.field,
              c.samples, c.clusters, c.fraction, c.max_tokens, a.bins, a.batch_size, a.seed, a.chat_template,
              a.t, a.alpha, a.clip_min, a.clip_max, a.metrics, a.driver, a.rule]
    light_event, heavy_event = light_first(
        ui, a.analyse_btn, inputs, outputs, hit=cached, light=analyse_light, heavy=analyse, api_name="analyse",
        what="the analysis", show_progress_on=[a.summary, a.nmi_plot])
    upload_event = _wire_upload(ui, outputs)
    for event in (light_event, heavy_event, upload_event):
        event.success(ui_errors(extras, warm=False), [ui.state], [a.tokens_plot, a.tokens_line, a.cal_download],
                      queue=False, api_visibility="private", show_progress="hidden")
        event.success(ui_errors(count_extras, warm=False), [ui.state], [a.count_plot, a.count_line],
                      queue=False, api_visibility="private", show_progress="hidden")
    a.compare_upload.upload(ui_errors(load_second_analysis),
                            [ui.state, a.compare_upload, a.t, a.clip_min, a.clip_max],
                            [a.compare_plot, a.compare_line], api_name="compare_calibration")
    _wire_coefficients(ui, coef_inputs)
    _wire_driver(ui, coef_inputs, [light_event, heavy_event, upload_event])
    ui.analysis_events = [light_event, heavy_event, upload_event]
    from components import fisher

    fisher.wire(ui).success(ui_errors(save_analysis, warm=False), [ui.state], [a.download], queue=False,
                            api_visibility="private", show_progress="hidden")   # the download carries the Fisher pass


def _wire_upload(ui, outputs):
    a = ui.analysis

    def upload_analysis(state, path=None, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None,
                        metric=None, rule=DEFAULT_RULE):
        """Use an analysis JSON saved earlier instead of running the models."""
        res = load_analysis_file(state, path)
        rule = rule_key(rule)
        coef_fig, multi_fig, table = coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric, rule=rule)
        top = layer_view(res, rule, state.coef_view["metric"])
        state.figures["per_layer"] = top
        md = summary_markdown(res, calibration_label=None, t=t if rule == "acm" else None) + \
            "\n\n_Loaded from an uploaded file._"
        line = old_file_line(res)
        if line and rule == "acm":
            warn(line)
        if state.base and list(getattr(m, "model", None) for m in res.models) != state.fts:
            warn("the uploaded analysis was made for other models than the ones selected; "
                 "merging uses it for the selected models")
        return md, top, coef_fig, multi_fig, table, save_analysis(state)

    return a.upload.upload(ui_errors(upload_analysis),
                           [ui.state, a.upload, a.t, a.alpha, a.clip_min, a.clip_max, a.driver, a.rule], outputs,
                           api_name="upload_analysis")


def _wire_coefficients(ui, coef_inputs) -> None:
    """α / clip / rule: the server recomputes every view; t: the page redraws the curve itself (LIVE_JS)
    and the λ table follows when the slider is released."""
    import gradio as gr

    a = ui.analysis

    def coefficients(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None,
                     rule=DEFAULT_RULE):
        """λₖ(t) per layer group and fine-tuned model from the cached analysis (no model work): the curve at
        t, the several-t view and the coefficient table. ``rule``: ``acm`` (the paper's, t ∈ [−3, 3]) or
        ``softmax`` (ours, t ∈ [0, 100]; ``metric`` picks the similarity that drives it, default NMI)."""
        return coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric, rule=rule)

    gr.on([a.alpha.change, a.clip_min.submit, a.clip_max.submit, a.clip_min.blur, a.clip_max.blur],
          ui_errors(coefficients, warm=False), coef_inputs, [a.coef_plot, a.multi_plot, a.table],
          api_name="coefficients", queue=False, show_progress="hidden", trigger_mode="always_last")

    a.t.change(None, [a.t], None, js=LIVE_JS, api_visibility="private", queue=False, show_progress="hidden")

    def table_at(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None,
                 rule=DEFAULT_RULE):
        coef_fig, _, table = coefficient_view(state, t, alpha, clip_min, clip_max, multi=False, metric=metric,
                                              rule=rule)
        return coef_fig, table

    # When the slider is released the λ table, the session's t and the chart's own value (what Gradio redraws
    # from, e.g. when the tab is shown again) follow from the server; re-rendering them on every step costs.
    a.t.release(ui_errors(table_at, warm=False), coef_inputs, [a.coef_plot, a.table], api_visibility="private",
                queue=False, show_progress="hidden", trigger_mode="always_last")

    def switch_rule(state, rule=DEFAULT_RULE, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None):
        """The rule's t range and default, its controls, and every view under it."""
        rule = rule_key(rule)
        slider = t_slider_settings(rule)
        coef_fig, multi_fig, table = coefficient_view(state, slider["value"], alpha, clip_min, clip_max,
                                                      metric=metric, rule=rule)
        top = (layer_view(state.analysis, rule, state.coef_view["metric"]) if state.analysis is not None else
               plots.empty_figure("Per-layer values appear here after “Analyse”"))
        state.figures["per_layer"] = top
        return (gr.update(**slider), *rule_controls(rule), top, coef_fig, multi_fig, table)

    a.rule.input(ui_errors(switch_rule, warm=False), [ui.state, a.rule, a.alpha, a.clip_min, a.clip_max, a.driver],
                 [a.t, a.alpha, a.driver, a.nmi_plot, a.coef_plot, a.multi_plot, a.table], api_visibility="private",
                 queue=False, show_progress="hidden", trigger_mode="always_last")


def _wire_driver(ui, coef_inputs, events) -> None:
    import gradio as gr

    a = ui.analysis

    def driver_choices(state):
        """The "λ driven by" choices follow the metrics of the current analysis."""
        from acm.activations.similarity import metric_label

        have = state.analysis.metrics() if state.analysis is not None else ["nmi"]
        value = driver_metric(state.analysis, (state.coef_view or {}).get("metric"))
        return gr.update(choices=[("NMI" if k == "nmi" else metric_label(k), k) for k in have], value=value)

    for event in events:
        event.success(driver_choices, [ui.state], [a.driver], queue=False, api_visibility="private",
                      show_progress="hidden")

    def switch_driver(state, t=DEFAULT_T, alpha=DEFAULT_ALPHA, clip_min=None, clip_max=None, metric=None,
                      rule=None):
        """The similarity that drives the softmax rule's λ (``rule`` defaults to softmax here)."""
        rule = rule_key(rule or "softmax")
        coef_fig, multi_fig, table = coefficient_view(state, t, alpha, clip_min, clip_max, metric=metric, rule=rule)
        if state.analysis is None:
            return plots.empty_figure("Per-layer NMI appears here after “Analyse”"), coef_fig, multi_fig, table
        top = layer_view(state.analysis, rule, state.coef_view["metric"])
        state.figures["per_layer"] = top
        return top, coef_fig, multi_fig, table

    a.driver.input(ui_errors(switch_driver, warm=False), coef_inputs, [a.nmi_plot, a.coef_plot, a.multi_plot, a.table],
                   api_name="lambda_driver", queue=False, show_progress="hidden", trigger_mode="always_last")
