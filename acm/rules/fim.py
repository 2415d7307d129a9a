"""A data-free rule, registered as ``fim``: this project's reading of FIM-Merging (arXiv 2603.21705).

The paper's code is not public; docs/formulas.md ("The fim rule") writes down exactly what is computed
here and why. Per λ key k (the acm rule's keys: embed, block.k, head.norm, head) and fine-tuned model i:

    scoreᵢₖ = Fₖ · ‖δᵢₖ‖²        (Fisher-only switch: scoreₖ = Fₖ)
    xᵢₖ = log scoreᵢₖ,  zᵢₖ = (xᵢₖ − meanₖ xᵢₖ) / stdₖ xᵢₖ
    αᵢₖ = σ(−t·zᵢₖ) ∈ (0, 1),   θ = θ₀ + Σᵢ Σₖ αᵢₖ·τᵢₖ

Fₖ is the base's diagonal Fisher per key on random tokens (``acm.activations.fisher``), δ the task vector.
A key whose score is 0 (the task vector leaves it unchanged, or it holds no parameter) is left out of the
mean and std and gets the largest α of the others (its τ is zero, so the value never changes a weight).
Standardising the log score makes t scale-free: t = 1 (the default) maps a key one standard deviation of
the log score above the layers' mean to α = σ(−1) ≈ 0.27 and one below to 0.73; t = 0 gives α = ½ everywhere
(Task Arithmetic at ½). High score (a sensitive layer that the fine-tune moved far) → small α: merged
conservatively.
"""

from __future__ import annotations

import numpy as np

from acm.errors import InputError
from acm.rules.registry import RuleParam, RuleSpec, _choice, _count, _number

SCORES = ("fisher-delta", "fisher-only")
LOSSES = ("lm", "sampled")
FIM_T_RANGE = (0.0, 10.0)
DEFAULT_SHARPNESS = 1.0

FIM = RuleSpec(
    key="fim",
    label="FIM — data-free Fisher information (a reading of arXiv 2603.21705)",
    formula="αₖ = σ(−t·zₖ), zₖ = standardised log(Fₖ·‖δₖ‖²) over the layers; θ = θ₀ + Σᵢ αᵢₖ·τᵢₖ",
    source="this project's reading of FIM-Merging (arXiv 2603.21705, 2026; its code is not public): the base's "
           "diagonal Fisher on random-token sequences, per layer, times the task vector's squared norm",
    params=(
        RuleParam("t", DEFAULT_SHARPNESS, "sigmoid sharpness t in [0, 10] on the standardised log score (default 1: "
                  "one standard deviation above the layers' mean → α ≈ 0.27; t = 0 → α = ½ everywhere)",
                  _number("t", *FIM_T_RANGE), range=FIM_T_RANGE),
        RuleParam("score", "fisher-delta", "what a layer's score is: 'fisher-delta' = Fisher × ‖δ‖² (the paper's "
                  "method), 'fisher-only' = the Fisher alone (its ablation; the same α for every model)",
                  _choice("score", SCORES), choices=SCORES),
        RuleParam("sequences", 8, "Fisher pass: random-token sequences S", _count("sequences", 1, 4096),
                  range=(1, 4096)),
        RuleParam("length", 64, "Fisher pass: tokens per sequence L", _count("length", 2, 32768), range=(2, 32768)),
        RuleParam("seed", 0, "Fisher pass: seed of the random tokens", _count("seed", 0, 2**31 - 1),
                  range=(0, 2**31 - 1)),
        RuleParam("loss", "lm", "Fisher pass: 'lm' = the base's own next-token loss on the random tokens "
                  "(default), 'sampled' = targets drawn from the base's prediction (expected Fisher)",
                  _choice("loss", LOSSES), choices=LOSSES),
    ),
    stages=("Fisher pass: S random-token sequences forward and backward through the base, squared gradients "
            "summed per layer", "‖δ‖² per layer streamed from the checkpoints",
            "α per layer from the sigmoid of the standardised log score", "merge: θ₀ + Σᵢ α·τᵢ"),
    needs="analysis",
    notes=("needs no calibration text; t = 0 is Task Arithmetic at α = ½",),
)


def fim_scores(fisher, delta_sq, score: str = "fisher-delta") -> np.ndarray:
    """[models, keys] score: Fₖ·‖δᵢₖ‖² (or Fₖ for every model with ``fisher-only``)."""
    f = np.asarray(fisher, dtype=np.float64)
    d = np.asarray(delta_sq, dtype=np.float64)
    if f.ndim != 1 or d.ndim != 2 or d.shape[1] != f.shape[0] or f.size == 0:
        raise InputError(f"the fim rule needs one Fisher value per key and ‖δ‖² [models, keys]; got "
                         f"{f.shape} and {d.shape}")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(d)) and np.all(f >= 0) and np.all(d >= 0)):
        raise InputError("the fim rule got a negative or non-finite Fisher or ‖δ‖² value")
    if score == "fisher-only":
        return np.broadcast_to(f, d.shape).copy()
    if score != "fisher-delta":
        raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    return f[None, :] * d


def standardised_log(scores) -> np.ndarray:
    """zᵢₖ = (log sᵢₖ − mean) / std over each model's keys with s > 0 (std 0 → 0); keys with s = 0 get the
    smallest z of their model (0 when no key is positive)."""
    s = np.asarray(scores, dtype=np.float64)
    z = np.zeros_like(s)
    for i, row in enumerate(s.reshape(-1, s.shape[-1])):
        pos = row > 0
        if not pos.any():
            continue
        x = np.log(row[pos])
        sd = x.std()
        zi = (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
        out = np.full(row.shape, zi.min())
        out[pos] = zi
        z.reshape(-1, s.shape[-1])[i] = out
    return z


def fim_lambdas(scores, t) -> np.ndarray:
    """α = σ(−t·z) for scores [models, keys]; ``t`` a scalar → [models, keys], a 1-D grid → [len(t), models, keys]."""
    z = standardised_log(scores)
    tt = np.asarray(t, dtype=np.float64)
    if tt.ndim > 1 or not np.all(np.isfinite(tt)):
        raise InputError(f"t must be a finite number or a 1-D grid of them, got {t!r}")
    arg = -tt.reshape(tt.shape + (1,) * z.ndim) * z
    return 0.5 * (1.0 + np.tanh(0.5 * arg))           # σ via tanh: no overflow


__all__ = ["DEFAULT_SHARPNESS", "FIM", "FIM_T_RANGE", "LOSSES", "SCORES", "fim_lambdas", "fim_scores",
           "standardised_log"]
