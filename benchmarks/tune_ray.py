"""Tune on Ray vs locally: the same 8-setting demo grid, ``--executor local`` against ``--executor ray`` (issue 24).

Grid: softmax-rule ACM-TIES at α ∈ {0.6, 0.7}, density 0.7, t ∈ {1, 2, 4} plus plain (8 settings) on the bundled
demo pair, 60 tune + 60 held-out problems, greedy, max 256 new tokens, batch 64 (as ``benchmarks.tune``). Local:
one setting after another in this process, 1 torch thread. Ray: a local cluster on 127.0.0.1 with 2 CPUs, each
setting one task asking for 1 CPU (1 torch thread), so two settings run at once. The analysis is computed once
before and shared (timed apart). Rounds alternate local, ray, local, ray… so a change in the machine's load hits
both. Reported per run: the whole ``run_tune`` wall time (references and the held-out check on the driver
included), the grid's own time (last reference record → last setting record), the Ray cluster's start-up, and
the load average.

    python -m benchmarks.tune_ray              # 2 rounds
    python -m benchmarks.tune_ray --quick      # 2 settings, 4 problems, a few tokens (smoke test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_info, md_table, save_result

DEMO = ROOT / "assets" / "demo-models"


def _one(executor_name: str, base: Path, long: Path, grid, work: Path, kw: dict) -> dict:
    """One timed run_tune on the local executor or a fresh local Ray cluster (2 CPUs)."""
    from acm.tune import run_tune

    stamps: list[tuple[str, float]] = []
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    executor, start_s = None, 0.0
    if executor_name == "ray":
        from acm.tune_ray import RayExecutor

        executor = RayExecutor(num_cpus=2).__enter__()
        start_s = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        report = run_tune(str(base), [str(long)], work / executor_name, grid, executor=executor,
                          on_record=lambda r: stamps.append((r["kind"], time.perf_counter())), **kw)
        tune_s = time.perf_counter() - t1
    finally:
        if executor is not None:
            executor.close()
    last_ref = max(t for k, t in stamps if k == "reference")
    last_setting = max(t for k, t in stamps if k == "setting")
    per = sorted(s["seconds"] for s in report["settings"])
    return {"executor": executor_name, "settings": len(grid), "tune_s": round(tune_s, 1),
            "grid_s": round(last_setting - last_ref, 1), "cluster_start_s": round(start_s, 1),
            "per_setting_median_s": round(per[len(per) // 2], 2), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "complete": report["complete"],
            "frontier": report["frontier"], "recommended": report["recommended"].get("key")}


def run(quick: bool = False, out: str | None = None, *, rounds: int = 2, log=print) -> dict:
    from acm.activations.analysis import analyze
    from acm.tune import expand_grid

    base, long = DEMO / "tiny-math-base", DEMO / "tiny-math-long"
    if not (base / "config.json").is_file():
        raise SystemExit("the bundled demo models are missing (python -m acm build-demo)")
    grid = expand_grid(["ties"], [0.7], [1.0], [0.7], rules=["softmax"]) if quick else \
        expand_grid(["ties"], [0.6, 0.7], [1, 2, 4], [0.7], rules=["softmax"])
    problems, tokens = (4, 16) if quick else (60, 256)
    work = Path(tempfile.mkdtemp(prefix="acm-bench-tune-ray-"))
    rows = []
    try:
        t0 = time.perf_counter()
        analysis = analyze(str(base), [str(long)], None, samples=4 if quick else None, seed=0, show_progress=False)
        analysis_s = round(time.perf_counter() - t0, 1)
        kw = {"limit": 2 * problems, "holdout": 0.5, "analysis": analysis, "max_new_tokens": tokens,
              "batch_size": 64, "threads": 1, "restart": True, "show_progress": False}
        for r in range(1 if quick else rounds):
            for name in ("local", "ray"):
                row = _one(name, base, long, grid, work, kw)
                row["round"] = r + 1
                log(f"[tune_ray] round {r + 1} {name}: tune {row['tune_s']} s, grid {row['grid_s']} s")
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = len({(tuple(r["frontier"]), r["recommended"]) for r in rows}) == 1
    data = {"benchmark": "tune_ray", "machine": machine_info(), "rows": rows, "analysis_s": analysis_s,
            "same_frontier_and_recommendation": same, "problems": problems, "max_new_tokens": tokens,
            "command": " ".join(["python -m benchmarks.tune_ray", *sys.argv[1:]])}
    data["path"] = str(save_result("tune_ray" + ("_quick" if quick else ""), data, out))
    return data


COLUMNS = [("round", "round"), ("executor", "executor"), ("settings", "settings"), ("tune_s", "run_tune wall s"),
           ("grid_s", "grid s"), ("cluster_start_s", "Ray start s"), ("per_setting_median_s", "per setting s (median)"),
           ("load_before", "load avg before"), ("load_after", "load avg after")]


def report(data: dict) -> str:
    rows = data["rows"]
    lines = [md_table(rows, COLUMNS)]
    for r in sorted({r["round"] for r in rows}):
        loc = next(x for x in rows if x["round"] == r and x["executor"] == "local")
        ray = next(x for x in rows if x["round"] == r and x["executor"] == "ray")
        lines.append(f"round {r}: speed-up of the grid {loc['grid_s'] / max(ray['grid_s'], 1e-9):.2f}×, of the whole run "
                     f"{loc['tune_s'] / max(ray['tune_s'] + ray['cluster_start_s'], 1e-9):.2f}× (Ray start-up included)")
    lines.append(f"same frontier and recommendation in every run: {data['same_frontier_and_recommendation']}; "
                 f"analysis (once, shared) {data['analysis_s']} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="acm tune: local executor vs a 2-CPU local Ray cluster (8 settings)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = run(args.quick, args.out, rounds=args.rounds)
    print(report(data))
    print(f"[tune_ray] results: {data['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
