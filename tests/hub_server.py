"""A loopback Hugging Face Hub for tests: a small threaded HTTP server on 127.0.0.1 that answers the
requests ``huggingface_hub`` (and ``datasets`` through it) makes, so Hub paths are tested through the
real client, offline, in CI.

Why a server and not mocks: the behaviour under test (which bytes a Check fetches, how a dropped
connection is resumed, which exception a gated repo raises, where the cache puts a pinned revision)
lives inside ``huggingface_hub``; only real HTTP exercises it. The routes below follow what
``huggingface_hub`` 1.x/2.x requests (``hf_api.py``, ``file_download.py``, ``utils/_http.py``):

* ``GET /api/{models|datasets}/{ns}/{name}[/revision/{rev}]`` — repo info (``sha``, ``siblings``; with
  ``?blobs=true`` each sibling carries ``size``/``blobId``/``lfs``), ``gated``.
* ``GET /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]?recursive=`` — tree listing (one page).
* ``POST /api/{type}s/{ns}/{name}/paths-info/{rev}`` — form ``paths`` → entries.
* ``HEAD|GET /{ns}/{name}/resolve/{rev}/{file}`` and ``/datasets/{ns}/{name}/resolve/...`` — served
  directly (no redirect) with ``X-Repo-Commit``, ``ETag``, ``Content-Length``, ``Accept-Ranges``;
  ``Range: bytes=a-b`` answers ``206`` with ``Content-Range`` (safetensors header reads, resumes).
* LFS files (``*.safetensors``, ``*.parquet``, …) answer ``302`` with ``X-Linked-Size``/``X-Linked-Etag``
  and ``Location: /cdn-lfs/...`` (served by the same server, with Range), as the Hub redirects them to
  its storage; ``hub.redirect_lfs = False`` serves them directly.
* Errors as the Hub sends them: ``X-Error-Code: RepoNotFound`` (404), ``RevisionNotFound`` (404),
  ``EntryNotFound`` (404, with ``X-Repo-Commit``), ``GatedRepo`` (401 on every file of a gated repo;
  its info stays public, as on the Hub). ``huggingface_hub.utils.hf_raise_for_status`` maps them to
  ``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``, ``GatedRepoError``.

API (see also the ``loopback_hub`` fixture in ``tests/fixtures.py``, which starts one, points
``huggingface_hub``/``datasets`` at it with an isolated cache, and stops it)::

    hub = LoopbackHub().start()              # hub.url == "http://127.0.0.1:<port>"
    sha = hub.add_model("org/name", folder)  # every file of a local folder, on branch "main"
    sha2 = hub.add_model("org/name", other, branch="v2")   # a second branch; both shas resolvable
    hub.add_model("org/locked", folder, gated=True)        # files answer 401 GatedRepo
    hub.add_dataset("org/calib", {"data/train-00000-of-00001.parquet": b"...", "README.md": b"..."})
    hub.bytes_served("org/name")             # body bytes sent for that repo (all files)
    hub.bytes_served("org/name", "model.safetensors")      # ... for one file
    hub.requests                             # [(method, repo_id, path, range header, status), ...]
    hub.reset_counts()
    hub.break_download("org/name", "model.safetensors", after_bytes=50_000)   # drop the connection once,
    #     mid-body, after that many bytes (huggingface_hub resumes with a Range request)
    hub.break_download(..., then_status=503)  # ... and answer 503 to every later GET of it until heal()
    hub.heal()
    hub.bytes_per_second = 2e6               # a slow link (every body throttled), to watch progress
    hub.env(home)                            # environment for a subprocess client (HF_ENDPOINT, offline off)
    hub.stop()
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".pt", ".gguf")


@dataclass
class _Blob:
    data: bytes
    git_oid: str                   # sha1 of the git blob
    sha256: str | None             # LFS files: the etag the Hub sends

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid


def _blob(path: str, data: bytes) -> _Blob:
    git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    lfs = path.endswith(LFS_SUFFIXES)
    return _Blob(data, git_oid, hashlib.sha256(data).hexdigest() if lfs else None)


@dataclass
class _Repo:
    kind: str                                          # "model" | "dataset"
    repo_id: str
    gated: bool = False
    commits: dict[str, dict[str, _Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit_of(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


@dataclass
class _Fault:
    after_bytes: int
    drops: int
    then_status: int | None


def _files_of(source: Path | dict[str, bytes]) -> dict[str, bytes]:
    if isinstance(source, dict):
        return {k: bytes(v) for k, v in source.items()}
    root = Path(source)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class LoopbackHub:
    """The server and its repos; thread-safe counters. See the module docstring for the API."""

    def __init__(self) -> None:
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._bytes: dict[tuple[str, str], int] = {}
        self._faults: dict[tuple[str, str], _Fault] = {}
        self.requests: list[tuple[str, str, str, str | None, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self.home: Path | None = None      # the client cache home, set by point_clients_at
        self.commits: dict[tuple[str, str], str] = {}   # (repo_id, branch) -> sha, filled by fixtures
        self.redirect_lfs = True   # LFS files (weights, parquet) answer 302 to /cdn-lfs/..., as the Hub does
        self.bytes_per_second: float | None = None   # throttle every body (a slow link) when set
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ repos
    def add_model(self, repo_id: str, source: Path | dict[str, bytes], *, branch: str = "main",
                  gated: bool = False) -> str:
        """Publish ``source`` (a folder or {path: bytes}) as a commit on ``branch``; returns the commit sha."""
        return self._add("model", repo_id, source, branch, gated)

    def add_dataset(self, repo_id: str, source: Path | dict[str, bytes], *, branch: str = "main",
                    gated: bool = False) -> str:
        return self._add("dataset", repo_id, source, branch, gated)

    def _add(self, kind: str, repo_id: str, source, branch: str, gated: bool) -> str:
        files = {path: _blob(path, data) for path, data in _files_of(source).items()}
        digest = hashlib.sha1(repr(sorted((p, b.git_oid) for p, b in files.items())).encode())
        sha = hashlib.sha1((repo_id + branch).encode() + digest.digest()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault((kind, repo_id), _Repo(kind, repo_id))
            repo.gated = repo.gated or gated
            repo.commits[sha] = files
            repo.refs[branch] = sha
        return sha

    # ------------------------------------------------------------------ counters and faults
    def bytes_served(self, repo_id: str | None = None, filename: str | None = None) -> int:
        """Body bytes sent by GET on resolve URLs, for one repo (and one file), or all."""
        with self._lock:
            return sum(n for (r, f), n in self._bytes.items()
                       if (repo_id is None or r == repo_id) and (filename is None or f == filename))

    def served_files(self, repo_id: str) -> dict[str, int]:
        with self._lock:
            return {f: n for (r, f), n in self._bytes.items() if r == repo_id}

    def reset_counts(self) -> None:
        with self._lock:
            self._bytes.clear()
            self.requests.clear()

    def break_download(self, repo_id: str, filename: str, *, after_bytes: int, drops: int = 1,
                       then_status: int | None = None) -> None:
        """Drop the connection after ``after_bytes`` of the body, ``drops`` times; with ``then_status``
        every later GET of the file answers that status until ``heal()``."""
        with self._lock:
            self._faults[(repo_id, filename)] = _Fault(after_bytes, drops, then_status)

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    # ------------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LoopbackHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def env(self, home: Path) -> dict[str, str]:
        """Environment variables that point a *subprocess* client at this hub with its own cache."""
        home = Path(home)
        return {"HF_ENDPOINT": self.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_DISABLE_XET": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}

    # ------------------------------------------------------------------ used by the handler
    def _repo(self, kind: str, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get((kind, repo_id))

    def _count(self, repo_id: str, path: str, n: int) -> None:
        with self._lock:
            self._bytes[(repo_id, path)] = self._bytes.get((repo_id, path), 0) + n

    def _take_fault(self, repo_id: str, path: str) -> tuple[str, int] | None:
        """('drop', after_bytes) | ('status', code) | None for the next GET of a file."""
        with self._lock:
            fault = self._faults.get((repo_id, path))
            if fault is None:
                return None
            if fault.drops > 0:
                fault.drops -= 1
                return "drop", fault.after_bytes
            if fault.then_status is not None:
                return "status", fault.then_status
            return None


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass  # quiet: tests read hub.requests instead

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self):
        self._route("HEAD")

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = split.path.strip("/").split("/")
        query = parse_qs(split.query)
        try:
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                self._api(method, parts[1][:-1], "/".join(parts[2:4]), parts[4:], query)
            elif parts[0] == "cdn-lfs" and len(parts) >= 6:          # cdn-lfs/{kind}/{ns}/{name}/{sha}/{path}
                self._resolve(method, parts[1], "/".join(parts[2:4]), parts[4], parts[5:], cdn=True)
            elif parts[0] == "datasets" and len(parts) >= 5 and parts[3] == "resolve":
                self._resolve(method, "dataset", "/".join(parts[1:3]), parts[4], parts[5:])
            elif len(parts) >= 4 and parts[2] == "resolve":
                self._resolve(method, "model", "/".join(parts[0:2]), parts[3], parts[4:])
            else:
                self._error(404, "RepoNotFound", "unknown route")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------------ api
    def _api(self, method: str, kind: str, repo_id: str, rest: list[str], query: dict) -> None:
        repo = self.hub._repo(kind, repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository Not Found for {repo_id}", repo_id=repo_id)
        if not rest or rest[0] == "revision":
            rev = unquote(rest[1]) if len(rest) > 1 else "main"
            sha = repo.commit_of(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo_id=repo_id)
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            return self._json(self._info(repo, sha, blobs), repo_id)
        if rest[0] in ("tree", "paths-info") and len(rest) >= 2:
            rev = unquote(rest[1])
            sha = repo.commit_of(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo_id=repo_id)
            files = repo.commits[sha]
            if rest[0] == "tree":
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(_tree(files, unquote("/".join(rest[2:])), recursive), repo_id)
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode()) if length else {}
            wanted = form.get("paths", [])
            entries = [e for e in _tree(files, "", True) if e["path"] in wanted]
            return self._json(entries, repo_id)
        self._error(404, "EntryNotFound", "unknown api route", repo_id=repo_id)

    def _info(self, repo: _Repo, sha: str, blobs: bool) -> dict:
        siblings = []
        for path, blob in sorted(repo.commits[sha].items()):
            sib: dict = {"rfilename": path}
            if blobs:
                sib.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.sha256:
                    sib["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": 134}
            siblings.append(sib)
        info = {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0], "sha": sha, "private": False, "disabled": False,
                "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z"}
        if repo.kind == "model":
            info["modelId"] = repo.repo_id
        return info

    # ------------------------------------------------------------------ files
    def _resolve(self, method: str, kind: str, repo_id: str, rev_part: str, path_parts: list[str],
                 cdn: bool = False) -> None:
        repo = self.hub._repo(kind, repo_id)
        path = unquote("/".join(path_parts))
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository Not Found for {repo_id}", repo_id=repo_id, method=method)
        rev = unquote(rev_part)
        sha = repo.commit_of(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo_id=repo_id, method=method)
        if repo.gated:
            return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                               "to it and be authenticated to access it. Please log in.", repo_id=repo_id, method=method)
        blob = repo.commits[sha].get(path)
        if blob is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", repo_id=repo_id,
                               method=method, commit=sha)
        if blob.sha256 and self.hub.redirect_lfs and not cdn:
            return self._redirect(method, kind, repo_id, sha, path, blob)
        fault = self.hub._take_fault(repo_id, path) if method == "GET" else None
        if fault is not None and fault[0] == "status":
            return self._error(fault[1], None, "loopback hub: injected failure", repo_id=repo_id, method=method)
        start, end, status = 0, len(blob.data) - 1, 200
        rng = self.headers.get("Range")
        if rng:
            start, end = _parse_range(rng, len(blob.data))
            if start > end:
                self._log(method, repo_id, path, rng, 416)
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(blob.data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = blob.data[start:end + 1]
        self._log(method, repo_id, path, rng, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{blob.etag}"')
        self.send_header("X-Repo-Commit", sha)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(blob.data)}")
        self.end_headers()
        if method == "HEAD":
            return
        if fault is not None:            # ("drop", n): send n bytes of the body, then cut the connection
            self._send_body(repo_id, path, body[:fault[1]])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send_body(repo_id, path, body)

    def _redirect(self, method: str, kind: str, repo_id: str, sha: str, path: str, blob: _Blob) -> None:
        """An LFS file, as the Hub serves it: 302 to its storage URL, the file's metadata on the redirect."""
        self._log(method, repo_id, path, self.headers.get("Range"), 302)
        self.send_response(302)
        self.send_header("Location", f"/cdn-lfs/{kind}/{repo_id}/{sha}/{path}")
        self.send_header("X-Repo-Commit", sha)
        self.send_header("X-Linked-Etag", f'"{blob.sha256}"')
        self.send_header("X-Linked-Size", str(len(blob.data)))
        self.send_header("ETag", f'"{blob.git_oid}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self, repo_id: str, path: str, body: bytes) -> None:
        step = 64 * 1024
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            self.wfile.write(chunk)
            self.hub._count(repo_id, path, len(chunk))
            if self.hub.bytes_per_second:          # a slow link, for tests that watch a download progress
                self.wfile.flush()
                time.sleep(len(chunk) / self.hub.bytes_per_second)
        self.wfile.flush()

    # ------------------------------------------------------------------ plumbing
    def _log(self, method: str, repo_id: str, path: str, rng: str | None, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append((method, repo_id, path, rng, status))

    def _json(self, payload, repo_id: str) -> None:
        data = json.dumps(payload).encode()
        self._log(self.command, repo_id, self.path, None, 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, *, repo_id: str = "", method: str = "GET",
               commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self._log(method, repo_id, self.path, self.headers.get("Range"), status)
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → inclusive (start, end), clipped to the file."""
    spec = header.strip().split("=", 1)[1].split(",")[0].strip()
    first, _, last = spec.partition("-")
    if not first:
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last) if last else size - 1, size - 1)


def _tree(files: dict[str, _Blob], under: str, recursive: bool) -> list[dict]:
    """Tree entries under ``under`` (files and folders), as ``/api/.../tree`` lists them."""
    prefix = under.strip("/") + "/" if under.strip("/") else ""
    entries: dict[str, dict] = {}
    for path, blob in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        for depth in range(1, len(rest)):          # the folders on the way
            folder = prefix + "/".join(rest[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                            "size": 0, "path": folder})
        if recursive or len(rest) == 1:
            entry = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.sha256:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
            entries[path] = entry
    return list(entries.values())


def point_clients_at(hub: LoopbackHub, monkeypatch, home: Path) -> None:
    """Point ``huggingface_hub`` and ``datasets`` (in this process) at ``hub``, online, with a cache under ``home``.

    Why patch modules and not only the environment: both libraries read ``HF_ENDPOINT``, the offline
    switches and the cache folders once, at import, and the rest of the suite (and CI) runs with
    ``HF_HUB_OFFLINE=1``. ``monkeypatch`` undoes every change after the test. The environment is set
    too, for code that reads it at call time and for subprocesses.
    """
    import huggingface_hub
    from huggingface_hub import constants

    home = Path(home)
    hub.home = home
    for key, value in hub.env(home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {"ENDPOINT": hub.url,
                        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_OFFLINE": False, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
                        "HUGGINGFACE_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_TELEMETRY": True,
                        "HF_HUB_DISABLE_XET": True, "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
                        # 64 KiB instead of 10 MB: progress callbacks and resumes are visible on tiny files
                        "DOWNLOAD_CHUNK_SIZE": 64 * 1024}.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
    try:
        from datasets import config as dconfig
    except ImportError:  # pragma: no cover - datasets is a requirement
        return
    datasets_home = home / "datasets"
    for name, value in {"HF_ENDPOINT": hub.url,
                        "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
                        "HF_HUB_OFFLINE": False, "HF_DATASETS_OFFLINE": False, "HF_UPDATE_DOWNLOAD_COUNTS": False,
                        "HF_CACHE_HOME": str(home), "HF_DATASETS_CACHE": datasets_home,
                        "HF_MODULES_CACHE": home / "modules",
                        "DOWNLOADED_DATASETS_PATH": datasets_home / "downloads",
                        "EXTRACTED_DATASETS_PATH": datasets_home / "downloads" / "extracted"}.items():
        if hasattr(dconfig, name):
            monkeypatch.setattr(dconfig, name, value)
