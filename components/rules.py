"""Merge tab add-on — the paper's rule's two switches and its staged variants (``acm.merging.rule_merge``).

The acm rule (``acm.rules.ACM``) has two switches: *MI against* the fine-tuned models (the paper's text)
or a plain merge of them (a public derivative of the authors' code), and *λ applies to* the task vectors
(Eq. 3, θ₀ + (1/N)·Σ λᵢ·τᵢ, no α) or the plain merge's delta (base + λ·(merged − base), α kept). The
paper's setting is one merge (components.merge runs it, through the shared cache); the other three run a
plain merge first, which ``run_rule_merge`` does with ``acm.merging.rule_merge.merge_with_rule`` in one folder.
What used to be the separate "sigmoid rule" button is the setting *against merged · merged delta*: one
sigmoid rule in the app. No maths here; this module never imports components.merge (no import cycle).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from types import SimpleNamespace

from components.common import merge_label, none_if_auto, progress_callback
from components.state import MergedModel, SessionState, load_merged

# acm.rules.ACM's switches and estimators, as the radios show them (values are the library's names).
AGAINST_CHOICES = [("the fine-tuned models (the paper's text)", "fine-tuned"),
                   ("a plain merge of them (the derivative; merges first)", "merged")]
APPLIES_CHOICES = [("the task vectors: θ₀ + (1/N)·Σ λᵢ·τᵢ (Eq. 3)", "task-vectors"),
                   ("the merged delta: base + λ·(merged − base)", "merged-delta")]
ESTIMATOR_CHOICES = [("labels: scikit-learn mutual_info_score of bf16 values (the derivative's)", "labels"),
                     ("binned: 64-bin joint histogram per sample (ours)", "binned")]
PAPER = ("fine-tuned", "task-vectors")


def switches(rule: str | None, against: str | None, applies: str | None) -> tuple[str, str]:
    """(against, applies) checked by the library (one line on a bad value); the old ``sigmoid`` rule name
    stands for *against merged · merged delta*."""
    from acm.rules import ACM, alias_params

    forced = alias_params(rule)
    vals = ACM.validate({"against": forced.get("against", against), "applies": forced.get("applies", applies)})
    return vals["against"], vals["applies"]


def staged(against: str, applies: str) -> bool:
    """Whether the setting needs a plain merge first (every setting but the paper's)."""
    return (against, applies) != PAPER


def uses_alpha(rule: str, against: str, applies: str) -> bool:
    """α: the softmax rule's mean λ, and the plain merge's coefficient where a plain merge runs first;
    the paper's Eq. 3 and the fim rule have none (λ / α takes its place)."""
    if rule == "fim":
        return False
    return rule != "acm" or (against, applies) != PAPER


def note(rule: str, against: str, applies: str) -> str:
    """One line under the switches: what runs, and where α went."""
    if rule == "fim":
        return ("**fim rule (data-free)**: θ = θ₀ + Σᵢ αᵢ·τᵢ, αₖ = σ(−t·zₖ) from the base's Fisher per layer × ‖δₖ‖² "
                "(the “Fisher pass” of step 3, no calibration text); α is per layer, so there is **no global α**.")
    if rule != "acm":
        return ("**softmax rule (ours)**: λₖ = α·K·exp(−t·sₖ)/Σⱼexp(−t·sⱼ) from the similarity chosen in the Analyse "
                "tab; α is the mean λ.")
    if (against, applies) == PAPER:
        return ("**The paper's Eq. 3**: θ = θ₀ + (1/N)·Σᵢ λᵢ·τᵢ with λ from the analysis (step 3) — λ takes the "
                "place of the task-vector weight, so there is **no α**.")
    first = "a plain merge (α below) runs first"
    mi = ("then the per-sample MI of base vs that merge on the calibration set of step 2" if against == "merged"
          else "λ from the analysis (step 3), averaged over the fine-tuned models")
    final = ("base + λ·(merged − base)" if applies == "merged-delta" else "θ₀ + (1/N)·Σᵢ λ·τᵢ")
    return f"**Staged (a public derivative of the authors' code)**: {first}, {mi}, then {final}; one click."


def run_rule_merge(state: SessionState, base: str, fts: list[str], options, *, t: float, against: str,
                   applies: str, clip=None, estimator: str = "labels", calibration: dict | None = None,
                   cal_settings: dict | None = None, device: str | None = "auto", dtype: str | None = "auto",
                   progress: Callable[[float, str], None] | None = None) -> MergedModel:
    """A staged setting of the acm rule into a fresh session folder (``acm.merging.rule_merge.merge_with_rule``),
    then loaded for chat. ``calibration`` (``components.calibration.resolve_calibration``) is needed for
    MI against the merge; MI against the fine-tuned models uses the session's analysis. Like
    ``components.merge.run_merge``: the session's merged model changes only when everything succeeded."""
    from acm.errors import InputError
    from acm.merging.rule_merge import merge_with_rule
    from components import steps as plan

    analysis, cal, aopts = None, None, None
    if against == "fine-tuned":
        analysis = state.analysis
        if analysis is None:
            raise InputError(f"the paper's rule needs the per-sample MI: {plan.how_to_get(plan.ANALYSIS, markdown=False)}")
    else:
        if calibration is None:
            raise InputError("MI against a plain merge needs calibration text: choose it in the Calibration tab")
        cal = calibration["source"]
        aopts = {k: v for k, v in (cal_settings or {}).items() if v not in (None, "")}
        aopts.update(field=calibration["field"], split=calibration["split"], device=none_if_auto(device))
    state.merge_count += 1
    merge_id = state.merge_count
    out_dir = state.subdir("merges") / f"merge-{merge_id:02d}-{options.method}-acm-{against}-{applies}"
    t0 = time.perf_counter()
    try:
        report = merge_with_rule(base, fts, out_dir, options, t=t, against=against, applies=applies, analysis=analysis,
                                 calibration=cal, clip=clip, estimator=estimator, analysis_options=aopts, force=True,
                                 show_progress=False, progress=progress_callback(progress, (0.0, 0.9)))
        if progress:
            progress(0.92, "loading the merged model for chat")
        model, tokenizer = load_merged(out_dir, device, dtype, shared=False)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    coef = report.coefficients
    lambdas = [coef.mean_over_models()] if applies == "merged-delta" or against == "merged" else coef.by_model()
    merged = MergedModel(
        merge_id=merge_id, label=merge_label(options.method, True, t, options.alpha, merge_id, rule="acm",
                                             against=against, applies=applies),
        out_dir=out_dir, report={**report.merge.to_dict(), "stage_seconds": report.stage_seconds},
        lambdas=lambdas, seconds=seconds, model=model, tokenizer=tokenizer,
        settings=dict(base=base, fts=fts, method=options.method, acm=True, rule="acm", t=t, against=against,
                      applies=applies, alpha=options.alpha, density=options.density, drop_rate=options.drop_rate,
                      trim_scope=options.trim_scope, seed=options.seed, gamma=options.gamma, epsilon=options.epsilon,
                      clip=clip, dtype=none_if_auto(dtype), tokenizer_from=options.tokenizer_from, estimator=estimator,
                      calibration=calibration["label"] if calibration else None))
    state.adopt_merged(merged, seconds)
    if progress:
        progress(1.0, "done")
    return merged


STAGE_NAMES = {"merge": "plain merge", "analysis": "MI base vs merged", "final": "apply λ"}


def stage_line(merged: MergedModel) -> str:
    """``stages: plain merge 1.2 s · MI base vs merged 3.4 s · apply λ 0.8 s`` (empty for one-stage merges)."""
    stages = (merged.report or {}).get("stage_seconds") or {}
    if len(stages) < 2:
        return ""
    return "stages: " + " · ".join(f"{STAGE_NAMES.get(k, k)} {float(v):.1f} s" for k, v in stages.items())


def build() -> SimpleNamespace:
    """The switches (visible for the acm rule only), the estimator (for MI against a merge) and the note.

    ``legacy``: a hidden button behind the old ``/merge_sigmoid`` endpoint (against merged · merged delta),
    kept so existing gradio_client scripts still run; its two outputs keep that endpoint's five results.
    """
    import gradio as gr

    with gr.Group(elem_id="rule-panel") as panel:
        with gr.Row():
            against = gr.Radio(AGAINST_CHOICES, value=PAPER[0], label="MI against", elem_id="against-select",
                               scale=1)
            applies = gr.Radio(APPLIES_CHOICES, value=PAPER[1], label="λ applies to", elem_id="applies-select",
                               scale=1)
        estimator = gr.Radio(ESTIMATOR_CHOICES, value="labels", label="per-sample MI estimator (MI against a merge)",
                             visible=False, elem_id="estimator-select")
    info = gr.Markdown(note("acm", *PAPER), elem_classes=["muted"], elem_id="rule-note")
    legacy = gr.Button("Merge with sigmoid rule", visible=False, elem_id="rule-merge-btn")
    legacy_summary = gr.Markdown("", visible=False)
    legacy_table = gr.Dataframe(interactive=False, visible=False)
    return SimpleNamespace(panel=panel, against=against, applies=applies, estimator=estimator, note=info,
                           button=legacy, summary=legacy_summary, table=legacy_table)
