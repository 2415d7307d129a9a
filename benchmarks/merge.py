"""Merge benchmark: wall time and peak memory of the streamed merge engine against the I/O floor.

For each model size and method (task arithmetic, TIES, DARE-TIES, ACM-TIES with a synthetic λ
table) every run happens in a fresh child process; measured in the same run, interleaved:

* ``floor`` — read every input tensor (base + fine-tuned, via ``acm.checkpoints.tensors.TensorReader`` /
  safetensors) and write one output of the same size as safetensors shards of the same limit.
  Nothing can merge faster than this on this machine.
* each engine method via ``acm.merging.engine.merge_models``;
* ``naive`` — the reference everybody writes first: ``from_pretrained`` every model, merge the
  state dicts in memory (task arithmetic), ``save_pretrained``.
* ``baseline`` — the interpreter + imports alone (RSS subtracted to get working memory).

Cache state: all inputs are read once before any timing (``warm_files``), and the 24 GB machine
holds every input in the page cache, so these are **warm-cache** numbers for floor and merge
alike. ``os.sync()`` runs after every child (outside the timing) so no run pays for the
previous run's dirty-page writeback. Times are measured inside the child (interpreter start and
imports excluded, reported separately as the baseline).

    python -m benchmarks.merge --quick
    python -m benchmarks.merge --sizes 10m 50m 200m 800m
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from acm.sizes import format_bytes
from benchmarks.common import (
    CACHE,
    MB,
    child_main,
    dir_bytes,
    loglog_exponent,
    lstsq_slope,
    machine_info,
    md_table,
    proc_status,
    run_task,
    save_result,
    warm_files,
)

METHODS = {  # benchmark name -> (engine method, uses ACM λ table)
    "task_arithmetic": ("task_arithmetic", False),
    "ties": ("ties", False),
    "dare_ties": ("dare_ties", False),
    "acm_ties": ("ties", True),
}
# Opt-in (--methods): the methods added through the registry (acm/merging/methods.py), not in the default run.
EXTRA_METHODS = {m: (m, False) for m in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")}
DEFAULT_SIZES = ["10m", "50m", "200m", "800m"]
DEFAULT_SHARD = "200MB"
REPEATS = {"10m": 3, "50m": 3, "200m": 2, "800m": 1}


# ============================================================================================
# child tasks (run in fresh interpreters)


def _shard_limit(shard: str | int) -> int:
    from benchmarks.models import parse_size

    return parse_size(shard)


def _preimport() -> None:
    """Import what a merge / naive run imports lazily, so no timed region pays for imports."""
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import acm.checkpoints.grouping
    import acm.checkpoints.tensors
    try:
        import acm.merging.engine  # noqa: F401
    except ImportError:
        pass


def task_baseline(args: dict) -> dict:
    """Interpreter + the imports a merge needs; nothing else."""
    _preimport()
    return {"cpu_seconds": 0.0, "rss_before": proc_status().get("VmRSS", 0), "anon_before": proc_status().get("RssAnon", 0),
            "seconds": 0.0}


def task_floor(args: dict) -> dict:
    """Read every input tensor, write one model-sized output in shards: the I/O floor."""
    import torch
    from safetensors.torch import save_file

    from acm.checkpoints.tensors import TensorReader, find_weight_files

    before = proc_status()
    t0, c0 = time.perf_counter(), time.process_time()
    readers = [TensorReader(find_weight_files(Path(p))[0]) for p in [args["base"], *args["fts"]]]
    out = Path(args["out"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    limit = _shard_limit(args["shard"])
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, n_shards, written, read = 0, 0, 0, 0
    weight_map: dict[str, str] = {}
    names: list[str] = []

    def flush() -> None:
        nonlocal shard, shard_bytes, n_shards
        if not shard:
            return
        n_shards += 1
        name = f"model-{n_shards:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        shard, shard_bytes = {}, 0

    # safetensors' get_tensor is zero-copy (memory-mapped, paged in lazily), so "reading" must
    # touch the bytes: copy each tensor into one reusable buffer (a memcpy, no allocation).
    largest = max(readers[0].nbytes(k) for k in readers[0].keys())
    buf = torch.empty(largest, dtype=torch.uint8)

    def touch(t: torch.Tensor) -> int:
        flat = t.reshape(-1).view(torch.uint8)
        buf[:flat.numel()].copy_(flat)
        return flat.numel()

    for key in readers[0].keys():
        base = readers[0].get(key)
        read += touch(base)
        for r in readers[1:]:
            t = r.get(key)
            read += touch(t)
            del t
        nbytes = base.numel() * base.element_size()
        if shard and shard_bytes + nbytes > limit:
            flush()
        shard[key] = base
        shard_bytes += nbytes
        written += nbytes
        names.append(key)
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": written},
                                                                  "weight_map": weight_map}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "bytes_read": read, "bytes_written": written, "num_shards": n_shards,
            "rss_before": before.get("VmRSS", 0), "anon_before": before.get("RssAnon", 0)}


def task_merge(args: dict) -> dict:
    """One engine merge, as the CLI would run it."""
    from acm.merging.engine import MergeOptions, merge_models

    _preimport()
    before = proc_status()
    opts = MergeOptions(method=args["method"], shard_size=args["shard"], **args.get("options", {}))
    t0, c0 = time.perf_counter(), time.process_time()
    report = merge_models(args["base"], args["fts"], args["out"], opts, lambdas=args.get("lambdas"),
                          force=True, show_progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "engine_seconds": getattr(report, "seconds", None),
            "bytes_written": getattr(report, "bytes_written", None),
            "num_shards": getattr(report, "num_shards", None), "num_tensors": getattr(report, "num_tensors", None),
            "rss_before": before.get("VmRSS", 0), "anon_before": before.get("RssAnon", 0)}


def task_naive(args: dict) -> dict:
    """Reference: load every model whole, merge state dicts in memory, save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    _preimport()
    before = proc_status()
    t0, c0 = time.perf_counter(), time.process_time()
    base = AutoModelForCausalLM.from_pretrained(args["base"], dtype=torch.bfloat16)
    fts = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16) for p in args["fts"]]
    t_load = time.perf_counter() - t0
    alpha = float(args.get("alpha", 1.0))
    with torch.no_grad():
        ft_states = [m.state_dict() for m in fts]
        for name, p in base.state_dict().items():
            acc = p.float()
            merged = acc.clone()
            for st in ft_states:
                merged += alpha * (st[name].float() - acc)
            p.copy_(merged.to(p.dtype))
    t_merge = time.perf_counter() - t0 - t_load
    out = Path(args["out"])
    shutil.rmtree(out, ignore_errors=True)
    base.save_pretrained(out, max_shard_size=args["shard"])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "load_s": t_load, "merge_s": t_merge, "save_s": seconds - t_load - t_merge,
            "bytes_written": dir_bytes(out), "rss_before": before.get("VmRSS", 0),
            "anon_before": before.get("RssAnon", 0)}


TASKS = {"baseline": task_baseline, "floor": task_floor, "merge": task_merge, "naive": task_naive}


# ============================================================================================
# parent


def synthetic_lambdas(num_layers: int, n_ft: int, t: float = 2.0, alpha: float = 1.0) -> list[dict[str, float]]:
    """An ACM λ table of the right shape: NMI falling with depth, λ from the project's formula."""
    import numpy as np

    from acm.checkpoints.grouping import group_names

    groups = group_names(num_layers)
    out = []
    for i in range(n_ft):
        nmi = np.linspace(0.85, 0.25, len(groups)) + 0.03 * np.sin(np.arange(len(groups)) + i)
        try:
            from acm.rules.coefficients import lambdas as lam_fn

            lam = np.asarray(lam_fn(nmi, t, alpha=alpha), dtype=float).reshape(-1)
        except ImportError:  # formula from docs/design.md: α·K·softmax(−t·NMI)
            w = np.exp(-t * nmi)
            lam = alpha * len(groups) * w / w.sum()
        out.append({g: float(v) for g, v in zip(groups, lam)})
    return out


def engine_available() -> tuple[bool, str]:
    try:
        from acm.merging.engine import MergeOptions, merge_models  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a half-written module: report, do not crash
        return False, f"acm.merging.engine not importable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return True, ""


def _largest_tensor_bytes(models, dtype_bytes: int = 4) -> int:
    from benchmarks.models import llama_config, param_shapes

    largest = 0
    for _, shape in param_shapes(llama_config(models.size)):
        n = 1
        for d in shape:
            n *= d
        largest = max(largest, n)
    return largest * dtype_bytes


def _run(task: str, args: dict, out_root: Path, label: str, threads: int | None = None) -> dict:
    out = out_root / label
    shutil.rmtree(out, ignore_errors=True)
    res = run_task("benchmarks.merge", {"task": task, "out": str(out), **args}, threads=threads)
    p = res.payload
    row = {"seconds": p["seconds"], "cpu_seconds": p.get("cpu_seconds"), "wall_s": res.wall_s, "cpu_s": res.cpu_s,
           "loadavg_1m": os.getloadavg()[0],
           "ru_maxrss": res.ru_maxrss, "peak_anon": res.peak_anon,
           "peak_file": res.peak_file, "rss_before": p.get("rss_before", 0), "anon_before": p.get("anon_before", 0),
           "bytes_written": p.get("bytes_written"), "num_shards": p.get("num_shards")}
    for k in ("load_s", "merge_s", "save_s", "bytes_read", "engine_seconds"):
        if k in p:
            row[k] = p[k]
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return row


def bench_size(size: str, *, methods: list[str], repeats: int, n_ft: int, shard: str, naive: bool,
               threads: int | None = None, log=print) -> dict[str, Any]:
    from benchmarks.models import get_models

    models = get_models(size, n_ft=n_ft)
    inputs = [*models.base.glob("*.safetensors")] + [f for ft in models.fts for f in ft.glob("*.safetensors")]
    nbytes, secs = warm_files(inputs)
    warm_files(inputs)  # second pass: the timed runs below all see a fully warm cache
    log(f"[merge] {size}: {models.params / 1e6:.1f}M params, {format_bytes(models.bytes_per_model)}/model, "
        f"warm-up read {format_bytes(nbytes)} in {secs:.2f}s")
    out_root = CACHE / "merge-out" / str(os.getpid())  # per run: concurrent benchmark runs never collide
    out_root.mkdir(parents=True, exist_ok=True)
    common = {"base": str(models.base), "fts": [str(f) for f in models.fts], "shard": shard}
    ok, why = engine_available()
    lam = synthetic_lambdas(models.config["num_hidden_layers"], n_ft)
    runs: dict[str, list[dict]] = {"floor": []}
    for m in methods:
        runs[m] = []
    base_row = _run("baseline", common, out_root, f"{size}-baseline", threads)
    for rep in range(repeats):
        runs["floor"].append(_run("floor", common, out_root, f"{size}-floor", threads))
        for m in methods:
            if not ok:
                continue
            method, use_acm = {**METHODS, **EXTRA_METHODS}[m]
            args = dict(common, method=method, options={"seed": rep}, lambdas=lam if use_acm else None)
            runs[m].append(_run("merge", args, out_root, f"{size}-{m}", threads))
        log(f"[merge] {size} repeat {rep + 1}/{repeats}: floor {runs['floor'][-1]['seconds']:.2f}s"
            + "".join(f", {m} {runs[m][-1]['seconds']:.2f}s" for m in methods if runs[m]))
    if naive:
        runs["naive"] = [_run("naive", dict(common, alpha=1.0), out_root, f"{size}-naive", threads)]
        log(f"[merge] {size} naive {runs['naive'][-1]['seconds']:.2f}s")
    shutil.rmtree(out_root, ignore_errors=True)
    largest = _largest_tensor_bytes(models)
    return {"size": size, "params": models.params, "bytes_per_model": models.bytes_per_model, "n_ft": n_ft,
            "input_bytes": models.bytes_per_model * (1 + n_ft), "shard_limit": shard,
            "largest_tensor_fp32_bytes": largest, "baseline": base_row, "runs": runs,
            "engine": "ok" if ok else why}


def summarize(sizes: list[dict]) -> list[dict]:
    """One row per (size, method) with medians and the ratios the targets talk about."""
    rows = []
    for s in sizes:
        floor = statistics.median(r["seconds"] for r in s["runs"]["floor"])
        floor_cpu = statistics.median(r.get("cpu_seconds") or 0.0 for r in s["runs"]["floor"])
        ta_runs = s["runs"].get("task_arithmetic") or []
        ta = statistics.median(r["seconds"] for r in ta_runs) if ta_runs else None
        ta_cpu = statistics.median(r.get("cpu_seconds") or 0.0 for r in ta_runs) if ta_runs else None
        for name, runs in s["runs"].items():
            if not runs:
                rows.append({"size": s["size"], "method": name, "status": s.get("engine", "")})
                continue
            sec = statistics.median(r["seconds"] for r in runs)
            cpu = statistics.median(r.get("cpu_seconds") or 0.0 for r in runs)
            peak = max(r["ru_maxrss"] for r in runs)
            anon = max(r["peak_anon"] for r in runs)
            anon_before = statistics.median(r["anon_before"] for r in runs) or s["baseline"]["peak_anon"]
            row = {"size": s["size"], "params_m": s["params"] / 1e6, "model_mib": s["bytes_per_model"] / MB,
                   "method": name, "seconds": sec, "min_seconds": min(r["seconds"] for r in runs),
                   "repeats": len(runs), "gb_per_s": s["input_bytes"] / sec / 1e9,
                   "x_floor": sec / floor, "x_ta": (sec / ta) if ta and name != "floor" else None,
                   "cpu_seconds": cpu, "x_floor_cpu": cpu / floor_cpu if floor_cpu else None,
                   "x_ta_cpu": (cpu / ta_cpu) if ta_cpu and name != "floor" else None,
                   "peak_rss_mib": peak / MB, "peak_anon_mib": anon / MB, "peak_file_mib": max(r["peak_file"] for r in runs) / MB,
                   "rss_over_model": peak / s["bytes_per_model"],
                   "rss_minus_baseline_mib": (peak - statistics.median(r["rss_before"] for r in runs)) / MB,
                   "anon_minus_baseline_mib": (anon - anon_before) / MB,
                   "largest_fp32_mib": s["largest_tensor_fp32_bytes"] / MB,
                   "anon_over_largest": (anon - anon_before) / s["largest_tensor_fp32_bytes"],
                   "loadavg_1m": max(r.get("loadavg_1m", 0.0) for r in runs), "status": "ok"}
            for k in ("load_s", "merge_s", "save_s"):
                if k in runs[0]:
                    row[k] = runs[0][k]
            rows.append(row)
    return rows


def scaling(rows: list[dict], sizes: list[dict]) -> list[dict]:
    """Least-squares time vs input bytes per method, and the growth exponents of time and memory."""
    out = []
    by_size = {s["size"]: s for s in sizes}
    methods = sorted({r["method"] for r in rows if r.get("status") == "ok"}, key=lambda m: list(
        ["floor", *METHODS, *EXTRA_METHODS, "naive"]).index(m) if m in ["floor", *METHODS, *EXTRA_METHODS, "naive"]
        else 99)
    for m in methods:
        pts = [r for r in rows if r["method"] == m and r.get("status") == "ok"]
        if len(pts) < 2:
            continue
        xs = [by_size[r["size"]]["input_bytes"] / 1e9 for r in pts]
        ys = [r["seconds"] for r in pts]
        slope, icpt, r2 = lstsq_slope(xs, ys)
        mem = [r["anon_minus_baseline_mib"] for r in pts]
        model = [by_size[r["size"]]["bytes_per_model"] for r in pts]
        rss = [r["peak_rss_mib"] for r in pts]
        out.append({"method": m, "sec_per_gb_input": slope, "intercept_s": icpt, "r2": r2,
                    "time_exponent": loglog_exponent(xs, ys),
                    "mem_exponent": loglog_exponent(model, mem),
                    "anon_mib_smallest": mem[0], "anon_mib_largest": mem[-1],
                    # peak VmRSS (what ru_maxrss / a container limit sees), all sizes and the two largest
                    "rss_exponent": loglog_exponent(model, rss),
                    "rss_exponent_top2": loglog_exponent(model[-2:], rss[-2:]),
                    "rss_mib_smallest": rss[0], "rss_mib_largest": rss[-1]})
    return out


TIME_COLUMNS = [("size", "size"), ("params_m", "params (M)"), ("model_mib", "model MiB"), ("method", "method"),
                ("seconds", "wall s"), ("repeats", "n"), ("gb_per_s", "input GB/s"), ("x_floor", "× floor"),
                ("x_ta", "× TA"), ("cpu_seconds", "CPU s"), ("x_floor_cpu", "CPU × floor"), ("x_ta_cpu", "CPU × TA"),
                ("loadavg_1m", "load avg")]
MEM_COLUMNS = [("size", "size"), ("model_mib", "model MiB"), ("method", "method"), ("peak_rss_mib", "peak RSS MiB"),
               ("rss_over_model", "peak RSS / model"), ("rss_minus_baseline_mib", "RSS − baseline MiB"),
               ("peak_anon_mib", "peak anon MiB"), ("peak_file_mib", "peak file-backed MiB"),
               ("anon_minus_baseline_mib", "anon − baseline MiB"), ("largest_fp32_mib", "largest tensor fp32 MiB"),
               ("anon_over_largest", "(anon − baseline) / largest")]
ROW_COLUMNS = TIME_COLUMNS
SCALING_COLUMNS = [("method", "method"), ("sec_per_gb_input", "s per GB input (slope)"),
                   ("intercept_s", "intercept s"), ("r2", "r²"), ("time_exponent", "time ∝ size^k"),
                   ("mem_exponent", "working memory ∝ size^k"), ("anon_mib_smallest", "working MiB smallest"),
                   ("anon_mib_largest", "working MiB largest"), ("rss_exponent", "peak RSS ∝ size^k"),
                   ("rss_exponent_top2", "peak RSS ∝ size^k, two largest"), ("rss_mib_smallest", "peak RSS MiB smallest"),
                   ("rss_mib_largest", "peak RSS MiB largest")]


def run(sizes: list[str], *, methods: list[str] | None = None, repeats: int | None = None, n_ft: int = 1,
        shard: str = DEFAULT_SHARD, naive: bool = True, threads: int | None = None, out: str | None = None,
        log=print) -> dict:
    methods = methods or list(METHODS)
    t0 = time.perf_counter()
    results = [bench_size(s, methods=methods, repeats=repeats or REPEATS.get(s, 1), n_ft=n_ft, shard=shard,
                          naive=naive, threads=threads, log=log) for s in sizes]
    rows = summarize(results)
    data = {"benchmark": "merge", "machine": machine_info(), "cache": "warm (inputs pre-read; os.sync() between runs)",
            "shard_limit": shard, "n_ft": n_ft, "threads": threads or "default", "sizes": results, "rows": rows,
            "scaling": scaling(rows, results),
            "total_seconds": time.perf_counter() - t0, "command": " ".join(["python -m benchmarks.merge", *sys.argv[1:]])}
    path = save_result("merge" if not out else "merge", data, out)
    data["path"] = str(path)
    return data


def report(data: dict) -> str:
    lines = [md_table(data["rows"], TIME_COLUMNS), md_table(data["rows"], MEM_COLUMNS)]
    fits = scaling(data["rows"], data["sizes"]) if data.get("sizes") else data.get("scaling")   # (re-fit old files)
    if fits:
        lines.append(md_table(fits, SCALING_COLUMNS))
    baselines = [(s["size"], s["baseline"]["ru_maxrss"] / MB) for s in data["sizes"]]
    lines.append("Baseline (interpreter + torch + acm imports) RSS MiB: "
                 + ", ".join(f"{s}: {v:.0f}" for s, v in baselines) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="merge engine vs I/O floor vs naive reference")
    ap.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *EXTRA_METHODS])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--n-ft", type=int, default=1)
    ap.add_argument("--shard", default=DEFAULT_SHARD, help="input and output shard limit")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in the children (default: one per core); 1 gives contention-robust CPU times")
    ap.add_argument("--quick", action="store_true", help="smallest size, one repeat")
    ap.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args(argv)
    sizes, repeats = (["10m"], 1) if args.quick else (args.sizes, args.repeats)
    data = run(sizes, methods=args.methods, repeats=repeats, n_ft=args.n_ft, shard=args.shard,
               naive=not args.no_naive, threads=args.threads, out=args.out)
    print(report(data))
    print(f"[merge] results: {data['path']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        child_main(TASKS)
    else:
        raise SystemExit(main())
