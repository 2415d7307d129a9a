"""Exact top-k by magnitude, and the TIES magnitude trim (``MagnitudeTrim``) built on it.

* **Trim (TIES)**: keep exactly the ``k = max(1, round(density · n))`` entries of largest ``|τ|``.
  The threshold is the exact k-th largest ``|τ|``; every entry above it is kept, and of the entries
  *equal* to it (bf16 task vectors take few distinct magnitudes, so thousands can tie) only the
  ones with the lowest flat indices are kept, as many as k still needs (``TrimSpec``). The tie-break
  depends on positions only, so it is the same for every chunk size and tensor order.
  ``density = 1`` keeps everything (no selection is run). If fewer than k entries are non-zero,
  all non-zero entries are kept.
* **Finding the threshold** (``kth_largest_abs``, ``MagnitudeTrim``): a fixed systematic sample places a
  narrow value band around the answer; one chunked pass counts the entries above it and collects the few
  inside it (``BandCounter``), and a partial sort of the band gives the exact value. A band that misses
  falls back to a full selection, so the result never depends on the sample. On CPU the TIES pass keeps no
  τ (the merge pass recomputes it from the inputs; with DARE it stores each model's keep mask, one byte per
  entry); small tensors, GPUs and extreme densities keep each model's τ of the current tensor.
* **Global trim** (``trim_scope="global"``): one threshold per model, the exact k-th largest
  |τ| over all its floating-point tensors with k = round(density · N), N = all their entries (in
  the base's shapes; rows a model lacks count as τ = 0). Found by two streaming histogram passes
  over the float32 bit patterns before the merge pass (``hist_high`` / ``hist_low`` / ``locate``: a
  radix select, O(65536) memory). Ties at the threshold are broken in the order (tensor name sorted as
  text, flat index), which a third counting pass resolves into a per-tensor tie budget only when the
  ties do not all fit (the engine's ``_Plan.global_thresholds``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .workspace import CPU_CHUNK, Step, Workspace

# Exact threshold search (see kth_largest_abs): random sample size, and below this size a plain
# torch.kthvalue is cheaper than being clever.
_SAMPLE = 1 << 15
_SAMPLE_MAX = 1 << 17
_EXACT_BELOW = 1 << 17
_SIGMAS = 5.0


def keep_count(n: int, density: float) -> int:
    """How many entries the trim keeps out of n (at least one)."""
    return max(1, min(n, int(round(density * n))))


def _is_prime(x: int) -> bool:
    if x < 2:
        return False
    for d in range(2, int(math.isqrt(x)) + 1):
        if x % d == 0:
            return False
    return True


def _sample_slice(n: int) -> slice:
    """Positions of the threshold sample in a flat tensor of n entries: every p-th entry, p prime.

    Why a systematic sample and not random positions: random gathers from a memory-mapped input
    cost a cache miss each (measured ~13 ns per draw, 0.29 s of a 0.9 s TIES merge at 200M), while
    a constant stride streams through memory. A prime stride is coprime with any realistic row
    length (powers of two times small factors), so the sample walks across all columns and rows
    instead of repeating one column. The sample only places the band: the threshold is exact
    whatever it contains (a band that misses falls back to a full selection).
    """
    step = max(1, n // _sample_size(n))
    while step > 2 and not _is_prime(step):
        step += 1
    return slice(step // 2, n, step)


def _sample_size(n: int) -> int:
    """Sample size for a band around the k-th largest of n values: n/16, within [_SAMPLE, _SAMPLE_MAX].

    Why it grows with n: the band must hold few entries, because gathering them costs far more per
    entry than counting (numpy's ``flatnonzero`` went from 0.13 to 0.55 ns/element between 2 % and 4 %
    of a 256K chunk set), and its width falls as 1/√m; the sample itself costs ~4 µs per 1,000 draws.
    """
    return max(_SAMPLE, min(_SAMPLE_MAX, n >> 4))


def _band(sample: np.ndarray, n: float, k: int) -> tuple[float, float] | None:
    """A value band [lo, hi] that holds the k-th largest of n values w.h.p., from a random sample."""
    m = sample.size
    q = (n - k + 0.5) / n                          # ascending quantile of the answer
    sd = math.sqrt(max(q * (1 - q), 1.0 / m) / m)
    lo_i = int(math.floor((q - _SIGMAS * sd) * m)) - 2
    hi_i = int(math.ceil((q + _SIGMAS * sd) * m)) + 2
    if lo_i <= 0 or hi_i >= m - 1:                 # extreme density: a plain selection is as cheap
        return None
    part = np.sort(sample)                         # (numpy's SIMD sort: 5-10× faster than a 2-point partition)
    return float(part[lo_i]), float(part[hi_i])


@dataclass(frozen=True)
class TrimSpec:
    """One model's TIES trim of one tensor.

    Keep every entry with ``|τ| > threshold``; of the entries with ``|τ| == threshold`` keep the
    first ``ties`` in flat order (``None``: keep them all — they all fit in k, the common case for
    float32 task vectors, which needs no extra pass). ``threshold <= 0`` keeps everything.
    """

    threshold: float
    ties: int | None = None


def trim_spec(value: float, above: int, equal: int, k: int) -> TrimSpec:
    """The spec that keeps exactly k entries, given the k-th largest |τ| and how many entries are
    strictly above it / equal to it."""
    if value <= 0.0:
        return TrimSpec(0.0)
    need = k - above
    if not 0 < need < equal:
        # need == equal: every tie fits. Anything else only happens with NaN in τ (NaN is neither
        # above, below nor equal to anything); keep the threshold and let the NaN check name the input.
        return TrimSpec(float(value))
    return TrimSpec(float(value), int(need))


class BandCounter:
    """Streams chunks of x (CPU) and keeps what the exact k-th largest |x| needs, given a band [lo, hi]:
    the count above ``hi`` and the values inside the band (exact zeros excluded).

    Speed (this pass is most of what TIES costs beyond task arithmetic): the tests run on the float32
    bit patterns — for non-negative floats the integer order is the value order — so |x| is one AND,
    "inside [lo, hi]" is one wrapping subtraction and one unsigned compare, and the few band entries
    (~2-4 %) are gathered by index (``flatnonzero`` + take), not by boolean-mask indexing (measured
    0.6 → 0.4 ns/element with 256K-element chunks, 1 thread).
    """

    def __init__(self, lo: float, hi: float, k: int, scratch: np.ndarray):
        self.lo, self.hi, self.k = lo, hi, k
        self.bits = scratch.view(np.uint32)
        self.flags = np.empty(scratch.size, dtype=bool)
        self.lo_bits = np.uint32(max(int(np.float32(lo).view(np.uint32)), 1))   # ≥ smallest positive: no zeros
        self.hi_bits = np.uint32(np.float32(hi).view(np.uint32))
        self.span = np.uint32(max(int(self.hi_bits) - int(self.lo_bits), 0))
        self.empty = int(self.hi_bits) < int(self.lo_bits)
        self.above, self.parts = 0, []

    def update(self, x: np.ndarray) -> None:
        m = x.size
        u = np.bitwise_and(x.view(np.uint32), np.uint32(0x7FFFFFFF), out=self.bits[:m])    # |x|
        flags = self.flags[:m]
        self.above += int(np.count_nonzero(np.greater(u, self.hi_bits, out=flags)))
        if self.empty:
            return
        np.subtract(u, self.lo_bits, out=u)                       # below lo wraps around to > span
        idx = np.flatnonzero(np.less_equal(u, self.span, out=flags))
        if idx.size:
            self.parts.append(np.abs(x[idx]))

    def result(self) -> float | None:
        """The exact k-th largest |x|, or None when the band missed it."""
        vals = np.concatenate(self.parts) if self.parts else np.empty(0, np.float32)
        k, above = self.k, self.above
        if above < k <= above + vals.size:
            j = vals.size - (k - above)            # ascending index of the answer inside the band
            return float(np.partition(vals, j)[j])
        if self.lo == 0.0 and k > above + vals.size:
            return 0.0                             # fewer than k non-zero entries: the k-th largest is 0
        return None

    def spec(self) -> TrimSpec | None:
        """The exact ``TrimSpec`` (threshold + tie budget) for k, or None when the band missed it.

        The counts come for free: entries above ``hi`` were counted, the rest above or at the
        threshold are all inside the band (which holds the threshold itself)."""
        value = self.result()
        if value is None or value <= 0.0:
            return None if value is None else TrimSpec(0.0)
        vals = np.concatenate(self.parts) if self.parts else np.empty(0, np.float32)
        v32 = np.float32(value)
        above = self.above + int(np.count_nonzero(vals > v32))
        return trim_spec(value, above, int(np.count_nonzero(vals == v32)), self.k)


def _kth_in_band(x: torch.Tensor, k: int, lo: float, hi: float, ws: Workspace | None, chunk: int) -> float | None:
    """The k-th largest |x| from the entries inside [lo, hi] and the count above it; None when the band missed."""
    n = x.numel()
    if x.device.type == "cpu":
        xn = x.numpy()
        scratch = (ws.get("kth.abs", min(chunk, n)) if ws is not None else torch.empty(min(chunk, n))).numpy()
        counter = BandCounter(lo, hi, k, scratch)
        for s in range(0, n, chunk):
            counter.update(xn[s:s + chunk])
        return counter.result()
    a = x.abs()
    above = int(torch.count_nonzero(a > hi))
    vals = a[((a >= lo) if lo > 0 else (a > 0)) & (a <= hi)]
    if above < k <= above + vals.numel():
        return float(torch.kthvalue(vals, vals.numel() - (k - above) + 1).values)
    if lo == 0.0 and k > above + vals.numel():
        return 0.0
    return None


def kth_largest_abs(x: torch.Tensor, k: int, ws: Workspace | None = None, chunk: int = CPU_CHUNK) -> float:
    """Exact k-th largest ``|x|`` of a flat float32 tensor (1 ≤ k ≤ n), without a full sort.

    Why not ``torch.kthvalue`` on everything: a full selection costs several times the
    task-arithmetic update itself. A fixed random sample of |x| brackets the answer in a narrow
    band [lo, hi]; one chunked pass counts the entries above ``hi`` and collects the few inside the
    band (~1-2 %), and a partial sort of the band gives the exact value. If the band misses —
    vanishingly unlikely, but correctness must not depend on luck — we fall back to ``kthvalue``
    over the whole tensor. The result is exact either way.
    """
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} entries")
    if n > _EXACT_BELOW:
        band = _band(x[_sample_slice(n)].abs().cpu().numpy(), n, k)
        if band is not None:
            value = _kth_in_band(x, k, band[0], band[1], ws, chunk)
            if value is not None:
                return value
    return float(torch.kthvalue(x.abs().reshape(-1), n - k + 1).values)


def kth_largest(a: torch.Tensor, k: int) -> float:
    """Exact k-th largest value of a non-negative tensor (see ``kth_largest_abs``)."""
    return kth_largest_abs(a.reshape(-1).contiguous().float(), k)


def _below(x: float) -> float:
    """The largest float32 strictly below x (x > 0): hardshrink keeps |τ| > λ, we keep |τ| ≥ threshold."""
    return float(np.nextafter(np.float32(x), np.float32(0)))


def exact_trim(x: torch.Tensor, k: int, ws: Workspace | None = None, chunk: int = CPU_CHUNK) -> TrimSpec:
    """``TrimSpec`` keeping exactly the k largest ``|x|`` of a flat float32 tensor (ties: lowest index)."""
    value = kth_largest_abs(x, k, ws, chunk)
    if value <= 0.0:
        return TrimSpec(0.0)
    above = equal = 0
    for s in range(0, x.numel(), chunk):
        a = x[s:s + chunk].abs()
        above += int(torch.count_nonzero(a > value))
        equal += int(torch.count_nonzero(a == value))
    return trim_spec(value, above, equal, k)


def apply_trim(tc: torch.Tensor, spec: TrimSpec, budget: int | None) -> int | None:
    """Trim one chunk of τ in place, chunks taken in flat order; returns the tie budget left.

    ``budget`` is how many entries equal to the threshold may still be kept (``None`` = all): the
    first ones met in flat order win, so the result does not depend on the chunk size.
    """
    thr = spec.threshold
    if thr <= 0.0:
        return budget
    if budget is None:
        torch.ops.aten.hardshrink.out(tc, _below(thr), out=tc)      # keep |τ| ≥ threshold
        return None
    if budget == 0:
        torch.ops.aten.hardshrink.out(tc, thr, out=tc)              # keep |τ| > threshold only
        return 0
    at = torch.nonzero(tc.abs() == thr).squeeze(1)
    if at.numel() > budget:
        tc[at[budget:]] = 0.0
        left = 0
    else:
        left = budget - at.numel()
    torch.ops.aten.hardshrink.out(tc, _below(thr), out=tc)
    return left


def trim(tau: torch.Tensor, *, density: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Whole-tensor TIES trim, in place: keep exactly the ``round(density·n)`` largest ``|τ|`` (ties
    at the threshold: lowest flat index first); with ``threshold`` instead, keep every ``|τ| ≥ threshold``."""
    if threshold is not None:
        return tau if threshold <= 0.0 else tau.mul_(tau.abs().ge_(threshold))
    if density is None or density >= 1.0 or tau.numel() == 0:
        return tau
    flat = tau.view(-1)
    f32 = flat.float()
    spec = exact_trim(f32, keep_count(flat.numel(), density))
    apply_trim(f32, spec, spec.ties)
    flat.copy_(f32)
    return tau


class Selection:
    """One tensor's prepared selection: each model's ``TrimSpec``, applied chunk by chunk in flat order with
    a running tie budget (``apply``), plus what the preparing pass left for the merge pass — each model's
    whole τ (``taus``) or its stored DARE keep mask (``keeps``); neither: the merge pass recomputes τ."""

    def __init__(self, trims: list[TrimSpec], *, taus: list[torch.Tensor] | None = None,
                 keeps: list[torch.Tensor] | None = None):
        self.trims, self.taus, self.keeps = list(trims), taus, keeps
        self.budgets = [spec.ties for spec in self.trims]

    def apply(self, i: int, tc: torch.Tensor) -> None:
        """Trim model i's next chunk of τ in place."""
        self.budgets[i] = apply_trim(tc, self.trims[i], self.budgets[i])


class MagnitudeTrim(Step):
    """TIES: each model keeps exactly its ``keep_count(n, density)`` largest |τ| of the tensor (module docstring).

    ``prepare`` takes the engine's global-trim specs when given; otherwise it runs the per-tensor pass."""

    selects = True

    def __init__(self, density: float = 1.0):
        self.density = float(density)

    @classmethod
    def from_options(cls, options) -> MagnitudeTrim:
        return cls(options.density)

    def prepare(self, job, given: list[TrimSpec] | None = None) -> Selection | None:
        if given is not None:
            return Selection(given)
        if self.density >= 1.0:
            return None
        return self._thresholds(job, keep_count(job.n, self.density))

    def _thresholds(self, job, keep: int) -> Selection:
        """Each model's exact trim of this tensor (k-th largest |τ| + tie budget), plus what the merge
        pass reuses.

        CPU, large tensors: one streamed pass feeds each τ chunk to a ``BandCounter`` while it is in
        cache and keeps no τ (the merge pass recomputes it from the inputs). With DARE it keeps each
        model's keep mask as one byte per entry, so the random stream is drawn once, not twice.
        Small tensors, GPUs and extreme densities (no band): τ is kept whole and selected directly.
        """
        k = len(job.fts)
        job.start_pass()                        # (the band counters need this pass's DARE streams)
        counters = [self._band_counter(job, i, keep) for i in range(k)] if job.cpu else [None] * k
        if not all(c is not None for c in counters):
            taus = job.whole_taus()
            return Selection([exact_trim(t, keep, job.ws, job.chunk) for t in taus], taus=taus)
        keeps = ([job.ws.get(f"keep{i}", job.n, torch.bool) for i in range(k)]
                 if job.drops is not None and all(d.storable for d in job.drops) else None)
        for s, e in job.ranges():
            bc = job.base_chunk(s, e)
            tc = job.ws.get("t", e - s)
            for i in range(k):
                kc = keeps[i][s:e] if keeps is not None else None
                counters[i].update(job.tau_chunk(i, s, e, bc, tc, keep=kc).numpy())
        specs = [c.spec() for c in counters]
        return Selection([v if v is not None else self._full_threshold(job, i, keep) for i, v in enumerate(specs)],
                         keeps=keeps)

    def _full_threshold(self, job, i: int, keep: int) -> TrimSpec:
        """The band missed (vanishingly rare): materialise model i's whole τ once and select exactly."""
        tau = job.whole_tau(i, job.ws.get("tau.full", job.n))
        spec = exact_trim(tau, keep, job.ws, job.chunk)
        job.ws.release("tau.full")
        return spec

    def _band_counter(self, job, i: int, k: int) -> BandCounter | None:
        """A band for model i's k-th largest |τ| from a fixed systematic sample of the *inputs*
        (τⱼ = θᵢⱼ − θ₀ⱼ at sampled j; with a drop the quantile accounts for the kept share)."""
        n = job.n
        if n <= _EXACT_BELOW:
            return None
        sl = _sample_slice(n)
        f = job.fts[i]
        b = job.base[sl].float()                    # (a view of the input when it is float32: never write to it)
        if f.numel() >= n:
            sample = torch.sub(f[sl].float(), b).abs_()
        else:                                       # rows this model lacks: τ = 0 there
            fs = f[slice(sl.start, f.numel(), sl.step)].float()
            sample = torch.zeros(b.numel())
            torch.sub(fs, b[:fs.numel()], out=sample[:fs.numel()]).abs_()
        n_eff = n * job.drops[i].keep_share if job.drops is not None else float(n)
        if k >= n_eff:
            return None
        band = _band(sample.numpy(), n_eff, k)
        if band is None:
            return None
        return BandCounter(band[0], band[1], k, job.ws.get(f"band{i}", min(job.chunk, n)).numpy())


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
