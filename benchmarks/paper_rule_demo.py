"""The paper's rule (arXiv 2505.14009, Eq. 2-3) on the bundled Long-to-Short demo pair, through the CLI.

Every model in the table is made and measured by the commands a user would type (``python -m acm
analyze / merge / eval``), so the table can be re-run and each row checked by hand. The commands are
written to ``OUT/commands.sh`` as they run.

* one analysis of base vs the long model on the bundled calibration set (NMI for the softmax rows and
  per-sample MI for the ``acm`` rows with MI against the fine-tuned model);
* reference rows: the base and long models, plain TA (α) and TIES (α, density), this project's
  softmax rule at t = 1 (the app's previous default);
* the ``acm`` rule for TA and TIES at each t and each (MI against, λ applies to) combination:
  ``fine-tuned`` + ``task-vectors`` (the paper's text: θ₀ + (1/N) Σ λ τ, no α) and ``merged`` +
  ``merged-delta`` (the public derivative: base + λ·(plain merge at α − base)); ``--combos all`` adds
  ``fine-tuned`` + ``merged-delta`` and ``merged`` + ``task-vectors``;
* every model evaluated greedily on the bundled problems (all 300 by default, max 256 new tokens, batch
  50, 1 thread: as ``acm.demo.sweep``), accuracy ± one standard error (binomial) and mean answer length ±
  one standard error (over replies).

    python -m benchmarks.paper_rule_demo --out /tmp/paper_rule        # canonical combos (~25 min, 2 cores)
    python -m benchmarks.paper_rule_demo --out /tmp/paper_rule --combos all
    python -m benchmarks.paper_rule_demo --out /tmp/fim --combos paper --ts 0.7 --fim-ts 1 2 --fim-only

``--fim-ts`` adds, per method, the data-free ``fim`` rule (issue 22; docs/formulas.md) at each t from one
``acm analyze --rule fim`` of the pair (``OUT/fim_analysis.json``: 8 random sequences × 64 tokens, seed 0);
``--fim-only`` adds its Fisher-only ablation at the same t.

Resumable: a finished evaluation group (``OUT/evals/*.json``) is not run again. Merged folders are
deleted after their evaluation unless ``--keep``. Results: ``OUT/results.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "demo-models" / "tiny-math-base"
LONG = ROOT / "assets" / "demo-models" / "tiny-math-long"
EVAL = ROOT / "assets" / "eval" / "demo_eval.jsonl"
PAPER_TS = (-1.0, -0.5, 0.5, 0.7, 0.9)
COMBOS = {"paper": ("fine-tuned", "task-vectors"), "derivative": ("merged", "merged-delta"),
          "ft-delta": ("fine-tuned", "merged-delta"), "merged-tv": ("merged", "task-vectors")}
COMBO_LABEL = {"paper": "MI vs fine-tuned, λ on task vectors (paper text)",
               "derivative": "MI vs merged, λ on merged delta (derivative)",
               "ft-delta": "MI vs fine-tuned, λ on merged delta",
               "merged-tv": "MI vs merged, λ on task vectors"}
METHOD_LABEL = {"task_arithmetic": "TA", "ties": "TIES"}


def fim_groups(methods: list[str], fim_ts: list[float], fisher_only: bool, density: float) -> list[dict]:
    """The fim rule's evaluation groups: per method, each t (and the Fisher-only ablation when asked)."""
    groups = []
    for method in methods:
        m = METHOD_LABEL[method]
        dens = ["--density", f"{density:g}"] if method == "ties" else []
        dlabel = f", d={density:g}" if method == "ties" else ""
        models = []
        for score in ["fisher-delta"] + (["fisher-only"] if fisher_only else []):
            for t in fim_ts:
                flags = ["--method", method, *dens, "--acm", "{fim_analysis}", "--rule", "fim", "--t", f"{t:g}"]
                tag = "" if score == "fisher-delta" else "-fonly"
                if score != "fisher-delta":
                    flags += ["--fim-score", score]
                what = "F·‖δ‖²" if score == "fisher-delta" else "Fisher only"
                models.append({"name": f"{m.lower()}-fim{tag}-t{t:g}", "rule": "fim", "t": t, "score": score,
                               "label": f"{m} + fim rule (t={t:g}{dlabel}), {what}", "flags": flags})
        groups.append({"name": f"{m.lower()}-fim", "models": models})
    return groups


def settings(methods: list[str], ts: list[float], combos: list[str], alpha: float, density: float,
             softmax_t: float) -> list[dict]:
    """Evaluation groups: each a name and its models (name, merge flags, label)."""
    groups = []
    for method in methods:
        m = METHOD_LABEL[method]
        dens = ["--density", f"{density:g}"] if method == "ties" else []
        plain_label = f"{m} (α={alpha:g}" + (f", d={density:g})" if method == "ties" else ")")
        groups.append({"name": f"{m.lower()}-plain", "models": [
            {"name": f"{m.lower()}-plain", "label": plain_label, "rule": "plain",
             "flags": ["--method", method, "--alpha", f"{alpha:g}", *dens]},
            {"name": f"{m.lower()}-softmax", "label": f"{plain_label[:-1]}, t={softmax_t:g}), softmax rule (NMI)",
             "rule": "softmax", "flags": ["--method", method, "--alpha", f"{alpha:g}", *dens, "--acm", "{analysis}",
                                          "--rule", "softmax", "--t", f"{softmax_t:g}"]}]})
        for combo in combos:
            against, applies = COMBOS[combo]
            models = []
            for t in ts:
                flags = ["--method", method, *dens, "--rule", "acm", "--t", f"{t:g}", "--against", against,
                         "--applies", applies]
                if against == "fine-tuned":
                    flags += ["--acm", "{analysis}"]
                else:
                    flags += ["--calibration", "bundled"]
                uses_alpha = against == "merged" or applies == "merged-delta"   # a plain merge at α is stage 1
                if uses_alpha:
                    flags += ["--alpha", f"{alpha:g}"]
                dlabel = f", d={density:g}" if method == "ties" else ""
                alabel = f", α={alpha:g}" if uses_alpha else ""
                models.append({"name": f"{m.lower()}-{combo}-t{t:g}", "rule": "acm", "t": t, "combo": combo,
                               "label": f"{m} + acm rule (t={t:g}{alabel}{dlabel}), {COMBO_LABEL[combo]}",
                               "flags": flags})
            groups.append({"name": f"{m.lower()}-{combo}", "models": models})
    return groups


class Runner:
    """Runs CLI commands, logging each one to OUT/commands.sh."""

    def __init__(self, out: Path):
        self.out = out
        self.log = out / "commands.sh"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}

    def __call__(self, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "acm", *args]
        shown = "python -m acm " + " ".join(shlex.quote(a) for a in args)
        with self.log.open("a", encoding="utf-8") as fh:
            fh.write(shown + "\n")
        print(f"$ {shown}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"command failed ({res.returncode}): {shown}\n{res.stderr.strip()[-2000:]}")
        print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)


def _lambda_summary(folder: Path) -> dict | None:
    """Mean / min / max λ per group from the merged model's recipe (acm and softmax rows)."""
    try:
        recipe = json.loads((folder / "acm_recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lambdas = recipe.get("lambdas") or []
    if not lambdas:
        return None
    vals = [float(v) for v in (lambdas[0].get("lambda") or {}).values()]
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "groups": lambdas[0].get("lambda")} \
        if vals else None


def _stats(model: dict, lengths: list[float] | None = None) -> dict:
    """Accuracy ± one standard error (binomial, n problems) and mean length ± one standard error (sample std of
    the replies' lengths / √n; from the saved replies, None when they were not saved)."""
    n = int(model["n"])
    acc = float(model["accuracy"])
    mean_len = float(model["mean_length"])
    se = None
    if lengths and len(lengths) > 1:
        m = sum(lengths) / len(lengths)
        se = math.sqrt(sum((x - m) ** 2 for x in lengths) / (len(lengths) - 1)) / math.sqrt(len(lengths))
    return {"n": n, "accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n), "mean_length": mean_len,
            "length_se": se, "levels": {k: v["accuracy"] for k, v in sorted((model.get("per_level") or {}).items())}}


def _reply_lengths(path: Path) -> dict[str, list[float]]:
    """Per model, the generated length of every saved reply (``acm eval --save-replies``)."""
    out: dict[str, list[float]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["model"], []).append(float(rec["num_tokens"]))
    return out


def _eval_group(run: Runner, name: str, folders: list[Path], args) -> tuple[dict, dict]:
    """One ``acm eval`` for a group's models (skipped when its results exist): (results, reply lengths)."""
    out = args.out / "evals" / f"{name}.json"
    replies = args.out / "evals" / f"{name}.replies.jsonl"
    if not out.is_file():
        cmd = ["eval"]
        for f in folders:
            cmd += ["--model", str(f)]
        cmd += ["--data", str(args.data), "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                str(args.batch_size), "--threads", str(args.threads), "--save-replies", str(replies), "--out", str(out)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        run(cmd)
    data = json.loads(out.read_text(encoding="utf-8"))
    return {m["model"]: m for m in data["models"]}, _reply_lengths(replies)


def run(args) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evals").mkdir(exist_ok=True)
    run_cli = Runner(args.out)
    t0 = time.perf_counter()
    analysis = args.out / "analysis.json"
    if not analysis.is_file():
        run_cli(["analyze", "--base", str(args.base), "--ft", str(args.long), "--calibration", "bundled",
                 "--out", str(analysis)])
    rows = []
    refs, ref_lengths = _eval_group(run_cli, "references", [args.base, args.long], args)
    for label, folder in (("base (System 1)", args.base), ("long (System 2)", args.long)):
        rows.append({"name": folder.name, "label": label, "rule": "reference",
                     **_stats(refs[str(folder)], ref_lengths.get(str(folder)))})
    groups = settings(args.methods, args.ts, args.combos, args.alpha, args.density, args.softmax_t)
    fim_analysis = args.out / "fim_analysis.json"
    if args.fim_ts:
        groups += fim_groups(args.methods, args.fim_ts, args.fim_only, args.density)
        if not fim_analysis.is_file():
            run_cli(["analyze", "--rule", "fim", "--base", str(args.base), "--ft", str(args.long), "--device", "cpu",
                     "--out", str(fim_analysis)])
    for group in groups:
        folders, lambdas = [], {}
        done = (args.out / "evals" / f"{group['name']}.json").is_file()
        for model in group["models"]:
            folder = args.out / "models" / model["name"]
            folders.append(folder)
            lam_file = args.out / "lambdas" / f"{model['name']}.json"
            if not done and not (folder / "config.json").is_file():
                flags = [f.replace("{analysis}", str(analysis)).replace("{fim_analysis}", str(fim_analysis))
                         for f in model["flags"]]
                run_cli(["merge", "--base", str(args.base), "--ft", str(args.long), *flags, "--threads", "1",
                         "--force", "--out", str(folder)])
            if not lam_file.is_file() and folder.is_dir():
                lam_file.parent.mkdir(exist_ok=True)
                lam_file.write_text(json.dumps(_lambda_summary(folder)), encoding="utf-8")
            lambdas[model["name"]] = json.loads(lam_file.read_text(encoding="utf-8")) if lam_file.is_file() else None
        evals, lengths = _eval_group(run_cli, group["name"], folders, args)
        for model, folder in zip(group["models"], folders):
            rows.append({**{k: v for k, v in model.items() if k != "flags"}, "lambda": lambdas[model["name"]],
                         **_stats(evals[str(folder)], lengths.get(str(folder)))})
            if not args.keep and folder.is_dir():
                shutil.rmtree(folder)
        _write(args, rows, t0)        # after every group: a stopped run still leaves its table
    return _write(args, rows, t0)


def _write(args, rows: list[dict], t0: float) -> dict:
    result = {"base": str(args.base), "long": str(args.long), "data": str(args.data), "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "alpha": args.alpha, "density": args.density,
              "ts": args.ts, "combos": args.combos, "fim_ts": args.fim_ts, "fim_only": args.fim_only,
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(["python -m benchmarks.paper_rule_demo", *sys.argv[1:]])}
    (args.out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "table.md").write_text(markdown(rows), encoding="utf-8")
    return result


def markdown(rows: list[dict]) -> str:
    long_len = next((r["mean_length"] for r in rows if r["label"].startswith("long")), None)
    lines = ["| model | λ mean (min–max) | accuracy ± SE | mean length ± SE | length cut vs long | L1 | L2 | L3 | L4 | L5 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lam = r.get("lambda")
        lam_s = f"{lam['mean']:.3f} ({lam['min']:.3f}–{lam['max']:.3f})" if lam else "—"
        cut = "—" if r["label"].startswith("long") or not long_len else f"{1 - r['mean_length'] / long_len:.0%}"
        levels = [f"{r['levels'].get(k, float('nan')):.2f}" for k in ("1", "2", "3", "4", "5")]
        se = f" ± {r['length_se']:.1f}" if r.get("length_se") is not None else ""
        lines.append(f"| {r['label']} | {lam_s} | {r['accuracy']:.3f} ± {r['accuracy_se']:.3f} | "
                     f"{r['mean_length']:.1f}{se} | {cut} | " + " | ".join(levels) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_rule_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", type=Path, default=BASE)
    p.add_argument("--long", type=Path, default=LONG)
    p.add_argument("--data", type=Path, default=EVAL)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=list(METHOD_LABEL))
    p.add_argument("--ts", type=float, nargs="+", default=list(PAPER_TS))
    p.add_argument("--combos", nargs="+", default=["paper", "derivative"], help=f"{', '.join(COMBOS)} or all")
    p.add_argument("--alpha", type=float, default=0.7, help="plain / softmax rows and every stage-1 plain merge")
    p.add_argument("--density", type=float, default=0.7, help="TIES density")
    p.add_argument("--softmax-t", type=float, default=1.0)
    p.add_argument("--fim-ts", type=float, nargs="*", default=[], help="add the fim rule at these t (e.g. 1 2)")
    p.add_argument("--fim-only", action="store_true", help="with --fim-ts: also the Fisher-only ablation")
    p.add_argument("--limit", type=int, default=None, help="first N problems (default all 300)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the merged model folders")
    a = p.parse_args(argv)
    if a.combos == ["all"]:
        a.combos = list(COMBOS)
    bad = [c for c in a.combos if c not in COMBOS]
    if bad:
        p.error(f"unknown combo(s) {', '.join(bad)}; choose from {', '.join(COMBOS)} or all")
    res = run(a)
    print((a.out / "table.md").read_text(encoding="utf-8"))
    print(f"{len(res['rows'])} rows in {res['seconds']} s -> {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
