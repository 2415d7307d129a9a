"""Streaming mutual-information estimator: one B×B joint histogram per layer group.

Why a histogram: the analysis must see every (token, feature) activation pair of two models
without ever holding all activations, and its cost must stay a small fraction of the forward
passes. A fixed-range joint histogram is exactly additive over batches (so streaming equals one
big batch), needs O(groups·B²) memory whatever the calibration size, and is filled with one
vectorised ``bincount`` per group and batch on the activations' own device.

Estimator (this project's precise form, see docs/formulas.md):

* x = base activation, y = fine-tuned activation at the same (token, feature) position.
* Each of x and y is binned into B equal-width bins over a range set from robust quantiles
  (0.1 % / 99.9 %) of the *first* batch seen for that group (per model, per group); values
  outside the range go to the edge bins.
* MI  = Σ p(x,y) · log(p(x,y) / (p(x) p(y)))      (nats)
* NMI = MI / √(H(x) · H(y))                         ∈ [0, 1]

Degenerate cases (documented, used consistently): if both H(x) and H(y) are 0 (both sides
constant in this binning, i.e. indistinguishable) NMI is 1; if exactly one is 0 NMI is 0 (one
side varies, the other carries no information about it); a group that never received data has
NMI NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from acm.errors import InputError

DEFAULT_BINS = 64
MIN_BINS, MAX_BINS = 2, 1024
QUANTILES = (0.001, 0.999)
# Quantiles come from at most this many values (a seeded random subsample beyond it; torch.quantile
# would refuse more than 2**24 anyway). With 2**16 values the 0.1 % tail still holds ~65 of them:
# the quantile's standard error is ~0.012 percentile points, far below a bin width.
QUANTILE_SAMPLE = 1 << 16


def check_bins(bins: int) -> int:
    """Validate the bin count early with a clear message (B² counters per group)."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not MIN_BINS <= int(bins) <= MAX_BINS:
        raise InputError(f"bins must be an integer between {MIN_BINS} and {MAX_BINS}, got {bins!r}")
    return int(bins)


def robust_range(values: torch.Tensor, quantiles: tuple[float, float] = QUANTILES, *,
                 seed: int = 0) -> tuple[float, float]:
    """(lo, hi) from robust quantiles of ``values``; a random subsample when it is huge.

    Why robust: a handful of outlier activations (massive activations are common in LLMs) would
    otherwise stretch the range so most values share a few bins and MI collapses.
    """
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("cannot set a histogram range from an empty tensor")
    if flat.numel() > QUANTILE_SAMPLE:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(0, flat.numel(), (QUANTILE_SAMPLE,), generator=gen).to(flat.device)
        flat = flat[idx]
    flat = flat.float()
    finite = torch.isfinite(flat)
    if not bool(finite.all()):
        flat = flat[finite]
        if flat.numel() == 0:
            return 0.0, 1.0
    # Order statistics by selection (kthvalue, O(n)) rather than torch.quantile's full sort.
    n = flat.numel()
    k_lo = min(n, max(1, int(round(quantiles[0] * (n - 1))) + 1))
    k_hi = min(n, max(1, int(round(quantiles[1] * (n - 1))) + 1))
    if flat.device.type == "cpu" or flat.device.type == "cuda":
        lo, hi = float(torch.kthvalue(flat, k_lo).values), float(torch.kthvalue(flat, k_hi).values)
    else:  # devices without kthvalue
        q = torch.quantile(flat, torch.tensor(quantiles, device=flat.device, dtype=flat.dtype))
        lo, hi = float(q[0]), float(q[1])
    if not hi > lo:  # constant (or nearly): any non-empty range puts every value in one bin
        span = max(abs(lo), 1.0) * 1e-6
        lo, hi = lo - span, hi + span
    return lo, hi


def bin_indices(values: torch.Tensor, lo: float, hi: float, bins: int, *, inplace: bool = False) -> torch.Tensor:
    """Bin index (int32, flattened) of every value; out-of-range values go to the edge bins.

    A few cheap element-wise passes (scale, shift, clamp, cast); NaN is sent to bin 0.
    ``inplace=True`` lets a caller that owns a float32 ``values`` buffer skip one allocation
    (the buffer is overwritten).
    """
    scale = bins / (hi - lo)
    v = values.reshape(-1)
    if v.dtype != torch.float32:
        v = v.to(torch.float32).mul_(scale)
    elif inplace:
        v = v.mul_(scale)
    else:
        v = v * scale
    v.sub_(lo * scale).clamp_(0.0, bins - 1).nan_to_num_(nan=0.0)
    return v.to(torch.int32)   # truncation == floor for the non-negative clamped values


def mi_from_joint(joint: np.ndarray | torch.Tensor) -> tuple[float, float, float]:
    """(MI, H(x), H(y)) in nats from a joint count (or probability) table, rows = x."""
    j = joint.detach().cpu().double().numpy() if isinstance(joint, torch.Tensor) else np.asarray(joint, np.float64)
    total = j.sum()
    if not total > 0:
        return float("nan"), float("nan"), float("nan")
    p = j / total
    px, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    outer = np.outer(px, py)
    mi = float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))
    hx = float(-np.sum(px[px > 0] * np.log(px[px > 0])))
    hy = float(-np.sum(py[py > 0] * np.log(py[py > 0])))
    return max(mi, 0.0), max(hx, 0.0), max(hy, 0.0)


def nmi_from_entropies(mi: float, hx: float, hy: float, eps: float = 1e-12) -> float:
    """NMI = MI / √(H(x)H(y)) clipped to [0, 1], with the degenerate cases of the module doc."""
    if any(math.isnan(v) for v in (mi, hx, hy)):
        return float("nan")
    zx, zy = hx <= eps, hy <= eps
    if zx and zy:
        return 1.0
    if zx or zy:
        return 0.0
    return float(min(1.0, max(0.0, mi / math.sqrt(hx * hy))))


class StreamingMI:
    """Joint histograms of (base, fine-tuned) activations for ``num_groups`` groups.

    ``update(group, x, y)`` takes paired activations of any (equal) shape; the first call for a
    group fixes that group's x and y ranges unless ``set_range`` was called before. Counts are
    int64 on the device of the first update (GPU when the activations are there).
    """

    def __init__(self, num_groups: int, bins: int = DEFAULT_BINS, *, quantiles: tuple[float, float] = QUANTILES,
                 seed: int = 0):
        if num_groups < 1:
            raise ValueError("num_groups must be >= 1")
        self.num_groups = int(num_groups)
        self.bins = check_bins(bins)
        self.quantiles = quantiles
        self.seed = seed
        self.x_range: list[tuple[float, float] | None] = [None] * self.num_groups
        self.y_range: list[tuple[float, float] | None] = [None] * self.num_groups
        self._joint: list[torch.Tensor | None] = [None] * self.num_groups

    # -- ranges -----------------------------------------------------------------------------
    def set_range(self, group: int, x_range: tuple[float, float] | None = None,
                  y_range: tuple[float, float] | None = None) -> None:
        """Fix a group's bin range(s) (e.g. the base range shared by several estimators)."""
        for rng in (x_range, y_range):
            if rng is not None and not (math.isfinite(rng[0]) and math.isfinite(rng[1]) and rng[1] > rng[0]):
                raise ValueError(f"invalid histogram range {rng}")
        if x_range is not None:
            self.x_range[group] = (float(x_range[0]), float(x_range[1]))
        if y_range is not None:
            self.y_range[group] = (float(y_range[0]), float(y_range[1]))

    # -- accumulation -----------------------------------------------------------------------
    def update(self, group: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the paired samples (x[i], y[i]) to the group's joint histogram."""
        if x.shape != y.shape:
            raise ValueError(f"paired activations differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel() == 0:
            return
        if self.x_range[group] is None:
            self.x_range[group] = robust_range(x, self.quantiles, seed=self.seed)
        if self.y_range[group] is None:
            self.y_range[group] = robust_range(y, self.quantiles, seed=self.seed)   # same positions as x
        self.add_indices(group, bin_indices(x, *self.x_range[group], self.bins),
                         bin_indices(y, *self.y_range[group], self.bins))

    def add_indices(self, group: int, ix: torch.Tensor, iy: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add pre-binned pairs (int indices in [0, B)) — lets callers bin x once for many y.

        ``keep`` (bool, broadcastable to ``ix``'s shape) drops the pairs where it is False: they
        go to an overflow bin B² that is discarded, which costs one pass instead of a gather.
        """
        b = self.bins
        if iy.dtype != torch.int32:
            iy = iy.to(torch.int32)
        flat = torch.add(iy, ix, alpha=b)   # ix·B + iy in one pass (int32: < B² + 1 ≤ 2**20 + 1)
        if keep is not None:
            flat = flat.masked_fill_(~keep, b * b)
            counts = torch.bincount(flat.reshape(-1), minlength=b * b + 1)[: b * b]
        else:
            counts = torch.bincount(flat.reshape(-1), minlength=b * b)
        joint = self._joint[group]
        if joint is None:
            self._joint[group] = counts.to(torch.int64)
        else:
            if joint.device != counts.device:
                counts = counts.to(joint.device)
            joint.add_(counts)

    # -- results ----------------------------------------------------------------------------
    def joint(self, group: int) -> np.ndarray:
        """The group's B×B joint count table (rows: base bins, columns: fine-tuned bins)."""
        j = self._joint[group]
        if j is None:
            return np.zeros((self.bins, self.bins), dtype=np.int64)
        return j.reshape(self.bins, self.bins).cpu().numpy()

    def count(self, group: int) -> int:
        j = self._joint[group]
        return 0 if j is None else int(j.sum())

    def stats(self) -> list[tuple[float, float, float]]:
        """(MI, H(x), H(y)) per group."""
        return [mi_from_joint(self.joint(g)) for g in range(self.num_groups)]

    def mi(self) -> np.ndarray:
        """MI in nats per group (NaN for a group with no data)."""
        return np.array([s[0] for s in self.stats()], dtype=np.float64)

    def nmi(self) -> np.ndarray:
        """NMI in [0, 1] per group (NaN for a group with no data)."""
        return np.array([nmi_from_entropies(*s) for s in self.stats()], dtype=np.float64)

    def merge(self, other: StreamingMI) -> None:
        """Add another estimator's counts (same bins and ranges): histograms are additive."""
        if other.bins != self.bins or other.num_groups != self.num_groups:
            raise ValueError("cannot merge estimators with different shapes")
        for g in range(self.num_groups):
            if other._joint[g] is None:
                continue
            if self.x_range[g] is None:
                self.x_range[g], self.y_range[g] = other.x_range[g], other.y_range[g]
            elif (self.x_range[g], self.y_range[g]) != (other.x_range[g], other.y_range[g]):
                raise ValueError(f"group {g}: estimators use different histogram ranges")
            self.add_indices_counts(g, other._joint[g])

    def add_indices_counts(self, group: int, counts: torch.Tensor) -> None:
        joint = self._joint[group]
        if joint is None:
            self._joint[group] = counts.clone().to(torch.int64)
        else:
            joint.add_(counts.to(joint.device))
