"""Cost of the fim rule's Fisher pass at the paper's 1.5B shape on the CPU, through the CLI a user types.

``python -m acm analyze --rule fim`` on the 1.5B-shaped random-weight stand-in pair (``benchmarks.fullsize``:
Qwen2.5-Math-1.5B's shape, tied base, untied fine-tune, bf16 files), in a fresh process: the Fisher pass on
the base (S random sequences × L tokens, forward and backward one sequence at a time) and ‖δ‖² streamed from
both checkpoints. Reported: wall time of the command, the pass's own time and the ‖δ‖² time (from the file's
``fisher`` block), the command's CPU seconds (user + system: what the load does not change), its peak RSS
(``ru_maxrss``, recorded by the pass) and the machine load.

    python -m benchmarks.fisher_pass --threads 1                   # float32 (the CPU default), S=8, L=64
    python -m benchmarks.fisher_pass --threads 1 --dtype bfloat16

Time on a shared machine is pessimistic; peak memory is not (it does not depend on the load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args) -> dict:
    from benchmarks.fullsize import get_pair

    pair = get_pair(verbose=True)
    out = Path(tempfile.mkdtemp(prefix="fisher-bench-")) / "fim.json"
    cmd = [sys.executable, "-m", "acm", "analyze", "--rule", "fim", "--base", str(pair.base), "--ft", str(pair.fts[0]),
           "--fim-sequences", str(args.sequences), "--fim-length", str(args.length), "--device", "cpu",
           "--out", str(out)] + (["--dtype", args.dtype] if args.dtype else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    import resource

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)       # CPU seconds: independent of the machine's load
    load1 = os.getloadavg()
    if res.returncode != 0:
        raise SystemExit(f"acm analyze failed: {res.stderr.strip()[-2000:]}")
    fb = json.loads(out.read_text(encoding="utf-8"))["fisher"]
    return {"command": "python -m acm " + " ".join(cmd[3:]), "threads": args.threads, "dtype": fb["dtype"],
            "sequences": fb["sequences"], "length": fb["length"], "params": pair.params, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "fisher_s": fb["seconds"], "delta_s": fb["delta_seconds"],
            "peak_rss_gib": round((fb.get("peak_rss_bytes") or 0) / 2**30, 2),
            "load_before": [round(x, 1) for x in load0], "load_after": [round(x, 1) for x in load1],
            "highest": max(zip(fb["scores"], fb["keys"]))[1], "stdout": res.stdout.strip().splitlines()[-2:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fisher_pass", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16")
    out = run(p.parse_args(argv))
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
