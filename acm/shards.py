"""Sharded safetensors output, written tensor by tensor, plus the atomic output folder.

Why: a merged 7B model must never be held in memory as a whole. ``ShardWriter`` buffers merged
tensors until the shard size limit and flushes them to disk, so peak memory is one shard plus the
tensors being computed. ``AtomicFolder`` makes the output appear only when complete: everything
is written into a temp dir next to the target and renamed onto it on success; on failure the temp
dir is deleted, so nothing that looks like a finished model is left behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from acm.errors import InputError

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


class ShardWriter:
    """Collect tensors and flush them to ``model-XXXXX-of-YYYYY.safetensors`` shards at a size limit."""

    def __init__(self, folder: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.num_tensors = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
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
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
