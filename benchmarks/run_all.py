"""Run every benchmark and write one Markdown report.

    python -m benchmarks.run_all --quick      # < 2 minutes on 2 CPU cores: smallest size, few tokens
    python -m benchmarks.run_all              # the full run behind BENCHMARKS.md (~15-20 min on 2 cores)

Results: ``benchmarks/.cache/results/{merge,analysis,latency}.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import analysis as analysis_bench
from benchmarks import kernels as kernels_bench
from benchmarks import latency as latency_bench
from benchmarks import merge as merge_bench
from benchmarks.common import RESULTS, machine_info


def machine_line(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GiB RAM, GPU: {info['gpu'] or 'none'}; "
            f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
            f"transformers {info['transformers']}, safetensors {info['safetensors']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=None, help="merge sizes (default: 10m 50m 200m 800m)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["merge", "analysis", "latency", "kernels"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for merge/analysis children (1 = contention-robust; default one per core)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    parts = [f"# Benchmark report ({'quick' if args.quick else 'full'})\n",
             f"Machine: {machine_line(machine_info())}\n"]
    if "merge" not in args.skip:
        sizes = ["10m"] if args.quick else (args.sizes or merge_bench.DEFAULT_SIZES)
        data = merge_bench.run(sizes, repeats=1 if args.quick else None, threads=args.threads)
        command = 'python -m benchmarks.merge --quick' if args.quick else 'python -m benchmarks.merge --sizes ' + ' '.join(sizes)
        parts += ["## Merge\n", f"Command: `{command}`; "
                  f"cache: {data['cache']}; shard limit {data['shard_limit']}\n", merge_bench.report(data)]
    if "analysis" not in args.skip:
        if args.quick:
            data = analysis_bench.run(["10m"], samples=8, scaling=[4, 8], max_tokens=64, batch_size=4,
                                      threads=args.threads)
        else:
            data = analysis_bench.run(["10m", "50m"], samples=16, scaling=[8, 32, 128], max_tokens=256, batch_size=4,
                                      threads=args.threads)
        parts += ["## Analysis\n", analysis_bench.report(data)]
    if "latency" not in args.skip:
        data = latency_bench.run(args.quick)
        parts += ["## Interactive latency\n", latency_bench.report(data)]
    if "kernels" not in args.skip:
        data = kernels_bench.run(1 << 20 if args.quick else 32000 * 2048, reps=2 if args.quick else 3)
        parts += ["## Merge kernels\n", kernels_bench.report(data)]
    parts.append(f"Total: {time.perf_counter() - t0:.0f} s\n")
    text = "\n".join(parts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / ("report-quick.md" if args.quick else "report.md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
