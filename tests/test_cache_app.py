"""The shared result cache in the app: sessions reuse each other's identical analyses and merges, see it
said ("reused a result computed … ago"), never see another visitor's file names, and a reused merged
model is byte-identical to a fresh merge. Plus the queue admission line (full queue / place in line)."""

from __future__ import annotations

import datetime as real_datetime
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from acm import cache
from components import analysis, calibration, common, merge
from components import state as state_module
from components.state import SessionState, admission, queue_status
from tests.fixtures import make_pair, write_calibration

SMALL = {"samples": 6, "clusters": 2, "max_tokens": 32, "batch_size": 2}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base, fts = make_pair(tmp_path_factory.mktemp("models"), "llama", n_ft=1)
    return str(base), [str(f) for f in fts]


@pytest.fixture()
def shared(tmp_path, monkeypatch):
    """The shared cache on, in a fresh folder; uploads may come from tmp_path."""
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "shared-cache"))
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    monkeypatch.delenv(cache.ENV_MAX_GB, raising=False)
    monkeypatch.setenv(common.UPLOAD_ROOTS_ENV, str(tmp_path))
    return cache.default_store()


@pytest.fixture()
def sessions():
    made = []

    def new():
        made.append(SessionState())
        return made[-1]

    yield new
    for st in made:
        st.close()


def test_a_second_session_reuses_the_analysis_and_is_told_so(shared, pair, sessions, one_torch_thread):
    a, b = sessions(), sessions()
    first = analysis.run_analysis(a, pair[0], pair[1], **SMALL)
    second = analysis.run_analysis(b, pair[0], pair[1], **SMALL)
    assert first["shared"]["hit"] is False and second["shared"]["hit"] is True and second["cached"]
    assert second["analysis"].to_dict() == first["analysis"].to_dict()
    md = analysis.summary_markdown(second["analysis"], cached=True, seconds=second["seconds"],
                                   shared=second["shared"])
    assert "reused a result computed" in md and "ago" in md
    assert "reused" not in analysis.summary_markdown(first["analysis"], seconds=first["seconds"],
                                                     shared=first["shared"])
    # Any setting that changes the result is another key.
    third = analysis.run_analysis(sessions(), pair[0], pair[1], **{**SMALL, "seed": 1})
    assert third["shared"]["hit"] is False
    assert shared.stats["misses"] == 2


def test_without_the_cache_nothing_is_shared(pair, sessions, monkeypatch, one_torch_thread):
    monkeypatch.delenv(cache.ENV_DIR, raising=False)
    out = analysis.run_analysis(sessions(), pair[0], pair[1], **SMALL)
    assert out["shared"] is None and not out["cached"]


def test_uploaded_calibration_is_shared_by_content_and_never_shows_another_visitors_name(
        shared, pair, sessions, tmp_path, one_torch_thread):
    mine = write_calibration(tmp_path / "alice-private-notes.jsonl", n=12)
    yours = tmp_path / "bob.jsonl"
    yours.write_bytes(mine.read_bytes())
    other = write_calibration(tmp_path / "carol.jsonl", n=13)
    kw = {"cal_mode": calibration.UPLOAD, **SMALL}
    a = analysis.run_analysis(sessions(), pair[0], pair[1], cal_upload=str(mine), **kw)
    b = analysis.run_analysis(sessions(), pair[0], pair[1], cal_upload=str(yours), **kw)
    c = analysis.run_analysis(sessions(), pair[0], pair[1], cal_upload=str(other), **kw)
    assert (a["shared"]["hit"], b["shared"]["hit"], c["shared"]["hit"]) == (False, True, False)
    assert b["analysis"].models[0].nmi == a["analysis"].models[0].nmi
    text_b = b["analysis"].to_json()
    assert "alice" not in text_b and "bob.jsonl" in b["analysis"].provenance["calibration"]["source"]
    assert "alice" in a["analysis"].provenance["calibration"]["source"]      # the first visitor's own view


class _FrozenDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 11, 25, 12, 0, 0, tzinfo=tz)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_reused_merge_is_byte_identical_to_a_fresh_merge(shared, pair, sessions, tmp_path, monkeypatch,
                                                           one_torch_thread):
    import acm.merging.export
    from acm.merging.engine import MergeOptions, merge_models
    from acm.rules.coefficients import compute

    # The recipe records when a merge was made; pin the clock so "when" is not the difference.
    monkeypatch.setattr(acm.merging.export, "_dt", SimpleNamespace(datetime=_FrozenDatetime,
                                                           timezone=real_datetime.timezone))
    a, b = sessions(), sessions()
    for st in (a, b):
        analysis.run_analysis(st, pair[0], pair[1], **SMALL)
    kw = {"method": "dare_ties", "mode": merge.ACM, "t": 0.7, "alpha": 0.9, "density": 0.6, "drop_rate": 0.2, "seed": 7}
    ma = merge.run_merge(a, pair[0], pair[1], **kw)
    mb = merge.run_merge(b, pair[0], pair[1], **kw)
    assert ma.cache["hit"] is False and mb.cache["hit"] is True
    assert mb.out_dir == ma.out_dir and mb.model is ma.model            # one folder, one loaded copy
    assert "reused a merge computed" in merge.summary_markdown(mb)
    assert mb.label == "#1 ACM-DARE-TIES t=0.7"                         # still this session's merge #1

    # A fresh merge, without any cache, of the same inputs and settings into a folder of the same name
    # (the paper's rule: λ/N per task vector and the recipe entry from acm.rules.coefficients.compute; no α).
    fresh = tmp_path / "fresh" / ma.out_dir.name
    options = MergeOptions(method="dare_ties", alpha=1.0, density=0.6, drop_rate=0.2, seed=7)
    coef = compute(a.analysis, "acm", 0.7)
    merge_models(pair[0], pair[1], fresh, options, lambdas=coef.weights(), acm=coef.entry(), show_progress=False)
    cached_files, fresh_files = _files(mb.out_dir), _files(fresh)
    assert sorted(cached_files) == sorted(fresh_files) and any(n.endswith(".safetensors") for n in fresh_files)
    for name in fresh_files:
        assert cached_files[name] == fresh_files[name], name
    # Another seed is another merge.
    assert merge.run_merge(a, pair[0], pair[1], **{**kw, "seed": 8}).cache["hit"] is False


def test_a_cached_merge_in_use_is_never_evicted(shared, pair, sessions, tmp_path, monkeypatch,
                                               one_torch_thread):
    monkeypatch.setenv(cache.ENV_MAX_GB, "0.000001")         # 1 kB: every merge is over the cap
    a, b = sessions(), sessions()
    ma = merge.run_merge(a, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.5)
    merge.run_merge(b, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.6)
    merge.run_merge(b, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.7)
    assert (ma.out_dir / "config.json").is_file()              # session a still uses it: kept
    store = cache.default_store()
    assert store.pinned(ma.cache["key"]) == 1
    a.close()                                                  # the session ends: the pin goes
    assert store.pinned(ma.cache["key"]) == 0
    merge.run_merge(b, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.8)
    assert not ma.out_dir.exists()


def test_a_session_replacing_its_merge_releases_the_old_one(shared, pair, sessions, one_torch_thread):
    st = sessions()
    m1 = merge.run_merge(st, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.5)
    store = cache.default_store()
    assert store.pinned(m1.cache["key"]) == 1
    merge.run_merge(st, pair[0], pair[1], method="task_arithmetic", mode=merge.PLAIN, alpha=0.4)
    assert store.pinned(m1.cache["key"]) == 0 and m1.out_dir.is_dir()   # released, not deleted


def test_a_broken_cache_disk_never_costs_the_visitor_their_result(shared, pair, sessions, monkeypatch,
                                                                   one_torch_thread):
    import errno

    def no_space(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "_tree_bytes", no_space)           # storing any entry fails after its build
    st = sessions()
    out = analysis.run_analysis(st, pair[0], pair[1], **SMALL)
    assert out["shared"] is None and st.analysis is out["analysis"] and len(out["analysis"].models) == 1
    merged = merge.run_merge(st, pair[0], pair[1], method="task_arithmetic", mode=merge.ACM, t=2.0, alpha=1.0)
    assert merged.cache is None and merged.model is not None
    assert st.workspace in merged.out_dir.parents                 # merged into the session's own folder
    assert shared.entries() == []


# ----------------------------------------------------------------------------- queue admission


def _demo(total=0, max_size=32, waiting=0, running=0, avg=None):
    class Fn:
        concurrency_id = "heavy"

    fn = Fn()
    group = SimpleNamespace(queue=[object()] * waiting, current_concurrency=running, concurrency_limit=1)

    class Q:
        def __len__(self):
            return total

    q = Q()
    q.max_size = max_size
    q.event_queue_per_concurrency_id = {"heavy": group}
    q.process_time_per_fn = {fn: SimpleNamespace(avg_time=avg, count=3)} if avg else {}
    return SimpleNamespace(_queue=q)


def test_queue_status_and_admission_lines():
    assert admission(_demo(), "the analysis") is None                                   # nobody ahead
    kind, line = admission(_demo(total=3, waiting=3, running=1, avg=2.0), "the analysis")
    assert kind == "info" and "number 4 in line" in line and "about 8 s" in line
    kind, line = admission(_demo(total=31, waiting=30, running=1, avg=4.0), "the merge")
    assert kind == "refuse" and "queue is full" in line and "the merge was not started" in line
    assert "try again in 2 min" in line                                                 # 31 jobs × 4 s
    st = queue_status(SimpleNamespace())                                                # no queue: unknown
    assert st["eta_s"] is None and admission(SimpleNamespace(), "x") is None


def test_the_heavy_buttons_check_the_queue_first_and_show_where_you_stand():
    import app

    demo = app.build_app(prewarm=False)
    deps = {d.api_name: d for d in demo.fns.values() if d.api_name}
    for name in ("analyse_heavy", "merge_heavy"):
        assert deps[name].concurrency_id == "heavy" and deps[name].concurrency_limit == 1
        assert deps[name].show_progress != "hidden"          # Gradio's queue position + ETA are shown
    # The page's Analyse asks the caches first (no queue); only a miss is checked against the queue.
    gates = [d for d in demo.fns.values() if getattr(d.fn, "__name__", "") in ("route_analyse", "route_merge")]
    assert len(gates) == 2 and all(not g.queue for g in gates)
    summary_id = demo.ui.analysis.summary._id
    for name in ("analyse", "analyse_heavy"):
        assert summary_id in [getattr(b, "_id", b) for b in deps[name].show_progress_on or []]
    assert deps["analyse"].concurrency_id != "heavy" and deps["analyse"].api_visibility == "public"


def test_app_turns_the_cache_on_with_a_default_folder(monkeypatch, tmp_path):
    import os

    import app

    # configure_cache writes os.environ itself, and monkeypatch.delenv of an unset variable records nothing to
    # undo: without this, ACM_CACHE=off leaked into every later test of the run (a browser test's app then
    # started with the cache off).
    for name in (cache.ENV_DIR, cache.ENV_SWITCH):
        monkeypatch.setitem(os.environ, name, os.environ.get(name, ""))
    monkeypatch.delenv(cache.ENV_DIR, raising=False)
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    app.configure_cache(None)
    assert Path(__import__("os").environ[cache.ENV_DIR]) == tmp_path / "acm-merge-explorer"
    app.configure_cache(str(tmp_path / "elsewhere"))
    assert __import__("os").environ[cache.ENV_DIR] == str(tmp_path / "elsewhere")
    app.configure_cache(None, enabled=False)
    assert cache.default_store() is None
    args = app.parse_args(["--no-cache", "--cache-dir", "/x"])
    assert args.no_cache and args.cache_dir == "/x"


# ----------------------------------------------------------------------------- over HTTP


def test_two_gradio_client_sessions_share_one_analysis_over_http(tmp_path, monkeypatch):
    from gradio_client import Client

    from tests.test_app_e2e import demo_assets_dir, free_port

    monkeypatch.setenv("ACM_ASSETS_DIR", str(demo_assets_dir(tmp_path)))
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "shared-cache"))
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    import app

    demo = app.create_app(prewarm=False)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **app.launch_kwargs())
    try:
        a, b = Client(url, verbose=False), Client(url, verbose=False)
        ra = a.predict(samples=4, api_name="/analyse")
        rb = b.predict(samples=4, api_name="/analyse")
        assert "reused" not in ra[0] and "reused a result computed" in rb[0]
        an_a, an_b = json.loads(Path(ra[5]).read_text()), json.loads(Path(rb[5]).read_text())
        assert an_a == an_b                                               # the same result, byte for byte
        pa = a.predict(method="ties", mode="ACM (per-layer λ)", t=2.0, alpha=0.7, density=0.7, api_name="/merge")[2]
        pb = b.predict(method="ties", mode="ACM (per-layer λ)", t=2.0, alpha=0.7, density=0.7, api_name="/merge")[2]
        assert pa["out_dir"] == pb["out_dir"] and pa["label"] == pb["label"] == "#1 ACM-TIES t=2"
        assert not pa["cache"]["hit"] and pb["cache"]["hit"]
    finally:
        demo.close()


# ----------------------------------------------------------------------------- the light path (issue 21, item 5)


@pytest.fixture()
def blocked_app(tmp_path, monkeypatch):
    """The app on loopback with the shared cache on, and a merge that holds the heavy slot until released:
    yields (url, release event, analyses computed so far, entered event)."""
    import threading

    import acm.activations.analysis as acm_analysis
    from tests.test_app_e2e import demo_assets_dir, free_port

    monkeypatch.setenv("ACM_ASSETS_DIR", str(demo_assets_dir(tmp_path)))
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "shared-cache"))
    monkeypatch.delenv(cache.ENV_SWITCH, raising=False)
    release, entered, computed = threading.Event(), threading.Event(), []
    real_merge, real_analyze = merge.run_merge, acm_analysis.analyze

    def blocking_merge(*args, **kwargs):
        if kwargs.get("compute", True):              # the merge itself, not the light path's cache look-up
            entered.set()
            assert release.wait(120), "the test never released the heavy slot"
        return real_merge(*args, **kwargs)

    def counted_analyze(*args, **kwargs):
        computed.append(kwargs.get("samples"))
        return real_analyze(*args, **kwargs)

    monkeypatch.setattr(merge, "run_merge", blocking_merge)
    monkeypatch.setattr(acm_analysis, "analyze", counted_analyze)
    import app

    demo = app.create_app(prewarm=False)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **app.launch_kwargs())
    try:
        yield url, release, computed, entered
    finally:
        release.set()
        demo.close()


def _occupy_heavy_slot(url, entered):
    """A merge that blocks inside the heavy slot (it runs in Gradio's "heavy" group)."""
    from gradio_client import Client

    job = Client(url, verbose=False).submit(method="task_arithmetic", mode="plain (α everywhere)", alpha=0.5,
                                            api_name="/merge")
    assert entered.wait(60) and not job.done(), "the blocking merge never started"
    return job


def test_a_cached_analysis_is_answered_while_the_heavy_slot_is_busy_and_a_cold_one_waits(blocked_app):
    import time

    from gradio_client import Client

    url, release, computed, entered = blocked_app
    warm = Client(url, verbose=False).predict(samples=4, api_name="/analyse")    # computed once, now cached
    assert computed == [4] and "reused" not in warm[0]
    merge_job = _occupy_heavy_slot(url, entered)
    t0 = time.monotonic()
    hit = Client(url, verbose=False).submit(samples=4, api_name="/analyse").result(timeout=30)   # another visitor
    took = time.monotonic() - t0
    assert not release.is_set() and not merge_job.done()                         # the slot was busy throughout
    assert "reused a result computed" in hit[0], hit[0]
    print(f"\n[light path] a cache hit answered in {took:.2f} s while the heavy slot was busy")
    assert json.loads(Path(hit[5]).read_text()) == json.loads(Path(warm[5]).read_text())
    cold = Client(url, verbose=False).submit(samples=6, api_name="/analyse")     # not cached: needs the slot
    time.sleep(2.0)
    assert not cold.done() and computed == [4]                                   # waiting, nothing computed
    release.set()
    out = cold.result(timeout=120)
    assert "reused" not in out[0] and computed == [4, 6]
    merge_job.result(timeout=120)


def test_identical_cold_analyses_at_once_compute_once(blocked_app):
    from gradio_client import Client

    url, release, computed, entered = blocked_app
    merge_job = _occupy_heavy_slot(url, entered)                  # both requests arrive while the slot is busy
    jobs = [Client(url, verbose=False).submit(samples=5, seed=3, api_name="/analyse") for _ in range(2)]
    import time

    time.sleep(1.0)
    release.set()
    outs = [j.result(timeout=120) for j in jobs]
    assert computed == [5]                                                       # one computation for both
    assert sorted("reused a result computed" in o[0] for o in outs) == [False, True]
    assert json.loads(Path(outs[0][5]).read_text()) == json.loads(Path(outs[1][5]).read_text())
    merge_job.result(timeout=120)


def test_the_page_routes_a_cached_analysis_to_the_light_event_and_a_miss_to_the_heavy_one(
        shared, pair, sessions, one_torch_thread):
    import gradio as gr

    import app

    demo = app.build_app(prewarm=False)
    route = next(d for d in demo.fns.values() if getattr(d.fn, "__name__", "") == "route_analyse")
    hit, miss = route.outputs
    light = next(d for d in demo.fns.values() if d.api_name == "analyse")
    heavy = next(d for d in demo.fns.values() if d.api_name == "analyse_heavy")
    assert [t[0] for t in light.targets] == [hit._id] and [t[0] for t in heavy.targets] == [miss._id]
    ui = demo.ui
    values = {ui.models.base: pair[0], ui.models.fts: pair[1], ui.calibration.samples: SMALL["samples"],
              ui.calibration.clusters: SMALL["clusters"], ui.calibration.max_tokens: SMALL["max_tokens"],
              ui.analysis.batch_size: SMALL["batch_size"], hit: 0, miss: 3}
    args = [values.get(c, getattr(c, "value", None)) for c in route.inputs[1:]]
    first = route.fn(sessions(), *args)
    assert first[0] is gr.skip() or first[0] == gr.skip()
    assert first[1] == 4                                     # a miss: the heavy event's trigger changes
    analysis.run_analysis(sessions(), pair[0], pair[1], **SMALL)          # another visitor computes it
    second = route.fn(sessions(), *args)
    assert second[0] == 1 and second[1] == gr.skip()         # now a hit: the light event draws it


def test_a_cached_merge_is_served_while_the_heavy_slot_is_busy(blocked_app):
    from gradio_client import Client

    url, release, computed, entered = blocked_app
    plain = dict(method="task_arithmetic", mode="plain (α everywhere)", api_name="/merge")
    release.set()
    first = Client(url, verbose=False).predict(alpha=0.3, **plain)                # merged and loaded once
    assert not first[2]["cache"]["hit"]
    release.clear()
    entered.clear()
    merge_job = _occupy_heavy_slot(url, entered)                                   # another merge holds the slot
    second = Client(url, verbose=False).submit(alpha=0.3, **plain).result(timeout=30)
    assert not release.is_set() and not merge_job.done()
    assert second[2]["cache"]["hit"] and second[2]["out_dir"] == first[2]["out_dir"]
    assert "reused a merge computed" in second[0] and second[2]["label"] == "#1 TA α=0.3"
    release.set()
    merge_job.result(timeout=120)


class _CountingSlot(state_module.HeavySlot):
    """The heavy slot, recording which threads took it."""

    def __init__(self):
        super().__init__()
        self.takers: list[str] = []

    def acquire(self, progress=None):
        super().acquire(progress)
        self.takers.append(threading.current_thread().name)


def _serve_together(n: int, heavy, monkeypatch, store: dict, key: str = "same") -> tuple[list, _CountingSlot]:
    """``n`` threads ask serve_light for one result at once (a miss); returns (answers, the slot used)."""
    slot = _CountingSlot()
    monkeypatch.setattr(state_module, "HEAVY_SLOT", slot)
    answers: list = [None] * n

    def ask(i: int) -> None:
        try:
            answers[i] = state_module.serve_light(lambda: store.get("result"), heavy, lambda r: ("drawn", r),
                                                  request_key=key)
        except RuntimeError as exc:
            answers[i] = ("failed", str(exc))

    threads = [threading.Thread(target=ask, args=(i,), name=f"visitor-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers, slot


def _users(key: str) -> int:
    with state_module.SAME_REQUESTS._guard:
        record = state_module.SAME_REQUESTS._locks.get(key)
        return record[1] if record else 0


def _wait_for_users(key: str, n: int, timeout: float = 20.0) -> None:
    """Until ``n`` requests for ``key`` have arrived (the computing one included)."""
    import time

    end = time.monotonic() + timeout
    while _users(key) < n:
        assert time.monotonic() < end, f"only {_users(key)} of {n} identical requests arrived"
        time.sleep(0.01)


def test_identical_light_misses_compute_once_and_the_others_never_queue_for_the_heavy_slot(monkeypatch):
    """Five identical requests miss together: the first computes in the heavy slot, the other four wait for
    it (not for the slot, where they could stand behind someone else's merge) and draw its result."""
    store: dict = {}
    computed = []

    def heavy():
        _wait_for_users("same", 5)                                   # every identical request has arrived
        computed.append(threading.current_thread().name)
        store["result"] = "analysis"
        return ("computed", "analysis")

    answers, slot = _serve_together(5, heavy, monkeypatch, store)
    assert len(computed) == 1 and slot.takers == computed          # only the one that computed took the slot
    assert sorted(answers) == [("computed", "analysis")] + [("drawn", "analysis")] * 4
    assert _users("same") == 0 and "same" not in state_module.SAME_REQUESTS._locks     # nothing left behind


def test_when_the_first_identical_request_fails_the_next_one_computes_it(monkeypatch):
    store: dict = {}
    calls = []

    def heavy():
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            _wait_for_users("same", 2)
            raise RuntimeError("out of memory")
        store["result"] = "analysis"
        return ("computed", "analysis")

    answers, slot = _serve_together(2, heavy, monkeypatch, store)
    assert sorted(answers) == [("computed", "analysis"), ("failed", "out of memory")]
    assert len(calls) == 2 and slot.takers == calls


def test_different_requests_do_not_wait_for_each_other():
    """The request key separates them: a request for another analysis does not wait for this one's key."""
    answer: list = []
    with state_module.SAME_REQUESTS.first_or_wait("A") as first:           # "A" is being computed
        assert first
        other = threading.Thread(target=lambda: answer.append(state_module.serve_light(
            lambda: None, lambda: "computed B", lambda r: r, request_key="B")))
        other.start()
        other.join(10)
    assert answer == ["computed B"]                                          # not held up by "A"
    assert not state_module.SAME_REQUESTS._locks


def test_a_view_memo_computes_an_entry_once_for_a_crowd_asking_at_once():
    """Twelve sessions that just got one fresh analysis draw the same view at the same instant: computed
    once, the others wait for it; least recently used entries go first; a failed computation is retried."""
    import time

    memo, calls, answers = state_module.SharedMemo(2), [], []

    def compute():
        calls.append(1)
        time.sleep(0.2)                       # long enough for all twelve to arrive while it runs
        return "figure"

    threads = [threading.Thread(target=lambda: answers.append(memo.get(("key", 0.7), compute))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == ["figure"] * 12 and len(calls) == 1
    memo.get("b", lambda: "B")
    memo.get(("key", 0.7), compute)               # used again: now the most recent
    memo.get("c", lambda: "C")                     # evicts "b", the least recently used
    assert len(calls) == 1 and memo.get("b", lambda: "B again") == "B again"
    with pytest.raises(RuntimeError):
        memo.get("d", lambda: (_ for _ in ()).throw(RuntimeError("broken")))
    assert memo.get("d", lambda: "D") == "D"       # nothing stored by the failure
