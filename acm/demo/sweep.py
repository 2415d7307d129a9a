"""Measure the Long-to-Short trade-off on the demo pair: plain vs ACM merges over a small grid.

``python -m acm.demo.sweep --out results_dir`` is a preset of ``acm tune`` (``acm.tune``) for the
demo pair: the analysis once, task arithmetic and TIES — plain, the paper's rule (``acm``, at each
``--ts``, default −1 −0.5 0.5 0.7 0.9; ``--against`` / ``--applies`` add its switches as grid
dimensions) and this project's softmax rule (at each ``--softmax-ts``) over several α / density —
every model evaluated greedily on the first ``--limit`` bundled problems (no held-out split), then
``sweep.json`` plus ``table.md`` (the table in the README's "Demo results"). Merged folders are
temporary; only numbers are kept, streamed to ``tune.jsonl`` so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
BASE = ASSETS / "demo-models" / "tiny-math-base"
LONG = ASSETS / "demo-models" / "tiny-math-long"
CALIBRATION = ASSETS / "calibration" / "demo_calibration.jsonl"
EVAL = ASSETS / "eval" / "demo_eval.jsonl"


_RULE_FIELDS = ("rule", "against", "applies", "estimator")   # absent from a softmax / plain row (as before)
DEMO_ACM_TS = (-1.0, -0.5, 0.5, 0.7, 0.9)    # issue 19's demo table: the paper's ablation ends and 0.7, and t < 0
DEMO_SOFTMAX_TS = (2.0, 5.0, 10.0)


def settings(alphas: Sequence[float], ts: Sequence[float] | None = None, densities: Sequence[float] = (0.2, 0.5),
             metrics: Sequence[str] = ("nmi",), methods: Sequence[str] = ("task_arithmetic", "ties"), *,
             rules: Sequence[str] = ("acm", "softmax"), softmax_ts: Sequence[float] | None = None,
             against: Sequence[str] = ("fine-tuned",), applies: Sequence[str] = ("task-vectors",),
             estimators: Sequence[str] = ("labels",), thetas: Sequence[float] | None = None) -> list[dict]:
    """The grid, α by α and method by method (the table's row order): every (method, α[, density]) plain,
    the paper's rule at each t (``ts``, default ``DEMO_ACM_TS``) × switches, and softmax at each
    ``softmax_ts`` (default ``DEMO_SOFTMAX_TS``; ``ts`` when softmax is the only rule) × metric — built and
    checked by ``acm.tune.expand_grid``.
    The paper's own setting has no α, so it appears once (with the first α)."""
    from acm.tune import expand_grid

    acm_ts = list(thetas) if thetas is not None else list(DEMO_ACM_TS if ts is None else ts)
    softmax_only = all(str(r).strip().lower() == "softmax" for r in rules)   # then --ts is softmax's (as before)
    soft_ts = list(softmax_ts if softmax_ts is not None else ts if (softmax_only and ts is not None)
                   else DEMO_SOFTMAX_TS)
    out: dict[str, dict] = {}
    for alpha in alphas:
        for method in methods:
            dens = list(densities) if method == "ties" else []
            grid = expand_grid([method], [alpha], acm_ts, dens, [], rules=rules, softmax_ts=soft_ts, against=against,
                               applies=applies, estimators=estimators, metrics=list(metrics), max_settings=None)
            for s in grid:
                out.setdefault(s.key(), s.to_dict())
    return list(out.values())


def label(s: dict) -> str:
    """The README table's name of a grid point (``acm.tune.Setting.label``)."""
    from acm.tune import Setting

    return Setting.from_dict(s).label()


def _row(name: str, m: dict, ref_long: float | None) -> dict:
    row = {"model": name, "accuracy": m["accuracy"], "mean_length": m["mean_length"],
           "median_length": m["median_length"], "acc_per_1k_tokens": m["accuracy_per_1k_tokens"],
           "per_level": {k: {"accuracy": v["accuracy"], "mean_length": v["mean_length"]}
                         for k, v in m.get("per_level", {}).items()}}
    if ref_long:
        row["length_cut_vs_long"] = round(1 - m["mean_length"] / ref_long, 4)
    lam = m.get("rule_lambda") or m.get("rule_kept")   # acm rule: λ per key (older runs: the sigmoid rule's 1 − s)
    if lam:
        row["lambda"] = lam
    return row


def markdown(rows: list[dict]) -> str:
    levels = sorted({k for r in rows for k in r["per_level"]}, key=float)
    has_lam = any(r.get("lambda") for r in rows)   # a column only when the acm rule made some merge
    head = ("| model | " + ("λ (acm rule): mean (range) | " if has_lam else "") + "accuracy | mean length | "
            "length cut vs long | acc. per 1k tokens | " + " | ".join(f"L{k} acc" for k in levels) + " |")
    sep = "|" + "---|" * (5 + has_lam + len(levels))
    lines = [head, sep]
    for r in rows:
        cut = r.get("length_cut_vs_long")
        k = list((r.get("lambda") or {}).values())
        kcol = ((f"{sum(k) / len(k):.2f} ({min(k):.2f}–{max(k):.2f}) | " if k else "— | ") if has_lam else "")
        lines.append(
            f"| {r['model']} | {kcol}{r['accuracy']:.3f} | {r['mean_length']:.1f} | "
            f"{'' if cut is None else f'{100 * cut:.0f}%'} | {r['acc_per_1k_tokens']:.2f} | "
            + " | ".join(f"{r['per_level'][k]['accuracy']:.2f}" for k in levels) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(out: Path, *, base: Path = BASE, long: Path = LONG, calibration: Path = CALIBRATION,
              eval_path: Path = EVAL, alphas: Sequence[float], ts: Sequence[float] | None,
              densities: Sequence[float], limit: int | None, max_new_tokens: int, batch_size: int,
              samples: int | None, threads: int | None = None, metrics: Sequence[str] = ("nmi",),
              methods: Sequence[str] = ("task_arithmetic", "ties"), rules: Sequence[str] = ("acm", "softmax"),
              softmax_ts: Sequence[float] | None = None, against: Sequence[str] = ("fine-tuned",),
              applies: Sequence[str] = ("task-vectors",), estimators: Sequence[str] = ("labels",),
              thetas: Sequence[float] | None = None) -> dict:
    """The demo preset of ``acm.tune``: this grid, the first ``limit`` problems, no held-out split.

    Results stream to ``out/tune.jsonl`` as with ``acm tune`` (so a killed sweep resumes); the
    ``sweep.json`` / ``table.md`` of the README are built from them.
    """
    from acm.evaluation.evaluate import load_data
    from acm.tune import Setting, TuneOptions, run_tune

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    grid = [Setting.from_dict(s) for s in settings(alphas, ts, densities, metrics, methods, rules=rules,
                                                    softmax_ts=softmax_ts, against=against, applies=applies,
                                                    estimators=estimators, thetas=thetas)]
    rows_in = load_data(str(eval_path), limit=limit)
    recs: list[dict] = []

    def show(rec: dict) -> None:
        if rec["kind"] in ("reference", "setting"):
            recs.append(rec)
            print(json.dumps({k: rec[k] for k in ("label", "accuracy", "mean_length")}, ensure_ascii=False),
                  flush=True)

    options = TuneOptions(data=rows_in, holdout=0.0, analysis=out / "analysis.json", calibration=str(calibration),
                          samples=samples, max_new_tokens=max_new_tokens, batch_size=batch_size, threads=threads)
    report = run_tune(str(base), [str(long)], out, grid, options, show_progress=False, on_record=show)
    from acm.tune import read_results

    done = {(r["kind"], r["key"]): r for r in read_results(out / "tune.jsonl") if r.get("kind") != "run"}
    base_m, long_m = done[("reference", "base")], done[("reference", "ft")]
    rows = [_row("base (System 1)", base_m, long_m["mean_length"]), _row("long (System 2)", long_m, None)]
    for s in grid:
        m = done[("setting", s.key())]
        rows.append({**_row(label(s.to_dict()), m, long_m["mean_length"]),
                     "setting": {k: v for k, v in s.to_dict().items()
                                 if k != "drop_rate" and not (k in _RULE_FIELDS and v is None)}})
    from acm.activations.result import AnalysisResult

    analysis = AnalysisResult.load(out / "analysis.json") if (out / "analysis.json").is_file() else None
    result = {"base": str(base), "long": str(long), "eval": str(eval_path), "n": len(rows_in),
              "max_new_tokens": max_new_tokens,
              "nmi": ({g: round(v, 4) for g, v in zip(analysis.groups, analysis.nmi_matrix()[0].tolist())}
                      if analysis is not None and "nmi" in analysis.metrics() else None),
              "similarity": {} if analysis is None else
              {k: {g: round(v, 4) for g, v in zip(analysis.groups, analysis.similarity_matrix(k)[0])}
               for k in analysis.metrics()},
              "sample_mi_mean": None if analysis is None or not analysis.has_sample_mi() else
              {g: round(float(v), 4) for g, v in zip(analysis.sample_info["point_groups"],
                                                    analysis.sample_mi_matrix()[0].mean(axis=-1))},
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "tune": report.get("recommended")}
    (out / "sweep.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "table.md").write_text(markdown(rows), encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from acm.activations.similarity import keys_help

    p = argparse.ArgumentParser(prog="python -m acm.demo.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--base", type=Path, default=BASE)
    p.add_argument("--long", type=Path, default=LONG)
    p.add_argument("--calibration", type=Path, default=CALIBRATION)
    p.add_argument("--eval", type=Path, default=EVAL)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    p.add_argument("--rules", nargs="+", default=["acm", "softmax"], choices=("acm", "softmax", "sigmoid"),
                   help="coefficient rules to compare (default: acm = the paper's rule, and softmax = this "
                        "project's; sigmoid = acm --against merged --applies merged-delta)")
    p.add_argument("--ts", type=float, nargs="+", default=None,
                   help=f"acm rule t values in [-3, 3] (default {' '.join(f'{t:g}' for t in DEMO_ACM_TS)})")
    p.add_argument("--softmax-ts", type=float, nargs="+", default=None,
                   help=f"softmax rule t values (default {' '.join(f'{t:g}' for t in DEMO_SOFTMAX_TS)})")
    p.add_argument("--against", nargs="+", default=["fine-tuned"], choices=("fine-tuned", "merged"),
                   help="acm rule: MI against the fine-tuned models (default) and/or a plain merge")
    p.add_argument("--applies", nargs="+", default=["task-vectors"], choices=("task-vectors", "merged-delta"),
                   help="acm rule: λ on the task vectors with 1/N (default) and/or on a plain merge's delta")
    p.add_argument("--thetas", type=float, nargs="+", default=None, help=argparse.SUPPRESS)   # old sigmoid θ
    p.add_argument("--rule-estimators", nargs="+", default=["labels"], choices=("labels", "binned"),
                   help="acm rule --against merged: per-sample MI estimators (default labels)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--metrics", nargs="+", default=["nmi"],
                   help=f"similarity metric(s) driving the softmax rule's λ, compared side by side: {keys_help()}")
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=("task_arithmetic", "ties"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--samples", type=int, default=None, help="calibration prompts (default: the analysis default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: acm.tune.auto_threads, 1 for the demo models)")
    a = p.parse_args(argv)
    from acm.activations.similarity import parse_metrics
    from acm.errors import InputError

    try:
        res = _run_main(a, parse_metrics)
    except InputError as exc:            # a bad grid or input: one line, exit 2 (as the acm CLI)
        print(f"python -m acm.demo.sweep: error: {exc}", file=sys.stderr)
        return 2
    print((a.out / "table.md").read_text())
    print(f"{len(res['rows'])} rows in {res['seconds']} s -> {a.out / 'sweep.json'}")
    return 0


def _run_main(a: argparse.Namespace, parse_metrics) -> dict:
    return run_sweep(a.out, base=a.base, long=a.long, calibration=a.calibration, eval_path=a.eval, alphas=a.alphas,
                     ts=a.ts, softmax_ts=a.softmax_ts, densities=a.densities, rules=a.rules, against=a.against,
                     applies=a.applies, thetas=a.thetas, estimators=a.rule_estimators, limit=a.limit,
                     max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, samples=a.samples,
                     threads=a.threads, metrics=parse_metrics(a.metrics), methods=a.methods)


if __name__ == "__main__":
    sys.exit(main())
