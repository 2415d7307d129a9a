"""Merge tab add-on — the sigmoid coefficient rule's two-stage workflow behind one button.

Self-contained: ``build()`` draws a small accordion (θ, estimator, button, sℓ table) inside the Merge
tab; ``wire(ui)`` reads the Merge tab's method settings and the Calibration tab's source, runs
``acm.sigmoid_rule.merge_with_sigmoid_rule`` through the heavy queue like Merge, and sets the
session's merged model the same way the Merge button does. No maths here (``acm.rules``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from types import SimpleNamespace

from components.common import gpu, none_if_auto, progress_callback, ui_errors
from components.models import validate_selection
from components.state import MergedModel, SessionState, admit, load_merged

# acm.rules.SIGMOID's defaults, repeated so building the UI does not import the library.
DEFAULT_THETA = 0.7
ESTIMATOR_CHOICES = [("labels: scikit-learn mutual_info_score of bf16 values (the derivative's)", "labels"),
                     ("binned: 64-bin joint histogram per sample (ours)", "binned")]
INTRO = ("**Sigmoid rule** — from a public derivative of the ACM authors' code, not the paper. Three stages in one "
         "click: the plain merge set above → per calibration sample i and layer ℓ, the MI between base and merged "
         "activations → sℓ = meanᵢ σ(θ·(MIℓ,ᵢ − maxᵢ MIℓ,ᵢ)), and every layer group keeps (1 − sℓ) of its delta from "
         "the base (between half and all of it). Uses the calibration set of step 2.")


def rule_label(method: str, alpha: float, theta: float, estimator: str, merge_id: int) -> str:
    from components.merge import METHOD_SHORT

    return f"#{merge_id} {METHOD_SHORT.get(method, method)} α={alpha:g} + sigmoid θ={theta:g} ({estimator})"


def run_rule_merge(state: SessionState, base: str | None, fts, *, method: str = "ties", alpha: float = 0.7,
                   density: float = 0.7, drop_rate: float = 0.3, trim_scope: str = "tensor", seed: int = 0,
                   theta: float = DEFAULT_THETA, estimator: str = "labels", cal_mode: str | None = None,
                   cal_upload: str | None = None, hub_id: str | None = None, split: str | None = None,
                   field: str | None = None, samples=None, clusters=20, fraction=0.1, max_tokens=128, device: str | None = "auto",
                   dtype: str | None = "auto", tokenizer_from: str = "base",
                   progress: Callable[[float, str], None] | None = None) -> MergedModel:
    """Plain merge → MI base vs merged → rescale, into a fresh session folder; then load it for chat.

    Like ``components.merge.run_merge``: the session's merged model changes only when all succeeded.
    """
    from acm.merge import MergeOptions
    from acm.rules import get_rule
    from acm.sigmoid_rule import merge_with_sigmoid_rule
    from components.calibration import resolve_calibration
    from components.merge import METHOD_ALIASES

    base, fts = validate_selection(base, fts)
    params = get_rule("sigmoid").validate({"theta": theta, "estimator": estimator})
    method = METHOD_ALIASES.get(str(method).strip().lower(), method)
    cal = resolve_calibration(cal_mode, cal_upload, hub_id, split, field)
    options = MergeOptions(method=method, alpha=float(alpha), density=float(density), drop_rate=float(drop_rate),
                           trim_scope=trim_scope, seed=int(seed), dtype=none_if_auto(dtype),
                           device=none_if_auto(device), tokenizer_from=(tokenizer_from or "base"))
    options.validate(len(fts))
    state.merge_count += 1
    merge_id = state.merge_count
    out_dir = state.subdir("merges") / f"merge-{merge_id:02d}-{method}-sigmoid"
    t0 = time.perf_counter()
    try:
        result = merge_with_sigmoid_rule(
            base, fts, out_dir, options, calibration=cal["source"], field=cal["field"], split=cal["split"],
            samples=None if samples in (None, "", 0) else int(samples), clusters=int(clusters or 20),
            fraction=float(fraction or 0.1), max_tokens=int(max_tokens or 128),
            analysis_device=none_if_auto(device), force=True, show_progress=False,
            progress=progress_callback(progress, (0.0, 0.9)), **params)
        if progress:
            progress(0.92, "loading the merged model for chat")
        model, tokenizer = load_merged(out_dir, device, dtype, shared=False)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    merged = MergedModel(
        merge_id=merge_id, label=rule_label(method, float(alpha), params["theta"], params["estimator"], merge_id),
        out_dir=out_dir, report={**result.merge.to_dict(), "rule": result.merge.recipe.get("rule")},
        lambdas=[result.scales], seconds=seconds, model=model, tokenizer=tokenizer,
        settings=dict(base=base, fts=fts, method=method, acm=False, t=None, alpha=float(alpha), density=float(density),
                      drop_rate=float(drop_rate), trim_scope=trim_scope, seed=int(seed), clip=None,
                      dtype=none_if_auto(dtype), tokenizer_from=options.tokenizer_from, rule="sigmoid",
                      theta=params["theta"], estimator=params["estimator"], calibration=cal["label"]))
    state.adopt_merged(merged, seconds)
    if progress:
        progress(1.0, "done")
    return merged


def score_rows(merged: MergedModel) -> tuple[list[str], list[list]]:
    """sℓ and the kept fraction 1 − sℓ per layer group (the rule's table)."""
    rule = (merged.report or {}).get("rule") or {}
    s = rule.get("s") or {}
    return ["layer group", "s", "delta kept (1 − s)"], [[g, round(v, 4), round(1 - v, 4)] for g, v in s.items()]


def build() -> SimpleNamespace:
    import gradio as gr

    with gr.Accordion("Coefficient rule: sigmoid (two-stage, one click)", open=False, elem_id="rule-panel"):
        gr.Markdown(INTRO, elem_classes=["muted"])
        with gr.Row():
            theta = gr.Slider(0.05, 10.0, value=DEFAULT_THETA, step=0.05, label="θ", scale=1,
                              info="larger θ → sℓ nearer 0 → more of the delta kept where samples differ")
            estimator = gr.Radio(ESTIMATOR_CHOICES, value="labels", label="per-sample MI estimator", scale=2)
        button = gr.Button("Merge with sigmoid rule", variant="secondary", scale=0, min_width=220,
                           elem_id="rule-merge-btn")
        summary = gr.Markdown("")
        table = gr.Dataframe(interactive=False, max_height=320, label="sℓ per layer group")
    return SimpleNamespace(theta=theta, estimator=estimator, button=button, summary=summary, table=table)


def wire(ui) -> None:
    import gradio as gr

    g, m, c = ui.merge, ui.models, ui.calibration
    r = g.rule

    @gpu(duration=900)
    def merge_sigmoid(state, base=None, fts=None, method="ties", alpha=0.7, density=0.7, drop_rate=0.3,
                      trim_scope="tensor", seed=0, theta=DEFAULT_THETA, estimator="labels", cal_mode=None,
                      cal_upload=None, hub_id=None, split=None, field=None, samples=None, clusters=20, fraction=0.1,
                      max_tokens=128,
                      device="auto", dtype="auto", tokenizer_from="base", progress=gr.Progress()):
        """Plain merge, MI of base vs merged per sample, rescale each group's delta; load the result."""
        import pandas as pd

        from components.merge import _jsonable, lambda_rows, summary_markdown

        progress(0.0, desc="stage 1/3: plain merge")
        merged = run_rule_merge(state, base, fts, method=method, alpha=alpha, density=density, drop_rate=drop_rate,
                                trim_scope=trim_scope, seed=seed, theta=theta, estimator=estimator,
                                cal_mode=cal_mode, cal_upload=cal_upload, hub_id=hub_id, split=split, field=field,
                                samples=samples, clusters=clusters, fraction=fraction, max_tokens=max_tokens,
                                device=device, dtype=dtype,
                                tokenizer_from=tokenizer_from, progress=progress_callback(progress))
        headers, rows = lambda_rows(merged)
        s_headers, s_rows = score_rows(merged)
        report = {**merged.report, "label": merged.label, "settings": merged.settings}
        line = f"✓ **{merged.label}**: every group keeps {min(r[2] for r in s_rows):.3f}–{max(r[2] for r in s_rows):.3f} " \
               "of its delta." if s_rows else ""
        return (summary_markdown(merged), pd.DataFrame(rows, columns=[h.replace("λ", "kept") for h in headers]),
                _jsonable(report), line, pd.DataFrame(s_rows, columns=s_headers))

    ui.rule_merge_event = r.button.click(
        lambda: admit(ui.demo, "the merge"), None, None, queue=False, api_visibility="private",
        show_progress="hidden").success(
        ui_errors(merge_sigmoid),
        [ui.state, m.base, m.fts, g.method, g.alpha, g.density, g.drop_rate, g.trim_scope, g.seed, r.theta,
         r.estimator, c.mode, c.upload, c.hub_id, c.split, c.field, c.samples, c.clusters, c.fraction, c.max_tokens,
         m.device, m.dtype,
         g.tokenizer_from],
        [g.summary, g.table, g.report, r.summary, r.table], api_name="merge_sigmoid", concurrency_id="heavy",
        concurrency_limit=1, show_progress_on=[r.summary])
