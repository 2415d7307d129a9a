"""Shared helpers for the benchmarks: machine facts, child-process runs with memory accounting,
page-cache warm-up, least-squares fits and Markdown tables.

Why a child process per measurement: peak RSS is a high-water mark of a *process*, so every
merge (and the I/O floor it is compared with) runs in a fresh interpreter. The parent collects
the child's own ``ru_maxrss`` through ``os.wait4`` (per child, unlike ``RUSAGE_CHILDREN``, which is
the maximum over *all* children waited for so far) and polls ``/proc/<pid>/status`` to split the
peak into anonymous memory (what the process really allocated) and file-backed pages (memory-
mapped safetensors shards that the kernel can drop at any time).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ACM_BENCH_CACHE", ROOT / "benchmarks" / ".cache"))
RESULTS = CACHE / "results"

MB = 1024 * 1024          # one MiB: tables report binary units, like acm.sizes.format_bytes


# --------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (put next to every table)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 1024**3, 1)      # GiB (acm.sizes: binary units)
    except (ImportError, OSError):  # pragma: no cover - psutil is a requirement
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": mem_gb, "loadavg": os.getloadavg(),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except (ImportError, RuntimeError):  # pragma: no cover
        info["gpu"] = None
    for mod in ("transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):  # pragma: no cover
            info[mod] = None
    return info


# --------------------------------------------------------------------------------------------
# memory


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process, in bytes (Linux)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


class PeakPoller:
    """Polls a process's /proc status in a thread and keeps the maxima (anon, file, total)."""

    def __init__(self, pid: int | str = "self", interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak_anon = self.peak_file = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> bool:
        st = proc_status(self.pid)
        if not st:
            return False
        self.peak_anon = max(self.peak_anon, st.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, st.get("RssFile", 0))
        self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0))
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sample():
                return
            time.sleep(self.interval)

    def __enter__(self) -> PeakPoller:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class ChildResult:
    """What a child run returned plus the parent's view of its resources."""

    payload: dict[str, Any]
    wall_s: float                 # parent wall time incl. interpreter start + imports
    ru_maxrss: int                # bytes; the child's own high-water mark (VmHWM), from wait4
    peak_anon: int                # bytes; max RssAnon seen by polling
    peak_file: int                # bytes; max RssFile seen by polling
    returncode: int
    cpu_s: float = 0.0            # user + system CPU seconds of the child (from wait4)
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def run_child(module: str, args: dict[str, Any], *, timeout: float = 3600, env: dict | None = None,
              poll_interval: float = 0.005) -> ChildResult:
    """Run ``python -m <module> '<json args>'`` in a fresh interpreter and measure it.

    The child must print one JSON object on its last stdout line.
    """
    cmd = [sys.executable, "-m", module, json.dumps(args)]
    child_env = dict(os.environ)
    child_env.setdefault("HF_HUB_OFFLINE", "1")
    child_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    if env:
        child_env.update(env)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    poller = PeakPoller(proc.pid, poll_interval)
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    t_out.start(), t_err.start()
    deadline = time.monotonic() + timeout
    with poller:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    t_out.join(), t_err.join()
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    payload: dict[str, Any] = {}
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                payload = json.loads(line)
                break
            except ValueError:
                continue
    if proc.returncode != 0 or not payload:
        tail = "\n".join(stderr.strip().splitlines()[-40:])
        raise RuntimeError(f"benchmark child {module} {args.get('task', '')} failed (rc={proc.returncode}):\n{tail}")
    return ChildResult(payload=payload, wall_s=wall, ru_maxrss=rusage.ru_maxrss * 1024,
                       peak_anon=poller.peak_anon, peak_file=poller.peak_file, returncode=proc.returncode,
                       cpu_s=rusage.ru_utime + rusage.ru_stime,
                       stderr_tail="\n".join(stderr.strip().splitlines()[-5:]))


_FORK_CTX = None


def _fork_context():
    """A forkserver that has imported torch / transformers / acm once (see ``benchmarks._preload``)."""
    global _FORK_CTX
    if _FORK_CTX is None:
        import multiprocessing as mp

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["benchmarks._preload"])
        _FORK_CTX = ctx
    return _FORK_CTX


def _forked_entry(conn, module: str, args: dict, threads: int | None) -> None:
    import importlib
    import resource
    import traceback

    try:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        tasks = importlib.import_module(module).TASKS
        result = tasks[args["task"]](args)
        st = proc_status()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        result.setdefault("rss_self_end", st.get("VmRSS", 0))
        conn.send({"ok": True, "payload": result, "hwm": st.get("VmHWM", 0), "cpu": ru.ru_utime + ru.ru_stime})
    except BaseException:  # noqa: BLE001 - reported to the parent
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_task(module: str, args: dict[str, Any], *, threads: int | None = None, fresh: bool | None = None,
             timeout: float = 3600, poll_interval: float = 0.005) -> ChildResult:
    """Run ``TASKS[args['task']]`` of ``module`` in a new process and measure it.

    Default: forked from a fork server that already imported torch / transformers / acm (no
    work done in it), which saves several seconds of imports per measurement on a 2-core machine.
    ``fresh=True`` (or ACM_BENCH_FRESH=1) starts a whole new interpreter instead (``run_child``).
    Peak RSS is the child's own VmHWM; the inherited, already-resident import pages are part of
    it, as they are in a fresh interpreter after its imports (report peak − ``rss_before``).
    """
    if fresh is None:
        fresh = os.environ.get("ACM_BENCH_FRESH", "") not in ("", "0")
    if fresh:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
        return run_child(module, args, timeout=timeout, env=env, poll_interval=poll_interval)
    ctx = _fork_context()
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_forked_entry, args=(child_conn, module, args, threads), daemon=True)
    proc.start()
    child_conn.close()
    msg = None
    deadline = time.monotonic() + timeout
    with PeakPoller(proc.pid, poll_interval) as poller:
        while msg is None:
            if parent_conn.poll(0.01):
                try:
                    msg = parent_conn.recv()
                except EOFError:
                    break
            elif not proc.is_alive() and not parent_conn.poll(0):
                break
            if time.monotonic() > deadline:
                proc.kill()
                break
    proc.join()
    wall = time.perf_counter() - t0
    if not msg or not msg.get("ok"):
        err = (msg or {}).get("error") or f"exit code {proc.exitcode}"
        raise RuntimeError(f"benchmark task {module} {args.get('task', '')} failed:\n{err[-3000:]}")
    return ChildResult(payload=msg["payload"], wall_s=wall, ru_maxrss=msg["hwm"], peak_anon=poller.peak_anon,
                       peak_file=poller.peak_file, returncode=proc.exitcode or 0, cpu_s=msg["cpu"])


def child_main(tasks: dict[str, Any]) -> None:
    """Entry point of a child: ``python -m benchmarks.X '<json>'`` dispatches to ``tasks[args['task']]``.

    Prints the task's result dict (plus the RSS just before the work started, i.e. the
    interpreter + imports baseline) as one JSON line.
    """
    args = json.loads(sys.argv[1])
    fn = tasks[args["task"]]
    result = fn(args)
    result.setdefault("rss_self_end", proc_status().get("VmRSS", 0))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# page cache


def warm_files(paths: Iterable[Path], block: int = 16 * MB) -> tuple[int, float]:
    """Read files end to end so they are in the OS page cache; returns (bytes, seconds).

    Why: the merge and the I/O floor must see the same cache state. With 24 GB of RAM and inputs
    of at most a few GB, every timed run below is a *warm-cache* run.
    """
    total, t0 = 0, time.perf_counter()
    buf = bytearray(block)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern))


# --------------------------------------------------------------------------------------------
# statistics and tables


def lstsq_slope(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b·x; returns (b, a, r²)."""
    n = len(xs)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    if sxx == 0:
        return float("nan"), my, float("nan")
    b = sxy / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    return b, a, r2


def loglog_exponent(xs: list[float], ys: list[float]) -> float:
    """Growth exponent k in y ∝ x^k (slope of log y vs log x)."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return float("nan")
    return lstsq_slope([p[0] for p in pts], [p[1] for p in pts])[0]


def md_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]] | None = None) -> str:
    """A GitHub Markdown table; ``columns`` = [(key, header)], floats shown with 3 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = columns or [(k, k) for k in rows[0]]

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if v != v:
                return "–"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def save_result(name: str, data: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write a benchmark's JSON result (default: benchmarks/.cache/results/<name>.json)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def mb(n: float | int | None) -> float | None:
    return None if n is None else n / MB
