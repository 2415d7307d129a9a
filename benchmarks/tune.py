"""Tune speed: the 12-setting demo grid (``acm tune``) on 60 problems, end to end.

Target (issue 13): on the bundled demo pair, a 12-setting grid evaluated on 60 problems finishes
in under 2 minutes on the 2-core development machine. Measured here: the analysis once (it is
cached and reused by every merge of the pair, so it is timed separately), then ``acm.tune.run_tune``
with softmax-rule ACM-TIES at α ∈ {0.6, 0.7}, density 0.7, t ∈ {0.5, 1, 2, 4, 8} plus plain (12 settings), on
60 tune problems, with the base and fine-tuned models evaluated on both splits and the recommended
setting re-measured on 60 held-out problems. Wall and CPU seconds and the load average are recorded.

    python -m benchmarks.tune            # the target run
    python -m benchmarks.tune --quick    # 2 settings, 8 problems, a few tokens (smoke test)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_info, md_table, save_result

DEMO = ROOT / "assets" / "demo-models"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(quick: bool = False, out: str | None = None, *, problems: int | None = None, max_new_tokens: int | None = None,
        threads: int | None = None, keep_dir: str | None = None, log=print) -> dict:
    from acm.activations.analysis import analyze
    from acm.tune import expand_grid, run_tune

    base, long = DEMO / "tiny-math-base", DEMO / "tiny-math-long"
    if not (base / "config.json").is_file() or not (long / "config.json").is_file():
        raise SystemExit("the bundled demo models are missing (python -m acm build-demo)")
    problems = problems or (8 if quick else 60)
    max_new_tokens = max_new_tokens or (16 if quick else 256)
    # the softmax rule's t grid, as measured for issue 13 (the paper's acm rule takes t in [-3, 3])
    if quick:
        grid = expand_grid(["ties"], [0.7], [1.0], [0.7], rules=["softmax"])
    else:
        grid = expand_grid(["ties"], [0.6, 0.7], [0.5, 1, 2, 4, 8], [0.7], rules=["softmax"])
    work = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="acm-bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        t0, c0 = time.perf_counter(), _cpu_s()
        analysis = analyze(str(base), [str(long)], None, samples=4 if quick else None, seed=0, show_progress=False)
        analysis_s, analysis_cpu = time.perf_counter() - t0, _cpu_s() - c0
        log(f"[tune] analysis {analysis_s:.1f} s")
        t0, c0 = time.perf_counter(), _cpu_s()
        report = run_tune(str(base), [str(long)], work / "run", grid, limit=2 * problems, holdout=0.5,
                          analysis=analysis, max_new_tokens=max_new_tokens, batch_size=64, threads=threads,
                          restart=True, show_progress=not quick)
        tune_s, tune_cpu = time.perf_counter() - t0, _cpu_s() - c0
    finally:
        if not keep_dir:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    settings = report["settings"]
    per = sorted(s["seconds"] for s in settings)
    row = {"settings": len(grid), "tune_problems": report["n_tune"], "holdout_problems": report["n_holdout"],
           "max_new_tokens": max_new_tokens, "threads": report.get("threads"), "tune_s": round(tune_s, 1),
           "tune_cpu_s": round(tune_cpu, 1), "per_setting_median_s": round(per[len(per) // 2], 2),
           "analysis_s": round(analysis_s, 1), "analysis_cpu_s": round(analysis_cpu, 1),
           "load_before": round(load_before[0], 2), "load_after": round(load_after[0], 2),
           "under_2_min": tune_s < 120}
    data = {"benchmark": "tune", "machine": machine_info(), "row": row, "report": report,
            "command": " ".join(["python -m benchmarks.tune", *sys.argv[1:]])}
    data["path"] = str(save_result("tune" + ("_quick" if quick else ""), data, out))
    return data


COLUMNS = [("settings", "settings"), ("tune_problems", "tune problems"), ("holdout_problems", "held-out problems"),
           ("max_new_tokens", "max new tokens"), ("threads", "torch threads"), ("tune_s", "tune wall s"),
           ("tune_cpu_s", "tune CPU s"), ("per_setting_median_s", "per setting s (median)"),
           ("analysis_s", "analysis s (once, cached)"), ("load_before", "load avg before"),
           ("load_after", "load avg after"), ("under_2_min", "< 2 min")]


def report(data: dict) -> str:
    rep = data["report"]
    lines = [md_table([data["row"]], COLUMNS)]
    rec = rep["recommended"]
    lines.append("| setting | tune acc. | tune length | frontier |\n|---|---|---|---|")
    for s in sorted(rep["settings"], key=lambda s: s["mean_length"]):
        lines.append(f"| {s['label']} | {s['accuracy']:.3f} | {s['mean_length']:.1f} | {'✓' if s['on_frontier'] else ''} |")
    for k, v in rep["references"].items():
        h = v.get("holdout") or {}
        lines.append(f"\n{v.get('label') or k}: tune {v['tune']['accuracy']:.3f} / {v['tune']['mean_length']:.1f} tok; "
                     f"held-out {h.get('accuracy', float('nan')):.3f} / {h.get('mean_length', float('nan')):.1f} tok")
    if rec.get("key"):
        h = rec.get("holdout") or {}
        lines.append(f"\nrecommended ({rep['objective']}): {rec['label']} — {rec['why']}; held-out "
                     f"{h.get('accuracy', float('nan')):.3f} / {h.get('mean_length', float('nan')):.1f} tok")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="acm tune speed on the demo pair (12 settings, 60 problems)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--problems", type=int, default=None, help="tune problems (the same number is held out)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: acm.tune.auto_threads)")
    ap.add_argument("--keep-dir", default=None, help="keep the run folder (tune.jsonl, frontier.*) here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    data = run(args.quick, args.out, problems=args.problems, max_new_tokens=args.max_new_tokens, threads=args.threads,
               keep_dir=args.keep_dir)
    print(report(data))
    print(f"[tune] results: {data['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
