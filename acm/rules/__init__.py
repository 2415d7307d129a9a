"""Coefficient rules: how per-layer-group merge coefficients λ are derived from activations.

Why a registry: the project has more than one way to turn "how much did this layer change" into
λ, and the CLI, the app and the tuner must offer the same choices with the same parameter names,
defaults, ranges and one-line errors. Each rule is one ``RuleSpec``; code that runs a rule looks
it up here by key. Torch-free on purpose (the UI imports it to build widgets cheaply).

One module per rule (``acm.rules.paper``, ``acm.rules.softmax``), the shape of a rule in
``acm.rules.registry``, and ``acm.rules.coefficients``: the one call from an analysis to λ.

* ``acm`` (default) — the paper's rule (arXiv 2505.14009, Eq. 2–3): per calibration sample j and
  activation point k the MI between the base's and a fine-tuned model's activations, translated by its
  maximum over samples, λₖ = 1 − meanⱼ σ(t·(MIₖ,ⱼ − maxⱼ MIₖ,ⱼ)), and θ = θ₀ + (1/N)·Σᵢ λᵢ·τᵢ. Two
  switches: MI *against* the fine-tuned models (the text) or a plain merge (a public derivative of
  the authors' code), λ *applies* to the task vectors (Eq. 3) or to a plain merge's delta (the
  derivative). ``acm.rules.coefficients`` computes λ; ``acm.merging.rule_merge`` runs the merged variants.
* ``fim`` — a data-free rule, this project's reading of FIM-Merging (arXiv 2603.21705; code not public):
  the base's diagonal Fisher per layer on random tokens times ‖δ‖², log-standardised, α = σ(−t·z)
  (``acm.rules.fim``, ``acm.activations.fisher``).
* ``softmax`` — this project's own alternative: λₖ = α·K·exp(−t·sₖ)/Σⱼexp(−t·sⱼ) over a per-group
  similarity s (NMI, CKA or cosine; ``acm.activations.similarity``).

Adding a rule: see docs/ARCHITECTURE.md "Adding a coefficient rule".
"""

from __future__ import annotations

from typing import Any

from acm.activations.estimators import ESTIMATORS
from acm.errors import InputError
from acm.rules.fim import FIM, fim_lambdas
from acm.rules.paper import ABLATION_TS, ACM, AGAINST, APPLIES, PAPER_T, T_RANGE, acm_lambdas
from acm.rules.registry import RuleParam, RuleSpec
from acm.rules.softmax import SOFTMAX

DEFAULT_RULE = "acm"
RULES: dict[str, RuleSpec] = {r.key: r for r in (ACM, SOFTMAX, FIM)}
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
    """t checked against ``rule``'s range (acm: [−3, 3]; softmax: [0, 100]; fim: [0, 10])."""
    spec = rule if isinstance(rule, RuleSpec) else get_rule(rule)
    return spec.param("t").check(spec.param("t").default if t is None else t)


__all__ = ["ABLATION_TS", "ACM", "AGAINST", "ALIASES", "APPLIES", "DEFAULT_RULE", "ESTIMATORS", "FIM", "PAPER_T", "RULES",
           "SOFTMAX", "T_RANGE", "RuleParam", "RuleSpec", "acm_lambdas", "alias_params", "check_t", "fim_lambdas",
           "get_rule"]
