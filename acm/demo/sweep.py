"""Measure the Long-to-Short trade-off on the demo pair: plain vs ACM merges over a small grid.

``python -m acm.demo.sweep --out results_dir`` runs the analysis once, merges the base and the
long model with task arithmetic and TIES (plain and ACM, several α / t / density), evaluates every
model greedily on the bundled evaluation set and writes ``sweep.json`` plus ``table.md`` (the
table in the README's "Demo results"). Merged folders are temporary; only numbers are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
BASE = ASSETS / "demo-models" / "tiny-math-base"
LONG = ASSETS / "demo-models" / "tiny-math-long"
CALIBRATION = ASSETS / "calibration" / "demo_calibration.jsonl"
EVAL = ASSETS / "eval" / "demo_eval.jsonl"


def settings(alphas: Sequence[float], ts: Sequence[float], densities: Sequence[float]) -> list[dict]:
    """The grid: every (method, α[, density]) plain, and the same with ACM at each t."""
    out = []
    for alpha in alphas:
        out.append({"method": "task_arithmetic", "alpha": alpha, "t": None, "density": None})
        out += [{"method": "task_arithmetic", "alpha": alpha, "t": t, "density": None} for t in ts]
        for d in densities:
            out.append({"method": "ties", "alpha": alpha, "t": None, "density": d})
            out += [{"method": "ties", "alpha": alpha, "t": t, "density": d} for t in ts]
    return out


def label(s: dict) -> str:
    name = ("ACM-" if s["t"] is not None else "") + ("TA" if s["method"] == "task_arithmetic" else "TIES")
    parts = [f"α={s['alpha']:g}"]
    if s["density"] is not None:
        parts.append(f"d={s['density']:g}")
    if s["t"] is not None:
        parts.append(f"t={s['t']:g}")
    return f"{name} ({', '.join(parts)})"


def _row(name: str, m: dict, ref_long: float | None) -> dict:
    row = {"model": name, "accuracy": m["accuracy"], "mean_length": m["mean_length"],
           "median_length": m["median_length"], "acc_per_1k_tokens": m["accuracy_per_1k_tokens"],
           "per_level": {k: {"accuracy": v["accuracy"], "mean_length": v["mean_length"]}
                         for k, v in m.get("per_level", {}).items()}}
    if ref_long:
        row["length_cut_vs_long"] = round(1 - m["mean_length"] / ref_long, 4)
    return row


def markdown(rows: list[dict]) -> str:
    levels = sorted({k for r in rows for k in r["per_level"]}, key=float)
    head = ("| model | accuracy | mean length | length cut vs long | acc. per 1k tokens | "
            + " | ".join(f"L{k} acc" for k in levels) + " |")
    sep = "|" + "---|" * (5 + len(levels))
    lines = [head, sep]
    for r in rows:
        cut = r.get("length_cut_vs_long")
        lines.append(
            f"| {r['model']} | {r['accuracy']:.3f} | {r['mean_length']:.1f} | "
            f"{'' if cut is None else f'{100 * cut:.0f}%'} | {r['acc_per_1k_tokens']:.2f} | "
            + " | ".join(f"{r['per_level'][k]['accuracy']:.2f}" for k in levels) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(out: Path, *, base: Path = BASE, long: Path = LONG, calibration: Path = CALIBRATION,
              eval_path: Path = EVAL, alphas: Sequence[float], ts: Sequence[float], densities: Sequence[float],
              limit: int | None, max_new_tokens: int, batch_size: int, samples: int | None,
              threads: int) -> dict:
    import torch

    from acm.analysis import analyze
    from acm.coefficients import lambdas_by_group
    from acm.evaluate import evaluate
    from acm.merge import MergeOptions, merge_models

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    analysis = analyze(str(base), [str(long)], str(calibration), samples=samples, seed=0, show_progress=False)
    analysis.save(out / "analysis.json")
    ev = dict(limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
    ref = evaluate([str(base), str(long)], str(eval_path), **ev)
    base_m, long_m = ref["models"]
    rows = [_row("base (System 1)", base_m, long_m["mean_length"]), _row("long (System 2)", long_m, None)]
    print(json.dumps(rows[0]), json.dumps(rows[1]), sep="\n", flush=True)
    for s in settings(alphas, ts, densities):
        opts = MergeOptions(method=s["method"], alpha=s["alpha"], density=s["density"] or 0.2)
        lams = lambdas_by_group(analysis, s["t"], alpha=s["alpha"]) if s["t"] is not None else None
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            merged = Path(tmp) / "merged"
            merge_models(str(base), [str(long)], merged, opts, lambdas=lams, show_progress=False)
            res = evaluate([str(merged)], str(eval_path), **ev)["models"][0]
        row = {**_row(label(s), res, long_m["mean_length"]), "setting": s}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"base": str(base), "long": str(long), "eval": str(eval_path), "n": ref["n"], "max_new_tokens": max_new_tokens,
              "nmi": {g: round(v, 4) for g, v in zip(analysis.groups, analysis.nmi_matrix()[0].tolist())},
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "sweep.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "table.md").write_text(markdown(rows), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m acm.demo.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--base", type=Path, default=BASE)
    p.add_argument("--long", type=Path, default=LONG)
    p.add_argument("--calibration", type=Path, default=CALIBRATION)
    p.add_argument("--eval", type=Path, default=EVAL)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    p.add_argument("--ts", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--samples", type=int, default=None, help="calibration prompts (default: the analysis default)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    res = run_sweep(a.out, base=a.base, long=a.long, calibration=a.calibration, eval_path=a.eval, alphas=a.alphas, ts=a.ts, densities=a.densities, limit=a.limit,
                    max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, samples=a.samples, threads=a.threads)
    print((a.out / "table.md").read_text())
    print(f"{len(res['rows'])} rows in {res['seconds']} s -> {a.out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
