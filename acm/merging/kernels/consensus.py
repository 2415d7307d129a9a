"""How the (sparsified) task vectors are combined: TIES sign election, a plain sum, or linear's weight average.

* **Sign election (TIES)** (``elect``, ``SignElection``): ``S = Σᵢ λᵢ·τᵢ`` (trimmed, weighted); model i's
  entry is kept iff ``τᵢ·S > 0`` (λ ≥ 0 is enforced, so this is "λᵢ·τᵢ has the elected sign"; zero entries
  and entries where S = 0 never count). Update: the sum of the kept ``λᵢ·τᵢ``; with ``normalize`` that sum
  is divided by the sum of the kept entries' λᵢ (0 where none is kept) — mergekit's convention, so the
  overall scale α cancels out under ``normalize``.
* **Sum** (``weighted_sum``, ``Sum``): θ = θ₀ + Σᵢ λᵢ·τᵢ. Without a selection step it is task arithmetic's
  single fused pass (``TensorJob.task_arithmetic``); after one it sums the selected chunks.
* **Average** (``Average``, ``linear``): θ = Σᵢ wᵢ·θᵢ (no task vectors, no sparsification).
* Arithmetic: float32, ``θ₀ + λ·τ`` as one multiply-add (``torch.add(alpha=)`` / ``addcmul``), so
  results agree with the written formula to float32 rounding; λ = 0 returns θ₀ bit-exactly, and
  a plain merge and an ACM merge with λ = α everywhere run the same operations (bit-identical).

Each combiner has ``merge(job, lams, out, steps, given)`` (which pass of ``TensorJob`` runs the tensor) and,
for the selection pass, ``combine(base, taus, lams, scale, ws, dest)`` (one chunk).
"""

from __future__ import annotations

import torch

from .workspace import Workspace


def weighted_sum(base: torch.Tensor, taus: list[torch.Tensor], lams: list[float], ws: Workspace, *,
                 dest: torch.Tensor | None = None) -> torch.Tensor:
    """θ = θ₀ + Σᵢ λᵢ·τᵢ of (trimmed) task-vector chunks, one multiply-add per model (no sign election)."""
    acc = ws.get("o", base.numel())
    final = acc if dest is None else dest
    for i, (tau, lam) in enumerate(zip(taus, lams)):
        torch.add(base if i == 0 else acc, tau, alpha=lam, out=final if i == len(taus) - 1 else acc)
    return final


def elect(base: torch.Tensor, taus: list[torch.Tensor], lams: list[float], ws: Workspace, *,
          normalize: bool = False, norm_weights: list[float] | None = None,
          dest: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election + disjoint merge of trimmed task-vector chunks; returns θ (in ``dest`` if given).

    S = Σᵢ λᵢ·τᵢ; model i's entry counts iff τᵢ·S > 0 (with λᵢ ≥ 0 that is "λᵢ·τᵢ has the
    elected sign"; a model with λᵢ = 0 contributes nothing either way). Without ``normalize``:
    θ = θ₀ + Σ agreeing λᵢ·τᵢ; with it that sum is divided by Σ agreeing λᵢ (0 where none agree).
    ``norm_weights`` (default ``lams``) are the λᵢ of that denominator — without the DARE rescale
    that ``lams`` may carry.
    """
    norm_weights = lams if norm_weights is None else norm_weights
    L = base.numel()
    acc = ws.get("o", L)
    final = acc if dest is None else dest
    k = len(taus)
    if k == 1 and not normalize:
        return torch.add(base, taus[0], alpha=lams[0], out=final)   # τ·S = λτ² > 0 wherever λτ ≠ 0
    elected = torch.mul(taus[0], lams[0], out=ws.get("s", L))
    for tau, lam in zip(taus[1:], lams[1:]):
        elected.add_(tau, alpha=lam)
    agree = ws.get("a", L)
    if normalize:
        denom = ws.get("d", L).zero_()
        acc.zero_()
    for i, (tau, lam, w) in enumerate(zip(taus, lams, norm_weights)):
        torch.mul(tau, elected, out=agree).gt_(0)               # float 0/1
        if normalize:
            denom.add_(agree, alpha=w)
            acc.addcmul_(tau, agree, value=lam)
        else:                                                    # θ₀ + Σ λ·τ·agree, last one into dest
            torch.addcmul(base if i == 0 else acc, tau, agree, value=lam, out=final if i == k - 1 else acc)
    if normalize:
        # where no model agrees the sum is 0 as well, so dividing by a tiny positive value gives 0
        torch.add(base, acc.div_(denom.clamp_min_(torch.finfo(torch.float32).tiny)), out=final)
    return final


class SignElection:
    """TIES consensus: ``elect`` on the selected chunks (``normalize``: divide by the agreeing λ)."""

    def __init__(self, normalize: bool = False):
        self.normalize = bool(normalize)

    @classmethod
    def from_options(cls, options) -> SignElection:
        return cls(options.normalize)

    def merge(self, job, lams: list[float], out: torch.Tensor, steps=(), given=None):
        return job.select(lams, out, steps, self, given)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], lams: list[float], scale: float, ws: Workspace,
                dest: torch.Tensor | None) -> torch.Tensor:
        return elect(base, taus, [lam * scale for lam in lams], ws, normalize=self.normalize, norm_weights=lams,
                     dest=dest)


class Sum:
    """No consensus: θ₀ + Σ λᵢ·τᵢ (task arithmetic's fused pass unless a step selects)."""

    @classmethod
    def from_options(cls, options) -> Sum:
        return cls()

    def merge(self, job, lams: list[float], out: torch.Tensor, steps=(), given=None):
        if any(step.selects for step in steps):
            return job.select(lams, out, steps, self, given)
        return job.task_arithmetic(lams, out)

    def combine(self, base: torch.Tensor, taus: list[torch.Tensor], lams: list[float], scale: float, ws: Workspace,
                dest: torch.Tensor | None) -> torch.Tensor:
        return weighted_sum(base, taus, [lam * scale for lam in lams], ws, dest=dest)


class Average:
    """``linear``: θ = Σᵢ wᵢ·θᵢ over the models' weights (λ holds the normalised weights)."""

    @classmethod
    def from_options(cls, options) -> Average:
        return cls()

    def merge(self, job, lams: list[float], out: torch.Tensor, steps=(), given=None):
        return job.linear(lams, out)
