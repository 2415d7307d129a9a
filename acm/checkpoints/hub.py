"""Hub models from their metadata: resolve, read safetensors headers, download weights only when needed.

Why: a compatibility check needs each model's config and tensor names/shapes/dtypes, which the Hub
serves without the weights — repo info (file list, sizes, commit sha), the small files (config,
tokenizer, generation config, shard index) and each safetensors file's header, read with an HTTP
Range request by ``huggingface_hub``. So Check on the paper's 7B pair moves a few MB, not ~30 GB.
The weights come later, only when a step reads tensors (analysis, merge, chat, evaluation), once,
into the shared HF cache, at the same commit (the revision is pinned to the sha at resolve time).

Downloads go through ``huggingface_hub.hf_hub_download`` file by file: it writes each file to a
process-unique temporary name next to the blob and renames it only when complete, so a cancelled
or dropped download never leaves a file a later step would trust. Before any byte is fetched the
free space of the cache is compared with the sizes from the metadata. Progress (bytes, speed, ETA)
goes to a tqdm bar (CLI) or to a ``progress(fraction, message)`` callback (the app).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acm.checkpoints.tensors import HeaderFacts
from acm.errors import InputError, OfflineError
from acm.sizes import format_bytes

Progress = Callable[[float, str], None]

# The small files fetched at resolve time (configs, tokenizer, chat template, shard index; model code
# only matters with trust_remote_code, which is checked when the config is read).
SMALL_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
SAFETENSORS_INDEX = "model.safetensors.index.json"
_HEADER_THREADS = 8

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class HubWeights:
    """A Hub model resolved at one commit: small files local, weights (maybe) still on the Hub."""

    repo_id: str
    commit: str
    folder: Path                       # the cache's snapshot folder for ``commit``
    sizes: dict[str, int]              # weight file -> bytes (from the repo info)
    headers: dict[str, Any] = field(default_factory=dict, repr=False)   # file -> SafetensorsFileMetadata

    @property
    def files(self) -> list[str]:
        return sorted(self.sizes)

    def paths(self) -> list[Path]:
        return [self.folder / name for name in self.files]

    def missing(self) -> dict[str, int]:
        """Weight files not yet in the local snapshot, with their sizes."""
        return {name: n for name, n in self.sizes.items() if not (self.folder / name).is_file()}

    @property
    def local(self) -> bool:
        return not self.missing()


# ----------------------------------------------------------------------------- errors


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Every Hub failure as one line naming the model (the wording the project always used)."""
    from huggingface_hub import errors as hub_errors_mod

    try:
        yield
    except hub_errors_mod.HFValidationError:
        raise InputError(f"{repo_id!r} is neither an existing local folder nor a valid Hub model id") from None
    except (hub_errors_mod.OfflineModeIsEnabled, hub_errors_mod.LocalEntryNotFoundError):
        raise OfflineError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE=1) and it is not in the local cache; pass a local folder instead") from None
    except hub_errors_mod.GatedRepoError:
        raise InputError(f"{repo_id!r} is gated: accept its licence on the Hub and log in (HF_TOKEN)") from None
    except hub_errors_mod.RepositoryNotFoundError:
        raise InputError(f"model {repo_id!r} not found on the Hub (or it is private)") from None
    except hub_errors_mod.RevisionNotFoundError:
        raise InputError(f"revision {revision!r} not found for {repo_id!r}") from None
    except hub_errors_mod.SafetensorsParsingError as exc:
        raise InputError(f"cannot read a safetensors header of {repo_id!r}: {str(exc).splitlines()[0]}") from None
    except (hub_errors_mod.HfHubHTTPError, OSError) as exc:
        raise OfflineError(f"cannot download {repo_id!r} from the Hub: {str(exc).splitlines()[0]}") from None
    except Exception as exc:           # httpx connection/timeout errors and the like: one line
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise OfflineError(f"cannot download {repo_id!r} from the Hub: {type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0]}") from None
        raise


# ----------------------------------------------------------------------------- resolve


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def resolve_hub(repo_id: str, *, revision: str | None = None, allow_pickle: bool = False
                ) -> tuple[Path, str | None, HubWeights | None]:
    """(snapshot folder, commit, pending weights) for a Hub id; weights None when they are already local.

    Online: the repo info pins ``revision`` to its commit sha, the small files are downloaded at that
    sha and, for safetensors repos, the weight list comes from the index (or the single file); no
    weight byte is fetched. Offline, or the Hub unreachable: the cached snapshot, if it holds the
    weights. A pickle-only repo the user allowed: a full download, as before.
    """
    if offline():
        return _cached(repo_id, revision, allow_pickle, None)
    try:
        return _resolve_online(repo_id, revision, allow_pickle)
    except OfflineError as exc:             # unreachable / Hub error (not 404, gated, …): the cache, as before
        return _cached(repo_id, revision, allow_pickle, exc)


def _resolve_online(repo_id: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str | None, HubWeights | None]:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.utils import filter_repo_objects

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        sha = info.sha
        sizes = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
        small = list(filter_repo_objects(sorted(sizes), allow_patterns=SMALL_PATTERNS))
        if "config.json" not in sizes:
            raise InputError(f"{repo_id} has no config.json: not a Hugging Face model folder")
        with ThreadPoolExecutor(min(_HEADER_THREADS, len(small))) as pool:   # a round trip each: in parallel
            paths = list(pool.map(lambda name: hf_hub_download(repo_id, name, revision=sha), small))
        # <cache>/models--org--name/snapshots/<sha>/<name>
        folder = Path(paths[0]).parents[len(Path(small[0]).parts) - 1]
    _remember_ref(folder, revision or "main", sha)
    weights = _weight_files(repo_id, folder, sizes, allow_pickle)
    if weights is None:                        # pickle weights the user allowed: the whole snapshot
        return (*_snapshot(repo_id, sha, allow_pickle, local_only=False), None)
    hub = HubWeights(repo_id, sha, folder, {name: sizes[name] for name in weights})
    return folder, sha, (None if hub.local else hub)


def _cached(repo_id: str, revision: str | None, allow_pickle: bool, error: OfflineError | None
            ) -> tuple[Path, str | None, None]:
    """The cached snapshot of ``revision`` with its weights; else ``error`` (or the offline line)."""
    try:
        folder, commit = _snapshot(repo_id, revision, allow_pickle, local_only=True)
    except OfflineError:
        if error is not None:
            raise error from None
        raise
    if not _has_weights(folder, allow_pickle):      # only Check's small files are cached
        raise error or OfflineError(f"cannot download {repo_id!r}: offline mode is on (HF_HUB_OFFLINE=1) and "
                                    "its weights are not in the local cache; pass a local folder instead")
    return folder, commit, None


def _weight_files(repo_id: str, folder: Path, sizes: dict[str, int], allow_pickle: bool) -> list[str] | None:
    """The safetensors files of the repo (from the index when sharded); None for allowed pickle weights."""
    import json

    if SAFETENSORS_INDEX in sizes:
        try:
            weight_map = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, OSError) as exc:
            raise InputError(f"cannot parse {SAFETENSORS_INDEX} of {repo_id}: {exc}") from None
        missing = sorted(set(weight_map.values()) - set(sizes))
        if missing:
            raise InputError(f"{repo_id} is incomplete: shard(s) {', '.join(missing[:3])} listed in the index are missing")
        return sorted(set(weight_map.values()))
    files = sorted(n for n in sizes if n.endswith(".safetensors") and "/" not in n and not n.startswith("adapter_model"))
    if files:
        return files
    if "adapter_config.json" in sizes:
        raise InputError(f"{repo_id} is a LoRA/PEFT adapter, not a full model: merge the adapter into its base first")
    if any(n.endswith(".bin") for n in sizes):
        if not allow_pickle:
            raise InputError(f"{repo_id} has only pickle (.bin) weights, which can execute code when loaded; "
                             "convert them to safetensors or pass --allow-pickle if you trust the source")
        return None
    raise InputError(f"no model weights (*.safetensors) found in {repo_id}")


def _remember_ref(folder: Path, revision: str, sha: str) -> None:
    """Record ``revision`` → ``sha`` in the cache (``refs/<revision>``), as huggingface_hub does when it
    resolves a branch itself: files fetched at the pinned sha do not write it, and offline use finds a
    model by its branch through it."""
    import os
    import uuid

    if revision == sha:
        return
    ref = folder.parent.parent / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if ref.is_file() and ref.read_text() == sha:
            return
        tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, ref)
    except OSError:                    # a read-only cache: offline look-ups by branch just will not find it
        pass


def _has_weights(folder: Path, allow_pickle: bool) -> bool:
    import json

    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, OSError):
            return True                # the usual path reports the broken index in its own words
        return all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors")) or (allow_pickle and any(folder.glob("*.bin")))


def _snapshot(repo_id: str, revision: str | None, allow_pickle: bool, *, local_only: bool) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download

    patterns = SMALL_PATTERNS + ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
    with hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                        local_files_only=local_only))
    return folder, (folder.name if len(folder.name) == 40 else None)


# ----------------------------------------------------------------------------- headers


# Headers already read, by (repo, commit, file): a commit never changes, so a crowd checking the same
# Hub model (or one session checking it again) reads each header from the Hub once per process.
_HEADER_MEMO: dict[tuple[str, str, str], Any] = {}
_HEADER_MEMO_MAX = 4096


def read_headers(hub: HubWeights) -> None:
    """Each safetensors file's header, by Range requests at the pinned commit (a few threads for shards)."""
    from huggingface_hub import HfApi

    for name in hub.files:
        memo = _HEADER_MEMO.get((hub.repo_id, hub.commit, name))
        if memo is not None:
            hub.headers.setdefault(name, memo)
    todo = [name for name in hub.files if name not in hub.headers]
    if not todo:
        return
    api = HfApi()

    def one(name: str):
        return name, api.parse_safetensors_file_metadata(hub.repo_id, name, revision=hub.commit)

    with hub_errors(hub.repo_id, hub.commit):
        if len(todo) == 1:
            results = [one(todo[0])]
        else:
            with ThreadPoolExecutor(min(_HEADER_THREADS, len(todo))) as pool:
                results = list(pool.map(one, todo))
    hub.headers.update(results)
    if len(_HEADER_MEMO) > _HEADER_MEMO_MAX:
        _HEADER_MEMO.clear()
    _HEADER_MEMO.update({(hub.repo_id, hub.commit, name): meta for name, meta in results})


class HeaderReader(HeaderFacts):
    """The part of ``TensorReader`` a compatibility check uses (keys, shape, dtype, numel, nbytes),
    backed by the safetensors headers read from the Hub; any data access (``get``, ``stream``, …)
    first downloads the weights through ``load`` and continues on the real reader."""

    def __init__(self, hub: HubWeights, load: Callable[[], Any]):
        read_headers(hub)
        self.format = "safetensors"
        self._load = load
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for name in hub.files:
            for key, info in hub.headers[name].tensors.items():
                self._shapes[key] = tuple(int(d) for d in info.shape)
                self._dtypes[key] = _ST_DTYPES.get(info.dtype, torch.float32)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def close(self) -> None:            # nothing is open: headers only
        pass

    def close_streams(self) -> None:
        pass

    def release(self, key: str) -> None:
        pass

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._load(), name)


# ----------------------------------------------------------------------------- downloads


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(path: Path) -> int:
    """Free space of the file system that holds ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage("/").free


def check_disk_space(hubs: list[HubWeights]) -> None:
    """Refuse, in one line with both sizes, a download the cache's disk cannot hold."""
    need = sum(sum(h.missing().values()) for h in _unique(hubs))
    if need <= 0:
        return
    where = cache_dir()
    free = free_bytes(where)
    if need > free:
        names = ", ".join(h.repo_id for h in _unique(hubs) if h.missing())
        raise InputError(f"not enough disk space to download the weights of {names}: {format_bytes(need)} needed, "
                         f"{format_bytes(free)} free in {where}")


def _unique(hubs: list[HubWeights]) -> list[HubWeights]:
    seen: dict[tuple[str, str], HubWeights] = {}
    for h in hubs:
        seen.setdefault((h.repo_id, h.commit), h)
    return list(seen.values())


class _Meter:
    """Bytes of one model's download → a tqdm bar (CLI) and/or ``progress(fraction, message)`` (app)."""

    def __init__(self, label: str, total: int, progress: Progress | None, show: bool):
        self.label, self.total, self.done, self.progress = label, total, 0, progress
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if show and progress is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {label}")

    def add(self, n: int) -> None:
        self.done = max(0, self.done + n)
        if self.bar is not None:
            self.bar.update(n)
        now = time.monotonic()
        if self.progress is not None and (now - self.last >= 0.25 or self.done >= self.total):
            self.last = now
            self.progress(min(1.0, self.done / self.total) if self.total else 1.0, self.message(now))

    def message(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.t0, 1e-6)
        speed = self.done / elapsed
        eta = (self.total - self.done) / speed if speed > 0 else None
        left = f", {_clock(eta)} left" if eta is not None and self.done < self.total else ""
        return (f"downloading {self.label}: {format_bytes(self.done)} of {format_bytes(self.total)} "
                f"at {format_bytes(speed)}/s{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def tqdm_class(self) -> type:
        meter = self

        class _Bytes:
            """What hf_hub_download drives (plain HTTP and Xet): a context manager whose ``update(n)``
            counts the bytes written; the Xet network-transfer counter (``update_transfer``) is not
            counted again, so a model's bytes are its file sizes whichever way they travel."""

            n = 0
            total = None
            disable = False

            def __init__(self, *args, **kwargs):
                pass

            def update_transfer(self, n=1):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                meter.add(int(n or 0))

            def close(self):
                pass

            def __getattr__(self, name):   # set_postfix_str, refresh, set_transfer_postfix_str…: nothing to show
                if name.startswith("_"):
                    raise AttributeError(name)
                return lambda *a, **k: None

        return _Bytes


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def download_weights(hub: HubWeights, *, progress: Progress | None = None, show_progress: bool = True,
                     label: str | None = None) -> list[Path]:
    """Download the missing weight files of ``hub`` at its pinned commit; the local paths of all of them."""
    from huggingface_hub import hf_hub_download

    missing = hub.missing()
    if not missing:
        return hub.paths()
    check_disk_space([hub])
    meter = _Meter(label or hub.repo_id, sum(missing.values()), progress, show_progress)
    try:
        with hub_errors(hub.repo_id, hub.commit):
            for name in sorted(missing):
                hf_hub_download(hub.repo_id, name, revision=hub.commit, tqdm_class=meter.tqdm_class())
    finally:
        meter.close()
    if hub.missing():
        raise OfflineError(f"cannot download {hub.repo_id!r} from the Hub: "
                           f"{', '.join(sorted(hub.missing())[:3])} did not arrive")
    return hub.paths()
