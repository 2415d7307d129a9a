"""Per-tensor merge maths: task vectors, DARE / DELLA drop, TIES / Breadcrumbs trim, sign election.

Why a separate module: these functions are the whole numerical definition of the merge methods
(docs/design.md "Merge methods"); the engine in ``acm.merging.engine`` only streams tensors through them.

Speed: the maths is memory-bound, and on CPU a fresh multi-MB allocation per operation costs
more than the operation itself (page faults). ``TensorJob`` therefore walks each tensor in
fixed-size chunks through a ``Workspace`` of reused float32 buffers with ``out=`` / in-place
operations: no per-op allocation, cache-sized working set, and memory bounded by the chunk
size — except TIES with a per-tensor threshold, which keeps each model's τ of the current tensor
(the threshold needs all of it).

Precise conventions (this project's choices where docs/design.md leaves room):

* **Trim (TIES)**: keep exactly the ``k = max(1, round(density · n))`` entries of largest ``|τ|``.
  The threshold is the exact k-th largest ``|τ|``; every entry above it is kept, and of the entries
  *equal* to it (bf16 task vectors take few distinct magnitudes, so thousands can tie) only the
  ones with the lowest flat indices are kept, as many as k still needs (``TrimSpec``). The tie-break
  depends on positions only, so it is the same for every chunk size and tensor order.
  ``density = 1`` keeps everything (no selection is run). If fewer than k entries are non-zero,
  all non-zero entries are kept.
* **Sign election (TIES)**: ``S = Σᵢ λᵢ·τᵢ`` (trimmed, weighted); model i's entry is kept iff
  ``τᵢ·S > 0`` (λ ≥ 0 is enforced, so this is "λᵢ·τᵢ has the elected sign"; zero entries and
  entries where S = 0 never count). Update: the sum of the kept ``λᵢ·τᵢ``; with ``normalize``
  that sum is divided by the sum of the kept entries' λᵢ (0 where none is kept) — mergekit's
  convention, so the overall scale α cancels out under ``normalize``.
* **Global trim** (``trim_scope="global"``): one threshold per model, the exact k-th largest
  |τ| over all its floating-point tensors with k = round(density · N), N = all their entries (in
  the base's shapes; rows a model lacks count as τ = 0). Found by two streaming histogram passes
  over the float32 bit patterns before the merge pass; O(65536) memory. Ties at the threshold are
  broken in the order (tensor name sorted as text, flat index), which a third counting pass
  resolves into a per-tensor tie budget only when the ties do not all fit.
* **DARE**: drop each entry with probability p, multiply the kept ones by ``1/(1−p)`` (folded into
  the coefficient: the engine computes ``(λ/(1−p))·(τ·mask)``; TIES thresholds are taken on the
  masked, unrescaled |τ|, which selects the same entries since a common positive factor keeps
  the order).
  The random stream is seeded from ``(seed, model index, tensor name)`` (SHA-256), so a merge is
  reproducible and independent of tensor order and chunking (exact definition: ``DropStream``).
  On CUDA the stream is torch's Philox generator on that device: masks are reproducible per
  device type, not across CPU/GPU.
* ``dare_ties`` = DARE drop/rescale, then the full TIES step (trim to ``density`` + election);
  ``density = 1`` gives mergekit's ``dare_ties`` (no magnitude trim).
* **Breadcrumbs trim** (``breadcrumbs``, ``breadcrumbs_ties``): with k = ``keep_count(n, density)`` and
  t = min(round(gamma·n), n − k), rank the entries by |τ| (descending, ties: lowest flat index first) and
  keep ranks t … t+k−1: the t largest (outliers) and everything below the top t+k are zeroed. Both cuts are
  exact selections with the TIES tie-break (``TrimSpec`` for t+k, ``apply_cut`` for t), so exactly k entries
  survive (fewer only when fewer are non-zero), whatever the chunk size. ``density = 1`` keeps everything.
  mergekit (``magnitude_outliers``) uses int(·) for both counts and breaks ties by an unstable sort;
  mergekit ≤ 0.1.4 keeps nothing of a tensor where int(gamma·n) = 0 (its ``indices[n_bot:-0]`` is empty).
* **DELLA drop** (``della``, ``della_linear``; ``DellaStream``): per row of τ (a 2-D tensor's rows; a 1-D
  tensor is one row; more dimensions are flattened after the first), entry j of rank rⱼ ∈ 0 … m−1 by |τ|
  (ascending, ties: lower index first) is kept with probability pⱼ = density − ε + 2ε·rⱼ/(m−1) (density for
  m = 1) and multiplied by 1/pⱼ when kept — E[τ̃] = τ. Random stream: float32 uniforms uⱼ from PCG64 seeded
  with ``stable_seed(seed, i, name + "/della")``, drawn in flat order; kept iff uⱼ < pⱼ. Chunks hold whole
  rows, so masks do not depend on the chunking, and the stream is the same on every device. ``della`` then
  runs the TIES election (no magnitude trim), ``della_linear`` sums. mergekit's ``della_magprune`` has the
  same schedule but its ``rescale`` is an L1-norm ratio for the whole tensor, not 1/pⱼ.
* Arithmetic: float32, ``θ₀ + λ·τ`` as one multiply-add (``torch.add(alpha=)`` / ``addcmul``), so
  results agree with the written formula to float32 rounding; λ = 0 returns θ₀ bit-exactly, and
  a plain merge and an ACM merge with λ = α everywhere run the same operations (bit-identical).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

# Exact threshold search (see kth_largest_abs): random sample size, and below this size a plain
# torch.kthvalue is cheaper than being clever.
_SAMPLE = 1 << 15
_SAMPLE_MAX = 1 << 17
_EXACT_BELOW = 1 << 17
_SIGMAS = 5.0


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
# Elements per chunk: float32 chunk buffers of 1 MiB on CPU (cache-sized; measured faster than 4 MiB),
# bigger on GPUs (kernel launch cost).
CPU_CHUNK = 1 << 18
GPU_CHUNK = 1 << 26


def keep_count(n: int, density: float) -> int:
    """How many entries the trim keeps out of n (at least one)."""
    return max(1, min(n, int(round(density * n))))


def stable_seed(seed: int, model_index: int, name: str) -> int:
    """A 63-bit seed from (seed, model index, tensor name): same merge → same masks, any tensor order."""
    digest = hashlib.sha256(f"{int(seed)}|{int(model_index)}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def finite(t: torch.Tensor) -> bool:
    """No NaN/Inf, in one cheap reduction (``aminmax`` propagates NaN; ``isfinite`` is ~10× slower on CPU)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class Workspace:
    """Reusable flat buffers on one device, grown on demand and kept for the whole merge."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get((key, dtype))
        if buf is None or buf.numel() < numel:
            self._bufs.pop((key, dtype), None)
            buf = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._bufs[(key, dtype)] = buf
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def release(self, prefix: str) -> None:
        """Drop buffers whose key starts with ``prefix`` (e.g. the big per-tensor τ buffers)."""
        for key in [k for k in self._bufs if k[0].startswith(prefix)]:
            del self._bufs[key]


class DropStream:
    """The DARE random stream of one (seed, model, tensor), consumed chunk by chunk in tensor order.

    CPU (fast and exact): one uniform random byte Bⱼ per entry from PCG64 seeded with
    ``stable_seed(seed, i, name)`` (raw 64-bit draws, little-endian bytes, in tensor order). With
    t = ⌊256·p⌋ and f = 256·p − t, entry j is dropped iff Bⱼ < t, or Bⱼ = t and vⱼ < f, where the vⱼ
    are float32 uniforms from a second PCG64 (``stable_seed(seed, i, name + "/tie")``) drawn only for
    the entries with Bⱼ = t, in order. So P(drop) = t/256 + f/256 = p exactly (up to float32
    resolution of f), at a fifth of the cost of one float per entry, and the masks do not depend on
    how the tensor is chunked. CUDA: float32 uniforms u from torch's Philox generator, dropped iff u < p.
    """

    def __init__(self, drop_rate: float, seed: int, model_index: int, name: str, device: torch.device):
        self.p = float(drop_rate)
        self.scale = 1.0 / (1.0 - self.p)
        s = stable_seed(seed, model_index, name)
        if device.type == "cpu":
            self.gen = None
            self.rng = np.random.Generator(np.random.PCG64(s))
            self.tie_rng = np.random.Generator(np.random.PCG64(stable_seed(seed, model_index, name + "/tie")))
            self.t = int(math.floor(self.p * 256))
            self.f = self.p * 256 - self.t
            self._carry = np.empty(0, dtype=np.uint8)
        else:
            self.rng, self.gen = None, torch.Generator(device=device).manual_seed(s)

    def _bytes(self, n: int) -> np.ndarray:
        have = self._carry.size
        if have >= n:
            out, self._carry = self._carry[:n], self._carry[n:]
            return out
        words = -(-(n - have) // 8)
        fresh = self.rng.integers(0, 2**64, size=words, dtype=np.uint64).view(np.uint8)
        if have:
            fresh = np.concatenate([self._carry, fresh])
        out, self._carry = fresh[:n], fresh[n:].copy()
        return out

    def mask(self, scratch: torch.Tensor) -> torch.Tensor:
        """The keep mask (float 0/1) of the next ``scratch.numel()`` entries, written into scratch.

        The 1/(1−p) rescale is not applied here: the engine folds it into λ (one multiply less).
        """
        if self.rng is None:
            scratch.uniform_(generator=self.gen)
            return scratch.ge_(self.p)
        self.keep_into(scratch.numpy())
        return scratch

    def keep_into(self, keep: np.ndarray) -> np.ndarray:
        """CPU: the keep mask (1 = kept) of the next ``keep.size`` entries, written into ``keep``
        (float32 0/1, or bool — one byte per entry, for masks that are stored and replayed)."""
        b = self._bytes(keep.size)
        if self.f == 0:                           # p is a multiple of 1/256: Bⱼ = t is always kept
            np.greater_equal(b, self.t, out=keep)
        else:
            np.greater(b, self.t, out=keep)
            ties = np.flatnonzero(b == self.t)
            if ties.size:
                v = self.tie_rng.random(ties.size, dtype=np.float32)
                keep[ties[v >= self.f]] = 1
        return keep

    def apply_(self, tau: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """τ ← τ · keep · 1/(1−p) (scratch: float32, same size as τ)."""
        return tau.mul_(self.mask(scratch).mul_(self.scale))


def dare_(tau: torch.Tensor, drop_rate: float, seed: int, model_index: int, name: str) -> torch.Tensor:
    """Whole-tensor DARE (drop with probability p, rescale by 1/(1−p)), in place; same stream as the engine."""
    if drop_rate <= 0 or tau.numel() == 0:
        return tau
    stream = DropStream(drop_rate, seed, model_index, name, tau.device)
    flat = tau.view(-1)
    stream.apply_(flat, torch.empty_like(flat))
    return tau


class DellaStream:
    """DELLA's magnitude-ranked random drop of one (seed, model, tensor), applied chunk by chunk.

    Chunks must hold whole rows of ``row`` entries (the engine aligns them); see the module docstring
    for the exact definition. ``scale`` is 1: the 1/pⱼ rescale is per entry, applied here.
    """

    scale = 1.0

    def __init__(self, density: float, epsilon: float, seed: int, model_index: int, name: str, row: int):
        self.lo = float(density) - float(epsilon)
        self.row = max(1, int(row))
        self.step = 2.0 * float(epsilon) / (self.row - 1) if self.row > 1 else 0.0
        if self.row == 1:
            self.lo = float(density)
        self.rng = np.random.Generator(np.random.PCG64(stable_seed(seed, model_index, name + "/della")))

    def _row_order(self, rows: torch.Tensor) -> torch.Tensor:
        """Per row, the column indices by ascending |τ|, ties by lower column (a stable argsort).

        CPU: one numpy sort of the int64 keys (|τ| bits << 32 | column) — unique keys, so any sort order
        is the stable one, and numpy's SIMD integer sort is ~5× faster than a stable float argsort
        (15.7 vs 85 ns per entry, rows of 4096, 1 thread), which was most of DELLA's cost.
        """
        if rows.device.type != "cpu":
            return torch.argsort(rows.abs(), dim=1, stable=True)
        keys = rows.abs().view(torch.int32).numpy().astype(np.int64)   # |τ| ≥ 0: bit order = value order
        keys <<= 32
        keys |= np.arange(rows.shape[1], dtype=np.int64)
        keys.sort(axis=1)
        keys &= 0xFFFFFFFF
        return torch.from_numpy(keys)

    def keep_probability(self, rows: torch.Tensor) -> torch.Tensor:
        """pⱼ of every entry of ``rows`` ([r, m] float32): linear in the entry's |τ| rank within its row."""
        order = self._row_order(rows)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
        return ranks.to(torch.float32).mul_(self.step).add_(self.lo)

    def sparsify_(self, tc: torch.Tensor) -> torch.Tensor:
        """τ ← τ·keep/p in place for the next ``tc.numel()`` entries (whole rows, flat order)."""
        if tc.numel() % self.row:
            raise ValueError(f"DELLA chunk of {tc.numel()} entries does not hold whole rows of {self.row}")
        rows = tc.view(-1, self.row)
        p = self.keep_probability(rows)
        u = torch.from_numpy(self.rng.random(tc.numel(), dtype=np.float32)).to(tc.device).view_as(rows)
        rows.mul_(torch.where(u < p, p.reciprocal(), torch.zeros_like(p)))
        return tc


def della_rows(shape: tuple[int, ...] | torch.Size) -> int:
    """DELLA's row length for a tensor of ``shape``: its last dimensions flattened (1-D: the whole tensor)."""
    if len(shape) == 0:
        return 1
    return max(1, math.prod(shape[1:])) if len(shape) >= 2 else int(shape[0]) or 1


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
            lo, hi = band
            if x.device.type == "cpu":
                xn = x.numpy()
                scratch = (ws.get("kth.abs", min(chunk, n)) if ws is not None else torch.empty(min(chunk, n))).numpy()
                counter = BandCounter(lo, hi, k, scratch)
                for s in range(0, n, chunk):
                    counter.update(xn[s:s + chunk])
                value = counter.result()
                if value is not None:
                    return value
            else:
                a = x.abs()
                above = int(torch.count_nonzero(a > hi))
                vals = a[((a >= lo) if lo > 0 else (a > 0)) & (a <= hi)]
                if above < k <= above + vals.numel():
                    return float(torch.kthvalue(vals, vals.numel() - (k - above) + 1).values)
                if lo == 0.0 and k > above + vals.numel():
                    return 0.0
    return float(torch.kthvalue(x.abs().reshape(-1), n - k + 1).values)


def _below(x: float) -> float:
    """The largest float32 strictly below x (x > 0): hardshrink keeps |τ| > λ, we keep |τ| ≥ threshold."""
    return float(np.nextafter(np.float32(x), np.float32(0)))


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


def kth_largest(a: torch.Tensor, k: int) -> float:
    """Exact k-th largest value of a non-negative tensor (see ``kth_largest_abs``)."""
    return kth_largest_abs(a.reshape(-1).contiguous().float(), k)


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


# ---------------------------------------------------------------------------------------------
# The chunked per-tensor engine
# ---------------------------------------------------------------------------------------------

class TensorJob:
    """Merge one tensor: base + fine-tuned inputs (flat, stored dtype, on CPU) → ``out`` (flat).

    ``fts[i]`` may be shorter than the base (a smaller vocabulary): missing entries count as
    τᵢ = 0 (θᵢ = θ₀). ``drops`` builds a fresh ``DropStream`` per model (DARE) or is None.
    """

    def __init__(self, base: torch.Tensor, fts: list[torch.Tensor], ws: Workspace, *, chunk: int,
                 drops=None):
        self.base, self.fts, self.ws, self.chunk = base, fts, ws, chunk
        self.n = base.numel()
        self.cpu = ws.device.type == "cpu"
        self._make_drops = drops
        self.drops: list[DropStream] | None = None

    def ranges(self):
        for s in range(0, self.n, self.chunk):
            yield s, min(self.n, s + self.chunk)

    def start_pass(self) -> None:
        """Every pass over the tensor re-reads the DARE stream from its start."""
        self.drops = self._make_drops() if self._make_drops is not None else None

    def _stage(self, x: torch.Tensor, s: int, e: int, key: str) -> torch.Tensor:
        c = x[s:e]
        if self.cpu:
            return c
        buf = self.ws.get(key, e - s, c.dtype)
        buf.copy_(c)
        return buf

    def base_chunk(self, s: int, e: int) -> torch.Tensor:
        bc = self.ws.get("b", e - s)
        bc.copy_(self.base[s:e])                    # stored dtype → float32 (and → device)
        return bc

    def tau_chunk(self, i: int, s: int, e: int, bc: torch.Tensor, dst: torch.Tensor, *,
                  drop: bool = True, keep: torch.Tensor | None = None) -> torch.Tensor:
        """dst ← τᵢ[s:e] in float32, times the DARE keep mask when ``drop`` (the 1/(1−p) rescale is
        left to the caller: see ``scale``). ``keep`` (CPU, bool, this chunk's slice of a stored mask):
        the mask is drawn into it, so a later pass can replay it (``keep_chunk``) instead of drawing
        the random stream again."""
        f = self.fts[i]
        ce = min(e, f.numel())
        if ce > s:
            torch.sub(self._stage(f, s, ce, f"f{i}"), bc[:ce - s], out=dst[:ce - s])
        if ce < e:
            dst[max(ce, s) - s:].zero_()
        if drop and self.drops is not None:
            if isinstance(self.drops[i], DellaStream):
                self.drops[i].sparsify_(dst)
            elif keep is not None:
                self.drops[i].keep_into(keep.numpy())
                dst.mul_(keep.view(torch.uint8))
            else:
                dst.mul_(self.drops[i].mask(self.ws.get("rand", e - s)))
        return dst

    def keep_chunk(self, i: int, s: int, e: int, bc: torch.Tensor, dst: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
        """dst ← τᵢ[s:e] times a stored DARE keep mask (bool slice from ``tau_chunk(keep=)``)."""
        self.tau_chunk(i, s, e, bc, dst, drop=False)
        return dst.mul_(keep.view(torch.uint8))

    @property
    def scale(self) -> float:
        """The DARE rescale 1/(1−p) (1 without DARE), folded into λ by the methods."""
        return self.drops[0].scale if self.drops else 1.0

    def theta_chunk(self, i: int, s: int, e: int, bc: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """dst ← θᵢ[s:e] as float32 (the base's values where the model has no entry)."""
        f = self.fts[i]
        ce = min(e, f.numel())
        if ce > s:
            dst[:ce - s].copy_(f[s:ce])
        if ce < e:
            dst[max(ce, s) - s:].copy_(bc[max(ce, s) - s:])
        return dst

    # -- methods --------------------------------------------------------------------------------
    def _dest(self, out: torch.Tensor, s: int, e: int) -> torch.Tensor | None:
        """On CPU the last operation writes straight into the output slice (casting on store)."""
        return out[s:e] if self.cpu else None

    def linear(self, weights: list[float], out: torch.Tensor) -> None:
        """θ = Σᵢ wᵢ·θᵢ."""
        k = len(self.fts)
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            dest = self._dest(out, s, e)
            oc = self.ws.get("o", e - s)
            th = self.theta_chunk(0, s, e, bc, self.ws.get("t", e - s))
            torch.mul(th, weights[0], out=dest if (k == 1 and dest is not None) else oc)
            for i in range(1, k):
                th = self.theta_chunk(i, s, e, bc, self.ws.get("t", e - s))
                torch.add(oc, th, alpha=weights[i], out=dest if (i == k - 1 and dest is not None) else oc)
            if dest is None:
                out[s:e].copy_(oc)

    def task_arithmetic(self, lams: list[float], out: torch.Tensor) -> None:
        """θ = θ₀ + Σᵢ λᵢ·τᵢ; for dare_ta θ = θ₀ + Σᵢ (λᵢ/(1−p))·(τᵢ·mᵢ) in one fused ``addcmul`` per model."""
        self.start_pass()
        k = len(self.fts)
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            dest = self._dest(out, s, e)
            oc, tc = self.ws.get("o", e - s), self.ws.get("t", e - s)
            for i in range(k):
                self.tau_chunk(i, s, e, bc, tc, drop=False)
                acc = oc if i > 0 else bc
                target = dest if (i == k - 1 and dest is not None) else oc
                if self.drops is not None and isinstance(self.drops[i], DellaStream):
                    torch.add(acc, self.drops[i].sparsify_(tc), alpha=lams[i], out=target)
                elif self.drops is not None:
                    keep = self.drops[i].mask(self.ws.get("rand", e - s))
                    torch.addcmul(acc, tc, keep, value=lams[i] * self.drops[i].scale, out=target)
                else:
                    torch.add(acc, tc, alpha=lams[i], out=target)
            if dest is None:
                out[s:e].copy_(oc)

    def ties(self, lams: list[float], out: torch.Tensor, *, density: float = 1.0,
             thresholds: list[TrimSpec] | None = None, normalize: bool = False, consensus: bool = True,
             gamma: float | None = None) -> list[TrimSpec]:
        """TIES: trim each τᵢ (per-tensor top ``density``, or the given per-model specs), elect, merge.

        Returns the trim specs used. Per-tensor specs take a first pass over the tensor
        (``_thresholds``); the merge pass then recomputes each τ chunk from the inputs, so on CPU
        TIES holds chunk-sized buffers only, like task arithmetic. Chunks are trimmed in flat order
        with a running tie budget (``apply_trim``), so exactly k entries per model survive.
        """
        k = len(self.fts)
        taus = keeps = None
        cuts: list[TrimSpec | None] = [None] * k
        if gamma is not None:               # Breadcrumbs: keep ranks t … t+k−1 (see outlier_counts)
            thresholds, cuts, taus = self._outlier_specs(density, gamma)
        elif thresholds is None and density < 1.0:
            thresholds, taus, keeps = self._thresholds(keep_count(self.n, density))
        else:
            thresholds = list(thresholds) if thresholds is not None else [TrimSpec(0.0)] * k
        budgets = [spec.ties for spec in thresholds]
        cut_budgets = [c.ties if c is not None else None for c in cuts]
        if taus is None and keeps is None:
            self.start_pass()
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            tcs = []
            for i in range(k):
                if taus is not None:
                    tc = taus[i][s:e]
                elif keeps is not None:
                    tc = self.keep_chunk(i, s, e, bc, self.ws.get(f"t{i}", e - s), keeps[i][s:e])
                else:
                    tc = self.tau_chunk(i, s, e, bc, self.ws.get(f"t{i}", e - s))
                budgets[i] = apply_trim(tc, thresholds[i], budgets[i])
                cut_budgets[i] = apply_cut(tc, cuts[i], cut_budgets[i])   # after the trim: same tie order
                tcs.append(tc)
            dest = self._dest(out, s, e)
            if consensus:
                res = elect(bc, tcs, [lam * self.scale for lam in lams], self.ws, normalize=normalize,
                            norm_weights=lams, dest=dest)
            else:
                res = weighted_sum(bc, tcs, [lam * self.scale for lam in lams], self.ws, dest=dest)
            if dest is None:
                out[s:e].copy_(res)
        return thresholds

    def _outlier_specs(self, density: float, gamma: float
                       ) -> tuple[list[TrimSpec], list[TrimSpec | None], list[torch.Tensor] | None]:
        """Breadcrumbs: each model's trim spec for the top t+k and cut spec for the top t of this tensor.

        Why whole τ: two exact selections per model; the τ buffers are kept for the merge pass (as TIES
        does on GPUs and for small tensors). Returns (trims, cuts, τs or None when nothing is cut)."""
        k = len(self.fts)
        keep, top = outlier_counts(self.n, density, gamma)
        if keep + top >= self.n and top == 0:
            return [TrimSpec(0.0)] * k, [None] * k, None
        self.start_pass()
        taus = [self.ws.get(f"tau{i}", self.n) for i in range(k)]
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            for i in range(k):
                self.tau_chunk(i, s, e, bc, taus[i][s:e])
        trims = [exact_trim(t, keep + top, self.ws, self.chunk) if keep + top < self.n else TrimSpec(0.0)
                 for t in taus]
        cuts = [exact_trim(t, top, self.ws, self.chunk) if top > 0 else None for t in taus]
        return trims, cuts, taus

    def _thresholds(self, keep: int) -> tuple[list[TrimSpec], list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Each model's exact trim of this tensor (k-th largest |τ| + tie budget), plus what the merge
        pass reuses.

        CPU, large tensors: one streamed pass feeds each τ chunk to a ``BandCounter`` while it is in
        cache and keeps no τ (the merge pass recomputes it from the inputs). With DARE it keeps each
        model's keep mask as one byte per entry, so the random stream is drawn once, not twice.
        Returns (thresholds, None, masks or None). Small tensors, GPUs and extreme densities (no
        band): τ is kept whole and selected directly; returns (thresholds, τs, None).
        """
        k = len(self.fts)
        self.start_pass()                       # (the band counters need this pass's DARE streams)
        counters = [self._band_counter(i, keep) for i in range(k)] if self.cpu else [None] * k
        if all(c is not None for c in counters):
            keeps = ([self.ws.get(f"keep{i}", self.n, torch.bool) for i in range(k)]
                     if self.drops is not None else None)
            for s, e in self.ranges():
                bc = self.base_chunk(s, e)
                tc = self.ws.get("t", e - s)
                for i in range(k):
                    kc = keeps[i][s:e] if keeps is not None else None
                    counters[i].update(self.tau_chunk(i, s, e, bc, tc, keep=kc).numpy())
            specs = [c.spec() for c in counters]
            return [v if v is not None else self._full_threshold(i, keep) for i, v in enumerate(specs)], None, keeps
        taus = [self.ws.get(f"tau{i}", self.n) for i in range(k)]
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            for i in range(k):
                self.tau_chunk(i, s, e, bc, taus[i][s:e])
        return [exact_trim(t, keep, self.ws, self.chunk) for t in taus], taus, None

    def _full_threshold(self, i: int, keep: int) -> TrimSpec:
        """The band missed (vanishingly rare): materialise model i's whole τ once and select exactly."""
        drops = self.drops
        self.drops = [self._make_drops()[i] if j == i else None for j in range(len(self.fts))] \
            if self._make_drops is not None else None
        tau = self.ws.get("tau.full", self.n)
        for s, e in self.ranges():
            self.tau_chunk(i, s, e, self.base_chunk(s, e), tau[s:e])
        self.drops = drops
        spec = exact_trim(tau, keep, self.ws, self.chunk)
        self.ws.release("tau.full")
        return spec

    def _band_counter(self, i: int, k: int) -> BandCounter | None:
        """A band for model i's k-th largest |τ| from a fixed systematic sample of the *inputs*
        (τⱼ = θᵢⱼ − θ₀ⱼ at sampled j; with DARE the quantile accounts for the (1−p) kept share)."""
        n = self.n
        if n <= _EXACT_BELOW:
            return None
        sl = _sample_slice(n)
        f = self.fts[i]
        b = self.base[sl].float()                   # (a view of the input when it is float32: never write to it)
        if f.numel() >= n:
            sample = torch.sub(f[sl].float(), b).abs_()
        else:                                       # rows this model lacks: τ = 0 there
            fs = f[slice(sl.start, f.numel(), sl.step)].float()
            sample = torch.zeros(b.numel())
            torch.sub(fs, b[:fs.numel()], out=sample[:fs.numel()]).abs_()
        n_eff = n * (1.0 - self.drops[i].p) if self.drops is not None else float(n)
        if k >= n_eff:
            return None
        band = _band(sample.numpy(), n_eff, k)
        if band is None:
            return None
        return BandCounter(band[0], band[1], k, self.ws.get(f"band{i}", min(self.chunk, n)).numpy())

    def abs_tau_chunks(self, i: int):
        """Yield |τᵢ| chunk by chunk (global-trim histograms); the caller runs ``start_pass`` first."""
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            yield self.tau_chunk(i, s, e, bc, self.ws.get("t", e - s)).abs_()


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
