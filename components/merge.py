"""Step 4 — Merge: plain or ACM-weighted, any method of the registry (acm.methods), streamed into the workspace.

The dropdown, which parameter controls are visible and their help come from ``acm.methods`` (torch-free,
so building the UI does not import torch).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from acm import methods as registry
from acm.sizes import format_bytes
from components import help as texts
from components import steps as plan
from components.analysis import DEFAULT_ALPHA, DEFAULT_T, T_MAX
from components.common import gpu, none_if_auto, optional_float, progress_callback, ui_errors, unique_labels
from components.models import validate_selection
from components.state import MergedModel, SessionState, admit, load_merged, reused_line, shared_merge

METHOD_CHOICES = registry.ui_choices()
METHOD_SHORT = {k: s.short for k, s in registry.SPECS.items()}
ACM, PLAIN = "ACM (per-layer λ)", "plain (α everywhere)"
# Defaults from the demo sweep (README "Demo results"): ACM-TIES α=0.7, density 0.7, t=1 keeps the
# base model's accuracy on the bundled problems with answers about half as long as the long model's.
DEFAULT_METHOD = "ties"
DEFAULT_DENSITY = 0.7
OPT = registry.OPTIONS
# The parameter controls below the method; each is visible only for the methods whose spec uses it.
PARAM_CONTROLS = ("density", "trim_scope", "drop_rate", "seed", "gamma", "epsilon")
# Whose tokenizer / chat template / generation defaults the merged model carries (acm.templates).
TOKENIZER_CHOICES = [("base model", "base")] + [(f"fine-tuned {i}", f"ft:{i}")
                                                 for i in range(1, registry.MAX_FINE_TUNED + 1)]
# Short names accepted from API callers (gradio_client) besides the dropdown values.
METHOD_ALIASES = registry.ALIASES


def normalize_mode(mode: str | None) -> str:
    """The radio's labels, or simply "acm" / "plain" from scripts."""
    text = (mode or ACM).strip().lower()
    if text.startswith("acm"):
        return ACM
    if text.startswith("plain"):
        return PLAIN
    from acm.errors import InputError

    raise InputError(f"unknown coefficient mode {mode!r}: use 'acm' or 'plain'")


def merge_label(method: str, use_acm: bool, t: float, alpha: float, merge_id: int, metric: str | None = None) -> str:
    """``#3 ACM-TIES t=1 α=0.7`` (``… by CKA`` when a metric other than NMI drove λ)."""
    short = METHOD_SHORT.get(method, method)
    if method == "linear":
        return f"#{merge_id} Linear"
    if not use_acm:
        return f"#{merge_id} {short} α={alpha:g}"
    by = ""
    if metric and metric != "nmi":
        from acm.similarity import metric_label

        by = f" by {metric_label(metric)}"
    return f"#{merge_id} ACM-{short} t={t:g} α={alpha:g}{by}"


def run_merge(state: SessionState, base: str | None, fts, *, method: str = DEFAULT_METHOD, mode: str = ACM,
              t: float = DEFAULT_T, alpha: float = DEFAULT_ALPHA, density: float = DEFAULT_DENSITY,
              drop_rate: float = OPT["drop_rate"].default, trim_scope: str = "tensor", seed: int = 0, clip_min=None,
              clip_max=None, device: str | None = "auto", dtype: str | None = "auto", trust_remote_code: bool = False,
              tokenizer_from: str = "base", gamma: float = OPT["gamma"].default,
              epsilon: float = OPT["epsilon"].default,
              progress: Callable[[float, str], None] | None = None, metric: str | None = None) -> MergedModel:
    """Merge into a fresh folder of the session workspace and load the result for chat/eval.

    The session's current merged model is replaced only when everything succeeded, so a failed
    merge leaves the previous one usable.
    """
    from acm.errors import InputError
    from acm.merge import MergeOptions, merge_models

    base, fts = validate_selection(base, fts)
    mode = normalize_mode(mode)
    method = registry.check_method(method)
    spec = registry.SPECS[method]
    if not spec.uses("trim_scope"):
        trim_scope = "tensor"                 # a hidden control's leftover value does not apply
    seed = int(seed) if isinstance(seed, float) and seed.is_integer() else seed
    registry.validate_options(method, alpha=alpha, density=density, drop_rate=drop_rate, gamma=gamma,
                              epsilon=epsilon, trim_scope=trim_scope, seed=seed)
    use_acm = mode == ACM and spec.acm
    if mode == ACM and not spec.acm:
        raise InputError(f"ACM coefficients scale task vectors; {spec.label.lower()} averaging has none. "
                         "Choose a task-vector method (TA, TIES, DARE, Breadcrumbs, DELLA), or the plain mode")
    t, alpha = float(t), float(alpha)
    lambdas, acm_info = None, None
    if use_acm:
        from acm.coefficients import lambdas_by_group

        analysis = state.analysis
        if analysis is None:
            raise InputError(f"ACM needs the per-layer NMI: {plan.how_to_get(plan.ANALYSIS, markdown=False)} "
                             "(or choose the plain mode)")
        if len(analysis.models) != len(fts):
            raise InputError(f"the analysis covers {len(analysis.models)} fine-tuned model(s) but {len(fts)} are "
                             "selected; analyse the selected models first")
        lo, hi = optional_float(clip_min), optional_float(clip_max)
        clip = None if lo is None and hi is None else (lo, hi)
        # λ driven by the metric chosen in step 3 ("λ driven by"; NMI unless changed)
        metric = metric or (state.coef_view or {}).get("metric") or "nmi"
        if metric not in analysis.metrics():
            if metric != (state.coef_view or {}).get("metric"):       # asked for explicitly (a tune point)
                raise InputError(f"the analysis has no {metric} values; analyse with that metric first")
            metric = analysis.metrics()[0]
        lambdas = lambdas_by_group(analysis, t, alpha, clip=clip, metric=metric)
        acm_info = {"analysis": analysis.provenance, "t": t, "alpha": alpha, "clip": clip}
        if metric != "nmi":            # NMI-driven merges keep the recipe (and shared-cache key) they always had
            acm_info["metric"] = metric
    state.merge_count += 1
    merge_id = state.merge_count
    out_dir = state.subdir("merges") / f"merge-{merge_id:02d}-{method}{'-acm' if use_acm else ''}"
    options = MergeOptions(method=method, alpha=alpha, density=float(density), drop_rate=float(drop_rate),
                           trim_scope=trim_scope, seed=int(seed), gamma=float(gamma), epsilon=float(epsilon),
                           dtype=none_if_auto(dtype),
                           device=none_if_auto(device), tokenizer_from=(tokenizer_from or "base"))
    t0 = time.perf_counter()
    shared = shared_merge(base, fts, f"{method}{'-acm' if use_acm else ''}", options, lambdas, acm_info, progress)
    try:
        if shared is None:
            report = merge_models(base, fts, out_dir, options, lambdas=lambdas, acm=acm_info, force=True,
                                  progress=progress_callback(progress, (0.0, 0.9)), show_progress=False)
            report_dict, used = report.to_dict(), report.lambdas
        else:
            out_dir, report_dict, used = shared["out_dir"], shared["report"], shared["report"].get("lambdas")
        if progress:
            progress(0.92, "loading the merged model for chat")
        model, tokenizer = load_merged(out_dir, device, dtype, shared=shared is not None)
    except BaseException:
        if shared is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            shared["release"]()
        raise
    seconds = time.perf_counter() - t0
    merged = MergedModel(
        merge_id=merge_id, label=merge_label(method, use_acm, t, alpha, merge_id, (acm_info or {}).get("metric")), out_dir=Path(out_dir),
        report=report_dict, lambdas=used or lambdas,
        cache=shared and {k: v for k, v in shared.items() if k not in ("release", "report", "out_dir")},
        release=shared and shared["release"],
        settings=dict(base=base, fts=fts, method=method, acm=use_acm, t=t if use_acm else None, alpha=alpha,
                      density=float(density), drop_rate=float(drop_rate), trim_scope=trim_scope, seed=int(seed),
                      gamma=float(gamma), epsilon=float(epsilon),
                      clip=acm_info["clip"] if acm_info else None, dtype=none_if_auto(dtype),
                      tokenizer_from=options.tokenizer_from),
        seconds=seconds, model=model, tokenizer=tokenizer)
    state.adopt_merged(merged, seconds)
    if progress:
        progress(1.0, "done")
    return merged


def lambda_rows(merged: MergedModel, groups: list[str] | None = None) -> tuple[list[str], list[list]]:
    """The λ actually used, as a table: one row per layer group, one column per fine-tuned model."""
    fts = merged.settings["fts"]
    headers = ["layer group"] + [f"λ {lab}" for lab in unique_labels(fts)]
    lams = merged.lambdas or []
    if not lams:
        return headers, []
    names = groups or list(lams[0].keys())
    rows = [[g] + [round(float(d.get(g, float("nan"))), 4) for d in lams] for g in names]
    return headers, rows


def summary_markdown(merged: MergedModel) -> str:
    r = merged.report
    s = merged.settings
    hit = merged.cache and merged.cache.get("hit")
    done = (f"— {reused_line(merged.cache['age_s'], merged.cache.get('compute_s'), 'merge')}; loaded in "
            f"**{merged.seconds:.1f} s**") if hit else \
        f"merged in **{merged.seconds:.1f} s** (including loading it for chat)"
    bits = [f"✓ **{merged.label}** {done}",
            f"{format_bytes(r.get('bytes_written', 0))} in {r.get('num_tensors', '?')} tensors, "
            f"{r.get('num_shards', '?')} shard(s)"]
    spec = registry.SPECS.get(s["method"])
    used = [k for k in PARAM_CONTROLS if spec is not None and spec.uses(k) and k in s]
    if used:
        bits.append(", ".join(f"{OPT[k].label.split(' (')[0].lower()} {s[k]:g}" if isinstance(s[k], float)
                              else f"{OPT[k].label.split(' (')[0].lower()} {s[k]}" for k in used))
    out = (r.get("recipe") or {}).get("output") or {}
    heads, tok = out.get("heads") or {}, out.get("tokenizer") or {}
    if heads.get("merged") == "untied" and "tied" in [heads.get("base"), *(heads.get("fine_tuned") or [])]:
        bits.append("untied output head (the tied models' heads read from their embeddings)")
    if tok:
        bits.append(f"tokenizer + chat template ({tok.get('template')}) from {tok.get('from')}")
    notes = "".join(f"\n- ⚠ {n}" for n in r.get("vocab_notes") or [])
    return " · ".join(bits) + notes + f"\n\nThe merged model is loaded: try it in {plan.links(['chat', 'evaluate'])}."


def acm_status_line(state: SessionState | None) -> str:
    """Whether an ACM merge can run now (it needs an analysis, components/steps.py)."""
    analysis = getattr(state, "analysis", None)
    if analysis is None:
        return (f"ACM needs the per-layer NMI: {plan.how_to_get(plan.ANALYSIS)} (a few seconds on the demo "
                "models), or choose the plain mode.")
    labels = ", ".join(f"`{lab}`" for lab in unique_labels([m.model for m in analysis.models]))
    return f"ACM will use the analysis of {labels} ({len(analysis.groups)} layer groups)."


def control_visibility(method: str) -> dict[str, bool]:
    """Which parameter controls the method uses (its ``acm.methods`` spec)."""
    spec = registry.SPECS.get(method)
    return {k: spec is not None and spec.uses(k) for k in PARAM_CONTROLS}


def method_info(method: str) -> str:
    """One line under the dropdown: the method's formula (from the registry)."""
    spec = registry.SPECS.get(method)
    return f"**{spec.label}**: {spec.formula}" if spec else ""


def method_changed(method: str, mode: str):
    """Show only the knobs the method uses; ACM only where it applies."""
    import gradio as gr

    visible = control_visibility(method)
    acm = method in registry.ACM_METHODS
    return (*(gr.update(visible=visible[k]) for k in PARAM_CONTROLS),
            gr.update(interactive=acm, value=mode if acm else PLAIN),
            gr.update(visible=acm and mode == ACM), gr.update(value=method_info(method)))


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.MERGE, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        method = gr.Dropdown(METHOD_CHOICES, value=DEFAULT_METHOD, label="Method", scale=2)
        mode = gr.Radio([ACM, PLAIN], value=ACM, label="Coefficients", scale=2)
    with gr.Row():
        t = gr.Slider(0, T_MAX, value=DEFAULT_T, step=0.5, label="Sharpness t (ACM)",
                      info="follows the Analyse tab; t = 0 equals plain", scale=2)
        alpha = gr.Slider(0.0, 2.0, value=DEFAULT_ALPHA, step=0.05, label="α", scale=2,
                          info="plain: the coefficient; ACM: the mean λ")
    info = gr.Markdown(method_info(DEFAULT_METHOD), elem_classes=["muted"])
    with gr.Row():
        vis = control_visibility(DEFAULT_METHOD)

        def slider(key, value=None):
            o = OPT[key]
            return gr.Slider(o.lo, o.hi, value=o.default if value is None else value, step=o.step, label=o.label,
                             info=o.help, visible=vis[key])

        density = slider("density", DEFAULT_DENSITY)
        trim_scope = gr.Radio(list(OPT["trim_scope"].choices), value="tensor", label=OPT["trim_scope"].label,
                              info=OPT["trim_scope"].help, visible=vis["trim_scope"])
        drop_rate = slider("drop_rate")
        gamma = slider("gamma")
        epsilon = slider("epsilon")
        seed = gr.Number(value=OPT["seed"].default, precision=0, label=OPT["seed"].label, info=OPT["seed"].help,
                         visible=vis["seed"])
    with gr.Row():
        tokenizer_from = gr.Dropdown(TOKENIZER_CHOICES, value="base", label="Tokenizer & chat template from",
                                     info="R1-distilled models ship their own template and special tokens",
                                     scale=0, min_width=280)
    acm_status = gr.Markdown(acm_status_line(None), elem_classes=["muted"])
    with gr.Row():
        merge_btn = gr.Button("Merge", variant="primary", scale=0, min_width=180, elem_id="merge-btn")
    summary = gr.Markdown("No merge yet.")
    with gr.Accordion("λ used per layer group", open=False):
        table = gr.Dataframe(interactive=False, max_height=320)
    with gr.Accordion("Merge report (JSON)", open=False):
        report = gr.JSON()
    from components import rules
    rule = rules.build()   # the sigmoid coefficient rule's panel and button (components/rules.py)
    return SimpleNamespace(rule=rule, acm_status=acm_status, method=method, mode=mode, t=t, alpha=alpha,
                           density=density, trim_scope=trim_scope, gamma=gamma, epsilon=epsilon, info=info,
                           drop_rate=drop_rate, seed=seed, tokenizer_from=tokenizer_from, merge_btn=merge_btn,
                           summary=summary, table=table,
                           report=report)


def wire(ui) -> None:
    import gradio as gr

    g, m, a = ui.merge, ui.models, ui.analysis
    g.method.change(method_changed, [g.method, g.mode], [*(getattr(g, k) for k in PARAM_CONTROLS), g.mode, g.t, g.info],
                    api_visibility="private", queue=False)
    g.mode.change(lambda mode, method: gr.update(visible=mode == ACM and method in registry.ACM_METHODS),
                  [g.mode, g.method], g.t,
                  api_visibility="private", queue=False)
    # t and α explored in the Analyse tab carry over to the merge (client-side, no round trip).
    a.t.change(None, a.t, g.t, js="(v) => v", api_visibility="private", queue=False)
    a.alpha.change(None, a.alpha, g.alpha, js="(v) => v", api_visibility="private", queue=False)

    @gpu(duration=600)
    def merge(state, base=None, fts=None, method=DEFAULT_METHOD, mode=ACM, t=DEFAULT_T, alpha=DEFAULT_ALPHA,
              density=DEFAULT_DENSITY, drop_rate=OPT["drop_rate"].default, trim_scope="tensor", seed=0, clip_min=None,
              clip_max=None, device="auto", dtype="auto", trust=False, tokenizer_from="base",
              gamma=OPT["gamma"].default, epsilon=OPT["epsilon"].default, progress=gr.Progress()):
        """Merge base + fine-tuned models (plain or ACM) and load the result for chat and evaluation."""
        progress(0.0, desc="starting the merge")
        merged = run_merge(state, base, fts, method=method, mode=mode, t=t, alpha=alpha, density=density,
                           drop_rate=drop_rate, trim_scope=trim_scope, seed=seed, clip_min=clip_min,
                           clip_max=clip_max, device=device, dtype=dtype, trust_remote_code=trust,
                           tokenizer_from=tokenizer_from, gamma=gamma, epsilon=epsilon,
                           progress=progress_callback(progress))
        groups = list(state.analysis.groups) if state.analysis is not None else None
        headers, rows = lambda_rows(merged, groups)
        report = {**merged.report, "label": merged.label, "settings": merged.settings, "cache": merged.cache}
        import pandas as pd

        return summary_markdown(merged), pd.DataFrame(rows, columns=headers), _jsonable(report)

    for event in plan.events(ui, plan.ANALYSIS):
        event.then(acm_status_line, ui.state, g.acm_status, api_visibility="private", queue=False)

    def admit_merge():
        admit(ui.demo, "the merge")

    ui.merge_event = g.merge_btn.click(
        admit_merge, None, None, queue=False, api_visibility="private", show_progress="hidden").success(
        ui_errors(merge),
        [ui.state, m.base, m.fts, g.method, g.mode, g.t, g.alpha, g.density, g.drop_rate, g.trim_scope, g.seed,
         a.clip_min, a.clip_max, m.device, m.dtype, m.trust, g.tokenizer_from, g.gamma, g.epsilon],
        [g.summary, g.table, g.report], api_name="merge", concurrency_id="heavy", concurrency_limit=1,
        show_progress_on=[g.summary])
    from components import rules
    rules.wire(ui)
    # Both buttons make a merged model; later steps chain on either (components/steps.py MERGED).
    ui.merge_event = [ui.merge_event, ui.rule_merge_event]


def _jsonable(obj):
    """Paths and other objects as strings so the report can be shown as JSON."""
    import json

    return json.loads(json.dumps(obj, default=str))
