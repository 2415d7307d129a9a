"""Step 6 — Evaluate: accuracy and answer length of the merged and source models (Long-to-Short)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from components import help as texts
from components import plots
from components.common import (
    bundled_eval,
    gpu,
    none_if_auto,
    progress_callback,
    ui_errors,
    unique_labels,
    uploaded_file,
)
from components.models import validate_selection
from components.state import SessionState, load_source_model

BUNDLED, PRESET, UPLOAD = "Bundled demo set", "Benchmark preset", "Upload a .jsonl"
GREEDY, SAMPLED, MODEL_CONFIG = "Greedy", "Sampled", "Each model's generation_config"
DEFAULT_LIMIT = 24
DEFAULT_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS = 32768
DEFAULT_BATCH = 16


def preset_choices() -> list[tuple[str, str]]:
    """(title, key) for the preset dropdown, in the order of ``acm.evaluation.presets.PRESETS``."""
    from acm.evaluation.presets import PRESETS

    return [(p.title, k) for k, p in PRESETS.items()]


def preset_rows(key: str, limit: int | None) -> list[dict]:
    """The preset's problems from the Hub (``datasets``, cached); tests point this at local copies."""
    from acm.evaluation.presets import load_preset

    return load_preset(key, limit=limit)


def _data(mode: str | None, upload: str | None, preset: str | None = None) -> tuple[str, str]:
    """(path or ``preset:key``, label) of the evaluation set."""
    from acm.errors import InputError

    if mode == PRESET:
        from acm.evaluation.presets import get_preset

        p = get_preset(preset or "")                          # a fixed list: never a path
        return f"preset:{p.key}", p.title
    if mode == UPLOAD:
        if not upload:
            raise InputError("upload a .jsonl evaluation file (question/answer per line) or pick the bundled set")
        path = uploaded_file(upload, "evaluation file")      # only Gradio's upload area, never other paths
        return str(path), path.name
    path = bundled_eval()
    if not path.is_file():
        raise InputError("the bundled evaluation set is missing (assets/eval/demo_eval.jsonl); upload a .jsonl")
    return str(path), "bundled demo set"


def decoding_options(decoding: str | None, temperature: float | None, top_p: float | None, samples: int | None,
                     seed: int | None) -> dict:
    """The ``acm.evaluation.evaluate.evaluate`` decoding arguments for the tab's controls (greedy ignores the rest)."""
    if decoding == SAMPLED:
        return {"temperature": float(temperature or 0.6), "top_p": float(top_p or 1.0), "samples": int(samples or 1),
                "seed": int(seed or 0), "use_generation_config": False}
    if decoding == MODEL_CONFIG:
        return {"samples": int(samples or 1), "seed": int(seed or 0), "use_generation_config": True}
    return {"samples": 1, "seed": 0, "use_generation_config": False}


def run_eval(state: SessionState, base: str | None, fts, *, data_mode: str | None = BUNDLED,
             upload: str | None = None, limit: int | None = DEFAULT_LIMIT,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, include_sources: bool = True,
             batch_size: int = DEFAULT_BATCH, device: str | None = "auto", dtype: str | None = "auto",
             trust_remote_code: bool = False, preset: str | None = None, decoding: str | None = GREEDY,
             temperature: float | None = 0.6, top_p: float | None = 0.95, samples: int | None = 1,
             seed: int | None = 0, progress: Callable[[float, str], None] | None = None) -> dict:
    """Evaluate the merged model (and the source models) on the same problems.

    Source-model results are cached per evaluation setting (problems, limit, max tokens, decoding),
    so after each new merge only the merged model runs. Every result becomes a point of the
    session's accuracy-vs-length scatter. Returns the ``acm.evaluation.evaluate.evaluate`` dict with ``kind``
    and ``label`` added per model.
    """
    from acm.evaluation.evaluate import length_warning
    from acm.evaluation.generation import check_max_new_tokens

    base, fts = validate_selection(base, fts)
    path, data_label = _data(data_mode, upload, preset)
    limit = int(limit) if limit else None
    max_new_tokens = check_max_new_tokens(int(max_new_tokens))
    dec = decoding_options(decoding, temperature, top_p, samples, seed)
    setting = (path, limit, max_new_tokens, decoding or GREEDY, *(
        (dec.get("temperature"), dec.get("top_p"), dec["samples"], dec["seed"]) if decoding != GREEDY else ()))
    wanted = _wanted(state, base, fts, include_sources)
    results, to_run = _cached(state, wanted, setting)
    if to_run:
        loaded = _load_models(state, to_run, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                              progress=progress)
        n = _evaluate_missing(state, to_run, loaded, results, path, limit=limit, max_new_tokens=max_new_tokens,
                              batch_size=int(batch_size), dec=dec, progress=progress)
    else:
        n = next(iter(results.values())).get("n")
    models_out = _record_points(state, wanted, results, setting, n)
    result = {"data": data_label, "n": n, "limit": limit, "max_new_tokens": max_new_tokens,
              "decoding": _decoding_label(decoding, dec), "samples_per_problem": dec["samples"], "models": models_out}
    warning = length_warning(max_new_tokens, none_if_auto(device))
    if warning:
        result["warnings"] = [warning]
    state.last_eval = result
    if progress:
        progress(1.0, "done")
    return result


def _wanted(state: SessionState, base: str, fts: list[str], include_sources: bool) -> list[tuple[str, str, str | None]]:
    """(kind, label, spec or None for the merged model) of every model to show."""
    from acm.errors import InputError

    wanted: list[tuple[str, str, str | None]] = []
    if state.merged is not None:
        wanted.append(("merged", state.merged.label, None))
    if include_sources or state.merged is None:
        labels = unique_labels([base] + fts)
        wanted.append(("base", labels[0], base))
        wanted.extend(("fine-tuned", lab, spec) for lab, spec in zip(labels[1:], fts))
    if not wanted:
        raise InputError("nothing to evaluate: merge first or tick “include the source models”")
    return wanted


def _cached(state: SessionState, wanted, setting: tuple) -> tuple[dict, list[tuple]]:
    """(results found in the session's cache by label, (kind, label, spec, cache key) of those to run)."""
    results, to_run = {}, []
    for kind, label, spec in wanted:
        key = (spec or f"merge:{state.merged.out_dir}", setting)
        if key in state.eval_cache:
            results[label] = state.eval_cache[key]
        else:
            to_run.append((kind, label, spec, key))
    return results, to_run


def _load_models(state: SessionState, to_run, *, device, dtype, trust_remote_code: bool, progress) -> list[tuple]:
    """``(label, model, tokenizer)`` of each model to run: the session's merged model, or a source model loaded."""
    models = []
    for k, (_kind, label, spec, _) in enumerate(to_run):
        if progress:
            progress(0.02 * k, f"loading {label}")
        if spec is None:
            models.append((label, state.merged.model, state.merged.tokenizer))
        else:
            model, tok = load_source_model(spec, device=none_if_auto(device), dtype=none_if_auto(dtype),
                                           trust_remote_code=trust_remote_code,
                                           progress=progress_callback(progress, (0.0, 0.05)))
            models.append((label, model, tok))
    return models


def _evaluate_missing(state: SessionState, to_run, models, results: dict, path: str, *, limit, max_new_tokens: int,
                      batch_size: int, dec: dict, progress) -> int | None:
    """Evaluate ``models`` in one call, cache and add their results; returns the number of problems."""
    from acm.evaluation.evaluate import evaluate

    data = preset_rows(path.split(":", 1)[1], limit) if path.startswith("preset:") else path
    out = evaluate(models, data, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   progress=progress_callback(progress, (0.05, 1.0)), show_progress=False, **dec)
    for (_kind, label, _spec, key), res in zip(to_run, out["models"]):
        state.eval_cache[key] = res
        results[label] = res
    return out.get("n")


def _record_points(state: SessionState, wanted, results: dict, setting: tuple, n) -> list[dict]:
    """Each model's result with kind / label / model added; its scatter point replaces the session's
    earlier one of the same label and setting."""
    models_out = []
    for kind, label, spec in wanted:
        res = dict(results[label])
        res.update(kind=kind, label=label, model=label if spec is None else spec)
        models_out.append(res)
        point = {"label": label, "kind": kind, "accuracy": res["accuracy"], "mean_length": res["mean_length"],
                 "n": res.get("n", n), "setting": setting, "thinking_length": res.get("mean_thinking_length"),
                 "answer_length": res.get("mean_answer_length"), "truncated": res.get("truncated", 0),
                 "truncated_in_thinking": res.get("truncated_in_thinking", 0), "replies": res.get("replies")}
        state.eval_points = [p for p in state.eval_points if not (p["label"] == label and p["setting"] == setting)]
        state.eval_points.append(point)
    return models_out


def _decoding_label(decoding: str | None, dec: dict) -> str:
    if decoding == SAMPLED:
        return (f"sampled (temperature {dec['temperature']:g}, top-p {dec['top_p']:g}, {dec['samples']} per problem, "
                f"seed {dec['seed']})")
    if decoding == MODEL_CONFIG:
        return f"each model's generation_config ({dec['samples']} per problem, seed {dec['seed']})"
    return "greedy"


def _opt(value):
    return "–" if value is None else value


def tables(result: dict) -> tuple[list[list], list[list], list[str]]:
    """(overall rows, per-difficulty rows, per-difficulty headers).

    Per difficulty is a pivot — one row per level, one "accuracy % · mean length" cell per model —
    so the models can be compared along a row.
    """
    overall = []
    for m in result["models"]:
        overall.append([m["label"], m["kind"], round(100 * m["accuracy"], 1), m["mean_length"],
                        _opt(m.get("mean_thinking_length")), _opt(m.get("mean_answer_length")),
                        m.get("median_length"), m.get("n"), m.get("truncated", 0), m.get("truncated_in_thinking", 0)])
    levels: list[str] = []
    for m in result["models"]:
        levels.extend(lv for lv in (m.get("per_level") or {}) if lv not in levels)
    headers = ["difficulty", "n"] + [f"{m['label']}: acc % · length" for m in result["models"]]
    per_level = []
    for lv in levels:
        cells, n = [], None
        for m in result["models"]:
            s = (m.get("per_level") or {}).get(lv)
            cell = f"{100 * s['accuracy']:.0f}% · {s['mean_length']:.0f}" if s else "–"
            if s and s.get("mean_thinking_length") is not None:
                cell += f" ({s['mean_thinking_length']:.0f} thinking + {s['mean_answer_length']:.0f} answer)"
            cells.append(cell)
            n = n or (s or {}).get("n")
        per_level.append([lv, n] + cells)
    return overall, per_level, headers


OVERALL_HEADERS = ["model", "kind", "accuracy %", "mean length", "thinking", "answer", "median length", "n",
                   "hit max tokens", "cut while thinking"]
LEVEL_HEADERS = ["difficulty", "n"]


def scatter(state: SessionState, setting: tuple | None = None):
    """Accumulated points of this session for one evaluation setting (comparable points only)."""
    pts = [p for p in state.eval_points if setting is None or p["setting"] == setting]
    fig = plots.eval_scatter(pts)
    state.figures["eval_scatter"] = fig
    return fig


def summary_markdown(result: dict) -> str:
    lines = [(f"**{result['n']} problems** from the {result['data']} · {result.get('decoding', 'greedy')} · "
             f"max {result['max_new_tokens']} new tokens")]
    merged = [m for m in result["models"] if m["kind"] == "merged"]
    longm = [m for m in result["models"] if m["kind"] == "fine-tuned"]
    if merged and longm:
        mm, lm = merged[0], longm[0]
        if lm["mean_length"]:
            cut = 100 * (1 - mm["mean_length"] / lm["mean_length"])
            lines.append(f"{mm['label']} vs `{lm['label']}`: length **{cut:+.1f}%** shorter"
                         if cut >= 0 else f"{mm['label']} vs `{lm['label']}`: length **{-cut:.1f}%** longer")
            lines[-1] += f", accuracy **{100 * (mm['accuracy'] - lm['accuracy']):+.1f}** points"
    cut = [f"{m['label']} {m['truncated_in_thinking']}" for m in result["models"] if m.get("truncated_in_thinking")]
    if cut:
        lines.append("cut off while thinking (counted wrong): " + ", ".join(cut))
    text = " · ".join(lines)
    for w in result.get("warnings", []):
        text += f"\n\n⚠ {w}"
    return text


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.EVALUATE, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        mode = gr.Radio([BUNDLED, PRESET, UPLOAD], value=BUNDLED, label="Problems", scale=2)
        preset = gr.Dropdown(preset_choices(), value="math500", label="Benchmark (Hugging Face Hub)", visible=False,
                             scale=2, elem_id="eval-preset",
                             info="the L2S prompt: “Please reason step by step, and put your final answer within "
                                  "\\boxed{}.”")
        upload = gr.File(label="Evaluation .jsonl", file_types=[".jsonl", ".json"], type="filepath", visible=False,
                         scale=2)
    with gr.Row():
        limit = gr.Slider(1, 1319, value=DEFAULT_LIMIT, step=1, label="Problems to use (first N)")
        max_new = gr.Slider(16, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=16, label="Max new tokens",
                            info="R1-style models need 8k–32k; that takes hours on CPU")
        batch = gr.Slider(1, 64, value=DEFAULT_BATCH, step=1, label="Batch size")
        include = gr.Checkbox(value=True, label="include the source models", info="cached after the first run")
    with gr.Row(equal_height=True):
        decoding = gr.Radio([GREEDY, SAMPLED, MODEL_CONFIG], value=GREEDY, label="Decoding", scale=2,
                            info="R1-distilled models are meant to be sampled (temperature 0.6, top-p 0.95)")
        temperature = gr.Slider(0.05, 1.5, value=0.6, step=0.05, label="Temperature", visible=False)
        top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="Top-p", visible=False)
        samples = gr.Slider(1, 16, value=1, step=1, label="Samples per problem", visible=False,
                            info="accuracy = mean over samples")
        seed = gr.Number(value=0, precision=0, label="Seed", visible=False, minimum=0)
    with gr.Row():
        run_btn = gr.Button("Evaluate", variant="primary", scale=0, min_width=180, elem_id="eval-btn")
    summary = gr.Markdown("No evaluation yet.")
    scatter_plot = gr.Plot(plots.eval_scatter([]), label="Accuracy vs length", show_label=False, elem_id="eval-scatter")
    overall = gr.Dataframe(headers=OVERALL_HEADERS, interactive=False, label="Per model")
    per_level = gr.Dataframe(headers=LEVEL_HEADERS, interactive=False, label="Per difficulty", max_height=300)
    with gr.Accordion("Raw results (JSON, with sample replies)", open=False):
        raw = gr.JSON()
    return SimpleNamespace(mode=mode, preset=preset, upload=upload, limit=limit, max_new=max_new, batch=batch,
                           include=include, decoding=decoding, temperature=temperature, top_p=top_p, samples=samples,
                           seed=seed, run_btn=run_btn, summary=summary, scatter=scatter_plot, overall=overall,
                           per_level=per_level, raw=raw)


def wire(ui) -> None:
    import gradio as gr

    e, m = ui.evaluate, ui.models
    e.mode.change(lambda mode: (gr.update(visible=mode == UPLOAD), gr.update(visible=mode == PRESET)), e.mode,
                  [e.upload, e.preset], api_visibility="private", queue=False)
    e.decoding.change(lambda d: (gr.update(visible=d == SAMPLED), gr.update(visible=d == SAMPLED),
                                 gr.update(visible=d != GREEDY), gr.update(visible=d != GREEDY)),
                      e.decoding, [e.temperature, e.top_p, e.samples, e.seed], api_visibility="private", queue=False)

    @gpu(duration=600)
    def evaluate(state, base=None, fts=None, mode=BUNDLED, upload=None, limit=DEFAULT_LIMIT,
                 max_new_tokens=DEFAULT_MAX_NEW_TOKENS, include=True, batch=DEFAULT_BATCH, device="auto", dtype="auto",
                 trust=False, preset="math500", decoding=GREEDY, temperature=0.6, top_p=0.95, samples=1, seed=0,
                 progress=gr.Progress()):
        """Accuracy and mean answer length (thinking / answer split for R1-style models) of the merged
        model and the source models; greedy or sampled."""
        progress(0.0, desc="preparing")
        result = run_eval(state, base, fts, data_mode=mode, upload=upload, limit=limit,
                          max_new_tokens=max_new_tokens, include_sources=include, batch_size=batch, device=device,
                          dtype=dtype, trust_remote_code=trust, preset=preset, decoding=decoding,
                          temperature=temperature, top_p=top_p, samples=samples, seed=seed,
                          progress=progress_callback(progress))
        overall_rows, level_rows, level_headers = tables(result)
        setting = state.eval_points[-1]["setting"] if state.eval_points else None
        import pandas as pd

        return (summary_markdown(result), scatter(state, setting), pd.DataFrame(overall_rows, columns=OVERALL_HEADERS),
                pd.DataFrame(level_rows, columns=level_headers), result)

    e.run_btn.click(ui_errors(evaluate), [ui.state, m.base, m.fts, e.mode, e.upload, e.limit, e.max_new, e.include,
                                          e.batch, m.device, m.dtype, m.trust, e.preset, e.decoding, e.temperature,
                                          e.top_p, e.samples, e.seed],
                    [e.summary, e.scatter, e.overall, e.per_level, e.raw], api_name="evaluate",
                    concurrency_id="heavy", concurrency_limit=1, show_progress_on=[e.scatter])
