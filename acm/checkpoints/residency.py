"""Convert a memory-mapped checkpoint to the compute dtype without holding both copies.

Why: transformers loads a bf16 checkpoint into float32 by reading the memory-mapped shards and
converting; the shards' pages stay mapped (and counted in RSS) until loading ends, so a CPU
analysis in float32 peaked at file pages + the float32 copy (1.56 × one model at the 1.5B shape).
Loading in the checkpoint's own dtype (file-backed, nothing copied) and converting one parameter
at a time, dropping the pages of each converted tensor from this process, peaks at the float32
copy plus one tensor.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import weakref

import torch

_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int, bool]]:
    """(start, end, read_only) of this process's file-backed mappings of safetensors files."""
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, "w" not in parts[1]))
    except OSError:
        return []
    return out


class _PageDropper:
    """Gives back the pages of memory-mapped safetensors data that no parameter uses any more.

    Only whole pages strictly inside a converted tensor's bytes are dropped, and only inside a
    file mapping of a ``.safetensors`` file. ``MADV_DONTNEED`` on a file mapping discards this
    process's view of those pages; a later read would fault them in again from the file, so the
    call cannot change any value a live tensor sees (nothing writes into a just-loaded checkpoint).
    """

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.maps = _file_mappings() if sys.platform.startswith("linux") else []
        self.libc = None
        if self.maps:
            try:
                self.libc = ctypes.CDLL(None, use_errno=True)
                self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError):
                self.libc = None
        self.dropped = 0

    def drop(self, tensor: torch.Tensor) -> None:
        if self.libc is None or tensor.device.type != "cpu":
            return
        addr = tensor.data_ptr()
        end = addr + tensor.numel() * tensor.element_size()
        if not any(s <= addr and end <= e for s, e, _ in self.maps):
            return
        start = -(-addr // self.page) * self.page
        stop = end // self.page * self.page
        if stop > start and self.libc.madvise(start, stop - start, _MADV_DONTNEED) == 0:
            self.dropped += stop - start


def stored_float_dtype(dtypes: list[torch.dtype]) -> torch.dtype | None:
    """The one floating dtype every floating tensor of a checkpoint is stored in, else None."""
    floats = {d for d in dtypes if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


def convert_parameters(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating parameter to ``dtype`` in place, one tensor at a time.

    Buffers keep the dtype the model gave them (rotary frequencies stay float32), as with
    ``from_pretrained(dtype=...)``.

    Returns the bytes of mapped checkpoint pages given back. Shared (tied) parameters are cast once.
    """
    dropper = _PageDropper()
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for param in list(module._parameters.values()):
                if param is None or id(param) in seen or not param.is_floating_point() or param.dtype == dtype:
                    continue
                seen.add(id(param))
                old = param.data
                param.data = old.to(dtype)
                dropper.drop(old)
                del old
    return dropper.dropped


def peak_rss_bytes() -> int | None:
    """The process's resident-set high-water mark (Linux/macOS ``ru_maxrss``; psutil elsewhere)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:  # noqa: BLE001 - no resource module (Windows): best effort
        try:
            import psutil

            info = psutil.Process().memory_info()
            return int(getattr(info, "peak_wset", info.rss))
        except Exception:  # noqa: BLE001 - peak memory is provenance only; never fail an analysis for it
            return None


def weight_ref(model: torch.nn.Module) -> weakref.ref | None:
    """A weak reference to one of the model's weights: tells whether dropping the model freed them."""
    try:
        return weakref.ref(next(model.parameters()))
    except (StopIteration, TypeError):
        return None


def release_memory(weight: weakref.ref | None = None) -> None:
    """After the caller dropped its last reference to a model: collect it now if reference cycles keep
    its weights alive (``weight`` still resolves; a full ``gc.collect`` costs ~0.4 s in a process with
    many objects, most of a small analysis, so it runs only when needed), hand freed heap pages back to
    the OS (glibc keeps freed chunks below its adaptive mmap threshold, up to 32 MB, e.g. attention
    projections) and CUDA's cached blocks, before the next model loads."""
    if weight is None or weight() is not None:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
