"""This project's own rule, registered as ``softmax`` — an alternative to the paper's.

With K layer groups, base coefficient α > 0, sharpness t ≥ 0 and a per-group similarity s (NMI,
linear CKA or cosine; ``acm.activations.similarity``):

    λₖ(t) = α · K · exp(−t·sₖ) / Σⱼ exp(−t·sⱼ)

so mean λ = α, t = 0 gives λₖ = α everywhere (the plain method), larger t gives more contrast, and a
group whose fine-tuned activations share less with the base (lower s) never gets a smaller λ.
Written before the paper's text was known; kept because it takes every similarity metric.
"""

from __future__ import annotations

import math

import numpy as np

from acm.errors import InputError
from acm.rules.registry import RuleParam, RuleSpec, _check_clip, _number

SOFTMAX = RuleSpec(
    key="softmax",
    label="softmax over similarity (this project's alternative rule)",
    formula="λₖ = α·K·exp(−t·sₖ) / Σⱼ exp(−t·sⱼ)  (s = NMI, CKA or cosine)",
    source="this project's own rule, written before the paper's text was known (docs/design.md); "
           "not the paper's formula",
    params=(RuleParam("t", 1.0, "sharpness t ≥ 0 (t = 0 is the plain method)", _number("t", 0.0, 100.0),
                      range=(0.0, 100.0)),),
    stages=("analysis: similarity per group, base vs each fine-tuned model", "merge with λ per group"),
    needs="analysis",
    notes=("takes every similarity metric (NMI, CKA, cosine); the acm rule takes per-sample MI only",),
)


def _check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha must be a number > 0, got {alpha!r}") from None
    if not (math.isfinite(a) and a > 0):
        raise InputError(f"alpha must be a finite number > 0, got {alpha!r}")
    return a


def _check_t(t) -> np.ndarray:
    try:
        arr = np.asarray(t, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"t must be a number >= 0 (or a list of them), got {t!r}") from None
    if arr.ndim > 1:
        raise InputError("t must be a number or a 1-D grid of numbers")
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InputError(f"t must be finite and >= 0, got {t!r}")
    return arr


def lambdas(nmi, t, alpha: float = 1.0, clip=None) -> np.ndarray:
    """λ per group for NMI of shape [..., K]; ``t`` a scalar → [..., K], a 1-D grid → [len(t), ..., K].

    Numerically stable softmax form (the maximum exponent is subtracted before ``exp``).
    """
    a = _check_alpha(alpha)
    clip = _check_clip(clip)
    tt = _check_t(t)
    x = np.asarray(nmi, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise InputError("nmi must hold at least one group")
    if not np.all(np.isfinite(x)):
        raise InputError("nmi values must be finite")
    k = x.shape[-1]
    grid = tt.reshape(tt.shape + (1,) * x.ndim)          # [T, 1.., 1] or scalar-shaped
    z = -grid * x                                         # broadcast → [T, ..., K] / [..., K]
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    lam = a * k * e / e.sum(axis=-1, keepdims=True)
    if clip is not None:
        lam = np.clip(lam, -np.inf if clip[0] is None else clip[0], np.inf if clip[1] is None else clip[1])
    return lam
