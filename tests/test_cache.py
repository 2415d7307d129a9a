"""The shared result cache (acm/cache.py): content keys, single flight, atomic entries, LRU with a cap, pins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from acm import cache
from acm.cache import (
    CacheStore,
    FileHasher,
    calibration_identity,
    folder_digest,
    make_key,
    model_identity,
)

REPO = Path(__file__).resolve().parent.parent


def _folder(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


# ----------------------------------------------------------------------------- identities


def test_code_version_is_a_stable_digest():
    assert cache.code_version() == cache.code_version()
    assert len(cache.code_version()) == 16 and int(cache.code_version(), 16) >= 0


def test_folder_digest_is_content_not_names_dates_or_metadata(tmp_path):
    files = {"config.json": b'{"a": 1}', "model.safetensors": b"\x00" * 1000, "sub/tok.json": b"{}"}
    a = _folder(tmp_path / "a", files)
    b = _folder(tmp_path / "b", files)
    os.utime(b / "model.safetensors", (1, 1))                      # another date, same bytes
    (b / ".cache").mkdir()
    (b / ".cache" / "junk").write_bytes(b"not part of the model")  # hidden: skipped
    assert folder_digest(a, FileHasher()) == folder_digest(b, FileHasher())
    # Same size, same mtime, one byte different: a different model (a header+size+mtime key would miss this).
    st = (b / "model.safetensors").stat()
    (b / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    os.utime(b / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert folder_digest(a, FileHasher()) != folder_digest(b, FileHasher())
    # A renamed file is another model too.
    c = _folder(tmp_path / "c", {"config.json": b'{"a": 1}', "model-1.safetensors": b"\x00" * 1000,
                                 "sub/tok.json": b"{}"})
    assert folder_digest(a, FileHasher()) != folder_digest(c, FileHasher())


def test_file_hashes_are_memoised_by_stat_and_survive_a_restart(tmp_path):
    folder = _folder(tmp_path / "m", {"w.safetensors": os.urandom(1 << 20), "config.json": b"{}"})
    memo = tmp_path / "store" / "file-hashes.json"
    h1 = FileHasher(memo)
    d1 = folder_digest(folder, h1)
    assert h1.bytes_hashed == (1 << 20) + 2
    folder_digest(folder, h1)
    assert h1.bytes_hashed == (1 << 20) + 2                 # second time: a stat, no read
    h2 = FileHasher(memo)                                   # a new process reads the memo file
    assert folder_digest(folder, h2) == d1 and h2.bytes_hashed == 0
    time.sleep(0.01)
    (folder / "config.json").write_bytes(b'{"x": 2}')       # rewritten: new mtime/size -> hashed again
    assert folder_digest(folder, h2) != d1 and h2.bytes_hashed == 8


def test_calibration_identity_is_the_texts_not_the_file_name(tmp_path):
    rows = "".join(json.dumps({"text": f"prompt {i}"}) + "\n" for i in range(5))
    (tmp_path / "mine.jsonl").write_text(rows)
    (tmp_path / "yours.jsonl").write_text(rows)
    (tmp_path / "other.jsonl").write_text(rows.replace("prompt 4", "prompt 5"))
    a = calibration_identity(str(tmp_path / "mine.jsonl"))
    assert a == calibration_identity(str(tmp_path / "yours.jsonl"))
    assert a != calibration_identity(str(tmp_path / "other.jsonl"))
    assert a == cache.texts_digest([f"prompt {i}" for i in range(5)])
    assert cache.texts_digest(["ab", "c"]) != cache.texts_digest(["a", "bc"])


def test_model_identity_local_and_hub(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "model", {"config.json": b"{}", "model.safetensors": b"w"})
    assert model_identity(str(folder)) == "local:" + folder_digest(folder, FileHasher())
    # A Hub id resolves to its commit (offline: from the local cache's ref), fetching only config.json.
    hub = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "models--org--tiny"
    _folder(repo / "snapshots" / sha, {"config.json": b"{}"})
    _folder(repo / "refs", {"main": sha.encode()})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(cache, "_HUB_MEMO", {})
    assert model_identity("org/tiny") == f"hub:org/tiny@{sha}"
    assert model_identity("org/not-cached") is None          # unknown offline: not cacheable
    assert model_identity(str(tmp_path / "missing" / "folder")) is None
    calls = []
    monkeypatch.setattr(cache, "_resolve_hub_commit", lambda repo, rev: calls.append(repo) or sha)
    assert [model_identity("org/other") for _ in range(3)] == [f"hub:org/other@{sha}"] * 3
    assert calls == ["org/other"]                                 # a crowd asks the Hub once a minute
    (tmp_path / "empty").mkdir()
    assert model_identity(str(tmp_path / "empty")) is None         # the analysis says what is wrong, not the cache


def test_keys_change_with_every_part():
    base = make_key("analysis", {"models": ["a"], "settings": {"bins": 64, "seed": 0}})
    assert base == make_key("analysis", {"settings": {"seed": 0, "bins": 64}, "models": ["a"]})   # order-free
    assert base != make_key("analysis", {"models": ["a"], "settings": {"bins": 64, "seed": 1}})
    assert base != make_key("merge", {"models": ["a"], "settings": {"bins": 64, "seed": 0}})
    assert make_key("merge", {"lambdas": [{"embed": 0.1}]}) != make_key("merge", {"lambdas": [{"embed": 0.1 + 1e-16 + 1e-17}]})


# ----------------------------------------------------------------------------- store


def _payload(folder: Path, size: int = 1000, tag: bytes = b"x") -> None:
    (folder / "blob").write_bytes(tag * size)


def test_concurrent_requests_for_a_new_key_compute_once(tmp_path):
    store = CacheStore(tmp_path / "c", 10**9)
    calls, start = [], threading.Barrier(6)

    def build(folder):
        calls.append(threading.get_ident())
        time.sleep(0.3)
        _payload(folder)
        return {"note": "built"}

    results = []

    def ask():
        start.wait()
        with store.get_or_create("analysis", "k" * 64, build) as e:
            results.append((e.hit, e.waited, (e.path / "blob").read_bytes()))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r[0] for r in results) == [False] + [True] * 5
    assert all(r[2] == b"x" * 1000 for r in results)
    assert sum(r[1] for r in results) >= 1                   # the others waited for the first
    meta = json.loads((store.entry_dir("analysis", "k" * 64) / "meta.json").read_text())
    assert meta["note"] == "built" and meta["bytes"] == 1000 and meta["compute_s"] >= 0.3


_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from acm.cache import CacheStore
store = CacheStore(sys.argv[2], 10**9)
def build(folder):
    with open(sys.argv[3], "a") as fh:
        fh.write("built\n")
    time.sleep(1.0)
    (folder / "blob").write_text("result")
with store.get_or_create("merge", "f" * 64, build) as e:
    print("hit" if e.hit else "miss", (e.path / "blob").read_text())
"""


def test_two_processes_asking_for_the_same_key_compute_it_once(tmp_path):
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO), str(tmp_path / "c"), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().count("built") == 1
    assert sorted(o[0] for o in outs) == ["hit", "miss"] and all(o[1] == "result" for o in outs)


def test_a_failed_build_stores_nothing_and_the_next_request_builds(tmp_path):
    store = CacheStore(tmp_path / "c", 10**9)

    def broken(folder):
        _payload(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.get_or_create("merge", "a" * 64, broken)
    assert store.lookup("merge", "a" * 64) is None
    assert list((tmp_path / "c" / "tmp").iterdir()) == []
    with store.get_or_create("merge", "a" * 64, _payload) as e:
        assert not e.hit and (e.path / "blob").is_file()


def test_an_entry_appears_only_when_complete(tmp_path):
    store = CacheStore(tmp_path / "c", 10**9)
    seen = {}

    def build(folder):
        _payload(folder)
        seen["visible_while_building"] = store.entry_dir("merge", "b" * 64).exists()
        seen["lookup_while_building"] = store.lookup("merge", "b" * 64)

    store.get_or_create("merge", "b" * 64, build).release()
    assert seen == {"visible_while_building": False, "lookup_while_building": None}
    assert store.lookup("merge", "b" * 64) is not None


def test_dead_builders_temp_folders_are_cleaned(tmp_path):
    store = CacheStore(tmp_path / "c", 10**9)
    dead = tmp_path / "c" / "tmp" / "x.dead"
    dead.mkdir()
    (dead / "owner").write_text(f"{__import__('socket').gethostname()} 999999999\n")
    alive = tmp_path / "c" / "tmp" / "y.alive"
    alive.mkdir()
    (alive / "owner").write_text(f"{__import__('socket').gethostname()} {os.getpid()}\n")
    store.evict()
    assert not dead.exists() and alive.exists()


def test_lru_eviction_keeps_the_store_under_its_cap(tmp_path):
    store = CacheStore(tmp_path / "c", 3500)
    keys = [f"{i}" * 64 for i in range(1, 6)]
    for i, key in enumerate(keys[:3]):
        store.get_or_create("analysis", key, _payload).release()
        os.utime(store.entry_dir("analysis", key) / "meta.json", (100 + i, 100 + i))
    store.lookup("analysis", keys[0]).release()              # used again: now the most recent
    store.get_or_create("analysis", keys[3], _payload).release()   # 4000 > 3500: the LRU one goes
    left = {k for *_, k in store.entries()}
    assert left == {keys[0], keys[2], keys[3]} and store.total_bytes() <= 3500
    assert store.stats["evicted"] == 1


def test_eviction_never_removes_an_entry_in_use(tmp_path):
    store = CacheStore(tmp_path / "c", 1500)
    held = store.get_or_create("merge", "1" * 64, _payload)   # a session keeps using it (pinned)
    other = CacheStore(tmp_path / "c", 1500)                   # another process's view of the store
    other.get_or_create("merge", "2" * 64, _payload).release()
    other.get_or_create("merge", "3" * 64, _payload).release()
    assert (held.path / "blob").read_bytes() == b"x" * 1000    # least recently used, but in use: kept
    assert store.lookup("merge", "2" * 64) is None             # the free one made room instead
    held.release()
    other.get_or_create("merge", "4" * 64, _payload).release()
    assert store.lookup("merge", "1" * 64) is None             # released: evictable again
    assert {k for *_, k in store.entries()} == {"4" * 64} and store.total_bytes() <= 1500


def test_pins_of_one_process_share_one_descriptor(tmp_path):
    store = CacheStore(tmp_path / "c", 10**9)
    store.get_or_create("merge", "5" * 64, _payload).release()
    pins = [store.lookup("merge", "5" * 64) for _ in range(50)]
    assert store.pinned("5" * 64) == 50 and len(store._pins) == 1
    for p in pins:
        p.release()
        p.release()                                            # twice is harmless
    assert store.pinned("5" * 64) == 0


def test_default_store_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV_DIR, raising=False)
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    assert cache.default_store() is None                       # library default: off
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "c"))
    monkeypatch.setenv(cache.ENV_MAX_GB, "0.5")
    store = cache.default_store()
    assert store is not None and store.max_bytes == 500_000_000 and store is cache.default_store()
    monkeypatch.setenv(cache.ENV_SWITCH, "off")
    assert cache.default_store() is None
    monkeypatch.delenv(cache.ENV_SWITCH)
    monkeypatch.setenv(cache.ENV_MAX_GB, "lots")
    from acm.errors import InputError

    with pytest.raises(InputError, match="ACM_CACHE_MAX_GB='lots' is not a number"):
        cache.default_store()


def test_describe_age():
    assert [cache.describe_age(s) for s in (0.2, 12, 130, 7200, 86400 * 3)] == ["1 s", "12 s", "2 min", "2 h",
                                                                                 "3 days"]
