"""The chunked per-tensor driver: ``TensorJob`` walks one tensor's chunks through the method's strategies,
and ``MethodKernel`` builds those strategies for one merge from a ``MethodSpec`` and the options.

A method is ``sparsify`` steps (``workspace.Step``: a drop stream that masks τ while it is read, a selection
prepared by a pass over the tensor) and a combiner (``consensus``): ``MethodKernel.merge`` hands the tensor to
the combiner, which picks the pass — ``linear``, ``task_arithmetic`` (one fused multiply-add per model and
chunk) or ``select`` (prepare the selection, then trim each chunk and combine it). Memory is bounded by the
chunk size except where a selection keeps a model's whole τ (``selection.py``, ``outliers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .consensus import SignElection, Sum
from .outliers import OutlierTrim
from .selection import MagnitudeTrim, Selection, TrimSpec
from .workspace import Workspace


class TensorJob:
    """Merge one tensor: base + fine-tuned inputs (flat, stored dtype, on CPU) → ``out`` (flat).

    ``fts[i]`` may be shorter than the base (a smaller vocabulary): missing entries count as
    τᵢ = 0 (θᵢ = θ₀). ``drops`` builds a fresh stream per model (``DropStream`` / ``DellaStream``) or is None.
    """

    def __init__(self, base: torch.Tensor, fts: list[torch.Tensor], ws: Workspace, *, chunk: int,
                 drops: Callable[[], list] | None = None):
        self.base, self.fts, self.ws, self.chunk = base, fts, ws, chunk
        self.n = base.numel()
        self.cpu = ws.device.type == "cpu"
        self._make_drops = drops
        self.drops: list | None = None

    def ranges(self):
        for s in range(0, self.n, self.chunk):
            yield s, min(self.n, s + self.chunk)

    def start_pass(self) -> None:
        """Every pass over the tensor re-reads the drop streams from their start."""
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
        """dst ← τᵢ[s:e] in float32, through model i's drop stream when ``drop`` (a DARE rescale is left to
        the caller: see ``scale``). ``keep`` (CPU, bool, this chunk's slice of a stored mask): the mask is
        drawn into it, so a later pass can replay it (``keep_chunk``) instead of drawing the stream again."""
        f = self.fts[i]
        ce = min(e, f.numel())
        if ce > s:
            torch.sub(self._stage(f, s, ce, f"f{i}"), bc[:ce - s], out=dst[:ce - s])
        if ce < e:
            dst[max(ce, s) - s:].zero_()
        if drop and self.drops is not None:
            self.drops[i].sparsify_(dst, self.ws, keep)
        return dst

    def keep_chunk(self, i: int, s: int, e: int, bc: torch.Tensor, dst: torch.Tensor,
                   keep: torch.Tensor) -> torch.Tensor:
        """dst ← τᵢ[s:e] times a stored DARE keep mask (bool slice from ``tau_chunk(keep=)``)."""
        self.tau_chunk(i, s, e, bc, dst, drop=False)
        return dst.mul_(keep.view(torch.uint8))

    def whole_taus(self) -> list[torch.Tensor]:
        """Every model's whole τ of this tensor (through the drop streams; the caller ran ``start_pass``)."""
        taus = [self.ws.get(f"tau{i}", self.n) for i in range(len(self.fts))]
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            for i in range(len(self.fts)):
                self.tau_chunk(i, s, e, bc, taus[i][s:e])
        return taus

    def whole_tau(self, i: int, dst: torch.Tensor) -> torch.Tensor:
        """Model i's whole τ into ``dst``, its drop stream restarted (the other models' streams are left alone)."""
        drops = self.drops
        self.drops = [self._make_drops()[i] if j == i else None for j in range(len(self.fts))] \
            if self._make_drops is not None else None
        for s, e in self.ranges():
            self.tau_chunk(i, s, e, self.base_chunk(s, e), dst[s:e])
        self.drops = drops
        return dst

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

    # -- passes ---------------------------------------------------------------------------------
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
        """θ = θ₀ + Σᵢ λᵢ·τᵢ; through a drop stream θ = θ₀ + Σᵢ λᵢ·drop(τᵢ), fused per model (``accumulate``:
        for DARE ``(λᵢ/(1−p))·(τᵢ·mᵢ)`` in one ``addcmul``)."""
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
                if self.drops is not None:
                    self.drops[i].accumulate(acc, tc, lams[i], self.ws, target)
                else:
                    torch.add(acc, tc, alpha=lams[i], out=target)
            if dest is None:
                out[s:e].copy_(oc)

    def select(self, lams: list[float], out: torch.Tensor, steps: Sequence = (), combine=None,
               given: list[TrimSpec] | None = None) -> list[TrimSpec]:
        """Trim each τᵢ by the selecting step (if any; ``given``: the engine's global-trim specs), combine, merge.

        Returns the trim specs used. A per-tensor selection takes a first pass over the tensor (the step's
        ``prepare``); the merge pass then trims the chunks in flat order with a running tie budget, so
        exactly k entries per model survive, and hands them to ``combine`` (default: sign election).
        """
        combine = combine if combine is not None else SignElection()
        trim = next((step for step in steps if step.selects), None)
        sel = trim.prepare(self, given) if trim is not None else None
        if sel is None:
            sel = Selection([TrimSpec(0.0)] * len(self.fts))
        if sel.taus is None and sel.keeps is None:
            self.start_pass()
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            tcs = []
            for i in range(len(self.fts)):
                tc = self._selected_tau(sel, i, s, e, bc)
                sel.apply(i, tc)
                tcs.append(tc)
            dest = self._dest(out, s, e)
            res = combine.combine(bc, tcs, lams, self.scale, self.ws, dest)
            if dest is None:
                out[s:e].copy_(res)
        return sel.trims

    def _selected_tau(self, sel: Selection, i: int, s: int, e: int, bc: torch.Tensor) -> torch.Tensor:
        """Model i's τ chunk for the merge pass: kept whole by the selection, replayed from its stored keep
        mask, or recomputed from the inputs."""
        if sel.taus is not None:
            return sel.taus[i][s:e]
        if sel.keeps is not None:
            return self.keep_chunk(i, s, e, bc, self.ws.get(f"t{i}", e - s), sel.keeps[i][s:e])
        return self.tau_chunk(i, s, e, bc, self.ws.get(f"t{i}", e - s))

    def ties(self, lams: list[float], out: torch.Tensor, *, density: float = 1.0,
             thresholds: list[TrimSpec] | None = None, normalize: bool = False, consensus: bool = True,
             gamma: float | None = None) -> list[TrimSpec]:
        """``select`` with the TIES trim (``density`` or the given per-model ``thresholds``) or, with ``gamma``,
        the Breadcrumbs trim; sign election when ``consensus``, else a sum. (Kept for scripts and tests that
        call the kernels without a ``MethodSpec``.)"""
        trim = OutlierTrim(density, gamma) if gamma is not None else MagnitudeTrim(density)
        combine = SignElection(normalize) if consensus else Sum()
        return self.select(lams, out, [trim], combine, thresholds)

    def abs_tau_chunks(self, i: int):
        """Yield |τᵢ| chunk by chunk (global-trim histograms); the caller runs ``start_pass`` first."""
        for s, e in self.ranges():
            bc = self.base_chunk(s, e)
            yield self.tau_chunk(i, s, e, bc, self.ws.get("t", e - s)).abs_()


class MethodKernel:
    """One method's strategies, built for one merge: ``spec.sparsify`` (steps, in order) and ``spec.combine``.

    ``spec`` is an ``acm.merging.methods.MethodSpec`` (each strategy's ``build(options)`` names its class
    here); the engine calls ``job`` for every tensor and ``merge`` to run it.
    """

    def __init__(self, spec, options):
        self.steps = [strategy.build(options) for strategy in spec.sparsify]
        self.combiner = spec.combine.build(options)
        if sum(step.selects for step in self.steps) > 1:
            raise ValueError(f"{spec.key}: at most one selecting step (trim) per method")

    def job(self, name: str, shape: tuple[int, ...], base: torch.Tensor, fts: list, ws: Workspace, chunk: int,
            device: torch.device) -> TensorJob:
        """The chunked job for tensor ``name`` of ``shape`` (each step may align the chunk; one drop stream)."""
        drops = None
        for step in self.steps:
            chunk = step.chunk(chunk, shape)
            made = step.streams(name, shape, len(fts), device)
            if made is not None and drops is not None:
                raise ValueError("at most one drop stream per method")
            drops = made if made is not None else drops
        return TensorJob(base, fts, ws, chunk=chunk, drops=drops)

    def merge(self, job: TensorJob, lams: list[float], out: torch.Tensor,
              given: list[TrimSpec] | None = None) -> None:
        """Merge the job's tensor into ``out`` (``given``: global-trim specs for a magnitude trim)."""
        self.combiner.merge(job, lams, out, self.steps, given)
