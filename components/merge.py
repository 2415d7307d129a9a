"""Step 4 — Merge: plain or ACM-weighted, any method of the registry (acm.merging.methods), streamed into the workspace.

ACM means the paper's rule by default (``acm.rules.ACM``: λ from per-sample MI, θ₀ + (1/N)·Σ λᵢ·τᵢ, no α);
its two switches and staged variants live in components/rules.py, this project's softmax rule stays
selectable. λ and the recipe's ``acm`` entry always come from ``acm.rules.coefficients.compute`` (one library
path). The dropdown, which parameter controls are visible and their help come from ``acm.merging.methods``
(torch-free, so building the UI does not import torch).
"""

from __future__ import annotations

import inspect
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from acm.merging import methods as registry
from acm.rules import DEFAULT_RULE
from acm.sizes import format_bytes
from components import help as texts
from components import rules
from components import steps as plan
from components.analysis import DEFAULT_ALPHA, DEFAULT_T, RULE_CHOICES, rule_key, rule_t, t_slider_settings
from components.common import gpu, merge_label, none_if_auto, optional_float, progress_callback, t_slider, ui_errors, unique_labels
from components.models import validate_selection
from components.state import (
    MergedModel,
    SessionState,
    admit,
    cached_merge,
    light_first,
    load_merged,
    reused_line,
    same_request_key,
    serve_light,
    shared_merge,
)

METHOD_CHOICES = registry.ui_choices()
METHOD_SHORT = {k: s.short for k, s in registry.SPECS.items()}
ACM, PLAIN = "ACM (per-layer λ)", "plain (α everywhere)"
DEFAULT_METHOD = "ties"
DEFAULT_DENSITY = 0.7
OPT = registry.OPTIONS
# The parameter controls below the method; each is visible only for the methods whose spec uses it.
# Method parameters with a control of their own, from their OptionSpec (acm.merging.methods.OPTIONS).
PARAM_CONTROLS = tuple(k for k, o in OPT.items() if o.control)
# Whose tokenizer / chat template / generation defaults the merged model carries (acm.checkpoints.templates).
TOKENIZER_CHOICES = [("base model", "base")] + [(f"fine-tuned {i}", f"ft:{i}")
                                                 for i in range(1, registry.MAX_FINE_TUNED + 1)]
# Short names accepted from API callers (gradio_client) besides the dropdown values.
METHOD_ALIASES = registry.ALIASES
__all__ = ["merge_label", "run_merge"]


def normalize_mode(mode: str | None) -> str:
    """The radio's labels, or simply "acm" / "plain" from scripts."""
    text = (mode or ACM).strip().lower()
    if text.startswith("acm"):
        return ACM
    if text.startswith("plain"):
        return PLAIN
    from acm.errors import InputError

    raise InputError(f"unknown coefficient mode {mode!r}: use 'acm' or 'plain'")


def _check_analysis(state: SessionState, fts: list[str]):
    from acm.errors import InputError

    analysis = state.analysis
    if analysis is None:
        raise InputError(f"ACM needs the analysis: {plan.how_to_get(plan.ANALYSIS, markdown=False)} "
                         "(or choose the plain mode)")
    if len(analysis.models) != len(fts):
        raise InputError(f"the analysis covers {len(analysis.models)} fine-tuned model(s) but {len(fts)} are "
                         "selected; analyse the selected models first")
    return analysis


def _softmax_metric(state: SessionState, analysis, metric: str | None) -> str:
    """The similarity that drives the softmax rule: the one chosen in step 3 ("λ driven by"; NMI unless changed)."""
    from acm.errors import InputError

    chosen = (state.coef_view or {}).get("metric")
    metric = metric or chosen or "nmi"
    if metric not in analysis.metrics():
        if metric != chosen:       # asked for explicitly (a tune point)
            raise InputError(f"the analysis has no {metric} values; analyse with that metric first")
        metric = analysis.metrics()[0]
    return metric


def merge_coefficients(state: SessionState, fts: list[str], rule: str, t: float, alpha: float, clip, metric=None):
    """(Coefficients, task-vector weights, the recipe's acm entry) from ``acm.rules.coefficients.compute`` —
    the one library path (the paper's rule: λ/N per task vector; softmax: λ)."""
    from acm.rules.coefficients import compute

    analysis = _check_analysis(state, fts)
    if rule == "acm":
        coef = compute(analysis, "acm", t, clip=clip)
    elif rule == "fim":
        coef = compute(analysis, "fim", t, clip=clip)
    else:
        coef = compute(analysis, "softmax", t, alpha, clip, metric=_softmax_metric(state, analysis, metric))
    return coef, coef.weights(), coef.entry()


def merge_options(method: str, *, alpha, density, drop_rate, trim_scope, seed, gamma, epsilon, dtype, device,
                  tokenizer_from):
    """``MergeOptions`` checked against the method's spec (a hidden control's leftover value does not apply)."""
    from acm.merging.engine import MergeOptions

    spec = registry.SPECS[method]
    if not spec.uses("trim_scope"):
        trim_scope = "tensor"
    seed = int(seed) if isinstance(seed, float) and seed.is_integer() else seed
    registry.validate_options(method, alpha=alpha, density=density, drop_rate=drop_rate, gamma=gamma,
                              epsilon=epsilon, trim_scope=trim_scope, seed=seed)
    return MergeOptions(method=method, alpha=float(alpha), density=float(density), drop_rate=float(drop_rate),
                        trim_scope=trim_scope, seed=int(seed), gamma=float(gamma), epsilon=float(epsilon),
                        dtype=none_if_auto(dtype), device=none_if_auto(device), tokenizer_from=(tokenizer_from or "base"))


def run_merge(state: SessionState, base: str | None, fts, *, method: str = DEFAULT_METHOD, mode: str = ACM,
              t: float | None = None, alpha: float = DEFAULT_ALPHA, density: float = DEFAULT_DENSITY,
              drop_rate: float = OPT["drop_rate"].default, trim_scope: str = "tensor", seed: int = 0, clip_min=None,
              clip_max=None, device: str | None = "auto", dtype: str | None = "auto", trust_remote_code: bool = False,
              tokenizer_from: str = "base", gamma: float = OPT["gamma"].default,
              epsilon: float = OPT["epsilon"].default, progress: Callable[[float, str], None] | None = None,
              metric: str | None = None, rule: str | None = DEFAULT_RULE, against: str | None = "fine-tuned",
              applies: str | None = "task-vectors", estimator: str = "labels", calibration: dict | None = None,
              cal_settings: dict | None = None, compute: bool = True, peek: bool = False) -> MergedModel | bool | None:
    """Merge into a fresh folder of the session workspace and load the result for chat/eval.

    ``compute=False``: only a merge the shared cache holds with its model already loaded (no heavy
    work: the light path's question); None otherwise, and the session is left as it was. ``peek``
    (with ``compute=False``): only whether it would be found (True / None), the session unchanged.

    ``rule``: ``acm`` (the paper's, default; ``against`` / ``applies`` its switches — every setting but
    fine-tuned · task-vectors runs staged, ``components.rules``) or ``softmax`` (ours; ``metric``). ``t``
    None = the rule's default. The session's current merged model is replaced only when everything
    succeeded, so a failed merge leaves the previous one usable.
    """
    from acm.errors import InputError

    base, fts = validate_selection(base, fts)
    mode = normalize_mode(mode)
    method = registry.check_method(method)
    spec = registry.SPECS[method]
    use_acm = mode == ACM and spec.acm
    if mode == ACM and not spec.acm:
        raise InputError(f"ACM coefficients scale task vectors; {spec.label.lower()} averaging has none. "
                         "Choose a task-vector method (TA, TIES, DARE, Breadcrumbs, DELLA), or the plain mode")
    against, applies = rules.switches(rule, against, applies)
    key = rule_key(rule)
    t = rule_t(key, t) if use_acm else None
    paper = use_acm and key == "acm" and not rules.staged(against, applies)
    # Eq. 3 (and the fim rule) have no α (λ takes its place): the merge records 1, not a slider value it never used.
    options = merge_options(method, alpha=1.0 if paper or (use_acm and key == "fim") else alpha, density=density, drop_rate=drop_rate,
                            trim_scope=trim_scope, seed=seed, gamma=gamma, epsilon=epsilon, dtype=dtype, device=device,
                            tokenizer_from=tokenizer_from)
    lo, hi = optional_float(clip_min), optional_float(clip_max)
    clip = None if lo is None and hi is None else (lo, hi)
    if use_acm and key == "acm" and rules.staged(against, applies):
        if not compute:
            return None                         # staged merges compute every time (components.rules)
        return rules.run_rule_merge(state, base, fts, options, t=t, against=against, applies=applies, clip=clip,
                                    estimator=estimator, calibration=calibration, cal_settings=cal_settings,
                                    device=device, dtype=dtype, progress=progress)
    coef, weights, entry = merge_coefficients(state, fts, key, t, options.alpha, clip, metric) if use_acm else \
        (None, None, None)
    used_metric = (coef.params.get("metric") if coef is not None else None)
    label_args = dict(rule=key, against=against, applies=applies)
    suffix = {"acm": "-acm", "softmax": "-softmax", "fim": "-fim"}[key] if use_acm else ""
    if compute:
        state.merge_count += 1
        merge_id = state.merge_count
        out_dir = state.subdir("merges") / f"merge-{merge_id:02d}-{method}{suffix}"
        merged = _merge_and_load(state, base, fts, out_dir, f"{method}{suffix}", options, weights, entry, device,
                                 dtype, progress)
    else:
        merged = _reuse_loaded(base, fts, f"{method}{suffix}", options, weights, entry, device, dtype)
        if merged is None or peek:
            if merged is not None:
                merged.drop()
            return True if merged is not None else None
        state.merge_count += 1
        merge_id = state.merge_count
    merged.merge_id = merge_id
    merged.label = merge_label(method, use_acm, t, options.alpha, merge_id, used_metric, **label_args)
    merged.lambdas = coef.by_model() if coef is not None else merged.lambdas
    merged.settings = dict(base=base, fts=fts, method=method, acm=use_acm, t=t, alpha=options.alpha,
                           rule=key if use_acm else None, against=against if paper else None,
                           applies=applies if paper else None, metric=used_metric,
                           density=options.density, drop_rate=options.drop_rate, trim_scope=options.trim_scope,
                           seed=options.seed, gamma=options.gamma, epsilon=options.epsilon,
                           clip=coef.params["clip"] if coef is not None else None, dtype=none_if_auto(dtype),
                           tokenizer_from=options.tokenizer_from)
    state.adopt_merged(merged, merged.seconds)
    if progress:
        progress(1.0, "done")
    return merged


def _merge_and_load(state: SessionState, base: str, fts: list[str], out_dir: Path, name: str, options, weights,
                    entry: dict | None, device, dtype, progress) -> MergedModel:
    """One merge (from the shared cache when it has it) loaded for chat; nothing is left behind on failure."""
    from acm.merging.engine import merge_models

    t0 = time.perf_counter()
    shared = shared_merge(base, fts, name, options, weights, entry, progress)
    try:
        if shared is None:
            report = merge_models(base, fts, out_dir, options, lambdas=weights, acm=entry, force=True,
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
    return MergedModel(merge_id=0, label="", out_dir=Path(out_dir), report=report_dict, lambdas=used or weights,
                       cache=shared and {k: v for k, v in shared.items() if k not in ("release", "report", "out_dir")},
                       release=shared and shared["release"], settings={}, seconds=time.perf_counter() - t0,
                       model=model, tokenizer=tokenizer)


def _reuse_loaded(base: str, fts: list[str], name: str, options, weights, entry: dict | None, device,
                  dtype) -> MergedModel | None:
    """The shared cache's merge when it is stored and its model already loaded (no heavy work), else None."""
    t0 = time.perf_counter()
    shared = cached_merge(base, fts, name, options, weights, entry, device, dtype)
    if shared is None:
        return None
    try:
        model, tokenizer = load_merged(shared["out_dir"], device, dtype, shared=True)     # in memory already
    except BaseException:
        shared["release"]()
        raise
    return MergedModel(merge_id=0, label="", out_dir=Path(shared["out_dir"]), report=shared["report"],
                       lambdas=shared["report"].get("lambdas") or weights,
                       cache={k: v for k, v in shared.items() if k not in ("release", "report", "out_dir")},
                       release=shared["release"], settings={}, seconds=time.perf_counter() - t0, model=model,
                       tokenizer=tokenizer)


def lambda_rows(merged: MergedModel, groups: list[str] | None = None) -> tuple[list[str], list[list]]:
    """The λ actually used, as a table: one row per λ key, one column per fine-tuned model (one column
    when λ rescaled a merged delta or came from MI against a merge: one λ per key for all models)."""
    s = merged.settings
    fts = s.get("fts") or []
    lams = merged.lambdas or []
    shared = s.get("rule") == "acm" and rules.staged(s.get("against") or "fine-tuned",
                                                     s.get("applies") or "task-vectors")
    if len(lams) == len(fts) and not shared:
        headers = ["layer group"] + [f"λ {lab}" for lab in unique_labels(fts)]
    else:
        headers = ["layer group"] + ["λ (all models)"] * len(lams)
    if not lams:
        return headers, []
    names = groups if groups and set(groups) == set(lams[0]) else list(lams[0].keys())   # acm keys: + head.norm
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
    if s.get("rule") == "acm" and not rules.staged(s.get("against") or "fine-tuned",
                                                     s.get("applies") or "task-vectors"):
        n = len(s.get("fts") or [])
        bits.append(f"the paper's rule: each task vector weighted λ/{n} (Eq. 3)")
    stages = rules.stage_line(merged)
    if stages:
        bits.append(stages)
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
        return (f"ACM needs the analysis: {plan.how_to_get(plan.ANALYSIS)} (a few seconds on the demo "
                "models), or choose the plain mode.")
    labels = ", ".join(f"`{lab}`" for lab in unique_labels([m.model for m in analysis.models]))
    line = f"ACM will use the analysis of {labels} ({len(analysis.groups)} layer groups)."
    if not analysis.has_sample_mi():
        line += " It has no per-sample MI: the paper's rule needs a new analysis (softmax works)."
    return line


def control_visibility(method: str) -> dict[str, bool]:
    """Which parameter controls the method uses (its ``acm.merging.methods`` spec)."""
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
            gr.update(interactive=acm, value=mode if acm else PLAIN), gr.update(value=method_info(method)))


def coefficient_controls(method: str, mode: str, rule: str | None, against: str | None, applies: str | None):
    """What the coefficient choice shows: the rule (ACM only), its switches (the paper's rule only), the
    estimator (MI against a merge), t (ACM), α (not for Eq. 3) and the one-line note."""
    import gradio as gr

    acm = normalize_mode(mode) == ACM and method in registry.ACM_METHODS
    key = rule_key(rule)
    against, applies = against or rules.PAPER[0], applies or rules.PAPER[1]
    paper = acm and key == "acm"
    alpha = not acm or rules.uses_alpha(key, against, applies)
    alpha_label = ("α (mean λ)" if acm and key == "softmax" else
                   "α of the plain merge (stage 1)" if acm else "α")
    text = rules.note(key, against, applies) if acm else "**plain**: every layer group gets α."
    return (gr.update(visible=acm), gr.update(visible=paper), gr.update(visible=paper and against == "merged"),
            gr.update(visible=acm), gr.update(visible=alpha, label=alpha_label), gr.update(value=text))


def option_control(o, value=None, visible: bool = True):
    """The app's control for one method parameter, from its ``OptionSpec``: a slider (float), a number
    (int), a radio (choice) or a checkbox (bool), labelled and explained by the spec."""
    import gradio as gr

    value = o.default if value is None else value
    if o.kind == "choice":
        return gr.Radio(list(o.choices), value=value, label=o.label, info=o.help, visible=visible)
    if o.kind == "int":
        return gr.Number(value=value, precision=0, label=o.label, info=o.help, visible=visible)
    if o.kind == "bool":
        return gr.Checkbox(value=value, label=o.label, info=o.help, visible=visible)
    return gr.Slider(o.lo, o.hi, value=value, step=o.step, label=o.label, info=o.help, visible=visible)


def build() -> SimpleNamespace:
    import gradio as gr

    gr.Markdown(texts.MERGE, elem_classes=["step-help"])
    with gr.Row(equal_height=True):
        method = gr.Dropdown(METHOD_CHOICES, value=DEFAULT_METHOD, label="Method", scale=2)
        mode = gr.Radio([ACM, PLAIN], value=ACM, label="Coefficients", scale=2)
    rule_radio = gr.Radio(RULE_CHOICES, value=DEFAULT_RULE, label="Coefficient rule", elem_id="merge-rule-select",
                          info="follows the Analyse tab")
    rule = rules.build()   # the paper's rule's switches, their note and the old sigmoid endpoint
    slider = t_slider_settings(DEFAULT_RULE)
    with gr.Row():
        t = t_slider(slider["minimum"], slider["maximum"], value=slider["value"], step=slider["step"],
                     label=slider["label"], info="follows the Analyse tab", scale=2, elem_id="merge-t-slider")
        alpha = gr.Slider(0.0, 2.0, value=DEFAULT_ALPHA, step=0.05, label="α", scale=2, visible=False,
                          info="plain: the coefficient; softmax: the mean λ; staged: the plain merge's α",
                          elem_id="merge-alpha-slider")
    info = gr.Markdown(method_info(DEFAULT_METHOD), elem_classes=["muted"])
    with gr.Row():
        vis = control_visibility(DEFAULT_METHOD)
        params = {k: option_control(OPT[k], DEFAULT_DENSITY if k == "density" else None, vis[k])
                  for k in PARAM_CONTROLS}
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
    return SimpleNamespace(rule=rule, rule_radio=rule_radio, acm_status=acm_status, method=method, mode=mode, t=t,
                           alpha=alpha, info=info, tokenizer_from=tokenizer_from, **params,
                           merge_btn=merge_btn, summary=summary, table=table, report=report)


def _wire_controls(ui) -> None:
    """Method, mode, rule and switches decide which controls show; the Analyse tab's rule and t carry over."""
    import gradio as gr

    g, a, r = ui.merge, ui.analysis, ui.merge.rule
    g.method.change(method_changed, [g.method, g.mode], [*(getattr(g, k) for k in PARAM_CONTROLS), g.mode, g.info],
                    api_visibility="private", queue=False)
    gr.on([g.method.change, g.mode.change, g.rule_radio.change, r.against.change, r.applies.change],
          coefficient_controls, [g.method, g.mode, g.rule_radio, r.against, r.applies],
          [g.rule_radio, r.panel, r.estimator, g.t, g.alpha, r.note], api_visibility="private", queue=False,
          show_progress="hidden")
    g.rule_radio.change(lambda rule: gr.update(**{k: v for k, v in t_slider_settings(rule).items() if k != "info"}),
                        g.rule_radio, g.t, api_visibility="private", queue=False, show_progress="hidden")
    # The rule, t and α explored in the Analyse tab carry over to the merge (client-side, no round trip).
    a.rule.change(None, a.rule, g.rule_radio, js="(v) => v", api_visibility="private", queue=False)
    a.t.change(None, a.t, g.t, js="(v) => v", api_visibility="private", queue=False)
    a.alpha.change(None, a.alpha, g.alpha, js="(v) => v", api_visibility="private", queue=False)


def _merge_outputs(state: SessionState, merged: MergedModel):
    """(summary, λ table, report) as the Merge tab shows them."""
    import pandas as pd

    headers, rows = lambda_rows(merged, list(state.analysis.groups) if state.analysis is not None else None)
    report = {**merged.report, "label": merged.label, "settings": merged.settings, "cache": merged.cache}
    return summary_markdown(merged), pd.DataFrame(rows, columns=headers), _jsonable(report)


def _calibration(needed: bool, cal_mode, cal_upload, hub_id, split, field, samples, clusters, fraction, max_tokens):
    """(calibration, analysis settings) from step 2 when MI is measured against a merge, else (None, None)."""
    if not needed:
        return None, None
    from components.calibration import resolve_calibration

    cal = resolve_calibration(cal_mode, cal_upload, hub_id, split, field)
    settings = {"samples": int(samples) if samples else None, "clusters": int(clusters or 20),
                "fraction": float(fraction or 0.1), "max_tokens": int(max_tokens or 128)}
    return cal, settings


def wire(ui) -> None:
    import gradio as gr

    g, m, a, c, r = ui.merge, ui.models, ui.analysis, ui.calibration, ui.merge.rule
    _wire_controls(ui)

    @gpu(duration=600)
    def merge(state, base=None, fts=None, method=DEFAULT_METHOD, mode=ACM, t=DEFAULT_T, alpha=DEFAULT_ALPHA,
              density=DEFAULT_DENSITY, drop_rate=OPT["drop_rate"].default, trim_scope="tensor", seed=0, clip_min=None,
              clip_max=None, device="auto", dtype="auto", trust=False, tokenizer_from="base",
              gamma=OPT["gamma"].default, epsilon=OPT["epsilon"].default, rule=DEFAULT_RULE, against="fine-tuned",
              applies="task-vectors", estimator="labels", cal_mode=None, cal_upload=None, hub_id=None, split=None,
              field=None, samples=None, clusters=20, fraction=0.1, max_tokens=128, progress=gr.Progress()):
        """Merge base + fine-tuned models (plain, or ACM: the paper's rule by default — ``against`` /
        ``applies`` its switches, calibration of step 2 for MI against a merge — or rule='softmax', ours)
        and load the result for chat and evaluation."""
        args = _merge_args(locals())
        progress(0.0, desc="starting the merge")
        return _merge_outputs(state, _run_merge_ui(args, progress=progress_callback(progress)))

    def merge_light(*values, **kwargs):
        args = _merge_args(MERGE_SIGNATURE.bind(*values, **kwargs))
        progress = progress_callback(args["progress"])
        # Served here, outside the heavy slot, when the shared cache holds it with its model loaded;
        # else the heavy job in the heavy slot (an API caller; the page routes a miss to the heavy event).
        return serve_light(lambda: _run_merge_ui(args, compute=False), lambda: merge(**args),
                           lambda merged: _merge_outputs(args["state"], merged), progress,
                           request_key=same_request_key("merge", args))

    MERGE_SIGNATURE = inspect.signature(merge)
    merge_light.__signature__ = MERGE_SIGNATURE           # the same /merge endpoint for API callers
    merge_light.__doc__ = merge.__doc__

    def cached(*values) -> bool:
        return bool(_run_merge_ui(_merge_args(MERGE_SIGNATURE.bind(*values)), compute=False, peek=True))

    for event in plan.events(ui, plan.ANALYSIS):
        event.then(acm_status_line, ui.state, g.acm_status, api_visibility="private", queue=False)

    cal_inputs = [c.mode, c.upload, c.hub_id, c.split, c.field, c.samples, c.clusters, c.fraction, c.max_tokens]
    light_event, heavy_event = light_first(
        ui, g.merge_btn,
        [ui.state, m.base, m.fts, g.method, g.mode, g.t, g.alpha, g.density, g.drop_rate, g.trim_scope, g.seed,
         a.clip_min, a.clip_max, m.device, m.dtype, m.trust, g.tokenizer_from, g.gamma, g.epsilon, g.rule_radio,
         r.against, r.applies, r.estimator, *cal_inputs],
        [g.summary, g.table, g.report], hit=cached, light=merge_light, heavy=merge, api_name="merge",
        what="the merge", show_progress_on=[g.summary])
    # Later steps chain on any of these events (components/steps.py MERGED).
    ui.rule_merge_event = _wire_legacy_sigmoid(ui, cal_inputs)
    ui.merge_event = [light_event, heavy_event, ui.rule_merge_event]


def _wire_legacy_sigmoid(ui, cal_inputs):
    """``/merge_sigmoid`` as before (a hidden button): the paper's rule against a plain merge, λ on its delta —
    the setting the old sigmoid rule was. Same inputs and five results as the old endpoint."""
    import gradio as gr

    g, m, r = ui.merge, ui.models, ui.merge.rule

    @gpu(duration=900)
    def merge_sigmoid(state, base=None, fts=None, method="ties", alpha=0.7, density=0.7, drop_rate=0.3,
                      trim_scope="tensor", seed=0, theta=DEFAULT_T, estimator="labels", cal_mode=None,
                      cal_upload=None, hub_id=None, split=None, field=None, samples=None, clusters=20, fraction=0.1,
                      max_tokens=128, device="auto", dtype="auto", tokenizer_from="base", progress=gr.Progress()):
        """The paper's rule with MI against a plain merge and λ on its delta (the old sigmoid rule; θ is t)."""
        progress(0.0, desc="stage 1/3: plain merge")
        cal, cal_settings = _calibration(True, cal_mode, cal_upload, hub_id, split, field, samples, clusters,
                                         fraction, max_tokens)
        merged = run_merge(state, base, fts, method=method, mode=ACM, t=theta, alpha=alpha, density=density,
                           drop_rate=drop_rate, trim_scope=trim_scope, seed=seed, device=device, dtype=dtype,
                           tokenizer_from=tokenizer_from, rule="sigmoid", estimator=estimator, calibration=cal,
                           cal_settings=cal_settings, progress=progress_callback(progress))
        summary, table, report = _merge_outputs(state, merged)
        return summary, table, report, rules.stage_line(merged), table

    return r.button.click(
        lambda: admit(ui.demo, "the merge"), None, None, queue=False, api_visibility="private",
        show_progress="hidden").success(
        ui_errors(merge_sigmoid),
        [ui.state, m.base, m.fts, g.method, g.alpha, g.density, g.drop_rate, g.trim_scope, g.seed, g.t,
         r.estimator, *cal_inputs, m.device, m.dtype, g.tokenizer_from],
        [g.summary, g.table, g.report, r.summary, r.table], api_name="merge_sigmoid", concurrency_id="heavy",
        concurrency_limit=1, show_progress_on=[g.summary])


def _merge_args(values) -> dict:
    """The merge event's arguments by name, from its ``locals()`` or a bound signature (defaults applied)."""
    if isinstance(values, inspect.BoundArguments):
        values.apply_defaults()
        return dict(values.arguments)
    return {k: v for k, v in values.items() if k in _MERGE_PARAMS}


_MERGE_PARAMS = ("state", "base", "fts", "method", "mode", "t", "alpha", "density", "drop_rate", "trim_scope", "seed",
                 "clip_min", "clip_max", "device", "dtype", "trust", "tokenizer_from", "gamma", "epsilon", "rule",
                 "against", "applies", "estimator", "cal_mode", "cal_upload", "hub_id", "split", "field", "samples",
                 "clusters", "fraction", "max_tokens", "progress")


def _run_merge_ui(args: dict, progress=None, compute: bool = True, peek: bool = False):
    """``run_merge`` from the merge event's arguments (the rule's switches and step 2's calibration)."""
    against, applies = rules.switches(args["rule"], args["against"], args["applies"])
    cal, cal_settings = _calibration(rule_key(args["rule"]) == "acm" and against == "merged", args["cal_mode"],
                                     args["cal_upload"], args["hub_id"], args["split"], args["field"], args["samples"],
                                     args["clusters"], args["fraction"], args["max_tokens"])
    return run_merge(args["state"], args["base"], args["fts"], method=args["method"], mode=args["mode"], t=args["t"],
                     alpha=args["alpha"], density=args["density"], drop_rate=args["drop_rate"],
                     trim_scope=args["trim_scope"], seed=args["seed"], clip_min=args["clip_min"],
                     clip_max=args["clip_max"], device=args["device"], dtype=args["dtype"],
                     trust_remote_code=args["trust"], tokenizer_from=args["tokenizer_from"], gamma=args["gamma"],
                     epsilon=args["epsilon"], rule=args["rule"], against=against, applies=applies,
                     estimator=args["estimator"], calibration=cal, cal_settings=cal_settings, progress=progress,
                     compute=compute, peek=peek)


def _jsonable(obj):
    """Paths and other objects as strings so the report can be shown as JSON."""
    import json

    return json.loads(json.dumps(obj, default=str))
