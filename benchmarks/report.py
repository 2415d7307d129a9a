"""Render Markdown tables from saved benchmark results (no re-run).

    python -m benchmarks.report                                   # the default result files
    python -m benchmarks.report --merge benchmarks/.cache/results/merge-1thread.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import analysis as analysis_bench
from benchmarks import kernels as kernels_bench
from benchmarks import latency as latency_bench
from benchmarks import merge as merge_bench
from benchmarks.common import RESULTS
from benchmarks.run_all import machine_line


def _load(path: str | Path | None, default: str) -> dict | None:
    p = Path(path) if path else RESULTS / default
    return json.loads(p.read_text()) if p.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("merge", "analysis", "latency", "kernels"):
        ap.add_argument(f"--{name}", default=None, help=f"{name} result JSON")
    args = ap.parse_args(argv)
    sections = [("merge", merge_bench.report), ("analysis", analysis_bench.report),
                ("latency", latency_bench.report), ("kernels", kernels_bench.report)]
    for name, render in sections:
        data = _load(getattr(args, name), f"{name}.json")
        if data is None:
            continue
        print(f"## {name}\n")
        print(f"Machine: {machine_line(data['machine'])}; load average at start {data['machine'].get('loadavg')}\n")
        print(f"Command: `{data.get('command', '')}`\n")
        print(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
