"""Coefficient rules: how per-layer-group merge coefficients λ are derived from activations.

Why a registry: the project has more than one way to turn "how much did this layer change" into
λ, and the CLI, the app and the tuner must offer the same choices with the same parameter names,
defaults, ranges and one-line errors. Each rule is one ``RuleSpec``; code that runs a rule looks
it up here by key. Torch-free on purpose (the UI imports it to build widgets cheaply).

* ``acm`` (default) — the paper's rule (arXiv 2505.14009, Eq. 2–3): per calibration sample j and
  activation point k the MI between the base's and a fine-tuned model's activations, translated by its
  maximum over samples, λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)), and θ = θ₀ + (1/N)·Σᵢ λᵢ·τᵢ. Two
  switches: MI *against* the fine-tuned models (the text) or a plain merge (a public derivative of
  the authors' code), λ *applies* to the task vectors (Eq. 3) or to a plain merge's delta (the
  derivative). ``acm.coefficients`` computes λ; ``acm.rule_merge`` runs the merged variants.
* ``softmax`` — this project's own alternative: λₖ = α·K·exp(−t·sₖ)/Σⱼexp(−t·sⱼ) over a per-group
  similarity s (NMI, CKA or cosine; ``acm.similarity``).

Adding a rule: see docs/ARCHITECTURE.md "Adding a coefficient rule".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acm.errors import InputError

DEFAULT_RULE = "acm"


@dataclass(frozen=True)
class RuleParam:
    """One parameter of a rule: default, allowed values, help text and its validator."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], Any]          # returns the cleaned value or raises InputError (one line)
    choices: tuple[str, ...] | None = None
    range: tuple[float, float] | None = None   # shown in the UI / docs (inclusive)


@dataclass(frozen=True)
class RuleSpec:
    """A coefficient rule as the CLI, app and tuner see it."""

    key: str
    label: str
    formula: str
    source: str
    params: tuple[RuleParam, ...]
    stages: tuple[str, ...]               # what running it takes, in order (shown as progress stages)
    needs: str                            # "analysis" (of base vs fine-tuned) or "merged" (a plain merge first)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def param(self, name: str) -> RuleParam:
        for p in self.params:
            if p.name == name:
                return p
        raise InputError(f"rule {self.key!r} has no parameter {name!r}; it takes "
                         f"{', '.join(p.name for p in self.params)}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, values: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``values`` (None means default), each checked by its validator."""
        values = dict(values or {})
        unknown = [k for k in values if k not in {p.name for p in self.params}]
        if unknown:
            raise InputError(f"rule {self.key!r} has no parameter {unknown[0]!r}; it takes "
                             f"{', '.join(p.name for p in self.params)}")
        return {p.name: p.check(p.default if values.get(p.name) is None else values[p.name]) for p in self.params}


def _number(name: str, lo: float, hi: float, *, lo_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be a number, got {v!r}") from None
        if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
            raise InputError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}")
        return x
    return check


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise InputError(f"{name} must be one of {', '.join(choices)}, got {v!r}")
        return s
    return check


def _count(name: str, lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool):
            raise InputError(f"{name} must be an integer, got {v!r}")
        try:
            x = int(v)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be an integer, got {v!r}") from None
        if x != float(v) or not lo <= x <= hi:
            raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        return x
    return check


ESTIMATORS = ("labels", "binned")
MAX_VALUES_RANGE = (1024, 1 << 24)
AGAINST = ("fine-tuned", "merged")               # what the base's activations are compared with
APPLIES = ("task-vectors", "merged-delta")       # what λ multiplies
T_RANGE = (-3.0, 3.0)
PAPER_T = 0.7                                     # Long-to-Short, 1.5B–32B (arXiv 2505.14009 §4.1)
ABLATION_TS = (0.5, 0.6, 0.7, 0.8, 0.9)           # the paper's Figure 4


def _max_values(v: Any) -> int | None:
    """0 / None keep every value; otherwise an integer in MAX_VALUES_RANGE."""
    if v is None or (not isinstance(v, bool) and v == 0):
        return None
    return _count("max values", *MAX_VALUES_RANGE)(v)


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
                  _choice("estimator", ESTIMATORS), choices=ESTIMATORS),
        RuleParam("bins", 64, "binned estimator: bins per axis", _count("bins", 2, 1024), range=(2, 1024)),
        RuleParam("max_values", 1 << 18,
                  "values per (sample, activation point) kept for the MI (a seeded subset beyond it; 0 = all)",
                  _max_values, range=MAX_VALUES_RANGE),
    ),
    stages=("analysis: per-sample MI at each activation point, base vs each fine-tuned model (or vs a plain merge)",
            "λ per layer from the sigmoid of the translated MI", "merge: θ₀ + (1/N)·Σ λ·τ (or base + λ·Δmerged)"),
    needs="analysis",
    notes=("t > 0 keeps every λ in [½, 1); t < 0 in (0, ½]; t = 0 gives λ = ½ everywhere",),
)

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

RULES: dict[str, RuleSpec] = {r.key: r for r in (ACM, SOFTMAX)}
# Earlier names: 'sigmoid' was the derivative's two-stage rule, now the acm rule with these switches.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sigmoid": ("acm", {"against": "merged", "applies": "merged-delta"}),
    "paper": ("acm", {}),
}


def get_rule(key: str | None) -> RuleSpec:
    """The rule registered under ``key`` (None → the default; an alias → its rule), or one InputError line."""
    k = DEFAULT_RULE if key is None else str(key).strip().lower()
    k = ALIASES[k][0] if k in ALIASES else k
    if k not in RULES:
        raise InputError(f"unknown coefficient rule {key!r}; choose from {', '.join(RULES)}")
    return RULES[k]


def alias_params(key: str | None) -> dict[str, Any]:
    """The switches an alias stands for (``sigmoid`` → MI against merged, λ on the merged delta)."""
    k = "" if key is None else str(key).strip().lower()
    return dict(ALIASES[k][1]) if k in ALIASES else {}


def check_t(rule: str | RuleSpec | None, t: Any) -> float:
    """t checked against ``rule``'s range (acm: [−3, 3]; softmax: [0, 100])."""
    spec = rule if isinstance(rule, RuleSpec) else get_rule(rule)
    return spec.param("t").check(spec.param("t").default if t is None else t)


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


__all__ = ["ABLATION_TS", "ACM", "AGAINST", "ALIASES", "APPLIES", "DEFAULT_RULE", "ESTIMATORS", "PAPER_T", "RULES",
           "SOFTMAX", "T_RANGE", "RuleParam", "RuleSpec", "acm_lambdas", "alias_params", "check_t", "get_rule"]
