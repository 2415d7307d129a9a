"""How much calibration is enough: bootstrap bands on λ, and λ against the number of samples.

Why: the paper's authors saw the coefficients fluctuate below ~100 calibration samples and settle above
(hence 10 % of s1K); its reviewers asked how much λ depends on the calibration set. The analysis keeps
per-sample MI [models, points, samples], so both questions cost no model work: resample the samples,
recompute λ with ``acm.rules.acm_lambdas``. numpy only, every draw seeded.

* ``bootstrap_band``: percentile bootstrap — ``resamples`` draws of S samples with replacement, λ of
  each, the central ``level`` interval per (model, λ key).
* ``count_curve``: λ on subsets of n samples drawn per k-means cluster as the calibration step draws
  them (``acm.activations.calibration.allocate``: in proportion to the clusters' sizes, at least one
  each while n allows; uniform inside a cluster, without replacement), for several seeds.
* ``settle_count``: the smallest n from which on every subset's λ (every seed, model and key) stays
  within ``tol`` of its full-set value.

Only the ``acm`` rule keeps per-sample values; ``softmax`` reads one similarity per group (``NO_BAND``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acm.errors import InputError
from acm.rules.paper import acm_lambdas

DEFAULT_LEVEL = 0.9
DEFAULT_RESAMPLES = 300
DEFAULT_SEED = 0
DEFAULT_TOL = 0.01
DEFAULT_SEEDS = 5
NO_BAND = ("no band for the softmax rule: it reads one similarity per layer group, not per-sample values "
           "(bands need the acm rule)")
METHOD = "percentile bootstrap over calibration samples (with replacement)"


def check_band_settings(level: float, resamples: int, tol: float = DEFAULT_TOL, seeds: int = DEFAULT_SEEDS) -> None:
    """One-line refusals shared by the CLI and the app."""
    if not (isinstance(level, (int, float)) and 0.0 < float(level) < 1.0):
        raise InputError(f"band level must be in (0, 1), e.g. 0.9, got {level!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or not 10 <= resamples <= 10_000:
        raise InputError(f"resamples must be an integer in [10, 10000], got {resamples!r}")
    if not (isinstance(tol, (int, float)) and 0.0 < float(tol) < 1.0):
        raise InputError(f"settle tolerance must be in (0, 1), e.g. 0.01, got {tol!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or not 1 <= seeds <= 100:
        raise InputError(f"seeds must be an integer in [1, 100], got {seeds!r}")


def _clip(lam: np.ndarray, clip) -> np.ndarray:
    if clip is None:
        return lam
    return np.clip(lam, -np.inf if clip[0] is None else clip[0], np.inf if clip[1] is None else clip[1])


def bootstrap_lambdas(mi, t: float, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      clip=None) -> np.ndarray:
    """λ of ``resamples`` bootstrap draws of the samples: [resamples, ..., points] (seeded)."""
    m = np.asarray(mi, dtype=np.float64)
    n = m.shape[-1]
    idx = np.random.default_rng(seed).integers(0, n, size=(int(resamples), n))
    drawn = np.moveaxis(m[..., idx], -2, 0)                          # [R, ..., points, S]
    return _clip(acm_lambdas(drawn, t), clip)


def bootstrap_band(mi, t: float, *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = DEFAULT_SEED, clip=None) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the central ``level`` bootstrap interval of λ, each [..., points]."""
    draws = bootstrap_lambdas(mi, t, resamples=resamples, seed=seed, clip=clip)
    q = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(draws, [q, 1.0 - q], axis=0)
    return lo, hi


def subset_indices(labels, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sample indices drawn per cluster as ``acm.activations.calibration`` draws them (sorted)."""
    from acm.activations.calibration import allocate

    labels = np.asarray(labels)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    counts = allocate([len(m) for m in members], fraction=1.0, samples=int(n))
    chosen = [rng.choice(m, size=c, replace=False) for m, c in zip(members, counts) if c]
    return np.sort(np.concatenate(chosen))


def default_counts(n: int, points: int = 14) -> list[int]:
    """Subset sizes for the λ-vs-count chart: every n up to 24 samples, else a geometric grid to n."""
    if n <= 24:
        return list(range(min(2, n), n + 1))
    grid = np.unique(np.round(np.geomspace(2, n, points)).astype(int))
    return [int(x) for x in grid]


def count_curve(mi, t: float, *, labels=None, counts=None, seeds: int = DEFAULT_SEEDS, seed: int = DEFAULT_SEED,
                clip=None) -> tuple[list[int], np.ndarray]:
    """(counts, λ [len(counts), seeds, ..., points]) on per-cluster subsets of each size (seeded)."""
    m = np.asarray(mi, dtype=np.float64)
    n = m.shape[-1]
    labels = np.zeros(n, dtype=int) if labels is None else np.asarray(labels)
    if labels.shape != (n,):
        raise InputError(f"cluster labels: {labels.size} for {n} samples")
    counts = default_counts(n) if counts is None else sorted({int(c) for c in counts})
    if not counts or counts[0] < 1 or counts[-1] > n:
        raise InputError(f"sample counts must lie in [1, {n}], got {counts}")
    rng = np.random.default_rng(seed)
    out = np.empty((len(counts), int(seeds), *m.shape[:-1]))
    for i, c in enumerate(counts):
        for s in range(int(seeds)):
            out[i, s] = acm_lambdas(m[..., subset_indices(labels, c, rng)], t)
    return counts, _clip(out, clip)


def settle_count(counts, deviation, tol: float = DEFAULT_TOL) -> int:
    """The smallest count from which on every deviation is ≤ ``tol`` (the last count if none earlier)."""
    counts, dev = list(counts), np.asarray(deviation, dtype=np.float64)
    settle = counts[-1]
    for c, d in zip(reversed(counts), dev[::-1]):
        if d > tol + 1e-12:
            break
        settle = c
    return int(settle)


def _per_model(models: list[str], arr: np.ndarray, nd: int = 6) -> dict[str, list[float]]:
    return {str(m): [round(float(x), nd) for x in row] for m, row in zip(models, arr)}


@dataclass
class Band:
    """λ of the acm rule at t with its bootstrap band, per fine-tuned model and λ key."""

    t: float
    level: float
    resamples: int
    seed: int
    samples: int
    keys: list[str]
    models: list[str]
    lam: np.ndarray                     # [models, keys]
    lo: np.ndarray
    hi: np.ndarray

    def width(self) -> np.ndarray:
        """hi − lo per (model, key)."""
        return self.hi - self.lo

    def to_dict(self) -> dict:
        """The JSON form the coefficient table and the recipe's ``acm`` entry carry."""
        w = self.width()
        return {"level": self.level, "resamples": self.resamples, "seed": self.seed, "samples": self.samples,
                "method": METHOD, "lo": _per_model(self.models, self.lo), "hi": _per_model(self.models, self.hi),
                "max_width": round(float(w.max()), 6), "mean_width": round(float(w.mean()), 6),
                "widest": self.keys[int(w.max(axis=0).argmax())]}


@dataclass
class SampleCurve:
    """λ against the number of calibration samples and the count at which it settles."""

    t: float
    tol: float
    seed: int
    counts: list[int]
    keys: list[str]
    models: list[str]
    lambdas: np.ndarray                 # [counts, seeds, models, keys]
    full: np.ndarray                    # [models, keys]
    clustered: bool
    settle: int = field(init=False)

    def __post_init__(self) -> None:
        self.settle = settle_count(self.counts, self.deviation(), self.tol)

    def deviation(self) -> np.ndarray:
        """Per count: the largest |λ(subset) − λ(full set)| over seeds, models and keys."""
        return np.abs(self.lambdas - self.full).reshape(len(self.counts), -1).max(axis=1)

    def line(self) -> str:
        """The summary line ("coefficients settle at ≈ N samples")."""
        n, seeds = self.counts[-1], self.lambdas.shape[1]
        how = "per k-means cluster" if self.clustered else "uniformly (one cluster, or none recorded)"
        if self.settle >= n:
            return (f"coefficients do not settle before the full set: some group's λ moves more than {self.tol:g} "
                    f"on subsets of fewer than {n} samples (t = {self.t:g}, {seeds} seeds, drawn {how})")
        return (f"coefficients settle at ≈ {self.settle} samples of {n}: every group's λ within {self.tol:g} of its "
                f"full-set value from there on (t = {self.t:g}, {seeds} seeds, drawn {how})")

    def to_dict(self) -> dict:
        return {"tol": self.tol, "seed": self.seed, "seeds": int(self.lambdas.shape[1]), "counts": list(self.counts),
                "settle": self.settle, "samples": self.counts[-1], "clustered": self.clustered,
                "max_deviation": [round(float(x), 6) for x in self.deviation()], "line": self.line()}


def supports_bands(rule: str | None) -> bool:
    """Whether ``rule`` keeps per-sample values (only then has λ a bootstrap band)."""
    from acm.rules import get_rule

    return get_rule(rule).key == "acm"


def _acm_inputs(analysis, t: float | None) -> tuple[float, np.ndarray, list[str], list[str]]:
    from acm.rules import check_t

    mi = analysis.sample_mi_matrix()                               # one InputError line for old files
    keys = list(analysis.sample_info.get("point_groups") or [])
    return check_t("acm", t), mi, keys, [m.model for m in analysis.models]


def analysis_band(analysis, t: float | None = None, *, level: float = DEFAULT_LEVEL,
                  resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, clip=None) -> Band:
    """The acm rule's λ at ``t`` for ``analysis`` with its bootstrap band (no model work)."""
    check_band_settings(level, resamples)
    t, mi, keys, models = _acm_inputs(analysis, t)
    lo, hi = bootstrap_band(mi, t, level=level, resamples=resamples, seed=seed, clip=clip)
    lam = _clip(acm_lambdas(mi, t), clip)
    return Band(t, float(level), int(resamples), int(seed), int(mi.shape[-1]), keys, models, lam, lo, hi)


def cluster_labels(analysis) -> np.ndarray | None:
    """Each calibration sample's k-means cluster as the analysis recorded it (None for older files)."""
    labels = analysis.sample_info.get("clusters")
    n = len(analysis.sample_info.get("tokens") or [])
    if not labels or len(labels) != n:
        return None
    return np.asarray(labels, dtype=int)


def analysis_curve(analysis, t: float | None = None, *, tol: float = DEFAULT_TOL, seeds: int = DEFAULT_SEEDS,
                   seed: int = DEFAULT_SEED, counts=None, clip=None) -> SampleCurve:
    """λ against the number of samples (drawn per recorded cluster) and the settle count."""
    check_band_settings(DEFAULT_LEVEL, DEFAULT_RESAMPLES, tol, seeds)
    t, mi, keys, models = _acm_inputs(analysis, t)
    labels = cluster_labels(analysis)
    counts, lam = count_curve(mi, t, labels=labels, counts=counts, seeds=seeds, seed=seed, clip=clip)
    if counts[-1] != mi.shape[-1]:
        raise InputError(f"sample counts must end at the full set ({mi.shape[-1]}), got {counts[-1]}")
    full = _clip(acm_lambdas(mi, t), clip)
    clustered = labels is not None and len(np.unique(labels)) > 1
    return SampleCurve(t, float(tol), int(seed), counts, keys, models, lam, full, clustered)


def compare(a: Band, b: Band) -> dict[str, Any]:
    """Two calibration sets on the same pair: per λ key the largest |λa − λb| over models, and
    whether the bands overlap there (disjoint bands: the sets disagree beyond resampling noise)."""
    if a.keys != b.keys or len(a.models) != len(b.models):
        raise InputError("the two analyses differ in λ keys or in the number of fine-tuned models: "
                         "analyse the same pair on both calibration sets")
    diff = np.abs(a.lam - b.lam)                                   # [models, keys]
    overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
    worst = int(diff.max(axis=0).argmax())
    return {"keys": list(a.keys), "max_diff": [round(float(x), 6) for x in diff.max(axis=0)],
            "overlap": [bool(x) for x in overlap.all(axis=0)], "largest": a.keys[worst],
            "largest_diff": round(float(diff.max()), 6)}
