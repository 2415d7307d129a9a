"""A shared, content-addressed, size-bounded cache of immutable results (analyses, merged models).

Why: on a public Space most visitors press the same buttons on the same defaults, and each of them
would otherwise redo an identical analysis or merge while the rest of the crowd waits in line. A
result is stored once under a key that names *everything* it depends on, and handed to whoever asks
for the same key again.

* **Keys are content, not names.** A local model folder is keyed by the SHA-256 of its files' bytes
  (hashed once, then memoised by (path, size, mtime_ns, inode), also on disk, so a 15 GB model is
  not re-read on every click); a Hub model by its resolved commit sha; calibration text by the
  SHA-256 of the texts the analysis reads; plus every setting and ``code_version()`` (the library's
  source and the numeric stack's versions). An uploaded file therefore only matches the same bytes.
* **Single flight.** Two requests for the same new key compute it once: the second waits (a thread
  lock per key, and a ``filelock.FileLock`` per key for other processes) and then reads the result.
* **Atomic.** An entry is built in a temp folder inside the store and renamed into place complete.
* **Bounded.** Least-recently-used entries are deleted once the store is over its byte cap
  (``ACM_CACHE_MAX_GB``, default 20), but never an entry in use: readers hold a shared ``flock``
  on the entry's pin file while they read it (or, for a merged model a session works with, for as
  long as the session keeps it), and eviction only takes entries it can lock exclusively.

Configuration: ``ACM_CACHE_DIR`` (the folder; unset = no shared cache, the library default — the app
sets one), ``ACM_CACHE_MAX_GB``, and ``ACM_CACHE=off`` to switch it off. POSIX only (``fcntl``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Self

from acm.errors import InputError
from acm.processes import process_alive

ENV_DIR = "ACM_CACHE_DIR"
ENV_MAX_GB = "ACM_CACHE_MAX_GB"
ENV_SWITCH = "ACM_CACHE"
DEFAULT_MAX_GB = 20.0
KINDS = ("analysis", "merge")
_CHUNK = 8 * 1024 * 1024


# ===================================================================================== hashing


@lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the library's own source plus the versions of the numeric stack.

    Why: a result is only reusable by code that would compute the same bytes; any edit under
    ``acm/`` or a new torch / transformers / safetensors changes the key (stale entries age out).
    """
    import acm

    h = hashlib.sha256(f"acm {acm.__version__}\n".encode())
    pkg = Path(acm.__file__).resolve().parent
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes() + b"\0")
    for mod in ("torch", "transformers", "safetensors", "numpy"):
        try:
            h.update(f"{mod} {__import__(mod).__version__}\n".encode())
        except ImportError:
            h.update(f"{mod} -\n".encode())
    return h.hexdigest()[:16]


def canonical_digest(obj: Any) -> str:
    """SHA-256 of an object's canonical JSON (sorted keys; floats as their exact repr)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FileHasher:
    """SHA-256 of files, memoised by (real path, size, mtime_ns, inode, device).

    Why: hashing is the honest way to say "same content", but a 7B model is 15 GB; the memo (kept
    in memory and, when a store is given, in ``<store>/file-hashes.json``) makes every later
    lookup a ``stat``. A file rewritten in place gets a new mtime/size and is hashed again.
    """

    def __init__(self, memo_file: Path | None = None):
        self.memo_file = memo_file
        self._memo: dict[str, str] = {}
        self._lock = threading.Lock()
        self._loaded = memo_file is None
        self._dirty = False
        self.bytes_hashed = 0

    @staticmethod
    def _stat_key(path: Path) -> tuple[str, os.stat_result]:
        real = os.path.realpath(path)
        st = os.stat(real)
        return f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}", st

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            data = json.loads(self.memo_file.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self._memo.update({str(k): str(v) for k, v in data.items()})
        except (OSError, ValueError):
            pass

    def _save(self) -> None:
        if self.memo_file is None:
            return
        try:
            self.memo_file.parent.mkdir(parents=True, exist_ok=True)
            with _LockedFile(self.memo_file.with_suffix(".lock")):
                try:   # merge what other processes wrote meanwhile
                    on_disk = json.loads(self.memo_file.read_text(encoding="utf-8"))
                    if isinstance(on_disk, dict):
                        for k, v in on_disk.items():
                            self._memo.setdefault(str(k), str(v))
                except (OSError, ValueError):
                    pass
                if len(self._memo) > 100_000:          # a bounded memo: keep the newest half
                    self._memo = dict(list(self._memo.items())[-50_000:])
                _write_atomic(self.memo_file, json.dumps(self._memo))
        except OSError:
            pass   # a memo that cannot be saved only costs a re-hash later

    def hash_file(self, path: str | os.PathLike, *, save: bool = True) -> str:
        key, st = self._stat_key(Path(path))
        with self._lock:
            self._load()
            cached = self._memo.get(key)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        with open(os.path.realpath(path), "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
        digest = h.hexdigest()
        with self._lock:
            self._memo[key] = digest
            self.bytes_hashed += st.st_size
            self._dirty = True
        if save:
            self.save()
        return digest

    def save(self) -> None:
        """Persist new hashes (no-op when nothing changed)."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._save()


_DEFAULT_HASHER = FileHasher()


def folder_digest(folder: str | os.PathLike, hasher: FileHasher | None = None) -> str:
    """SHA-256 over every regular file under ``folder`` (relative path + content hash).

    Hidden files and folders (``.git``, ``.cache``, temp folders of a writer) are skipped: they are
    not part of the model. Symlinks are followed (Hub snapshots link to blobs).
    """
    hasher = hasher or _DEFAULT_HASHER
    root = Path(folder)
    lines = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_file():
                lines.append(f"{path.relative_to(root).as_posix()}\0{hasher.hash_file(path, save=False)}")
    hasher.save()
    if not lines:
        raise InputError(f"model folder {folder} holds no files")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


_HUB_TTL_S = 60.0
_HUB_MEMO: dict[tuple[str, str | None], tuple[float, str | None]] = {}
_HUB_LOCK = threading.Lock()


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit sha a Hub id (and revision) resolves to now, or None when it cannot be told.

    Fetches only ``config.json`` (the snapshot folder is named by the commit); offline, the local
    cache's ref answers. None means "not cacheable": the caller computes without the cache. Answers
    are remembered for a minute, so a crowd clicking on the same Hub model asks the Hub once.
    """
    now = time.monotonic()
    with _HUB_LOCK:
        hit = _HUB_MEMO.get((repo_id, revision))
    if hit is not None and now - hit[0] < _HUB_TTL_S:
        return hit[1]
    sha = _resolve_hub_commit(repo_id, revision)
    with _HUB_LOCK:
        if len(_HUB_MEMO) > 1024:
            _HUB_MEMO.clear()
        _HUB_MEMO[(repo_id, revision)] = (now, sha)
    return sha


def _resolve_hub_commit(repo_id: str, revision: str | None) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"]))
    except Exception:  # noqa: BLE001 - offline and not cached, gated, unknown: no identity
        return None
    sha = folder.name
    return sha if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else None


def model_identity(spec: str, *, revision: str | None = None, hasher: FileHasher | None = None) -> str | None:
    """A content identity for a model: ``local:<sha256 of the folder>`` or ``hub:<id>@<commit>``.

    None when it cannot be determined (a Hub id while offline and not cached, an empty or unreadable
    folder); the caller then does not use the cache for this request.
    """
    spec = (spec or "").strip()
    local = Path(spec).expanduser()
    if local.is_dir():
        try:
            return "local:" + folder_digest(local, hasher)
        except (InputError, OSError):      # empty or unreadable: the work itself reports it in its own words
            return None
    if local.exists() or not spec:
        return None
    commit = hub_commit(spec, revision)
    return f"hub:{spec}@{commit}" if commit else None


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts (length-prefixed, so no two lists collide by concatenation)."""
    h = hashlib.sha256()
    for t in texts:
        b = str(t).encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


_TEXTS_MEMO: dict[tuple, str] = {}
_TEXTS_LOCK = threading.Lock()


def calibration_identity(source: str | os.PathLike | Sequence[str] | None, *, field: str | None = None,
                         split: str = "train") -> str:
    """SHA-256 of the calibration texts the analysis would read (files memoised by stat).

    Keyed by the texts themselves, not by a name: an uploaded file matches only an upload with the
    same content, whatever it is called; a Hub dataset is read (from the local ``datasets`` cache
    after the first time) and hashed.
    """
    from acm.activations.calibration import load_texts

    stat_key = None
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        st = os.stat(os.path.realpath(source))
        stat_key = (os.path.realpath(source), st.st_size, st.st_mtime_ns, st.st_ino, field, split)
        with _TEXTS_LOCK:
            if stat_key in _TEXTS_MEMO:
                return _TEXTS_MEMO[stat_key]
    digest = texts_digest(load_texts(source, field=field, split=split))
    if stat_key is not None:
        with _TEXTS_LOCK:
            if len(_TEXTS_MEMO) > 1024:
                _TEXTS_MEMO.clear()
            _TEXTS_MEMO[stat_key] = digest
    return digest


def make_key(kind: str, parts: dict) -> str:
    """The cache key of a result: its kind, everything it depends on, and the code version."""
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}")
    return canonical_digest({"kind": kind, "code": code_version(), **parts})


# ===================================================================================== store


class _LockedFile:
    """An exclusive ``flock`` on a small lock file, as a context manager (short critical sections)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)     # closing releases the lock
            self._fd = None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Pin:
    """A hold on one entry: while any pin on it is held, eviction leaves the entry alone.

    Held briefly by a reader, or for as long as a session works with a cached merged model (its
    ``release`` is called when the session drops the model). Not tied to a thread; releasing twice
    is harmless. Pins of one process share one file descriptor per key (see ``CacheStore.pin``),
    so a thousand sessions on one cached model hold one descriptor.
    """

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):   # a forgotten pin must not keep an entry forever
        self.release()


@dataclass
class Entry:
    """One stored result: its payload folder and when / how long it took to make."""

    kind: str
    key: str
    path: Path                    # the payload folder (read-only by convention)
    meta: dict
    hit: bool                     # True: reused; False: computed by this call
    waited: bool = False          # True: another request was computing it and this one waited
    pin: Pin | None = field(default=None, repr=False)

    @property
    def created(self) -> float:
        return float(self.meta.get("created", 0.0))

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.created)

    @property
    def compute_s(self) -> float | None:
        v = self.meta.get("compute_s")
        return None if v is None else float(v)

    def release(self) -> None:
        """Let eviction have the entry again (read what you need before)."""
        if self.pin is not None:
            self.pin.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CacheStore:
    """The on-disk LRU store: ``<root>/<kind>/<key>/{meta.json,data/}``, pins and locks beside it."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        for sub in (*KINDS, "tmp", "locks", "pins", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.hasher = FileHasher(self.root / "file-hashes.json")
        self._key_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._pins: dict[str, list[int]] = {}          # key -> [fd holding LOCK_SH, count]
        self._pin_lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "waits": 0, "evicted": 0}

    # ------------------------------------------------------------------ paths
    def entry_dir(self, kind: str, key: str) -> Path:
        if kind not in KINDS or not key.isalnum():
            raise ValueError(f"bad cache entry {kind}/{key}")
        return self.root / kind / key

    def _pin_path(self, key: str) -> Path:
        return self.root / "pins" / f"{key}.pin"

    def pin(self, key: str) -> Pin:
        """Hold ``key`` against eviction (a shared ``flock``; waits while an eviction of it runs)."""
        with self._pin_lock:
            held = self._pins.get(key)
            if held is not None:
                held[1] += 1
            else:
                fd = os.open(self._pin_path(key), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                except BaseException:
                    os.close(fd)
                    raise
                self._pins[key] = [fd, 1]
        return Pin(lambda: self._unpin(key))

    def _unpin(self, key: str) -> None:
        with self._pin_lock:
            held = self._pins.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del self._pins[key]
                os.close(held[0])      # closing releases the shared lock

    def pinned(self, key: str) -> int:
        """How many pins this process holds on ``key``."""
        with self._pin_lock:
            held = self._pins.get(key)
            return held[1] if held else 0

    # ------------------------------------------------------------------ reading
    def lookup(self, kind: str, key: str) -> Entry | None:
        """The entry if present, pinned (``entry.release()`` or ``with``), else None."""
        folder = self.entry_dir(kind, key)
        if not (folder / "meta.json").is_file():
            return None
        return self._read_entry(kind, key, folder)

    def has(self, kind: str, key: str) -> bool:
        """Whether the entry is stored now (no pin: it may be evicted right after; ``lookup`` to use it)."""
        return (self.entry_dir(kind, key) / "meta.json").is_file()

    def in_flight(self, key: str) -> bool:
        """Whether this process is computing ``key`` right now (``get_or_create``'s single flight)."""
        with self._guard:
            lock = self._key_locks.get(key)
        return lock is not None and lock.locked()

    def wait_in_flight(self, key: str) -> bool:
        """Wait until this process's computation of ``key`` (if any) has ended; True when there was one.
        Why: a request identical to one being computed reads that result instead of queuing to redo it."""
        with self._guard:
            lock = self._key_locks.get(key)
        if lock is None or not lock.locked():
            return False
        with lock:
            pass
        return True

    def record_hit(self) -> None:
        """Count a request answered from an entry ``lookup`` found (the app's light path; a miss is
        counted by the ``get_or_create`` that then computes it)."""
        self._count("hits")

    def _read_entry(self, kind: str, key: str, folder: Path) -> Entry | None:
        pin = self.pin(key)
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):          # evicted between the check and the pin, or damaged
            pin.release()
            return None
        try:
            os.utime(folder / "meta.json")      # LRU: "last used" is the meta file's mtime
        except OSError:
            pass
        return Entry(kind, key, folder / "data", meta, hit=True, pin=pin)

    # ------------------------------------------------------------------ writing
    def get_or_create(self, kind: str, key: str, build: Callable[[Path], dict | None], *,
                      meta: dict | None = None) -> Entry:
        """The entry for ``key``: reused when present, else built once (single flight) and stored.

        ``build(folder)`` writes the payload into ``folder`` (created for it) and may return extra
        metadata. The entry comes back pinned: release it (``with`` or ``.release()``) once read, or
        keep it as long as its payload is used in place. Concurrent callers for the same key wait for the first one and then reuse its
        result; if the build fails, nothing is stored and the error propagates to its caller (a
        waiting caller then tries the build itself).
        """
        found = self.lookup(kind, key)
        if found is not None:
            self._count("hits")
            return found
        with self._guard:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        waited = key_lock.locked()
        with key_lock:
            from filelock import FileLock

            lock = FileLock(str(self.root / "locks" / f"{key}.lock"), thread_local=False)
            t_wait = time.perf_counter()
            with lock:
                waited = waited or time.perf_counter() - t_wait > 0.05
                found = self.lookup(kind, key)
                if found is not None:
                    found.waited = waited
                    self._count("waits" if waited else "hits")
                    return found
                self._count("misses")
                entry = self._build(kind, key, build, meta or {})
        self.evict()
        return entry

    def _build(self, kind: str, key: str, build: Callable[[Path], dict | None], meta: dict) -> Entry:
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))
        (tmp / "owner").write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        try:
            data = tmp / "data"
            data.mkdir()
            t0 = time.perf_counter()
            extra = build(data) or {}
            compute_s = time.perf_counter() - t0
            size = _tree_bytes(data)
            info = {"kind": kind, "key": key, "created": time.time(), "compute_s": round(compute_s, 3),
                    "bytes": size, "code": code_version(), **meta, **extra}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
            (tmp / "owner").unlink()
            pin = self.pin(key)
            final = self.entry_dir(kind, key)
            try:
                os.rename(tmp, final)
            except OSError:
                pin.release()
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(kind, key, final / "data", info, hit=False, pin=pin)

    def _count(self, what: str) -> None:
        with self._guard:
            self.stats[what] += 1

    # ------------------------------------------------------------------ eviction
    def entries(self) -> list[tuple[float, int, str, str]]:
        """(last used, bytes, kind, key) of every stored entry."""
        out = []
        for kind in KINDS:
            for folder in (self.root / kind).iterdir():
                meta = folder / "meta.json"
                try:
                    st = meta.stat()
                    size = int(json.loads(meta.read_text(encoding="utf-8")).get("bytes", 0))
                except (OSError, ValueError):
                    continue
                out.append((st.st_mtime, size, kind, folder.name))
        return out

    def total_bytes(self) -> int:
        return sum(e[1] for e in self.entries())

    def evict(self, *, keep: Iterable[str] = ()) -> list[str]:
        """Delete least-recently-used entries until the store fits its cap; skip entries in use.

        An entry is in use while anyone holds its pin (shared ``flock``); eviction takes the pin
        exclusively without waiting, renames the entry into ``trash/`` (so no reader ever sees
        half of it) and deletes it. Also removes temp folders of builders that died.
        """
        removed: list[str] = []
        keep = set(keep)
        with _LockedFile(self.root / "locks" / "evict.lock"):
            self._remove_dead_builds()
            items = sorted(self.entries())
            total = sum(e[1] for e in items)
            for _, size, kind, key in items:
                if total <= self.max_bytes:
                    break
                if key in keep:
                    continue
                fd = os.open(self._pin_path(key), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue                      # in use: never evicted
                    trash = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "trash"))
                    try:
                        os.rename(self.entry_dir(kind, key), trash / "entry")
                    except OSError:
                        shutil.rmtree(trash, ignore_errors=True)
                        continue
                finally:
                    os.close(fd)
                shutil.rmtree(trash, ignore_errors=True)
                total -= size
                removed.append(key)
        if removed:
            with self._guard:
                self.stats["evicted"] += len(removed)
        return removed

    def _remove_dead_builds(self) -> None:
        for tmp in (self.root / "tmp").iterdir():
            try:
                host, pid = (tmp / "owner").read_text(encoding="utf-8").split()
                if host != socket.gethostname() or process_alive(int(pid)):
                    continue
            except (OSError, ValueError):
                continue
            shutil.rmtree(tmp, ignore_errors=True)
        for trash in (self.root / "trash").iterdir():
            shutil.rmtree(trash, ignore_errors=True)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ===================================================================================== default store

_STORES: dict[tuple[str, int], CacheStore] = {}
_STORES_LOCK = threading.Lock()


def max_bytes_from_env() -> int:
    """The byte cap: ``ACM_CACHE_MAX_GB`` (decimal GB, may be fractional) or 20 GB."""
    raw = os.environ.get(ENV_MAX_GB, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        raise InputError(f"{ENV_MAX_GB}={raw!r} is not a number of gigabytes") from None
    if not gb >= 0:
        raise InputError(f"{ENV_MAX_GB} must be >= 0, got {raw!r}")
    return int(gb * 1e9)


def default_store() -> CacheStore | None:
    """The store named by the environment (``ACM_CACHE_DIR``), or None when the cache is off."""
    if os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get(ENV_DIR, "").strip()
    if not root:
        return None
    cap = max_bytes_from_env()
    key = (str(Path(root).expanduser().absolute()), cap)
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            try:
                store = CacheStore(key[0], cap)
            except OSError as exc:
                raise InputError(f"cannot use the cache folder {root} ({exc.strerror or exc}); "
                                 f"set {ENV_DIR} to a writable folder or {ENV_SWITCH}=off") from None
            _STORES[key] = store
    return store


def describe_age(seconds: float) -> str:
    """'12 s', '2 min', '3 h', '2 days' — for "reused a result computed … ago"."""
    s = max(0.0, float(seconds))
    if s < 1.5:
        return "1 s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} days"


__all__ = ["CacheStore", "Entry", "FileHasher", "Pin", "calibration_identity", "canonical_digest", "code_version",
           "default_store", "describe_age", "folder_digest", "hub_commit", "make_key", "max_bytes_from_env",
           "model_identity", "texts_digest"]
