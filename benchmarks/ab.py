"""A/B comparison of two versions of the merge engine, interleaved, on the same cached models.

Why: on a shared 2-core machine the load changes from minute to minute, so "before" and "after"
numbers taken in separate runs are not comparable. This runs ``benchmarks.merge`` (1 size at a
time, one repeat per call, naive reference off) alternately from two source trees — A, B, B, A,
A, B, … — each call in its own processes, and reports per (size, method) the medians of CPU
seconds and wall seconds and the peak memory of each version, with B/A.

A version is a git ref (its ``acm/`` and ``benchmarks/`` are extracted with ``git archive`` into
a temp dir) or ``WORKTREE`` (the files as they are now). Both use the same model cache.

    python -m benchmarks.ab --a HEAD --b WORKTREE --sizes 200m --methods task_arithmetic ties --rounds 3
    python -m benchmarks.ab --quick          # HEAD vs WORKTREE, 10m, TA + TIES, 1 round (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, ROOT, md_table, save_result

WORKTREE = "WORKTREE"


def materialise(ref: str, tmp: Path) -> Path:
    """A source tree for ``ref``: the repository itself for WORKTREE, else ``git archive`` of acm/ + benchmarks/."""
    if ref == WORKTREE:
        return ROOT
    dest = tmp / ref.replace("/", "_")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref, "acm", "benchmarks"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def one_call(tree: Path, size: str, methods: list[str], threads: int, out: Path) -> dict:
    """One ``benchmarks.merge`` invocation (floor + the methods, 1 repeat) run from ``tree``."""
    env = dict(os.environ, ACM_BENCH_CACHE=str(CACHE))
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "benchmarks.merge", "--sizes", size, "--repeats", "1", "--no-naive",
           "--threads", str(threads), "--methods", *methods, "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _load_methods(tree: Path, tag: str):
    """The per-tensor kernels of one tree as their own module (they import only numpy / torch): the package
    ``acm/merging/kernels/`` (modules importing each other relatively), or the one file of older trees."""
    import importlib.util

    pkg = tree / "acm" / "merging" / "kernels"
    name = f"_ab_merge_methods_{tag}"
    if pkg.is_dir():
        spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    else:
        old = tree / "acm" / "merging" / "kernels.py"
        spec = importlib.util.spec_from_file_location(name, old if old.exists() else tree / "acm" / "merge_methods.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses in the module look themselves up there
    spec.loader.exec_module(mod)
    return mod


def kernel_ab(trees: dict[str, Path], size: str, methods: list[str], reps: int, tensor: str | None = None,
              log=print) -> list[dict]:
    """In-process A/B of the per-tensor kernels (``TensorJob``) on one real tensor of a cached model.

    Much less noisy than whole merges on a loaded machine: same process, same input pages, the two
    versions alternate call by call, and the per-call CPU time is taken with ``time.process_time``.
    """
    import torch

    from acm.checkpoints.tensors import TensorReader, find_weight_files
    from benchmarks.models import get_models

    torch.set_num_threads(1)
    models = get_models(size, n_ft=1)
    readers = [TensorReader(find_weight_files(p)[0]) for p in (models.base, models.fts[0])]
    name = tensor or max(readers[0].keys(), key=lambda k: readers[0].nbytes(k))
    base = readers[0].get(name).reshape(-1)
    ft = readers[1].get(name).reshape(-1)
    mods = {label: _load_methods(tree, str(i)) for i, (label, tree) in enumerate(trees.items())}
    rows = []
    spaces = {label: mods[label].Workspace("cpu") for label in mods}   # kept across calls, as in a merge
    for method in methods:
        times: dict[str, list[float]] = {label: [] for label in mods}
        outs: dict[str, torch.Tensor] = {}
        for rep in range(reps + 1):
            order = list(mods) if rep % 2 == 0 else list(reversed(mods))
            for label in order:
                mm = mods[label]
                ws = spaces[label]
                out = torch.empty(base.numel(), dtype=base.dtype)
                drops = None
                if method.startswith("dare"):
                    drops = lambda mm=mm: [mm.DropStream(0.3, rep, 0, name, torch.device("cpu"))]  # noqa: E731
                job = mm.TensorJob(base, [ft], ws, chunk=mm.CPU_CHUNK, drops=drops)
                c0 = time.process_time()
                if method in ("ties", "dare_ties"):
                    job.ties([1.0], out, density=0.2)
                else:
                    job.task_arithmetic([1.0], out)
                if rep:                                    # the first round warms up both
                    times[label].append(time.process_time() - c0)
                outs[label] = out
        a, b = list(mods)
        same = torch.equal(outs[a], outs[b])
        row = {"size": size, "tensor": name, "numel": base.numel(), "method": method, "n": reps,
               "cpu_a": statistics.median(times[a]), "cpu_b": statistics.median(times[b]),
               "min_a": min(times[a]), "min_b": min(times[b]), "identical": same}
        row["cpu_ratio"] = row["cpu_b"] / row["cpu_a"]
        row["ns_per_elem_a"] = row["cpu_a"] / base.numel() * 1e9
        row["ns_per_elem_b"] = row["cpu_b"] / base.numel() * 1e9
        rows.append(row)
        log(f"[ab] kernel {method}: A {row['cpu_a']:.3f}s B {row['cpu_b']:.3f}s (B/A {row['cpu_ratio']:.2f}), "
            f"outputs identical: {same}")
    return rows


KERNEL_COLUMNS = [("size", "size"), ("tensor", "tensor"), ("numel", "elements"), ("method", "method"), ("n", "n"),
                  ("cpu_a", "CPU s A"), ("cpu_b", "CPU s B"), ("cpu_ratio", "CPU B/A"), ("min_a", "min s A"),
                  ("min_b", "min s B"), ("ns_per_elem_a", "ns/element A"), ("ns_per_elem_b", "ns/element B"),
                  ("identical", "same output")]


def summarise(calls: dict[str, list[dict]], a: str, b: str) -> list[dict]:
    rows = []
    keys: list[tuple[str, str]] = []
    for data in calls[a]:
        for r in data["rows"]:
            if (r["size"], r["method"]) not in keys and r.get("status") == "ok":
                keys.append((r["size"], r["method"]))

    def pick(label: str, size: str, method: str) -> list[dict]:
        return [r for d in calls[label] for r in d["rows"] if r["size"] == size and r["method"] == method
                and r.get("status") == "ok"]

    for size, method in keys:
        ra, rb = pick(a, size, method), pick(b, size, method)
        if not ra or not rb:
            continue
        row = {"size": size, "method": method, "n": min(len(ra), len(rb))}
        for key, agg, name in (("cpu_seconds", statistics.median, "cpu"), ("seconds", statistics.median, "wall"),
                               ("peak_rss_mib", max, "rss"), ("anon_minus_baseline_mib", max, "anon"),
                               ("peak_file_mib", max, "file")):
            va, vb = agg(r[key] for r in ra), agg(r[key] for r in rb)
            row[f"{name}_a"], row[f"{name}_b"] = va, vb
            row[f"{name}_ratio"] = vb / va if va else None
        # each call also measures the floor: the method's CPU time over that call's floor cancels
        # most of the load drift between calls (the floor's own CPU time moves ±30 % on this box)
        row["xfloor_a"] = statistics.median(r["x_floor_cpu"] for r in ra)
        row["xfloor_b"] = statistics.median(r["x_floor_cpu"] for r in rb)
        row["xfloor_ratio"] = row["xfloor_b"] / row["xfloor_a"] if row["xfloor_a"] else None
        row["load"] = max(r["loadavg_1m"] for r in ra + rb)
        rows.append(row)
    return rows


COLUMNS = [("size", "size"), ("method", "method"), ("n", "n"), ("cpu_a", "CPU s A"), ("cpu_b", "CPU s B"),
           ("cpu_ratio", "CPU B/A"), ("xfloor_a", "CPU × floor A"), ("xfloor_b", "CPU × floor B"),
           ("xfloor_ratio", "(CPU × floor) B/A"), ("wall_a", "wall s A"), ("wall_b", "wall s B"), ("wall_ratio", "wall B/A"),
           ("rss_a", "peak RSS MiB A"), ("rss_b", "peak RSS MiB B"), ("anon_a", "working anon MiB A"),
           ("anon_b", "working anon MiB B"), ("file_a", "file-backed MiB A"), ("file_b", "file-backed MiB B"),
           ("load", "load avg")]


def run(a: str, b: str, sizes: list[str], methods: list[str], rounds: int, threads: int = 1,
        out: str | None = None, log=print, kernel: bool = False, tensor: str | None = None) -> dict:
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="acm-ab-"))
    try:
        trees = {a: materialise(a, tmp), b: materialise(b, tmp)}
        if kernel:
            rows = [r for size in sizes for r in kernel_ab(trees, size, methods, rounds, tensor, log=log)]
            data = {"benchmark": "ab-kernel", "a": a, "b": b, "sizes": sizes, "methods": methods, "rounds": rounds,
                    "threads": 1, "rows": rows, "total_seconds": time.perf_counter() - t0,
                    "command": " ".join(["python -m benchmarks.ab", *sys.argv[1:]])}
            data["path"] = str(save_result("ab-kernel", data, out))
            return data
        calls: dict[str, list[dict]] = {a: [], b: []}
        for size in sizes:
            for rnd in range(rounds):
                order = (a, b) if rnd % 2 == 0 else (b, a)
                for label in order:
                    data = one_call(trees[label], size, methods, threads, tmp / f"{len(calls[label])}.json")
                    calls[label].append(data)
                    log(f"[ab] {size} round {rnd + 1}/{rounds} {label}: " + ", ".join(
                        f"{r['method']} {r['cpu_seconds']:.2f} CPU-s" for r in data["rows"] if r.get("status") == "ok"))
        rows = summarise(calls, a, b)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = {"benchmark": "ab", "a": a, "b": b, "sizes": sizes, "methods": methods, "rounds": rounds,
            "threads": threads, "rows": rows, "calls": {k: [d["rows"] for d in v] for k, v in calls.items()},
            "total_seconds": time.perf_counter() - t0,
            "command": " ".join(["python -m benchmarks.ab", *sys.argv[1:]])}
    data["path"] = str(save_result("ab", data, out))
    return data


def report(data: dict) -> str:
    if data["benchmark"] == "ab-kernel":
        return (f"A = {data['a']}, B = {data['b']}; kernels alternating in one process, {data['rounds']} calls each, "
                "1 torch thread; median CPU s per call\n\n" + md_table(data["rows"], KERNEL_COLUMNS))
    return (f"A = {data['a']}, B = {data['b']}; {data['rounds']} interleaved rounds, {data['threads']} torch thread(s); "
            "medians of CPU / wall s, max of memory\n\n" + md_table(data["rows"], COLUMNS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="interleaved A/B of two engine versions (benchmarks.merge)")
    ap.add_argument("--a", default="HEAD", help="git ref or WORKTREE (default HEAD)")
    ap.add_argument("--b", default=WORKTREE, help="git ref or WORKTREE (default WORKTREE)")
    ap.add_argument("--sizes", nargs="+", default=["200m"])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kernel", action="store_true",
                    help="per-tensor kernels in one process on the size's largest tensor (low noise); "
                         "--rounds = calls per version")
    ap.add_argument("--tensor", default=None, help="--kernel: tensor name (default: the largest)")
    ap.add_argument("--quick", action="store_true", help="10m, TA + TIES, 1 round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.methods, args.rounds = ["10m"], ["task_arithmetic", "ties"], 1
    data = run(args.a, args.b, args.sizes, args.methods, args.rounds, args.threads, args.out, kernel=args.kernel,
               tensor=args.tensor)
    print(report(data))
    print(f"[ab] results: {data['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
