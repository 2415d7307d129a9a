"""Coefficient rules: how per-layer-group merge coefficients λ are derived from activations.

Why a registry: the project has more than one way to turn "how much did this layer change" into
λ, and the CLI, the app and the tuner must offer the same choices with the same parameter names,
defaults, ranges and one-line errors. Each rule is one ``RuleSpec``; code that runs a rule looks
it up here by key. Torch-free on purpose (the UI imports it to build widgets cheaply).

* ``softmax`` (default, this project's form of the paper's rule, docs/design.md "From NMI to
  coefficients"): λₖ = α·K·exp(−t·NMIₖ)/Σⱼexp(−t·NMIⱼ), from an ``acm analyze`` result of the base
  against each fine-tuned model; ``acm.coefficients.lambdas``.
* ``sigmoid`` (from a public derivative of the authors' code, not the paper's text): a plain merge
  first, then per calibration sample i and activation point ℓ the MI between base and merged
  activations, sℓ = meanᵢ σ(θ·(MIℓ,ᵢ − maxᵢ MIℓ,ᵢ)), and the merged model's delta from the base is
  scaled by (1 − sℓ) ∈ [½, 1); ``acm.sigmoid_rule``.

Adding a rule: see docs/ARCHITECTURE.md "Adding a coefficient rule".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acm.errors import InputError

DEFAULT_RULE = "softmax"


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

SOFTMAX = RuleSpec(
    key="softmax",
    label="ACM softmax rule (default)",
    formula="λₖ = α·K·exp(−t·NMIₖ) / Σⱼ exp(−t·NMIⱼ)",
    source="this project's precise form of the paper's description (arXiv 2505.14009; docs/design.md)",
    params=(RuleParam("t", 1.0, "sharpness t ≥ 0 (t = 0 is the plain method)", _number("t", 0.0, 100.0),
                      range=(0.0, 100.0)),),
    stages=("analysis: NMI per group, base vs each fine-tuned model", "merge with λ per group"),
    needs="analysis",
)

SIGMOID = RuleSpec(
    key="sigmoid",
    label="sigmoid rule (from a public derivative of the authors' code)",
    formula="sℓ = meanᵢ σ(θ·(MIℓ,ᵢ − maxᵢ MIℓ,ᵢ)); final = base + (1 − sℓ)·(merged − base)",
    source="a public derivative of the ACM authors' code (issue 12 of this project), not the paper's text; "
           "implemented from the issue's description",
    params=(
        RuleParam("theta", 0.7, "θ > 0: steepness of the sigmoid (larger θ → sℓ nearer 0 → more delta kept)",
                  _number("θ", 0.0, 100.0, lo_open=True), range=(0.0, 100.0)),
        RuleParam("estimator", "labels",
                  "per-sample MI: 'labels' = scikit-learn mutual_info_score of the flattened bf16 values taken as "
                  "discrete labels (the derivative's); 'binned' = this project's B-bin joint histogram",
                  _choice("estimator", ESTIMATORS), choices=ESTIMATORS),
        RuleParam("bins", 64, "binned estimator: bins per axis", _count("bins", 2, 1024), range=(2, 1024)),
        RuleParam("max_values", 1 << 18,
                  "values per (sample, activation point) kept for the MI (a seeded subset beyond it)",
                  _count("max values", *MAX_VALUES_RANGE), range=MAX_VALUES_RANGE),
    ),
    stages=("stage 1: plain merge (temporary)", "stage 2: per-sample MI, base vs merged",
            "stage 3: rescale each group's delta by 1 − sℓ"),
    needs="merged",
    notes=("every group keeps between half and all of its delta from the base",),
)

RULES: dict[str, RuleSpec] = {r.key: r for r in (SOFTMAX, SIGMOID)}


def get_rule(key: str | None) -> RuleSpec:
    """The rule registered under ``key`` (None → the default), or one InputError line."""
    k = DEFAULT_RULE if key is None else str(key).strip().lower()
    if k not in RULES:
        raise InputError(f"unknown coefficient rule {key!r}; choose from {', '.join(RULES)}")
    return RULES[k]


def sigmoid_scores(mi, theta: float):
    """sℓ = meanᵢ σ(θ·(MIℓ,ᵢ − maxᵢ MIℓ,ᵢ)) for an MI matrix [points, samples] → [points].

    Every σ argument is ≤ 0, so each term is in (0, ½] and so is sℓ: the kept fraction of the delta
    1 − sℓ lies in [½, 1). numpy only (imported lazily: this module stays import-light).
    """
    import numpy as np

    theta = SIGMOID.param("theta").check(theta)
    m = np.asarray(mi, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] == 0:
        raise InputError("the sigmoid rule needs an MI matrix [activation points, samples] with at least one sample")
    if not np.all(np.isfinite(m)):
        raise InputError("the sigmoid rule got a non-finite MI value (an activation point captured nothing)")
    z = theta * (m - m.max(axis=1, keepdims=True))     # ≤ 0
    return (1.0 / (1.0 + np.exp(-z))).mean(axis=1)


__all__ = ["DEFAULT_RULE", "ESTIMATORS", "RULES", "RuleParam", "RuleSpec", "get_rule", "sigmoid_scores"]
