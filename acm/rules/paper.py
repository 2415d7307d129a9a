"""The paper's rule (arXiv 2505.14009, Eq. 2–3), registered as ``acm`` — the default.

Per calibration sample j and activation point k, the MI between the base's and a fine-tuned model's
activations, translated by its maximum over the samples, then
λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)) and θ = θ₀ + (1/N)·Σᵢ λᵢ·τᵢ. Two switches: MI *against*
the fine-tuned models (the text) or a plain merge (a public derivative of the authors' code), λ
*applies* to the task vectors (Eq. 3) or to a plain merge's delta (the derivative).
"""

from __future__ import annotations

from acm.activations.estimators import (
    DEFAULT_MAX_VALUES,
    ESTIMATORS,
    MAX_VALUES_RANGE,
    check_estimator,
    check_max_values,
)
from acm.errors import InputError
from acm.rules.registry import RuleParam, RuleSpec, _choice, _count, _number

AGAINST = ("fine-tuned", "merged")               # what the base's activations are compared with
APPLIES = ("task-vectors", "merged-delta")       # what λ multiplies
T_RANGE = (-3.0, 3.0)
PAPER_T = 0.7                                     # Long-to-Short, 1.5B–32B (arXiv 2505.14009 §4.1)
ABLATION_TS = (0.5, 0.6, 0.7, 0.8, 0.9)           # the paper's Figure 4


ACM = RuleSpec(
    key="acm",
    label="ACM — the paper's rule (Eq. 2–3, default)",
    formula="λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)); θₖ = θ₀ₖ + (1/N)·Σᵢ λᵢₖ·τᵢₖ",
    source="Yao et al., Activation-Guided Consensus Merging for Large Language Models (arXiv 2505.14009, "
           "NeurIPS 2025), Eq. 1–3 with the per-sample translation of §3.2; activation points as in a public "
           "derivative of the authors' code",
    params=(
        RuleParam("t", PAPER_T, "t in [−3, 3]: t > 0 gives more weight to layers whose MI is below the "
                  "samples' maximum (the paper uses 0.7; its ablation 0.5–0.9; −1.8 for a 3-model merge)",
                  _number("t", *T_RANGE), range=T_RANGE),
        RuleParam("against", "fine-tuned", "MI of the base against each fine-tuned model (the paper's text) or "
                  "against a plain merge of them (a public derivative of the authors' code; runs the merge first)",
                  _choice("MI against", AGAINST), choices=AGAINST),
        RuleParam("applies", "task-vectors", "λ weights each task vector with 1/N (Eq. 3, no α) or rescales a "
                  "plain merge's delta from the base (the derivative: base + λ·(merged − base), α kept)",
                  _choice("λ applies to", APPLIES), choices=APPLIES),
        RuleParam("estimator", "labels",
                  "per-sample MI: 'labels' = discrete MI of the flattened bf16 values taken as labels (equal to "
                  "scikit-learn's mutual_info_score); 'binned' = this project's B-bin joint histogram",
                  check_estimator, choices=ESTIMATORS),
        RuleParam("bins", 64, "binned estimator: bins per axis", _count("bins", 2, 1024), range=(2, 1024)),
        RuleParam("max_values", DEFAULT_MAX_VALUES,
                  "values per (sample, activation point) kept for the MI (a seeded subset beyond it; 0 = all)",
                  check_max_values, range=MAX_VALUES_RANGE),
    ),
    stages=("analysis: per-sample MI at each activation point, base vs each fine-tuned model (or vs a plain merge)",
            "λ per layer from the sigmoid of the translated MI", "merge: θ₀ + (1/N)·Σ λ·τ (or base + λ·Δmerged)"),
    needs="analysis",
    notes=("t > 0 keeps every λ in [½, 1); t < 0 in (0, ½]; t = 0 gives λ = ½ everywhere",),
)


def acm_lambdas(mi, t):
    """The paper's Eq. 2 with its translation: λ = 1 − meanⱼ σ(t·(MIⱼ − maxⱼ MIⱼ)).

    ``mi``: per-sample MI [..., points, samples] (nats); ``t`` a scalar → [..., points], a 1-D grid →
    [len(t), ..., points]. With t > 0 every σ argument is ≤ 0, so λ ∈ [½, 1): the layer whose MI sits
    furthest below the samples' maximum keeps most of its task vector. numpy only (imported lazily).
    """
    import numpy as np

    m = np.asarray(mi, dtype=np.float64)
    if m.ndim < 2 or m.shape[-1] == 0:
        raise InputError("the acm rule needs per-sample MI [activation points, samples] with at least one sample")
    if not np.all(np.isfinite(m)):
        raise InputError("the acm rule got a non-finite MI value (an activation point captured nothing)")
    tt = np.asarray(t, dtype=np.float64)
    if tt.ndim > 1 or not np.all(np.isfinite(tt)):
        raise InputError(f"t must be a finite number or a 1-D grid of them, got {t!r}")
    shifted = m - m.max(axis=-1, keepdims=True)                     # ≤ 0 (the translation)
    z = tt.reshape(tt.shape + (1,) * m.ndim) * shifted               # [T?, ..., points, samples]
    return 1.0 - (0.5 * (1.0 + np.tanh(0.5 * z))).mean(axis=-1)     # σ via tanh: no overflow for any t
