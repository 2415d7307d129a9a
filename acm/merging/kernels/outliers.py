"""Breadcrumbs' outlier trim (``breadcrumbs``, ``breadcrumbs_ties``): ``OutlierTrim``.

* **Breadcrumbs trim**: with k = ``keep_count(n, density)`` and t = min(round(gamma·n), n − k), rank the
  entries by |τ| (descending, ties: lowest flat index first) and keep ranks t … t+k−1: the t largest
  (outliers) and everything below the top t+k are zeroed. Both cuts are exact selections with the TIES
  tie-break (``TrimSpec`` for t+k, ``apply_cut`` for t), so exactly k entries survive (fewer only when fewer
  are non-zero), whatever the chunk size. ``density = 1`` keeps everything. The selection keeps each model's
  τ of the current tensor for the merge pass (two exact selections per model).
  mergekit (``magnitude_outliers``) uses int(·) for both counts and breaks ties by an unstable sort;
  mergekit ≤ 0.1.4 keeps nothing of a tensor where int(gamma·n) = 0 (its ``indices[n_bot:-0]`` is empty).
"""

from __future__ import annotations

import torch

from .selection import Selection, TrimSpec, exact_trim, keep_count
from .workspace import Step


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs: (k kept, t outliers dropped above them) for a tensor of n entries."""
    k = keep_count(n, density)
    return k, max(0, min(int(round(gamma * n)), n - k))


def apply_cut(tc: torch.Tensor, spec: TrimSpec | None, budget: int | None) -> int | None:
    """Zero one chunk's share of the top-t |τ| (Breadcrumbs outliers), chunks in flat order; returns the
    tie budget left. The complement of ``apply_trim`` with the same tie-break: of the entries equal to
    the threshold the first ``budget`` met in flat order are cut (``None``: all); threshold ≤ 0 (fewer
    than t non-zero entries) cuts everything."""
    if spec is None:
        return budget
    thr = spec.threshold
    if thr <= 0.0:
        tc.zero_()
        return budget
    a = tc.abs()
    if budget is None:
        tc.mul_(a < thr)
        return None
    at = torch.nonzero(a == thr).squeeze(1)
    cut = at[:budget]
    tc.mul_(a <= thr)
    tc[cut] = 0.0
    return budget - cut.numel()


class OutlierSelection(Selection):
    """A ``Selection`` that also cuts each model's top t (``cuts``), after the trim: the same tie order."""

    def __init__(self, trims: list[TrimSpec], cuts: list[TrimSpec | None], taus: list[torch.Tensor]):
        super().__init__(trims, taus=taus)
        self.cuts = cuts
        self.cut_budgets = [c.ties if c is not None else None for c in cuts]

    def apply(self, i: int, tc: torch.Tensor) -> None:
        super().apply(i, tc)
        self.cut_budgets[i] = apply_cut(tc, self.cuts[i], self.cut_budgets[i])


class OutlierTrim(Step):
    """Breadcrumbs: keep ranks t … t+k−1 of each model's |τ| (module docstring)."""

    selects = True

    def __init__(self, density: float, gamma: float):
        self.density, self.gamma = density, gamma

    @classmethod
    def from_options(cls, options) -> OutlierTrim:
        return cls(options.density, options.gamma)

    def prepare(self, job, given=None) -> OutlierSelection | None:
        """Each model's trim spec for the top t+k and cut spec for the top t of this tensor (None: nothing cut).

        Why whole τ: two exact selections per model; the τ buffers are kept for the merge pass (as TIES
        does on GPUs and for small tensors)."""
        keep, top = outlier_counts(job.n, self.density, self.gamma)
        if keep + top >= job.n and top == 0:
            return None
        job.start_pass()
        taus = job.whole_taus()
        trims = [exact_trim(t, keep + top, job.ws, job.chunk) if keep + top < job.n else TrimSpec(0.0)
                 for t in taus]
        cuts = [exact_trim(t, top, job.ws, job.chunk) if top > 0 else None for t in taus]
        return OutlierSelection(trims, cuts, taus)
