"""Read a model's tensors one at a time, without loading the whole model.

Merging and compatibility checks only ever need one tensor (or just its shape) at a time, so we
open safetensors shards lazily (``safe_open`` memory-maps them). Pickle checkpoints (``.bin``)
are read only when the caller explicitly allowed it, with ``weights_only=True`` and ``mmap``.

Memory: every page of a memory-mapped shard that has been read counts in the process's RSS for
as long as the shard stays mapped. A streaming reader (the merge engine) therefore calls
``release(key)`` when it is done with a tensor; once every tensor of a shard has been released
the shard's handle is dropped, and its mapping goes away with the last tensor still using it.
So a streamed pass keeps at most about one shard per model mapped, not the whole model. A
released shard is reopened (lazily) if it is read again.

The merge engine does not map its inputs at all: ``TensorReader.stream(key, window)`` gives a
``StreamedTensor``, a flat read-only view whose slices are read with ``os.preadv`` into one reused
buffer per model (``Window``). The inputs' pages then stay in the page cache, never in the
process's RSS, and no page fault is taken per 4-64 KB of input (a 1.5B-shaped merge took ~100k
faults on its mapped inputs). Everything else (analysis, checks, pickle) keeps using ``get``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from acm.errors import InputError


def finite(t: torch.Tensor) -> bool:
    """No NaN/Inf, in one cheap reduction (``aminmax`` propagates NaN; ``isfinite`` is ~10× slower on CPU).

    Here, with the tensors, because loading (the analysis refuses broken weights) and merging (a
    merged tensor is checked once) both ask it."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def _corrupt(path: Path, exc: Exception) -> InputError:
    return InputError(f"cannot read weights file {path.name} in {path.parent}: it looks corrupt or truncated ({exc})")


def find_weight_files(folder: Path, *, allow_pickle: bool = False) -> tuple[list[Path], str]:
    """Return (files, format) for a model folder; format is 'safetensors' or 'pickle'.

    Why: choosing the format is a security decision (pickle can run code), so it lives in one
    place and refuses ``.bin`` unless the user opted in.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        return _files_from_index(index), "safetensors"
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if files:
        return files, "safetensors"
    pickles = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if (folder / "adapter_config.json").is_file():
        raise InputError(f"{folder} is a LoRA/PEFT adapter, not a full model: merge the adapter into its base first")
    if pickles:
        if not allow_pickle:
            raise InputError(
                f"{folder} has only pickle (.bin) weights, which can execute code when loaded; "
                "convert them to safetensors or pass --allow-pickle if you trust the source")
        pindex = folder / PICKLE_INDEX
        return (_files_from_index(pindex) if pindex.is_file() else pickles), "pickle"
    raise InputError(f"no model weights (*.safetensors) found in {folder}")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"cannot parse {index}: {exc}") from exc
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{index.parent} is incomplete: shard(s) {', '.join(missing[:3])} listed in the index are missing")
    return files


class HeaderFacts:
    """Shapes, dtypes and sizes from ``_shapes`` / ``_dtypes`` (filled from safetensors headers): shared by
    the local reader and the Hub's header-only reader, so a compatibility check reads both the same way."""

    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def numel(self) -> int:
        total = 0
        for shape in self._shapes.values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def nbytes(self, key: str) -> int:
        n = 1
        for d in self._shapes[key]:
            n *= d
        return n * torch.empty((), dtype=self._dtypes[key]).element_size()


class TensorReader(HeaderFacts):
    """Lazy, name-addressed access to every tensor of a checkpoint (all shards)."""

    def __init__(self, files: list[Path], fmt: str = "safetensors"):
        self.files = [Path(f) for f in files]
        self.format = fmt
        self._where: dict[str, int] = {}
        self._handles: dict[int, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._file_keys: dict[int, int] = {}          # file -> how many tensors it holds
        self._released: dict[int, set[str]] = {}      # file -> tensors released since it was (re)opened
        self._offsets: dict[str, int] = {}            # safetensors: absolute byte offset of each tensor
        self._fds: dict[int, int] = {}                # files opened for positioned reads (``stream``)
        for i, path in enumerate(self.files):
            if fmt == "safetensors":
                handle = self._open_safetensors(path)
                self._offsets.update(_data_offsets(path))
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    self._where[key] = i
                    self._shapes[key] = tuple(sl.get_shape())
                    self._dtypes[key] = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
                self._handles.pop(i, None)            # headers read; map the data only when it is read
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                self._handles[i] = state
                for key, value in state.items():
                    self._where[key] = i
                    self._shapes[key] = tuple(value.shape)
                    self._dtypes[key] = value.dtype
        for i in self._where.values():
            self._file_keys[i] = self._file_keys.get(i, 0) + 1

    def _open_safetensors(self, path: Path):
        from safetensors import SafetensorError, safe_open

        i = self.files.index(path)
        if i not in self._handles:
            try:
                self._handles[i] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise _corrupt(path, exc) from exc
        return self._handles[i]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU). Corruption surfaces here as a one-line InputError.

        safetensors tensors are zero-copy views of the shard's memory map; the map stays valid for
        as long as any tensor from it is alive, even after ``release`` dropped the handle.
        """
        i = self._where[key]
        if self.format == "safetensors":
            from safetensors import SafetensorError

            handle = self._open_safetensors(self.files[i])     # reopens a released shard
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise _corrupt(self.files[i], exc) from exc
        return self._handles[i][key]

    def stream(self, key: str, window: Window) -> StreamedTensor | torch.Tensor:
        """A flat view of ``key`` read on demand with positioned reads into ``window`` (no memory map).

        Only for floating-point safetensors tensors; anything else comes back from ``get``
        (flattened), so callers can treat both alike."""
        i = self._where[key]
        dtype = self._dtypes[key]
        if self.format != "safetensors" or key not in self._offsets or dtype not in _STREAMABLE:
            return self.get(key).reshape(-1)
        fd = self._fds.get(i)
        if fd is None:
            try:
                fd = self._fds[i] = os.open(self.files[i], os.O_RDONLY)
            except OSError as exc:
                raise _corrupt(self.files[i], exc) from exc
        n = 1
        for d in self._shapes[key]:
            n *= d
        return StreamedTensor(fd, self._offsets[key], n, dtype, window, self.files[i])

    def release(self, key: str) -> None:
        """The caller is done with ``key`` for this pass; drop its shard's handle once every tensor of
        the shard has been released (safetensors only; a later ``get`` reopens it)."""
        if self.format != "safetensors":
            return
        i = self._where[key]
        done = self._released.setdefault(i, set())
        done.add(key)
        if len(done) >= self._file_keys[i]:
            self._handles.pop(i, None)
            fd = self._fds.pop(i, None)
            if fd is not None:
                os.close(fd)
            done.clear()

    def open_files(self) -> int:
        """How many shards are open now (for tests and memory accounting)."""
        return len(self._handles)

    def close_streams(self) -> None:
        """Close the file descriptors ``stream`` opened (reopened if streamed again); mapped handles stay."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        self._handles.clear()
        self.close_streams()
        self._released.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_STREAMABLE = (torch.float32, torch.bfloat16, torch.float16)
# Strided slices at least this sparse are gathered through a temporary memory map (``_gather_mapped``).
_SPARSE_STRIDE_BYTES = 256
DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _data_offsets(path: Path) -> dict[str, int]:
    """Absolute byte offset of every tensor of a safetensors file, from its header alone
    (8-byte little-endian header length, JSON header, data; offsets are relative to the data)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise _corrupt(Path(path), exc) from exc
    return {k: 8 + n + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


class Window:
    """One model's reused read buffer: the loaded byte range of one tensor at a time.

    Why reused: a fresh multi-MB allocation per read costs a page fault and a zero-fill per 4 KB
    page (the reason for this module's positioned reads in the first place)."""

    DEFAULT_BYTES = 8 << 20

    def __init__(self, nbytes: int = DEFAULT_BYTES, *, pin: bool = False):
        self.nbytes = int(nbytes)
        self.pin = pin
        self.buf: torch.Tensor | None = None
        self.owner: object = None
        self.start = self.end = 0                # loaded element range of ``owner``

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < nbytes:
            size = max(nbytes, self.nbytes)
            self.buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.owner = None
        return self.buf


class StreamedTensor:
    """A flat, read-only view of one stored tensor, read slice by slice with ``os.preadv``.

    Supports what the merge kernels use: ``numel()``, ``shape``, ``dtype``, contiguous slices
    ``x[s:e]`` (a view of the window, valid until the next read through the same window), strided
    slices ``x[a:b:k]`` (a new tensor) and ``read(s, e)`` (a new tensor). Reading ahead a whole
    window at a time keeps the number of system calls small; the values are the stored bytes, so
    results are bit-identical to reading the memory-mapped tensor.
    """

    def __init__(self, fd: int, offset: int, numel: int, dtype: torch.dtype, window: Window, path: Path):
        self.fd, self.offset, self.n, self.dtype, self.window, self.path = fd, offset, numel, dtype, window, path
        self.itemsize = torch.empty((), dtype=dtype).element_size()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,)

    def numel(self) -> int:
        return self.n

    def dim(self) -> int:
        return 1

    def is_floating_point(self) -> bool:
        return True

    def reshape(self, *shape) -> StreamedTensor:
        return self

    def narrow_flat(self, n: int) -> StreamedTensor:
        """The first ``n`` entries (rows of a grown vocabulary are read separately)."""
        return StreamedTensor(self.fd, self.offset, min(n, self.n), self.dtype, self.window, self.path)

    def _pread(self, dst: torch.Tensor, s: int, e: int) -> None:
        view = memoryview(dst.numpy()).cast("B")
        want, pos, off = (e - s) * self.itemsize, 0, self.offset + s * self.itemsize
        while pos < want:
            try:
                got = os.preadv(self.fd, [view[pos:want]], off + pos)
            except OSError as exc:
                raise _corrupt(self.path, exc) from exc
            if got <= 0:
                raise _corrupt(self.path, EOFError(f"file ends before tensor data at byte {off + pos}"))
            pos += got

    def _load(self, s: int, e: int) -> torch.Tensor:
        w = self.window
        if w.owner is not self or s < w.start or e > w.end:
            stop = min(self.n, max(e, s + w.nbytes // self.itemsize))
            buf = w.buffer((stop - s) * self.itemsize)
            self._pread(buf, s, stop)
            w.owner, w.start, w.end = self, s, stop
        lo = (s - w.start) * self.itemsize
        return w.buf[lo: lo + (e - s) * self.itemsize].view(self.dtype)

    def _gather_mapped(self, s: int, e: int, k: int, count: int) -> torch.Tensor:
        """A sparse strided sample (TIES's threshold band, one entry per ~100-2000) through a short-lived
        memory map of the tensor's bytes: the page cache is read in place instead of copying the whole
        tensor with ``preadv`` only to keep one entry in k. The map is closed before returning, so its
        pages leave the process's RSS at once."""
        import mmap

        import numpy as np

        first = self.offset + s * self.itemsize
        last = self.offset + (s + (count - 1) * k + 1) * self.itemsize
        base = first - first % mmap.ALLOCATIONGRANULARITY
        np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[self.itemsize]
        try:
            mm = mmap.mmap(self.fd, last - base, access=mmap.ACCESS_READ, offset=base)
        except (OSError, ValueError) as exc:
            raise _corrupt(self.path, exc) from exc
        try:
            view = np.frombuffer(mm, dtype=np.uint8, count=last - first, offset=first - base)
            picked = view.view(np_dtype)[::k].copy()
            del view
        finally:
            mm.close()
        return torch.from_numpy(picked).view(self.dtype)

    def read(self, s: int, e: int) -> torch.Tensor:
        """Entries [s, e) as a new tensor."""
        out = torch.empty(max(e - s, 0), dtype=self.dtype)
        if e > s:
            self._pread(out.view(torch.uint8), s, e)
        return out

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if not isinstance(sl, slice):
            raise TypeError("StreamedTensor supports slices only")
        s, e, k = sl.indices(self.n)
        if k == 1:
            return self._load(s, max(s, e))
        count = len(range(s, e, k))
        if k * self.itemsize >= _SPARSE_STRIDE_BYTES and count:
            return self._gather_mapped(s, e, k, count)
        out = torch.empty(count, dtype=self.dtype)
        j, pos = 0, s
        step_window = max(k, self.window.nbytes // self.itemsize)
        while j < count:
            stop = min(e, pos + step_window)
            part = self._load(pos, stop)[::k]
            out[j: j + part.numel()].copy_(part)
            j += part.numel()
            pos += part.numel() * k
        return out
