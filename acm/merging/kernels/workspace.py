"""What every kernel shares: chunk sizes, the reused float32 ``Workspace``, the seeded-stream seed, ``finite``.

Speed: the maths is memory-bound, and on CPU a fresh multi-MB allocation per operation costs more than the
operation itself (page faults). ``TensorJob`` (``job.py``) therefore walks each tensor in fixed-size chunks
through a ``Workspace`` of reused float32 buffers with ``out=`` / in-place operations: no per-op allocation,
cache-sized working set, and memory bounded by the chunk size — except where a selection needs a whole
tensor's τ (``selection.py`` / ``outliers.py`` say when).
"""

from __future__ import annotations

import hashlib

import torch

from acm.checkpoints.tensors import finite  # noqa: F401 - re-exported: the kernels check merged tensors with it

# Elements per chunk: float32 chunk buffers of 1 MiB on CPU (cache-sized; measured faster than 4 MiB),
# bigger on GPUs (kernel launch cost).
CPU_CHUNK = 1 << 18
GPU_CHUNK = 1 << 26


def stable_seed(seed: int, model_index: int, name: str) -> int:
    """A 63-bit seed from (seed, model index, tensor name): same merge → same masks, any tensor order."""
    digest = hashlib.sha256(f"{int(seed)}|{int(model_index)}|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


class Step:
    """One sparsification step of a method (``MethodSpec.sparsify``), as the kernels run it.

    Two kinds, each family in its own module: a *drop* (``random_drop.RandomDrop``, ``rank_drop.RankDrop``) gives
    each model a seeded stream that masks τ while it is read, chunk by chunk (``streams``, and ``chunk`` when
    the stream needs aligned chunks); a *selection* (``selection.MagnitudeTrim``, ``outliers.OutlierTrim``)
    needs a pass over the whole tensor first and returns the per-model specs the merge pass applies
    (``prepare``). The defaults do nothing, so a step overrides only what it is.
    """

    selects = False                      # True for steps whose ``prepare`` returns a selection

    def chunk(self, chunk: int, shape: tuple[int, ...]) -> int:
        """The chunk length for a tensor of ``shape`` (a drop that works on whole rows aligns it)."""
        return chunk

    def streams(self, name: str, shape: tuple[int, ...], n_models: int, device: torch.device):
        """A factory of one fresh stream per model for tensor ``name`` (each pass restarts them), or None."""
        return None

    def prepare(self, job, given=None):
        """The selection of this tensor (``selection.Selection``), or None when it keeps everything."""
        return None
