"""A bounded load test of the app: N simultaneous visitors on loopback, each pressing the usual buttons.

Starts ``python app.py`` on 127.0.0.1 (a free port, a fresh shared-cache folder unless ``--cache-dir``),
then runs N sessions (N ≤ 64), each in its own process (``--threads``: threads of this one process). Each
session, like a visitor of a Space, first **opens the page** (the app's config and its page-load events,
as a browser does; timed as ``open``, before the crowd is released), then all at once: **Analyse** on the
bundled defaults → three **coefficient** redraws (t = −1, 0.7, 2) → one **chat** message. Reports
per-endpoint latency percentiles, queue-full rejections, other errors, cache hits (from the Analyse
summary) and the app's RSS (idle and peak, polled from /proc). The run stops by itself: every call has a
deadline (``--time-limit`` for the whole run), and the app is terminated at the end whatever happened.
Only 127.0.0.1 is contacted.

How a session talks to the app — as the page does, so that what is timed is the app, not the harness
(the clients share the app's 2 cores here, where a Space's visitors bring their own machines):

- queued events (Analyse, chat) through ``gradio_client`` (join the queue, read the event stream);
- unqueued events (the page-load events, the coefficient redraws) as one POST to ``run/predict`` on the
  session's keep-alive connection, as the page posts them. ``gradio_client`` would route them through the
  queue and its event stream on a new connection per call (~50 ms of client CPU each);
- opening the page is also when Gradio builds the session's state (a config entry for each of the app's
  ~275 components, ~0.1 s of the app's CPU), so the first button press does not pay for it, as in a browser.

    python -m benchmarks.load --sessions 12
    python -m benchmarks.load --sessions 40
    python -m benchmarks.load --sessions 12 --no-cache      # the app without the shared cache
    python -m benchmarks.load --quick                        # 3 sessions, small chat (CI smoke)
    python -m benchmarks.load --sessions 12 --warm           # the defaults already in the shared cache

"Idle RSS" is the app's RSS after a warm-up visitor (a different analysis, a chat message: imports and
source models loaded, shared cache still cold for the defaults) — the memory a Space carries anyway.
``--warm``: the warm-up visitor also analyses the defaults, so every session's Analyse is a cache hit
(a Space that has been up a while); without it the sessions' first Analyse is one computation that the
others wait for ("cold"). The result records the default analysis' own compute time from the cache
entry (``analysis_compute_s``), the yardstick of the cold target (one analysis + 1 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MB,
    ROOT,
    PeakPoller,
    machine_info,
    md_table,
    proc_status,
    save_result,
)

MAX_SESSIONS = 64
ENDPOINTS = ("open", "analyse", "coefficients", "chat")
REDRAW_TS = (-1.0, 0.7, 2.0)          # the paper's rule (the default) takes t in [-3, 3]
CHAT_MESSAGE = "What is 27 + 58?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def start_app(port: int, env: dict[str, str], log_path: Path, root: Path = ROOT) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--no-prewarm"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/config", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the app was not ready after {timeout:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    """Terminate the app (its own process group), then kill it if it does not go."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=10)


def classify(exc: BaseException) -> str:
    """'rejected' for an explicit queue-full answer, 'timeout' past the deadline, else 'error'."""
    from gradio_client.utils import QueueError

    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, QueueError) or "queue is full" in text.lower() or "busy" in text.lower():
        return "rejected"
    if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
        return "timeout"
    return "error"


class Session:
    """One visitor: Analyse → 3 coefficient redraws → 1 chat message, each call timed. ``run()`` returns a
    plain dict (times, outcome, messages, cache hit), so a session can run in a thread or in its own process."""

    def __init__(self, idx: int, url: str, start: Any, deadline: float, chat_tokens: int | None,
                 analyse_kwargs: dict, chat: bool = True):
        self.idx, self.url, self.start_barrier, self.deadline = idx, url, start, deadline
        self.chat_tokens, self.analyse_kwargs, self.chat = chat_tokens, analyse_kwargs, chat
        self.times: dict[str, list[float]] = {e: [] for e in ENDPOINTS}
        self.outcome: dict[str, str] = {}
        self.messages: list[str] = []
        self.cache_hit: bool | None = None

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("run deadline reached")
        return left

    def _call(self, endpoint: str, fn) -> Any:
        self._left()
        t0 = time.perf_counter()
        out = fn()
        self.times[endpoint].append(time.perf_counter() - t0)
        return out

    def result(self) -> dict:
        return {"times": self.times, "outcome": self.outcome, "messages": self.messages, "cache_hit": self.cache_hit}

    def run(self) -> dict:
        import httpx

        with httpx.Client() as http:      # a browser tab's one keep-alive connection (plain HTTP, loopback)
            self._visit(http)
        return self.result()

    def _visit(self, http: Any) -> None:
        from gradio_client import Client

        client = None
        try:
            client = Client(self.url, verbose=False, analytics_enabled=False, download_files=False, ssl_verify=False)
        except BaseException as exc:  # noqa: BLE001 - every connection failure is classified and reported
            self.outcome["connect"] = classify(exc)
            self.messages.append(f"connect: {type(exc).__name__}: {exc}")
        if client is not None:
            try:
                self._call("open", lambda: open_page(client, http, self._left()))
            except BaseException as exc:  # noqa: BLE001 - counted like any other step's failure
                self.outcome["open"] = classify(exc)
                self.messages.append(f"open: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                client = None
        try:
            self.start_barrier.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            pass
        if client is None:
            return
        step = "analyse"
        try:
            out = self._call("analyse", lambda: client.submit(api_name="/analyse", **self.analyse_kwargs)
                             .result(timeout=self._left()))
            self.cache_hit = "reused" in str(out[0]).lower()
            step = "coefficients"
            redraw = unqueued_event(client, "coefficients")      # inputs: state, t, alpha, clip min, clip max, …
            for t in REDRAW_TS:
                self._call("coefficients", lambda t=t: post_unqueued(
                    client, http, redraw, {1: t, 2: 0.7, 3: "", 4: ""}, self._left()))
            step = "chat"
            if not self.chat:
                self.outcome["done"] = "ok"
                return
            kwargs = {"message": CHAT_MESSAGE}
            if self.chat_tokens:
                kwargs["max_new_tokens"] = self.chat_tokens
            self._call("chat", lambda: client.submit(api_name="/chat", **kwargs).result(timeout=self._left()))
            self.outcome["done"] = "ok"
        except BaseException as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            self.outcome[step] = classify(exc)
            self.messages.append(f"{step}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        finally:
            with contextlib.suppress(Exception):
                client.close()


def post_unqueued(client: Any, http: Any, dep: dict, overrides: dict[int, Any], timeout: float) -> Any:
    """Call an unqueued event (``queue=False``) the way the page does: one POST to ``run/predict`` with
    the session's hash and every input's value (the component's default unless in ``overrides``, by
    position), on the session's one keep-alive connection (``http``, an ``httpx.Client``). ``gradio_client``
    routes such events through the queue and its event stream instead, on a new connection (and TLS
    context) per call, which costs the client more than the app. Returns the output data."""
    values = {c["id"]: c.get("props", {}).get("value") for c in client.config.get("components", [])}
    data = [overrides.get(k, values.get(i)) for k, i in enumerate(dep.get("inputs", []))]
    body = {"data": data, "fn_index": dep["id"], "session_hash": client.session_hash,
            "trigger_id": (dep.get("targets") or [[None]])[0][0], "event_data": None}
    r = http.post(client.src_prefixed + "run/predict", json=body, headers=client.headers, timeout=timeout)
    r.raise_for_status()
    return r.json().get("data")


def unqueued_event(client: Any, api_name: str) -> dict:
    """The page's description (config) of the unqueued event named ``api_name``."""
    for dep in client.config.get("dependencies", []):
        if dep.get("api_name") == api_name and dep.get("queue") is False:
            return dep
    raise RuntimeError(f"the app has no unqueued event named {api_name!r}")


def open_page(client: Any, http: Any, timeout: float) -> int:
    """What a browser does when the page opens, before any button: the app's page-load events (``demo.load``,
    not queued: the device line and the Check of the preselected models) for this session. This is also when
    Gradio builds the session's state (a config entry per component, ~0.1 s of the app's CPU with ~275
    components), so — as in a browser — the crowd's first button press does not pay for it. Returns the
    number of load events run."""
    ran = 0
    for dep in client.config.get("dependencies", []):
        if dep.get("backend_fn", True) and dep.get("queue") is False and \
                any(len(t) == 2 and t[1] == "load" for t in dep.get("targets", [])):
            post_unqueued(client, http, dep, {}, timeout)
            ran += 1
    return ran


def _session_process(results: Any, idx: int, *args: Any) -> None:
    """A process's one session (spawned: its own interpreter, so the clients do not share one GIL)."""
    try:
        results.put((idx, Session(idx, *args).run()))
    except BaseException as exc:  # noqa: BLE001 - reported as the session's outcome, never lost
        results.put((idx, _no_result(f"process: {type(exc).__name__}: {exc}", {"connect": "error"})))


def run_sessions(sessions: int, url: str, deadline: float, chat_tokens: int | None, chat: bool,
                 processes: bool) -> list[dict]:
    """Run ``sessions`` visitors released together by a barrier, each in a thread or (``processes``) in its
    own process; returns their results (a session that did not finish in time has an empty result)."""
    grace = 15.0
    if not processes:
        barrier = threading.Barrier(sessions)
        out: list[dict | None] = [None] * sessions

        def one(i: int) -> None:
            out[i] = Session(i, url, barrier, deadline, chat_tokens, {}, chat).run()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + grace)
        return [r or _unfinished() for r in out]
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(sessions), ctx.Queue()
    procs = [ctx.Process(target=_session_process, args=(results, i, url, barrier, deadline, chat_tokens, {}, chat),
                         daemon=True) for i in range(sessions)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    while len(got) < sessions:
        try:
            idx, res = results.get(timeout=max(0.1, deadline - time.monotonic() + grace))
        except queue.Empty:
            break
        got[idx] = res
    for p in procs:
        p.join(timeout=1)
        if p.is_alive():
            p.kill()
    return [got.get(i) or _unfinished() for i in range(sessions)]


def _unfinished() -> dict:
    return _no_result("session still running at the deadline", unfinished=True)


def _no_result(message: str, outcome: dict[str, str] | None = None, **extra: Any) -> dict:
    """A session's result when it timed nothing: why (``message``) and how it ended (``outcome``)."""
    return {"times": {e: [] for e in ENDPOINTS}, "outcome": outcome or {}, "messages": [message], "cache_hit": None,
            **extra}


def warm_up(url: str, chat_tokens: int | None, defaults: bool = False) -> float:
    """A first visitor with another analysis key (4 samples): imports and models loaded, defaults not cached
    (``defaults``: then the defaults too, so the sessions' Analyse are all cache hits). Returns the time
    (epoch s) from which the defaults' analysis may have been stored."""
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False, download_files=False, ssl_verify=False)
    try:
        client.predict(samples=4, api_name="/analyse")
        since = time.time()
        if defaults:
            client.predict(api_name="/analyse")
        kwargs = {"message": "What is 1 + 2?"}
        if chat_tokens:
            kwargs["max_new_tokens"] = chat_tokens
        client.predict(api_name="/chat", **kwargs)
    finally:
        client.close()
    return since


def analysis_compute_s(cache_dir: Path, since: float) -> float | None:
    """How long the analysis stored after ``since`` (epoch s) took to compute (its cache entry's meta)."""
    import json

    times = []
    for meta in (cache_dir / "analysis").glob("*/meta.json"):
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if float(info.get("created", 0)) >= since and info.get("compute_s") is not None:
            times.append(float(info["compute_s"]))
    return max(times) if times else None


def run(sessions: int = 12, *, time_limit: float = 300.0, cache: bool = True, cache_dir: str | None = None,
        chat_tokens: int | None = None, chat: bool = True, startup_timeout: float = 120.0, out: str | None = None,
        app_root: str | None = None, warm: bool = False, processes: bool = True, log=print) -> dict:
    """Start the app, run ``sessions`` visitors at once, stop the app; return the measurements."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise SystemExit(f"--sessions must be in 1..{MAX_SESSIONS}, got {sessions}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="acm-load-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(work / "gradio"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if cache:
        env["ACM_CACHE_DIR"] = cache_dir or str(work / "cache")
        env.pop("ACM_CACHE", None)
    else:
        env["ACM_CACHE"] = "off"
    machine = machine_info()
    load_before = os.getloadavg()
    log(f"[load] starting the app on {url} (cache: {env.get('ACM_CACHE_DIR', 'off')})")
    root = Path(app_root).resolve() if app_root else ROOT
    proc = start_app(port, env, work / "app.log", root)
    result: dict[str, Any] = {"sessions": sessions, "cache": cache, "chat": chat, "app_root": str(root), "time_limit_s": time_limit,
                              "machine": machine, "loadavg_before": load_before, "url": url, "warm": warm and cache,
                              "clients": "processes" if processes else "threads"}
    try:
        result["startup_s"] = wait_ready(url, proc, startup_timeout)
        result["rss_startup_mib"] = proc_status(proc.pid).get("VmRSS", 0) / MB
        t0 = time.perf_counter()
        t_defaults = warm_up(url, chat_tokens, defaults=warm and cache)
        result["warmup_s"] = time.perf_counter() - t0
        time.sleep(1.0)
        result["rss_idle_mib"] = proc_status(proc.pid).get("VmRSS", 0) / MB
        deadline = time.monotonic() + time_limit
        log(f"[load] {sessions} sessions ({'warm' if result['warm'] else 'cold'} cache, "
            f"{'a process each' if processes else 'threads of one process'}): analyse → "
            f"{len(REDRAW_TS)} × coefficients → chat")
        t_sessions = time.time()
        with PeakPoller(proc.pid, interval=0.05) as peak:
            t_run = time.perf_counter()
            done = run_sessions(sessions, url, deadline, chat_tokens, chat, processes)
            result["run_s"] = time.perf_counter() - t_run
        result["loadavg_after"] = os.getloadavg()
        result["rss_peak_mib"] = peak.peak_rss / MB
        result["rss_anon_peak_mib"] = peak.peak_anon / MB
        result["still_running"] = sum(bool(d.get("unfinished")) for d in done)
        rows = []
        for e in ENDPOINTS:
            times = [t for d in done for t in d["times"][e]]
            outcomes = [d["outcome"].get(e) for d in done]
            rows.append({"endpoint": e, "calls": len(times),
                         "median_s": statistics.median(times) if times else None,
                         "p90_s": percentile(times, 90), "p95_s": percentile(times, 95),
                         "max_s": max(times) if times else None,
                         "rejected": outcomes.count("rejected"), "errors": outcomes.count("error"),
                         "timeouts": outcomes.count("timeout")})
        result["rows"] = rows
        result["completed"] = sum(d["outcome"].get("done") == "ok" for d in done)
        result["connect_failures"] = sum("connect" in d["outcome"] for d in done)
        hits = [d["cache_hit"] for d in done if d["cache_hit"] is not None]
        result["analyse_cache_hits"] = sum(hits)
        result["messages"] = sorted({m for d in done for m in d["messages"]})[:20]
        cache_path = Path(env["ACM_CACHE_DIR"]) if cache else None
        if cache_path is not None and cache_path.is_dir():
            result["cache_bytes"] = sum(p.stat().st_size for p in cache_path.rglob("*") if p.is_file())
            # The defaults' own analysis: stored by the warm-up (warm) or by the run's first session (cold).
            result["analysis_compute_s"] = analysis_compute_s(cache_path, t_defaults if result["warm"] else t_sessions)
    finally:
        stop_app(proc)
        if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL, None):
            result["app_exit"] = proc.returncode
        result["app_log_tail"] = (work / "app.log").read_text(errors="replace")[-2000:] \
            if (work / "app.log").is_file() else ""
        if not cache_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    save_result(f"load-{sessions}{'' if cache else '-nocache'}{'-warm' if result['warm'] else ''}", result, out)
    return result


def report(data: dict) -> str:
    """The per-endpoint table plus one line of context (RSS, load average, hits)."""
    table = md_table(data.get("rows", []), [("endpoint", "endpoint"), ("calls", "calls"), ("median_s", "median s"),
                                            ("p90_s", "p90 s"), ("p95_s", "p95 s"), ("max_s", "max s"),
                                            ("rejected", "rejected (queue full)"), ("errors", "errors"),
                                            ("timeouts", "timeouts")])
    la = data.get("loadavg_before") or (0, 0, 0)
    lb = data.get("loadavg_after") or (0, 0, 0)
    idle, peak = data.get("rss_idle_mib"), data.get("rss_peak_mib")
    ratio = f" ({peak / idle:.2f} × idle)" if idle and peak else ""
    cache = ("off" if not data.get("cache") else "on, pre-warmed with the defaults" if data.get("warm") else
             "on, cold")
    one = data.get("analysis_compute_s")
    lines = [(f"{data['sessions']} sessions, shared cache {cache}: "
             f"{data.get('completed', 0)} completed, {data.get('analyse_cache_hits', 0)} Analyse answers were cache "
             f"hits; run {data.get('run_s', 0):.1f} s; app RSS at startup {data.get('rss_startup_mib', 0):.0f} MiB, "
             f"idle (after warm-up) {idle or 0:.0f} MiB, peak {peak or 0:.0f} MiB{ratio}; shared cache on disk "
             f"{(data.get('cache_bytes') or 0) / 1024:.0f} KiB; load average before {la[0]:.2f} / {la[1]:.2f} / "
             f"{la[2]:.2f}, after {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}"
             + (f"; the defaults' analysis itself took {one:.2f} s" if one is not None else "")),
             f"sessions as {'a process each' if data.get('clients', 'processes') == 'processes' else 'threads'}; "
             "`open` is each page's opening (config + page-load events), before the crowd is released"]
    if data.get("messages"):
        lines.append("messages: " + " | ".join(data["messages"][:5]))
    return table + "\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bounded load test: N sessions on loopback (Analyse → coefficients → chat)")
    ap.add_argument("--sessions", type=int, default=12, help=f"simultaneous sessions, 1..{MAX_SESSIONS} (default 12)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run (default 300)")
    ap.add_argument("--no-cache", action="store_true", help="run the app with ACM_CACHE=off (no shared cache)")
    ap.add_argument("--cache-dir", default=None, help="shared-cache folder (default: a fresh temp folder, cold)")
    ap.add_argument("--chat-tokens", type=int, default=None, help="max new tokens per chat reply (default: the app's)")
    ap.add_argument("--no-chat", action="store_true", help="sessions stop after the coefficient redraws")
    ap.add_argument("--warm", action="store_true",
                    help="pre-warm the shared cache with the defaults' analysis before the sessions (all hits)")
    ap.add_argument("--threads", action="store_true",
                    help="run the sessions as threads of this process (one GIL) instead of a process each")
    ap.add_argument("--quick", action="store_true", help="3 sessions, 16 chat tokens, 120 s (a smoke run; CI)")
    ap.add_argument("--app-root", default=None,
                    help="run the app.py of another checkout (e.g. `git archive REV | tar -x -C DIR`) for a before/after")
    ap.add_argument("--out", default=None, help="JSON result path (default benchmarks/.cache/results/)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sessions, args.chat_tokens, args.time_limit = min(args.sessions, 3), args.chat_tokens or 16, \
            min(args.time_limit, 120.0)
    data = run(args.sessions, time_limit=args.time_limit, cache=not args.no_cache, cache_dir=args.cache_dir,
               chat_tokens=args.chat_tokens, chat=not args.no_chat, out=args.out, app_root=args.app_root,
               warm=args.warm, processes=not args.threads)
    print(report(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
