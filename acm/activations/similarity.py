"""Similarity metrics between base and fine-tuned activations: a small streaming protocol + registry.

Why a protocol: ACM only needs, per layer group, one number sₖ ∈ [0, 1] with 1 = "the fine-tuned
model's activations are unchanged" (λ then follows from sₖ, ``acm.rules.coefficients``). Which measure
gives sₖ is an ablation the paper's reviewers asked about (mutual information vs cosine, CKA, …),
so the measure is a plug-in: every metric is a streaming estimator that is fed paired activations
of one group at a time and whose state does **not grow with the calibration size**.

* ``nmi``: normalised mutual information of the (base, fine-tuned) value pairs (``acm.activations.mi``, the
  paper's measure and the default).
* ``cka``: linear CKA of the token rows (centred), streamed as cross-covariance sums; a group wider
  than k = ``sketch_dim`` keeps one-sided d×k sketches of them (a fixed seeded Gaussian projection,
  unbiased for each squared Frobenius norm; exact when d ≤ k). Error vs exact CKA: tests/test_similarity.py.
* ``cosine``: mean over tokens of cos(base row, fine-tuned row), clamped at 0 (``CosineEstimator``
  says why this map).

How to add a metric: docs/ARCHITECTURE.md "Adding a similarity metric".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from acm.errors import InputError

if TYPE_CHECKING:   # torch is imported where it is used: `acm --help` and the CLI parsers stay torch-free
    import torch

DEFAULT_METRIC = "nmi"
DEFAULT_SKETCH_DIM = 128   # random-projection width for row metrics (CKA / cosine) of wider groups


@runtime_checkable
class SimilarityEstimator(Protocol):
    """Streaming similarity of paired activations, per layer group."""

    def update(self, group: int, base_act: torch.Tensor, other_act: torch.Tensor) -> None:
        """Add paired rows ``[n, d]`` of one group (row i of both = the same token)."""

    def similarity(self) -> np.ndarray:
        """``[num_groups]`` in [0, 1]; 1 = unchanged, NaN = the group received no data."""

    def state_bytes(self) -> int:
        """Bytes of accumulated state (must not grow with the number of rows seen)."""


@runtime_checkable
class TwoPhaseEstimator(SimilarityEstimator, Protocol):
    """A row metric usable with one model resident at a time (``acm.activations.analysis``).

    ``base_rows`` runs in the base-only pass: it may accumulate base-only statistics and returns what
    must be kept per token for the pairing (at most ``sketch_dim`` wide: the bounded store);
    ``update_stored`` runs in each fine-tuned pass with those stored rows and that model's rows at
    the same tokens. ``update(g, x, y)`` must equal ``update_stored(g, base_rows(g, x), y)``.
    """

    def base_rows(self, group: int, base_act: torch.Tensor) -> torch.Tensor: ...

    def update_stored(self, group: int, base_rows: torch.Tensor, other_act: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric.

    ``pairs``: what the analysis pairs for it — ``"values"`` (every (token, feature) value; NMI's
    binned path in ``acm.activations.analysis``) or ``"rows"`` (token rows, randomly projected to at most
    ``sketch_dim`` features, a seeded subset of at most ``row_budget`` tokens per group).
    """

    key: str
    label: str
    formula: str
    description: str
    make: Callable[..., SimilarityEstimator]
    pairs: str = "rows"


# ----------------------------------------------------------------------------- projection


def projection(width: int, sketch_dim: int, seed: int, group: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The fixed random projection ``[width, sketch_dim]`` of a group (None when no projection is needed).

    Gaussian entries scaled by 1/√k, so inner products (and hence Gram matrices, CKA and cosines)
    are preserved in expectation (Johnson–Lindenstrauss). Seeded by (seed, group): the base pass
    and every fine-tuned pass project with the same matrix.
    """
    import torch

    if width <= sketch_dim:
        return None
    gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(group) * 7919 + 17) & 0x7FFF_FFFF)
    r = torch.randn(width, sketch_dim, generator=gen, dtype=torch.float32) / math.sqrt(sketch_dim)
    return r.to(device)


class _Projector:
    """Caches one projection per (group, width, device)."""

    def __init__(self, sketch_dim: int, seed: int):
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, (int, np.integer)) or sketch_dim < 1:
            raise InputError(f"sketch_dim must be an integer >= 1, got {sketch_dim!r}")
        self.sketch_dim, self.seed = int(sketch_dim), int(seed)
        self._cache: dict[tuple[int, int, str], torch.Tensor | None] = {}

    def __call__(self, group: int, rows: torch.Tensor) -> torch.Tensor:
        import torch

        rows = rows.reshape(-1, rows.shape[-1]).to(torch.float32)
        key = (group, rows.shape[-1], str(rows.device))
        if key not in self._cache:
            self._cache[key] = projection(rows.shape[-1], self.sketch_dim, self.seed, group, rows.device)
        r = self._cache[key]
        return rows if r is None else rows @ r


def _paired(base_act: torch.Tensor, other_act: torch.Tensor) -> None:
    if base_act.shape != other_act.shape:
        raise ValueError(f"paired activations differ in shape: {tuple(base_act.shape)} vs {tuple(other_act.shape)}")


class _RowMetric:
    """A two-phase row metric (``TwoPhaseEstimator``): ``update`` on both sides at once is the base pass's
    ``base_rows`` followed by the other pass's ``update_stored`` — one definition for every row metric."""

    def update(self, group: int, base_act: torch.Tensor, other_act: torch.Tensor) -> None:
        _paired(base_act, other_act)
        if base_act.numel() == 0:
            return
        self.update_stored(group, self.base_rows(group, base_act), other_act)


# ----------------------------------------------------------------------------- NMI


class NMIEstimator:
    """NMI of the paired values (wraps ``acm.activations.mi.StreamingMI``; ``.mi()`` gives MI in nats)."""

    def __init__(self, num_groups: int, *, bins: int = 64, seed: int = 0, **_ignored):
        from acm.activations.mi import StreamingMI

        self.mi_estimator = StreamingMI(num_groups, bins=bins, seed=seed)

    def update(self, group: int, base_act: torch.Tensor, other_act: torch.Tensor) -> None:
        self.mi_estimator.update(group, base_act, other_act)

    def similarity(self) -> np.ndarray:
        return self.mi_estimator.nmi()

    def mi(self) -> np.ndarray:
        return self.mi_estimator.mi()

    def state_bytes(self) -> int:
        return sum(int(j.numel() * j.element_size()) for j in self.mi_estimator._joint if j is not None)


# ----------------------------------------------------------------------------- linear CKA


class CKAEstimator(_RowMetric):
    """Linear CKA of centred token rows, from streamed sums (no Gram matrix over tokens).

    CKA(X, Y) = ‖XcᵀYc‖²_F / (‖XcᵀXc‖_F · ‖YcᵀYc‖_F), Xc = X − mean(X) over tokens. When a group is
    wider than k = ``sketch_dim`` each d×d product M is kept as the d×k one-sided sketch M·R
    (R = ``projection``, E[RRᵀ] = I, so E‖MR‖²_F = ‖M‖²_F: unbiased, relative error ≲ √(2/k) and far
    less for activations whose spectrum decays); the base side enters only as its k-wide sketch
    X·R, which is what the one-model-resident analysis stores per token (``base_rows``). Per group
    the state is n, Σx, Σy, ΣxR, ΣyR and RᵀΣxyᵀ (k×d), ΣxxᵀR, ΣyyᵀR (d×k), float64: ``3dk + 2d + 2k + 1``
    numbers whatever the number of tokens (exact, k = d, when d ≤ ``sketch_dim``).
    """

    def __init__(self, num_groups: int, *, sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, **_ignored):

        self.num_groups = int(num_groups)
        self.project = _Projector(sketch_dim, seed)
        self._nx = [0] * self.num_groups
        self._ny = [0] * self.num_groups
        self._s: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_groups)]

    @staticmethod
    def _acc(st: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        if name in st:
            st[name].add_(value)
        else:
            st[name] = value.clone()

    def base_rows(self, group: int, base_act: torch.Tensor) -> torch.Tensor:
        """Base-only pass: accumulate the base's statistics; returns the k-wide rows X·R to pair later."""
        import torch

        x = base_act.detach().reshape(-1, base_act.shape[-1]).double()
        xr = self.project(group, x).double()
        st = self._s[group]
        self._acc(st, "x", x.sum(0))
        self._acc(st, "xr", xr.sum(0))
        self._acc(st, "xx", x.t() @ xr)
        self._nx[group] += x.shape[0]
        return xr.to(torch.float32)

    def update_stored(self, group: int, base_rows: torch.Tensor, other_act: torch.Tensor) -> None:
        """Pair the stored base rows (``base_rows``' output) with the other model's rows at the same tokens."""
        import torch

        y = other_act.detach().reshape(-1, other_act.shape[-1]).double()
        xr = base_rows.to(y.device, torch.float64)
        if xr.shape[0] != y.shape[0]:
            raise ValueError(f"paired rows differ in number: {xr.shape[0]} vs {y.shape[0]}")
        yr = self.project(group, y).double()
        st = self._s[group]
        self._acc(st, "y", y.sum(0))
        self._acc(st, "yr", yr.sum(0))
        self._acc(st, "yy", y.t() @ yr)
        self._acc(st, "xy", xr.t() @ y)
        self._ny[group] += y.shape[0]

    def similarity(self) -> np.ndarray:
        import torch

        out = np.full(self.num_groups, np.nan)
        for g, st in enumerate(self._s):
            n = self._ny[g]
            if n == 0 or "xy" not in st:
                continue
            if self._nx[g] != n:
                raise ValueError(f"group {g}: {self._nx[g]} base rows but {n} paired rows")
            mx, mxr, my, myr = st["x"] / n, st["xr"] / n, st["y"] / n, st["yr"] / n
            sxx = float(torch.linalg.matrix_norm(st["xx"] - n * torch.outer(mx, mxr)))
            syy = float(torch.linalg.matrix_norm(st["yy"] - n * torch.outer(my, myr)))
            cxy = st["xy"] - n * torch.outer(mxr, my)
            out[g] = _degenerate(float((cxy * cxy).sum()), sxx * syy, sxx, syy)
        return out

    def state_bytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for st in self._s for t in st.values())


def _degenerate(num: float, den: float, sx: float, sy: float, eps: float = 1e-12) -> float:
    """num/den in [0, 1]; both sides constant → 1 (indistinguishable), exactly one constant → 0 (as NMI)."""
    zx, zy = sx <= eps, sy <= eps
    if zx and zy:
        return 1.0
    if zx or zy or not den > 0:
        return 0.0
    return float(min(1.0, max(0.0, num / den)))


# ----------------------------------------------------------------------------- cosine


class CosineEstimator(_RowMetric):
    """Mean over tokens of cos(base row, fine-tuned row), mapped to [0, 1] by clamping at 0.

    The map s = max(0, mean cos): the usual regime (mean cos > 0) keeps cosine's own scale, so a
    given t gives the same λ contrast per cosine point as per NMI point; an anti-aligned group
    (mean cos ≤ 0) is as "changed" as an orthogonal one. (1 + cos)/2 would halve every difference
    and silently halve t's effect. A zero row against a zero row counts cos 1, against a non-zero
    row cos 0. State: n and Σcos per group.
    """

    def __init__(self, num_groups: int, *, sketch_dim: int = DEFAULT_SKETCH_DIM, seed: int = 0, **_ignored):
        self.num_groups = int(num_groups)
        self.project = _Projector(sketch_dim, seed)
        self._n = np.zeros(self.num_groups, dtype=np.int64)
        self._sum = np.zeros(self.num_groups, dtype=np.float64)

    def base_rows(self, group: int, base_act: torch.Tensor) -> torch.Tensor:
        """Base-only pass: the rows to keep for pairing (k-wide sketch; inner products are preserved)."""
        return self.project(group, base_act.detach())

    def update_stored(self, group: int, base_rows: torch.Tensor, other_act: torch.Tensor) -> None:
        import torch

        y = self.project(group, other_act.detach()).double()
        x = base_rows.to(y.device, torch.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired rows differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        nx, ny = x.norm(dim=1), y.norm(dim=1)
        cos = (x * y).sum(1) / (nx * ny).clamp_min(1e-300)
        cos = torch.where((nx == 0) & (ny == 0), torch.ones_like(cos), cos)
        self._sum[group] += float(cos.clamp(-1.0, 1.0).sum())
        self._n[group] += x.shape[0]

    def mean_cosine(self) -> np.ndarray:
        """Raw mean cosine per group in [−1, 1] (NaN without data)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._n > 0, self._sum / np.maximum(self._n, 1), np.nan)

    def similarity(self) -> np.ndarray:
        return cosine_to_unit(self.mean_cosine())

    def state_bytes(self) -> int:
        return int(self._n.nbytes + self._sum.nbytes)


def cosine_to_unit(cos: np.ndarray | float) -> np.ndarray:
    """The documented map of a mean cosine into [0, 1]: max(0, cos) (NaN stays NaN)."""
    c = np.asarray(cos, dtype=np.float64)
    return np.where(np.isnan(c), np.nan, np.clip(c, 0.0, 1.0))


# ----------------------------------------------------------------------------- registry

METRICS: dict[str, MetricSpec] = {
    "nmi": MetricSpec(
        key="nmi", label="NMI", formula="NMI = MI / sqrt(H(x) H(y)), B×B joint histogram of paired values",
        description="normalised mutual information of base vs fine-tuned activation values (the paper's measure)",
        make=NMIEstimator, pairs="values"),
    "cka": MetricSpec(
        key="cka", label="linear CKA", formula="CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)",
        description="linear centred kernel alignment of the token rows (random projection for wide groups)",
        make=CKAEstimator),
    "cosine": MetricSpec(
        key="cosine", label="cosine", formula="s = max(0, mean_tokens cos(x_row, y_row))",
        description="mean per-token cosine similarity of base vs fine-tuned rows, clamped at 0",
        make=CosineEstimator),
}


def get_metric(key: str) -> MetricSpec:
    """The registered metric ``key`` (InputError naming the valid keys otherwise)."""
    spec = METRICS.get(str(key).strip().lower()) if isinstance(key, str) else None
    if spec is None:
        raise InputError(f"unknown similarity metric {key!r}; choose from {', '.join(METRICS)}")
    return spec


def parse_metrics(values: str | Iterable[str] | None) -> list[str]:
    """Metric keys from a comma list and/or repeated values, validated, deduplicated, in order (default nmi)."""
    if values is None:
        return [DEFAULT_METRIC]
    items = [values] if isinstance(values, str) else list(values)
    keys: list[str] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                key = get_metric(part).key
                if key not in keys:
                    keys.append(key)
    if not keys:
        raise InputError(f"give at least one similarity metric ({', '.join(METRICS)})")
    return keys


def keys_help() -> str:
    """``nmi (default), cka, cosine`` — the registry as CLI help text (parsers import this module, not torch)."""
    return ", ".join(f"{k} (default)" if k == DEFAULT_METRIC else k for k in METRICS)


def metric_label(key: str) -> str:
    """Human label of a metric key (the key itself when unknown, e.g. from a newer file)."""
    spec = METRICS.get(key)
    return spec.label if spec else key


__all__ = ["METRICS", "MetricSpec", "SimilarityEstimator", "TwoPhaseEstimator", "NMIEstimator", "CKAEstimator", "CosineEstimator",
           "DEFAULT_METRIC", "get_metric", "parse_metrics", "keys_help", "metric_label", "cosine_to_unit", "projection"]
