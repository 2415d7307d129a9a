"""Per-tensor merge maths: task vectors, DARE drop, TIES trim / sign election, exact thresholds.

Why a separate module: these functions are the whole numerical definition of the merge methods
(DESIGN "Merge methods"); the engine in ``acm.merge`` only streams tensors through them. Every
function works on float32 tensors on any device and mutates its inputs in place where that saves
a full-size allocation (the callers own those buffers).

Precise conventions (this project's choices where DESIGN leaves room):

* **Trim (TIES)**: keep the ``k = max(1, round(density · n))`` entries of largest ``|τ|``; the
  threshold is the exact k-th largest ``|τ|`` and every entry with ``|τ| ≥ threshold`` is kept, so
  ties at the threshold are all kept (never fewer than k entries survive). ``density = 1`` keeps
  everything (no selection is run).
* **Sign election (TIES)**: ``S = Σᵢ λᵢ·τᵢ`` (trimmed, weighted); model i's entry is kept iff
  ``λᵢ·τᵢ·S > 0`` (same sign as the elected one; zero entries and entries where S = 0 never
  count). Update ``Σ`` of the kept ``λᵢ·τᵢ``; with ``normalize`` that sum is divided by the sum
  of the kept entries' λᵢ (0 where none is kept) — mergekit's convention, so the overall scale α
  cancels out under ``normalize``.
* **DARE**: drop each entry with probability p, multiply the kept ones by ``1/(1−p)``. The random
  stream is seeded from ``(seed, model index, tensor name)`` (SHA-256), so a merge is
  reproducible and independent of tensor order. On CPU the stream is NumPy's PCG64 (float32
  uniforms), on CUDA torch's Philox generator on that device: masks are reproducible per device
  type, not across CPU/GPU.
* ``dare_ties`` = DARE drop/rescale, then the full TIES step (trim to ``density`` + election);
  ``density = 1`` gives mergekit's ``dare_ties`` (no magnitude trim).
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import torch

# Sample size for the exact threshold search (see kth_largest).
_SAMPLE = 1 << 16
_EXACT_BELOW = 1 << 18


def keep_count(n: int, density: float) -> int:
    """How many entries the trim keeps out of n (at least one)."""
    return max(1, min(n, int(round(density * n))))


def stable_seed(seed: int, model_index: int, name: str) -> int:
    """A 63-bit seed from (seed, model index, tensor name): same merge → same masks, any tensor order."""
    digest = hashlib.sha256(f"{int(seed)}|{int(model_index)}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_(tau: torch.Tensor, drop_rate: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """Drop each entry of τ with probability ``drop_rate`` and rescale the rest by 1/(1−p), in place."""
    if drop_rate <= 0 or tau.numel() == 0:
        return tau
    s = stable_seed(seed, model_index, name)
    if tau.device.type == "cpu":
        rng = np.random.Generator(np.random.PCG64(s))
        r = torch.from_numpy(rng.random(tau.numel(), dtype=np.float32)).view(tau.shape)
    else:
        gen = torch.Generator(device=tau.device).manual_seed(s)
        r = torch.rand(tau.shape, generator=gen, device=tau.device, dtype=torch.float32)
    # r <- (r >= p) · 1/(1 − p): keep mask and rescale in one buffer, then one multiply, so each kept
    # entry is τ · float32(1/(1 − p)) with a single rounding.
    r.ge_(drop_rate).mul_(1.0 / (1.0 - drop_rate))
    return tau.mul_(r)


def kth_largest(a: torch.Tensor, k: int) -> float:
    """Exact k-th largest value of a non-negative 1-D float32 tensor (1 ≤ k ≤ n).

    Why not ``torch.kthvalue`` on everything: a full selection over a large tensor costs several
    times the task-arithmetic update itself. We locate a narrow value band from a fixed random
    sample, count the entries above it, and run ``kthvalue`` only inside the band (~1-2 % of the
    tensor). If the band misses (it cannot for any reasonable sample, but correctness must not
    depend on luck) we fall back to ``kthvalue`` over the whole tensor — the result is exact
    either way.
    """
    n = a.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n <= _EXACT_BELOW:
        return float(torch.kthvalue(a, n - k + 1).values)
    gen = torch.Generator().manual_seed(n)
    idx = torch.randint(n, (_SAMPLE,), generator=gen).to(a.device)
    sample, _ = torch.sort(a[idx])
    q = 1.0 - k / n                              # quantile of the threshold (ascending)
    sd = math.sqrt(max(q * (1 - q), 1.0 / _SAMPLE) / _SAMPLE)
    lo_i = max(0, int(math.floor((q - 8 * sd) * _SAMPLE)) - 2)
    hi_i = min(_SAMPLE - 1, int(math.ceil((q + 8 * sd) * _SAMPLE)) + 2)
    lo = float(sample[lo_i]) if lo_i > 0 else 0.0
    hi = float(sample[hi_i]) if hi_i < _SAMPLE - 1 else math.inf
    above = int(torch.count_nonzero(a > hi)) if hi < math.inf else 0
    band = a[(a >= lo) & (a <= hi)]
    if above < k <= above + band.numel():
        j = k - above                            # j-th largest inside the band
        return float(torch.kthvalue(band, band.numel() - j + 1).values)
    return float(torch.kthvalue(a, n - k + 1).values)


def trim_(tau: torch.Tensor, *, density: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Zero every entry with ``|τ| < threshold`` in place (threshold from ``density`` when not given)."""
    if threshold is None:
        if density is None or density >= 1.0 or tau.numel() == 0:
            return tau
        a = tau.abs().reshape(-1)
        threshold = kth_largest(a, keep_count(a.numel(), density))
        return tau.mul_(a.ge_(threshold).view(tau.shape))  # a reused as the 0/1 keep mask
    if threshold <= 0.0:
        return tau
    return tau.mul_(tau.abs().ge_(threshold))


def weighted_sum(taus: list[torch.Tensor], lams: list[float]) -> torch.Tensor:
    """Σᵢ λᵢ·τᵢ, reusing the first buffer (task arithmetic update)."""
    acc = taus[0].mul_(lams[0])
    for tau, lam in zip(taus[1:], lams[1:]):
        acc.add_(tau, alpha=lam)
    return acc


def ties_combine(taus: list[torch.Tensor], lams: list[float], *, normalize: bool = False) -> torch.Tensor:
    """TIES sign election + disjoint merge of already-trimmed task vectors (buffers are reused)."""
    contribs = [tau.mul_(lam) for tau, lam in zip(taus, lams)]   # cᵢ = λᵢ·τᵢ
    if len(contribs) == 1 and not normalize:
        return contribs[0]                       # cᵢ·S > 0 ⇔ cᵢ ≠ 0: the election keeps everything
    elected = contribs[0].clone()
    for c in contribs[1:]:
        elected.add_(c)                          # S = Σ cᵢ
    delta = torch.zeros_like(elected)
    denom = torch.zeros_like(elected) if normalize else None
    for c, lam in zip(contribs, lams):
        agree = torch.mul(c, elected).gt_(0)     # float 0/1: same sign as S, non-zero
        if denom is not None:
            denom.add_(agree, alpha=lam)
        delta.add_(c.mul_(agree))
    if denom is not None:
        delta = torch.where(denom > 0, delta / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(delta))
    return delta


# ---------------------------------------------------------------------------------------------
# Global trim: one exact threshold per model over all its tensors, found by streaming histograms
# of the float32 bit patterns (non-negative IEEE floats order like their integer bits).
# Pass 1 counts the high 16 bits, pass 2 the low 16 bits inside the one bucket holding the k-th
# largest value: two passes, O(65536) memory, exact.
# ---------------------------------------------------------------------------------------------

_HI_BINS = 1 << 15      # sign bit is 0 for |τ|
_LO_BINS = 1 << 16


def _bits(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1).contiguous().view(torch.int32)


def hist_high(a: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of |τ| (int64 [32768], CPU)."""
    return torch.bincount(_bits(a) >> 16, minlength=_HI_BINS).cpu()


def hist_low(a: torch.Tensor, bucket: int) -> torch.Tensor:
    """Counts of the low 16 bits of the entries of |τ| whose high 16 bits equal ``bucket``."""
    bits = _bits(a)
    sel = bits[(bits >> 16) == bucket] & 0xFFFF
    return torch.bincount(sel, minlength=_LO_BINS).cpu()


def locate(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin, rank inside that bin from the top) of the k-th largest entry given per-bin counts."""
    from_top = torch.cumsum(counts.flip(0), 0)           # entries in the top j+1 bins
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype))[0])
    above = int(from_top[j - 1]) if j > 0 else 0
    return counts.numel() - 1 - j, k - above


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]
