"""Sharded safetensors output, written tensor by tensor, plus the atomic output folder.

Why: a merged 7B model must never be held in memory as a whole. With a ``plan`` (every output
tensor's name, dtype and shape, which the merge engine knows before it merges anything)
``ShardWriter`` lays out every shard up front, writes each shard's safetensors header first and
then each tensor's bytes the moment it is added, so nothing but the tensor being written is in
memory — the engine merges every tensor into one reused buffer. Without a plan it buffers tensors
until the shard size limit and flushes them with ``safetensors.torch.save_file`` (one shard in
memory). ``AtomicFolder`` makes the output appear only when complete: everything
is written into a temp dir next to the target and renamed onto it on success; on failure the temp
dir is deleted, so nothing that looks like a finished model is left behind.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from acm.errors import InputError
from acm.processes import process_alive

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | float | str) -> int:
    """Bytes from an int or a string like "2GB", "500MB", "1.5GiB" (decimal units as in transformers)."""
    if isinstance(size, bool):
        raise InputError(f"invalid shard size {size!r}: use bytes or a size like 2GB / 500MB")
    if isinstance(size, (int, float)):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m or m.group(2) not in _UNITS:
            raise InputError(f"invalid shard size {size!r}: use bytes or a size like 2GB / 500MB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise InputError(f"shard size must be positive, got {size!r}")
    return value


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class _PlannedShard:
    """One output file laid out in advance: header bytes and each tensor's absolute offset."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        from acm.checkpoints.tensors import DTYPE_NAMES

        self.path, self.names = path, [e[0] for e in entries]
        # Data layout: widest elements first (as safetensors' own writer does), so every tensor
        # starts at a multiple of its element size; the order of the add() calls does not matter.
        order = sorted(range(len(entries)), key=lambda j: -torch.empty((), dtype=entries[j][1]).element_size())
        header: dict = {"__metadata__": metadata}
        rel: dict[str, int] = {}
        pos = 0
        for j in order:
            name, dtype, shape = entries[j]
            if dtype not in DTYPE_NAMES:
                raise InputError(f"cannot write tensor {name}: dtype {dtype} has no safetensors name")
            n = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            rel[name] = pos
            pos += n
        text = json.dumps({k: header[k] for k in ["__metadata__", *self.names]}, separators=(",", ":"))
        raw = text.encode("utf-8")
        raw += b" " * (-len(raw) % 8)            # the data starts 8-byte aligned (the spec's padding)
        self.header = len(raw).to_bytes(8, "little") + raw
        self.offset = {name: len(self.header) + r for name, r in rel.items()}
        self.expect = {name: (dtype, tuple(shape)) for name, dtype, shape in entries}
        self.size = len(self.header) + pos
        self.left = set(self.names)
        self.fd: int | None = None

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(self.fd, memoryview(self.header), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:], offset + pos)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")


class ShardWriter:
    """Write tensors to ``model-XXXXX-of-YYYYY.safetensors`` shards of at most ``max_shard_bytes``.

    With ``plan`` (``[(name, dtype, shape), …]`` in the order they will be added) every tensor is
    written to its file as soon as it is added (streamed; the caller may reuse the tensor's memory
    right after). Without it, tensors are buffered up to the shard limit. Either way a shard starts
    a new file when the next tensor would overflow it, so both give the same shards.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 plan: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None):
        self.folder = Path(folder)
        self.max_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.num_tensors = 0
        self._planned: list[_PlannedShard] | None = None
        self._where: dict[str, _PlannedShard] = {}
        if plan is not None:
            self._lay_out(plan)

    def _lay_out(self, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
        size = 0
        for name, dtype, shape in plan:
            n = _nbytes(dtype, shape)
            if not groups or (groups[-1] and size + n > self.max_bytes):
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape)))
            size += n
        self._planned = [_PlannedShard(self.folder / f"shard-{i:05d}.tmp", g, self.metadata)
                         for i, g in enumerate(groups)]
        self._where = {name: shard for shard in self._planned for name in shard.names}
        self._shards = [(shard.path, shard.names) for shard in self._planned]
        if self._planned:
            self._planned[0].open()          # header first: the file exists as the first tensor starts

    def _write_planned(self, name: str, tensor: torch.Tensor) -> int:
        shard = self._where.get(name)
        if shard is None or name not in shard.left:
            raise ValueError(f"tensor {name} is not in the write plan (or was written twice)")
        dtype, shape = shard.expect[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, the plan says {dtype} {list(shape)}")
        if shard.fd is None:
            shard.open()
        data = _as_bytes(tensor)
        _write_all(shard.fd, data, shard.offset[name])
        shard.left.discard(name)
        if not shard.left:
            shard.close()
        return len(data)

    def abort(self) -> None:
        """Close any open shard file (the temp folder holding it is deleted by the caller)."""
        for shard in self._planned or []:
            shard.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._planned is not None:
            self.total_bytes += self._write_planned(name, tensor)
            self.num_tensors += 1
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_bytes:
            self.flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes
        self.num_tensors += 1

    def flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> int:
        """Flush, give the shards their final names, write the index when > 1 shard; returns #shards."""
        if self._planned is not None:
            missing = [n for shard in self._planned for n in shard.names if n in shard.left]
            self.abort()
            if missing:
                raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]}")
        self.flush()
        n = len(self._shards)
        if n == 0:
            raise InputError("nothing to write: the model has no tensors")
        if n == 1:
            self._shards[0][0].rename(self.folder / SINGLE_FILE)
            return 1
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return n


class AtomicFolder:
    """A temp dir next to ``target`` that replaces ``target`` only on ``commit()``.

    ``force`` replaces an existing target: the old folder is renamed aside, the new one renamed
    in, then the old one deleted (restored if the swap fails). Use as a context manager: leaving
    the block without ``commit()`` (e.g. on an exception) deletes the temp dir.
    """

    def __init__(self, target: str | Path, *, force: bool = False):
        self.target = Path(target).expanduser().absolute()
        self.force = force
        self.tmp: Path | None = None
        self.committed = False
        check_target(self.target, force=force)

    def __enter__(self) -> Path:
        parent = self.target.parent
        remove_stale_temps(self.target)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=parent))
            (self.tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot create a temp folder in {parent}: {exc.strerror or exc}") from None
        return self.tmp

    def commit(self) -> Path:
        assert self.tmp is not None
        target = self.target
        if target.exists() or target.is_symlink():
            if not self.force:
                raise InputError(f"output folder {target} appeared while merging; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.rename(target, old)
            try:
                os.rename(self.tmp, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, target)
        (target / OWNER_FILE).unlink(missing_ok=True)
        self.committed = True
        self.tmp = None
        return target

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


OWNER_FILE = ".acm-writer"


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp folders that a killed writer of ``target`` left behind (SIGKILL skips cleanup).

    Only folders whose owner file names a process on this host that no longer exists are
    removed; a temp folder of a merge still running, of another host (shared disks), or without
    an owner file is left alone. ``.old-*`` folders are never touched: they may hold the only copy
    of a previous output.
    """
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        try:
            host, pid_text = (tmp / OWNER_FILE).read_text(encoding="utf-8").split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if host != socket.gethostname() or process_alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def check_target(target: Path, *, force: bool) -> None:
    """Refuse an existing target without force, a target that is a file, or an unwritable parent."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise InputError(f"output path {target} exists and is not a folder; choose another --out")
        if not force:
            raise InputError(f"output folder {target} already exists; pass --force to replace it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output's parent folder {parent}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder's parent {parent} is not writable; choose another --out")
