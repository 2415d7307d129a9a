"""The merge-method registry: one torch-free spec per method, and one validator per merge parameter.

Why: the engine (``acm.merging.engine``), the CLI (``acm merge`` / ``acm tune``), the app (method dropdown,
visible controls, help), the export (model card, recipe, reproduce command, mergekit YAML) and the
tests all look a method up here, so adding a method is one ``MethodSpec`` that names its strategies (plus,
for new maths, one strategy module in ``acm.merging.kernels``) plus tests (docs/ARCHITECTURE.md "Adding a
merge method"). Nothing here imports torch: the app builds its UI and ``acm --help`` runs without it.

A method is described by what it does to each task vector τᵢ = θᵢ − θ₀ and how it combines them, as
strategies (``Strategy``: a torch-free name of a class in ``acm.merging.kernels``, built by the engine):

* ``sparsify``: the steps applied to each τᵢ, in order — a random drop (``RANDOM_DROP``: DARE, probability
  ``drop_rate``, rescale 1/(1−p); ``RANK_DROP``: DELLA, keep probability rising with the magnitude rank
  inside each row, rescale 1/pⱼ) and/or an exact selection (``MAGNITUDE``: keep the top ``density`` by
  |τ|, TIES; ``OUTLIERS``: Breadcrumbs, drop the top ``gamma`` share and keep the next ``density``);
* ``combine``: ``SIGN_ELECTION`` (TIES consensus), ``SUM`` (θ₀ + Σ λ·τ) or ``AVERAGE`` (linear: Σ wᵢ·θᵢ).

The formulas are in docs/design.md "Merge methods"; the exact conventions (counts, tie-breaks, random
streams) in the ``acm.merging.kernels`` modules, one per strategy family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acm.checkpoints.limits import MAX_FINE_TUNED, check_num_fine_tuned
from acm.errors import InputError

# ----------------------------------------------------------------------------- parameter validators
# One function per merge parameter, used by MergeOptions.validate, the CLI and the app handlers, so a
# bad value gets the same one-line message everywhere. Each returns the parsed value.

def _number(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def check_alpha(alpha: Any) -> float:
    """α (plain: λ for every group; ACM: the mean λ): a finite number ≥ 0."""
    v = _number(alpha)
    if v is None or v < 0:
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    return v


def check_density(density: Any) -> float:
    """TIES / Breadcrumbs: the share of τ kept; DELLA: the mean keep probability. In (0, 1]."""
    v = _number(density)
    if v is None or not 0 < v <= 1:
        raise InputError(f"density must be in (0, 1], got {density}")
    return v


def check_drop_rate(drop_rate: Any) -> float:
    """DARE: the probability of dropping an entry of τ, in [0, 1)."""
    v = _number(drop_rate)
    if v is None or not 0 <= v < 1:
        raise InputError(f"drop rate must be in [0, 1), got {drop_rate}")
    return v


def check_gamma(gamma: Any) -> float:
    """Breadcrumbs: the share of largest |τ| (outliers) dropped, in [0, 1)."""
    v = _number(gamma)
    if v is None or not 0 <= v < 1:
        raise InputError(f"gamma must be in [0, 1), got {gamma}")
    return v


def check_epsilon(epsilon: Any, density: Any | None = None) -> float:
    """DELLA: half-width of the keep-probability range. With ``density``: density ± ε must stay in (0, 1]."""
    v = _number(epsilon)
    if v is None or not 0 <= v < 0.5:
        raise InputError(f"epsilon must be in [0, 0.5), got {epsilon}")
    if density is not None:
        d = check_density(density)
        if not (d - v > 0 and d + v <= 1):
            raise InputError(f"DELLA keep probabilities density ± epsilon must lie in (0, 1]: density {d:g}, "
                             f"epsilon {v:g} give [{d - v:g}, {d + v:g}]")
    return v


def check_trim_scope(scope: Any) -> str:
    if scope not in TRIM_SCOPES:
        raise InputError(f"trim scope must be 'tensor' or 'global', got {scope!r}")
    return scope


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    return seed


def check_method(name: Any) -> str:
    """A registered method key (aliases such as 'ta', 'DARE-TIES' or a dropdown label are accepted)."""
    key = ALIASES.get(str(name).strip().lower(), name) if name is not None else name
    if key not in METHODS:
        raise InputError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    return key


# ----------------------------------------------------------------------------- option specs

TRIM_SCOPES = ("tensor", "global")


@dataclass(frozen=True)
class OptionSpec:
    """One merge parameter: its ``MergeOptions`` field, CLI flag, UI label, default, range and help."""

    name: str
    flag: str
    label: str
    default: Any
    help: str
    kind: str = "float"                  # float | int | bool | choice
    lo: float | None = None              # UI slider range (the validator is the authority)
    hi: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    control: bool = True                 # the Merge tab shows a control for it (shown for the methods that use it)


OPTIONS: dict[str, OptionSpec] = {o.name: o for o in (
    OptionSpec("alpha", "--alpha", "α", 1.0, "plain: λ for every group; ACM: the mean λ (default 1.0)",
               lo=0.0, hi=2.0, step=0.05, control=False),   # the Merge tab's α follows the coefficient rule
    OptionSpec("density", "--density", "Density", 0.2,
               "TIES / Breadcrumbs: share of each task vector kept; DELLA: mean keep probability; in (0, 1] "
               "(default 0.2)", lo=0.01, hi=1.0, step=0.01),
    OptionSpec("trim_scope", "--trim-scope", "Trim scope", "tensor",
               "TIES threshold per tensor (default) or one per model over all tensors (3 passes)",
               kind="choice", choices=TRIM_SCOPES),
    OptionSpec("normalize", "--normalize", "Normalize", False,
               "sign-election methods: divide by the sum of agreeing λ", kind="bool", control=False),
    OptionSpec("gamma", "--gamma", "Gamma (outliers dropped)", 0.01,
               "Breadcrumbs: share of largest |τ| dropped as outliers, in [0, 1) (default 0.01)",
               lo=0.0, hi=0.2, step=0.005),
    OptionSpec("epsilon", "--epsilon", "Epsilon (keep-probability spread)", 0.15,
               "DELLA: keep probability runs from density − ε (smallest |τ| of a row) to density + ε (largest); "
               "in [0, 0.5) (default 0.15)", lo=0.0, hi=0.45, step=0.01),
    OptionSpec("drop_rate", "--drop-rate", "Drop rate", 0.3, "DARE: drop probability, in [0, 1) (default 0.3)",
               lo=0.0, hi=0.99, step=0.01),
    OptionSpec("seed", "--seed", "Seed", 0, "DARE / DELLA random seed (default 0)", kind="int"),
    OptionSpec("weights", "--weights", "Weights", None,
               "linear only: one weight per --ft (normalised to sum 1; default uniform)", kind="list", control=False),
)}


_FIELD_TYPES = {"float": float, "int": int, "bool": bool, "choice": str, "list": "list[float] | None"}


def option_field(o: OptionSpec) -> tuple[str, Any, Any]:
    """``(name, type, field)`` of an option for ``dataclasses.make_dataclass`` (``MergeOptions``)."""
    from dataclasses import field

    return o.name, _FIELD_TYPES[o.kind], field(default=o.default)


# ----------------------------------------------------------------------------- strategies

@dataclass(frozen=True)
class Strategy:
    """One piece of a method's per-tensor maths, named without importing torch.

    ``kernel`` is ``"<module>.<Class>"`` in ``acm.merging.kernels``, a class with ``from_options(MergeOptions)``;
    ``build`` imports it (and torch) only when a merge runs, so a new strategy module needs no other edit.
    ``family`` and ``key`` describe it (the model card, the mergekit export); the engine never switches on
    them. ``check`` cross-checks the parameters it reads (torch-free).
    """

    family: str                          # "drop" | "trim" (the sparsify steps) | "combine"
    key: str                             # e.g. "dare", "magnitude", "sign_election"
    kernel: str                          # "<module>.<Class>" in acm.merging.kernels
    summary: str
    check: Callable[[dict[str, Any]], None] | None = None

    def build(self, options: Any) -> Any:
        import importlib

        module, _, cls = self.kernel.rpartition(".")
        kernels = importlib.import_module(f"acm.merging.kernels.{module}")     # torch: only when a merge runs
        return getattr(kernels, cls).from_options(options)


def _check_della(values: dict[str, Any]) -> None:
    check_epsilon(values["epsilon"], values["density"])


RANDOM_DROP = Strategy("drop", "dare", "random_drop.RandomDrop",
                       "drop each entry with probability p, rescale by 1/(1−p) (DARE)")
RANK_DROP = Strategy("drop", "della", "rank_drop.RankDrop",
                     "per row, keep with probability density ± ε by |τ| rank, rescale by 1/pⱼ (DELLA)", check=_check_della)
MAGNITUDE = Strategy("trim", "magnitude", "selection.MagnitudeTrim", "keep exactly the top density share by |τ| (TIES)")
OUTLIERS = Strategy("trim", "outliers", "outliers.OutlierTrim",
                    "drop the top gamma share by |τ|, keep the next density share (Breadcrumbs)")
SIGN_ELECTION = Strategy("combine", "sign_election", "consensus.SignElection",
                         "elect each entry's sign from Σ λ·τ, sum the agreeing λ·τ (TIES)")
SUM = Strategy("combine", "sum", "consensus.Sum", "θ₀ + Σ λ·τ")
AVERAGE = Strategy("combine", "average", "consensus.Average", "Σ wᵢ·θᵢ (no task vectors)")
STRATEGIES: tuple[Strategy, ...] = (RANDOM_DROP, RANK_DROP, MAGNITUDE, OUTLIERS, SIGN_ELECTION, SUM, AVERAGE)


# ----------------------------------------------------------------------------- method specs

@dataclass(frozen=True)
class MethodSpec:
    """Everything about one merge method; its per-tensor maths are the strategies it names."""

    key: str                             # name in the CLI, recipes, MergeOptions.method
    label: str                           # model card / dropdown
    short: str                           # merge labels in the app ("#3 ACM-TIES t=1 α=0.7")
    formula: str                         # one line, λᵢ,ₖ = coefficient of model i in layer group k
    options: tuple[str, ...]             # OPTIONS it uses, in reproduce-command order
    sparsify: tuple[Strategy, ...] = ()  # steps on each τᵢ, in order: a drop and/or a trim
    combine: Strategy = SUM              # SIGN_ELECTION | SUM | AVERAGE
    acm: bool = True                     # ACM per-layer λ applies (False: linear, which has no task vector)
    mergekit: str | None = None          # mergekit's merge_method; None = no mergekit equivalent
    mergekit_note: str = ""              # how it maps to mergekit, or why it cannot
    reference: str = ""
    ui_order: int = 0                    # position in the app's dropdown
    menu: str = ""                       # the dropdown's label (default: ``short``)

    def uses(self, option: str) -> bool:
        return option in self.options

    def _step(self, family: str) -> str | None:
        return next((s.key for s in self.sparsify if s.family == family), None)

    # Descriptive keys (for the mergekit export and the docs; the engine runs the strategies themselves).
    @property
    def drop(self) -> str | None:
        """The drop step's key: ``"dare"``, ``"della"`` or None."""
        return self._step("drop")

    @property
    def trim(self) -> str | None:
        """The trim step's key: ``"magnitude"``, ``"outliers"`` or None."""
        return self._step("trim")

    @property
    def consensus(self) -> bool:
        """TIES sign election."""
        return self.combine is SIGN_ELECTION

    @property
    def random(self) -> bool:
        return self.drop is not None


_TIES_NOTE = "mergekit's ties; k = int(density·n) there vs round(density·n) here (one entry per tensor at most)"
_DARE_NOTE = ("mergekit's {}: density = 1 − p, rescale: false, lambda: 1/(1 − p) — mergekit ≥ 0.1 rescales by the "
              "tensor's L1 norm when rescale is on, not by 1/(1 − p); the random streams differ, so the merges "
              "agree in distribution only")
_BREADCRUMBS_NOTE = ("mergekit's {} (magnitude_outliers with density and gamma, rescale: false); counts there are "
                     "int(·) instead of round(·); needs mergekit >= 0.1.5 (earlier versions keep nothing of a tensor "
                     "where int(gamma·n) = 0)")
_DELLA_NOTE = ("none: mergekit's {} rescales the kept entries by the tensor's L1-norm ratio (rescale: true) or not "
               "at all, never by 1/pⱼ per entry as DELLA does, so no mergekit config reproduces this merge")

_SPECS = (
    MethodSpec("linear", "Linear", "Linear", "θ = Σᵢ wᵢ·θᵢ  (weights normalised to sum 1)", ("weights",),
               combine=AVERAGE, acm=False, mergekit=None,
               mergekit_note="none: ACM coefficients scale task vectors and linear averaging has none", ui_order=8,
               menu="Linear (weight average)"),
    MethodSpec("task_arithmetic", "Task Arithmetic", "TA", "θ = θ₀ + Σᵢ λᵢ,ₖ·τᵢ,  τᵢ = θᵢ − θ₀", ("alpha",),
               mergekit="task_arithmetic", mergekit_note="mergekit's task_arithmetic, normalize: false",
               reference="https://arxiv.org/abs/2212.04089", ui_order=0,
               menu="Task Arithmetic (TA)"),
    MethodSpec("ties", "TIES", "TIES",
               "τᵢ trimmed to its top-density |τ|; signs elected from Σᵢ λᵢ,ₖ·τᵢ; θ = θ₀ + Σ of agreeing λᵢ,ₖ·τᵢ",
               ("alpha", "density", "trim_scope", "normalize"), sparsify=(MAGNITUDE,), combine=SIGN_ELECTION,
               mergekit="ties", mergekit_note=_TIES_NOTE, reference="https://arxiv.org/abs/2306.01708", ui_order=1),
    MethodSpec("dare_ta", "DARE + Task Arithmetic", "DARE-TA",
               "τᵢ entries dropped with probability p and rescaled by 1/(1−p); θ = θ₀ + Σᵢ λᵢ,ₖ·τᵢ",
               ("alpha", "drop_rate", "seed"), sparsify=(RANDOM_DROP,), mergekit="dare_linear",
               mergekit_note=_DARE_NOTE.format("dare_linear"), reference="https://arxiv.org/abs/2311.03099",
               ui_order=2),
    MethodSpec("dare_ties", "DARE + TIES", "DARE-TIES",
               "τᵢ entries dropped with probability p and rescaled by 1/(1−p), then TIES (trim, elect, merge)",
               ("alpha", "density", "trim_scope", "normalize", "drop_rate", "seed"),
               sparsify=(RANDOM_DROP, MAGNITUDE), combine=SIGN_ELECTION, mergekit="dare_ties",
               mergekit_note=_DARE_NOTE.format("dare_ties") + "; only with density 1 (mergekit has no magnitude "
               "trim after the drop)", reference="https://arxiv.org/abs/2311.03099", ui_order=3),
    MethodSpec("breadcrumbs", "Model Breadcrumbs", "Breadcrumbs",
               "τᵢ keeps the density share of entries ranked just below its top-gamma |τ| (outliers and smallest "
               "dropped); θ = θ₀ + Σᵢ λᵢ,ₖ·τᵢ", ("alpha", "density", "gamma"), sparsify=(OUTLIERS,),
               mergekit="breadcrumbs", mergekit_note=_BREADCRUMBS_NOTE.format("breadcrumbs"),
               reference="https://arxiv.org/abs/2312.06795", ui_order=4),
    MethodSpec("breadcrumbs_ties", "Model Breadcrumbs + TIES", "Breadcrumbs-TIES",
               "Breadcrumbs trim (drop top-gamma outliers and smallest |τ|, keep density), then TIES sign election "
               "and disjoint merge", ("alpha", "density", "gamma", "normalize"), sparsify=(OUTLIERS,),
               combine=SIGN_ELECTION,
               mergekit="breadcrumbs_ties", mergekit_note=_BREADCRUMBS_NOTE.format("breadcrumbs_ties"),
               reference="https://arxiv.org/abs/2312.06795", ui_order=5),
    MethodSpec("della", "DELLA", "DELLA",
               "per row of τᵢ, keep probability pⱼ rises linearly with |τ| rank from density−ε to density+ε; kept "
               "entries ×1/pⱼ; then TIES sign election and disjoint merge with λᵢ,ₖ",
               ("alpha", "density", "epsilon", "normalize", "seed"), sparsify=(RANK_DROP,),
               combine=SIGN_ELECTION,
               mergekit="della", mergekit_note=_DELLA_NOTE.format("della"),
               reference="https://arxiv.org/abs/2406.11617", ui_order=6),
    MethodSpec("della_linear", "DELLA + Task Arithmetic", "DELLA-linear",
               "per row of τᵢ, keep probability pⱼ rises linearly with |τ| rank from density−ε to density+ε; kept "
               "entries ×1/pⱼ; θ = θ₀ + Σᵢ λᵢ,ₖ·τᵢ", ("alpha", "density", "epsilon", "seed"), sparsify=(RANK_DROP,),
               mergekit="della_linear", mergekit_note=_DELLA_NOTE.format("della_linear"),
               reference="https://arxiv.org/abs/2406.11617", ui_order=7),
)

SPECS: dict[str, MethodSpec] = {s.key: s for s in _SPECS}
METHODS: tuple[str, ...] = tuple(SPECS)
ACM_METHODS: tuple[str, ...] = tuple(k for k, s in SPECS.items() if s.acm)
# Short names accepted from scripts and API callers besides the keys.
ALIASES: dict[str, str] = {
    **{k.replace("_", "-"): k for k in METHODS},
    "ta": "task_arithmetic",
    **{s.short.lower(): s.key for s in _SPECS},
    **{s.label.lower(): s.key for s in _SPECS},
    **{s.menu.lower(): s.key for s in _SPECS if s.menu},
}


def spec(method: str) -> MethodSpec:
    """The spec of ``method`` (a key or an alias); InputError (one line) for an unknown one."""
    return SPECS[check_method(method)]


def methods_using(option: str) -> tuple[str, ...]:
    return tuple(k for k, s in SPECS.items() if s.uses(option))


def ui_choices() -> list[tuple[str, str]]:
    """(label, key) for the app's method dropdown, in its display order."""
    return [(s.menu or s.short, s.key) for s in sorted(_SPECS, key=lambda s: s.ui_order)]


def validate_options(method: str, *, alpha: Any = 1.0, density: Any = 0.2, drop_rate: Any = 0.3, gamma: Any = 0.01,
                     epsilon: Any = 0.15, trim_scope: Any = "tensor", seed: Any = 0) -> None:
    """Check every parameter (InputError, one line); cross-checks only for the methods that use them."""
    s = spec(method)
    check_alpha(alpha)
    check_density(density)
    check_drop_rate(drop_rate)
    check_gamma(gamma)
    check_epsilon(epsilon)
    values = {"alpha": alpha, "density": density, "drop_rate": drop_rate, "gamma": gamma, "epsilon": epsilon,
              "trim_scope": trim_scope, "seed": seed}
    for strategy in (*s.sparsify, s.combine):         # cross-checks of the strategies' own parameters (DELLA)
        if strategy.check is not None:
            strategy.check(values)
    check_trim_scope(trim_scope)
    check_seed(seed)


__all__ = ["MAX_FINE_TUNED", "OPTIONS", "SPECS", "METHODS", "ACM_METHODS", "ALIASES", "TRIM_SCOPES", "MethodSpec",
           "OptionSpec", "Strategy", "option_field", "STRATEGIES", "RANDOM_DROP", "RANK_DROP", "MAGNITUDE", "OUTLIERS", "SIGN_ELECTION",
           "SUM", "AVERAGE", "spec", "methods_using", "ui_choices", "validate_options", "check_alpha", "check_density",
           "check_drop_rate", "check_gamma", "check_epsilon", "check_trim_scope", "check_seed",
           "check_num_fine_tuned", "check_method"]
