"""DARE's random drop (``dare_ta``, ``dare_ties``): the seeded ``DropStream`` and the ``RandomDrop`` step.

* **DARE**: drop each entry with probability p, multiply the kept ones by ``1/(1−p)`` (folded into
  the coefficient: the engine computes ``(λ/(1−p))·(τ·mask)``; TIES thresholds are taken on the
  masked, unrescaled |τ|, which selects the same entries since a common positive factor keeps
  the order).
  The random stream is seeded from ``(seed, model index, tensor name)`` (SHA-256), so a merge is
  reproducible and independent of tensor order and chunking (exact definition: ``DropStream``).
  On CUDA the stream is torch's Philox generator on that device: masks are reproducible per
  device type, not across CPU/GPU.
* ``dare_ties`` = DARE drop/rescale, then the full TIES step (trim to ``density`` + election);
  ``density = 1`` gives mergekit's ``dare_ties`` (no magnitude trim). ``p = 0`` runs no stream at all.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .workspace import Step, Workspace, stable_seed


class DropStream:
    """The DARE random stream of one (seed, model, tensor), consumed chunk by chunk in tensor order.

    CPU (fast and exact): one uniform random byte Bⱼ per entry from PCG64 seeded with
    ``stable_seed(seed, i, name)`` (raw 64-bit draws, little-endian bytes, in tensor order). With
    t = ⌊256·p⌋ and f = 256·p − t, entry j is dropped iff Bⱼ < t, or Bⱼ = t and vⱼ < f, where the vⱼ
    are float32 uniforms from a second PCG64 (``stable_seed(seed, i, name + "/tie")``) drawn only for
    the entries with Bⱼ = t, in order. So P(drop) = t/256 + f/256 = p exactly (up to float32
    resolution of f), at a fifth of the cost of one float per entry, and the masks do not depend on
    how the tensor is chunked. CUDA: float32 uniforms u from torch's Philox generator, dropped iff u < p.

    The stream protocol ``TensorJob`` drives (shared with ``rank_drop.DellaStream``): ``sparsify_`` (τ ← τ·mask;
    the 1/(1−p) rescale is ``scale``, which the methods fold into λ), ``accumulate`` (the fused task-arithmetic
    update), ``keep_share`` (expected share kept) and ``storable`` (the mask can be stored as bytes and replayed).
    """

    storable = True

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

    @property
    def keep_share(self) -> float:
        return 1.0 - self.p

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

    def sparsify_(self, tc: torch.Tensor, ws: Workspace, keep: torch.Tensor | None = None) -> torch.Tensor:
        """τ ← τ·mask for the next ``tc.numel()`` entries (no rescale: see ``scale``). ``keep`` (CPU, bool, this
        chunk's slice of a stored mask): the mask is drawn into it, so a later pass can replay it."""
        if keep is not None:
            self.keep_into(keep.numpy())
            return tc.mul_(keep.view(torch.uint8))
        return tc.mul_(self.mask(ws.get("rand", tc.numel())))

    def accumulate(self, acc: torch.Tensor, tc: torch.Tensor, lam: float, ws: Workspace,
                   out: torch.Tensor) -> torch.Tensor:
        """out ← acc + (λ/(1−p))·(τ·mask), one fused ``addcmul`` (task arithmetic's update)."""
        keep = self.mask(ws.get("rand", tc.numel()))
        return torch.addcmul(acc, tc, keep, value=lam * self.scale, out=out)

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


class RandomDrop(Step):
    """The DARE step: one ``DropStream`` per model and tensor (none when p = 0)."""

    def __init__(self, drop_rate: float, seed: int = 0):
        self.p, self.seed = float(drop_rate), int(seed)

    @classmethod
    def from_options(cls, options) -> RandomDrop:
        return cls(options.drop_rate, options.seed)

    def streams(self, name: str, shape: tuple[int, ...], n_models: int, device: torch.device):
        if self.p <= 0:
            return None
        p, seed = self.p, self.seed
        return lambda: [DropStream(p, seed, i, name, device) for i in range(n_models)]
