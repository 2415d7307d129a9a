"""Full-size merge benchmark: the CLI merge of the 1.5B-shaped tied/untied pair against the I/O floor.

Every run is a fresh process started the way a user starts it, so start-up (interpreter, imports,
resolving the models) is *included* in the wall and CPU times — the issue-11 targets are about the
whole command. Measured in the same run, interleaved (floor, TA, TIES, floor, TA, TIES, …):

* ``floor`` — a bare Python process that reads every byte of both inputs' safetensors files into one
  reused buffer (``readinto``) and writes a file the size of the merged model from that buffer: the
  least any merge must do on this machine, with a ~50 ms interpreter start and no torch import.
* ``task_arithmetic`` / ``ties`` — ``python -m acm merge … --threads 1`` (α = 0.7; TIES density 0.2).
* ``ref_*`` (optional) — the same commands from another checkout (``--ref-src DIR``, e.g. ``git archive``
  of the commit before a change), interleaved: a before/after A/B under the same load.
* ``mergekit`` (optional) — ``mergekit-yaml`` from a separate venv with an equivalent config, when
  ``--mergekit PATH`` points at it (never a project dependency); skipped cleanly otherwise.

Per run: wall, CPU (user + sys of the child, from ``wait4``), peak RSS split into anonymous and
file-backed (``/proc/<pid>/status`` polled every 5 ms), minor page faults, and for our engine the
time from process start to its first merged tensor (the moment the streamed writer creates its first
shard file). Inputs are pre-read twice (warm page cache) and ``os.sync()`` runs between runs.

    python -m benchmarks.fullsize_merge                    # 1.5B shape, 2 rounds
    python -m benchmarks.fullsize_merge --quick            # tiny model, 1 round (CI smoke test)
    python -m benchmarks.fullsize_merge --mergekit /tmp/mkvenv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import os
import shutil
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
    PeakPoller,
    machine_info,
    md_table,
    save_result,
    warm_files,
)

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("floor", "task_arithmetic", "ties")
ALPHA, DENSITY = 0.7, 0.2

FLOOR_CODE = r"""
import os, sys
inputs, out, size = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
buf = bytearray(8 << 20)
view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
tmp = out + ".tmp"
with open(tmp, "wb", buffering=0) as f:
    left = size
    while left:
        left -= f.write(view[: min(left, len(buf))])
os.replace(tmp, out)
"""


def _pair(quick: bool):
    if quick:
        from benchmarks.models import get_models

        return get_models("10m", n_ft=1)
    from benchmarks.fullsize import get_pair

    return get_pair(verbose=True)


def _files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def _watch_first_shard(out: Path, t0: float, found: dict, stop: threading.Event) -> None:
    """Record when the merge's temp folder first holds a shard file (= its first tensor is merged)."""
    pattern = f".{out.name}.tmp-*"
    while not stop.is_set():
        for tmp in out.parent.glob(pattern):
            if any(tmp.glob("shard-*.tmp")):
                found["first_tensor_s"] = time.perf_counter() - t0
                return
        time.sleep(0.005)


def run_one(cmd: list[str], out: Path, *, watch: bool = False, env: dict | None = None,
            cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` as a child: wall, CPU (user + sys), peak RSS (anon / file), faults, first tensor."""
    shutil.rmtree(out, ignore_errors=True)
    found: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    watcher = threading.Thread(target=_watch_first_shard, args=(out, t0, found, stop), daemon=True)
    if watch:
        watcher.start()
    with PeakPoller(proc.pid) as peak:
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    stop.set()
    if watch:
        watcher.join()
    row = {"wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "cpu_s": ru.ru_utime + ru.ru_stime,
           "peak_rss_mib": peak.peak_rss / MB, "peak_anon_mib": peak.peak_anon / MB,
           "peak_file_mib": peak.peak_file / MB, "minor_faults": ru.ru_minflt, "rc": proc.returncode,
           "first_tensor_s": found.get("first_tensor_s"), "loadavg_1m": os.getloadavg()[0]}
    if proc.returncode != 0:
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {proc.returncode}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return row


def _commands(name: str, base: Path, ft: Path, out: Path, out_bytes: int, mergekit: str | None) -> list[str]:
    py = sys.executable
    if name == "floor":
        return [py, "-c", FLOOR_CODE, *map(str, _files(base) + _files(ft)), str(out), str(out_bytes)]
    name = name.removeprefix("ref_")
    if name in ("task_arithmetic", "ties"):
        cmd = [py, "-m", "acm", "merge", "--base", str(base), "--ft", str(ft), "--method", name,
               "--alpha", str(ALPHA), "--threads", "1", "--out", str(out), "--force"]
        return cmd + (["--density", str(DENSITY)] if name == "ties" else [])
    method = name.removeprefix("mergekit_")
    config = out.parent / f"{name}.yml"
    params = f"weight: {ALPHA}" + (f", density: {DENSITY}" if method == "ties" else "")
    config.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
                      f"    parameters: {{{params}}}\nparameters: {{normalize: false}}\ndtype: bfloat16\n")
    return [mergekit, str(config), str(out), "--lazy-unpickle", "--out-shard-size", "2B"]


def run(*, quick: bool = False, repeats: int | None = None, mergekit: str | None = None, out: str | None = None,
        ref_src: str | None = None, only: list[str] | None = None, log=print) -> dict[str, Any]:
    pair = _pair(quick)
    base, ft = Path(pair.base), Path(pair.fts[0])
    inputs = _files(base) + _files(ft)
    in_bytes = sum(p.stat().st_size for p in inputs)
    out_bytes = max(sum(p.stat().st_size for p in _files(base)), sum(p.stat().st_size for p in _files(ft)))
    warm_files(inputs)
    warm_files(inputs)
    names = list(METHODS)
    if mergekit and Path(mergekit).is_file():
        names += ["mergekit_task_arithmetic", "mergekit_ties"]
    elif mergekit:
        log(f"[fullsize-merge] mergekit not found at {mergekit}: skipped")
    if ref_src:                          # another checkout of the project (e.g. the commit before a change)
        names += ["ref_task_arithmetic", "ref_ties"]
    if only:                             # a subset (the floor always runs: every ratio needs it)
        names = ["floor", *[n for n in names if n in only and n != "floor"]]
    repeats = repeats or (1 if quick else 2)
    work = Path(tempfile.mkdtemp(prefix="acm-fullsize-merge-"))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t_start = time.perf_counter()
    try:
        for rep in range(repeats):
            order = names if rep % 2 == 0 else [names[0], *reversed(names[1:])]
            for name in order:
                target = work / name
                row = run_one(_commands(name, base, ft, target, out_bytes, mergekit), target,
                              watch=name in ("task_arithmetic", "ties"),
                              cwd=Path(ref_src) if name.startswith("ref_") else ROOT)
                runs[name].append(row)
                log(f"[fullsize-merge] {name} #{rep + 1}: wall {row['wall_s']:.2f}s cpu {row['cpu_s']:.2f}s "
                    f"rss {row['peak_rss_mib']:.0f} MiB load {row['loadavg_1m']:.1f}"
                    + (f" ERROR {row['error']}" if row.get("error") else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs, model_bytes=pair.bytes_per_model)
    data = {"benchmark": "fullsize_merge", "machine": machine_info(), "quick": quick, "pair": pair.to_dict(),
            "ref_src": ref_src, "input_bytes": in_bytes, "output_bytes": out_bytes, "runs": runs, "rows": rows,
            "total_seconds": time.perf_counter() - t_start,
            "command": " ".join(["python -m benchmarks.fullsize_merge", *sys.argv[1:]])}
    data["path"] = str(save_result("fullsize_merge", data, out))
    return data


def summarize(runs: dict[str, list[dict]], *, model_bytes: int) -> list[dict]:
    """Medians per method and the ratios the targets use (× floor by wall and by CPU)."""
    ok = {n: [r for r in rs if r["rc"] == 0] for n, rs in runs.items()}
    floor = ok.get("floor") or []
    f_wall = statistics.median(r["wall_s"] for r in floor) if floor else None
    f_cpu = statistics.median(r["cpu_s"] for r in floor) if floor else None
    rows = []
    for name, rs in ok.items():
        if not rs:
            rows.append({"method": name, "status": (runs[name][0].get("error") if runs[name] else "not run")})
            continue
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        firsts = [r["first_tensor_s"] for r in rs if r.get("first_tensor_s") is not None]
        rows.append({"method": name, "n": len(rs), "wall_s": wall, "x_floor": wall / f_wall if f_wall else None,
                     "cpu_s": cpu, "user_s": statistics.median(r["user_s"] for r in rs),
                     "sys_s": statistics.median(r["sys_s"] for r in rs),
                     "cpu_x_floor": cpu / f_cpu if f_cpu else None,
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                     "rss_over_model": max(r["peak_rss_mib"] for r in rs) * MB / model_bytes,
                     "peak_anon_mib": max(r["peak_anon_mib"] for r in rs),
                     "peak_file_mib": max(r["peak_file_mib"] for r in rs),
                     "minor_faults_k": statistics.median(r["minor_faults"] for r in rs) / 1000,
                     "first_tensor_s": statistics.median(firsts) if firsts else None,
                     "loadavg_1m": max(r["loadavg_1m"] for r in rs), "status": "ok"})
    return rows


COLUMNS = [("method", "method"), ("n", "n"), ("wall_s", "wall s"), ("x_floor", "× floor (wall)"),
           ("cpu_s", "CPU s (user+sys)"), ("user_s", "user s"), ("sys_s", "sys s"), ("cpu_x_floor", "× floor (CPU)"),
           ("peak_rss_mib", "peak RSS MiB"), ("rss_over_model", "RSS / model"), ("peak_anon_mib", "anon MiB"),
           ("peak_file_mib", "file-backed MiB"), ("minor_faults_k", "minor faults (k)"),
           ("first_tensor_s", "start → first tensor s"), ("loadavg_1m", "load avg (max)")]


def report(data: dict) -> str:
    return md_table(data["rows"], COLUMNS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="full-size CLI merge vs the I/O floor (start-up included)")
    ap.add_argument("--quick", action="store_true", help="the 10m benchmark model, one round (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 2; 1 with --quick)")
    ap.add_argument("--mergekit", default=None, metavar="PATH", help="mergekit-yaml of a separate venv, to compare")
    ap.add_argument("--ref-src", default=None, metavar="DIR",
                    help="also run `python -m acm merge` from this checkout (rows ref_*), interleaved: a before/after A/B")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="run only these rows (e.g. task_arithmetic mergekit_task_arithmetic); the floor always runs")
    ap.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args(argv)
    data = run(quick=args.quick, repeats=args.repeats, mergekit=args.mergekit, out=args.out, ref_src=args.ref_src,
               only=args.only)
    print(report(data))
    print(f"[fullsize-merge] results: {data['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
