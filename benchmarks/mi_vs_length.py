"""Does per-sample MI measure dependence or sequence length? (issue 19, item 4)

The paper's rule takes the discrete MI of one calibration sample's flattened activations
(``acm.activations.sample_mi``). For continuous values that are mostly distinct, a sample of n values has
H(x) ≈ log n, and the MI of two such label vectors is bounded by it and, when both sides are
nearly injective, close to it: longer samples get larger MI whatever the models do. This script
measures how much of the per-sample MI follows log(real token count):

* the bundled demo pair (``tiny-math-base`` vs ``tiny-math-long``) on **every** bundled calibration
  prompt (no k-means selection; the CLI's chat template), and
* the 1.5B-shaped random-weight stand-in pair of ``benchmarks.fullsize`` on a few synthetic samples of
  varied length (float32, CPU),

each with both estimators (``labels``: discrete MI of the bf16 values, default cap 2¹⁸ values per sample
and point; ``binned``: 64-bin histogram per sample). Reported per activation point: Pearson r of MI with
log(tokens), the least-squares slope (nats per e-fold of tokens), mean MI, and mean MI ÷ log(values
compared); "overall" is r of the per-sample mean over points with log(tokens), and the median of the
per-point r.

    python -m benchmarks.mi_vs_length                       # both pairs (~10 min on 2 busy cores)
    python -m benchmarks.mi_vs_length --skip-fullsize       # demo pair only (~2 min)
    python -m benchmarks.mi_vs_length --fullsize-lengths 16 32 64 128 256 --threads 1

Writes ``benchmarks/.cache/results/mi-vs-length.json`` (or ``--out``) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "demo-models" / "tiny-math-base"
LONG = ROOT / "assets" / "demo-models" / "tiny-math-long"
ESTIMATORS = ("labels", "binned")


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def slope(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def point_widths(analysis, config: dict) -> list[int]:
    """Values per token at each activation point: hidden size, except the logits (vocabulary)."""
    names = analysis.sample_info["points"]
    return [int(config["vocab_size"]) if n == "logits" else int(config["hidden_size"]) for n in names]


def summarize(analysis, config: dict) -> dict:
    """Per point and overall: r(MI, log tokens), slope, mean MI, mean MI / log(values compared)."""
    info = analysis.sample_info
    mi = analysis.sample_mi_matrix()[0]                   # [points, samples], nats
    tokens = np.asarray(info["tokens"], dtype=float)
    log_t = np.log(tokens)
    cap = info.get("max_values")
    widths = point_widths(analysis, config)
    rows = []
    for p, name in enumerate(info["points"]):
        n_values = tokens * widths[p]
        if cap:
            n_values = np.minimum(n_values, cap)
        rows.append({"point": name, "r": pearson(log_t, mi[p]), "slope": slope(log_t, mi[p]),
                     "mean_mi": float(mi[p].mean()), "sd_mi": float(mi[p].std()),
                     "mi_over_log_n": float(np.mean(mi[p] / np.log(n_values)))})
    per_point_r = [r["r"] for r in rows if math.isfinite(r["r"])]
    mean_over_points = mi.mean(axis=0)
    return {"points": rows, "overall_r": pearson(log_t, mean_over_points),
            "overall_slope": slope(log_t, mean_over_points),
            "median_point_r": float(np.median(per_point_r)) if per_point_r else math.nan,
            "min_point_r": float(min(per_point_r)) if per_point_r else math.nan,
            "tokens": [int(t) for t in tokens], "samples": int(len(tokens)),
            "seconds": analysis.provenance.get("seconds")}


def _config(folder: str | Path) -> dict:
    import json

    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def run_demo(estimators, *, log=print) -> dict:
    """Every bundled calibration prompt, the CLI's defaults otherwise (chat template, 512 tokens)."""
    from acm.activations.analysis import analyze
    from acm.activations.calibration import load_texts

    texts = load_texts("bundled")
    out = {"pair": "demo (tiny-math-base vs tiny-math-long)", "calibration": f"bundled, all {len(texts)} prompts"}
    for est in estimators:
        res = analyze(str(BASE), [str(LONG)], texts, samples=len(texts), metrics=[], sample_mi=est,
                      device="cpu", show_progress=False)
        out[est] = summarize(res, _config(BASE))
        log(f"[mi-vs-length] demo {est}: overall r {out[est]['overall_r']:.3f}, median per-point r "
            f"{out[est]['median_point_r']:.3f} ({out[est]['samples']} samples, "
            f"{min(out[est]['tokens'])}–{max(out[est]['tokens'])} tokens)")
    return out


def fullsize_texts(lengths: list[int], seed: int = 0) -> list[str]:
    """Synthetic prompts long enough to be cut to each requested token count (character-level
    tokenizer of the stand-in: ~5 tokens per word, so 1 word per 4 tokens over-fills)."""
    from benchmarks.analysis import calibration_texts

    out = []
    for i, n in enumerate(lengths):
        words = max(4, n // 3)
        out.append(calibration_texts(1, seed=seed + i, min_words=words, max_words=words)[0])
    return out


def run_fullsize(estimators, lengths: list[int], *, dtype: str = "float32", log=print) -> dict:
    """The 1.5B-shaped stand-in pair, one sample per length (each cut to its length)."""
    from transformers import AutoTokenizer

    from acm.activations.analysis import analyze
    from acm.activations.calibration import encode
    from benchmarks.fullsize import get_pair

    pair = get_pair(verbose=False)
    tok = AutoTokenizer.from_pretrained(str(pair.base))
    texts = []
    for text, n in zip(fullsize_texts(lengths), lengths):
        ids = encode([text], tok, max_tokens=n, chat_template=False)[0]
        texts.append(tok.decode(ids))
    out = {"pair": "1.5B-shaped random-weight stand-in (benchmarks.fullsize)", "dtype": dtype,
           "requested_lengths": lengths}
    for est in estimators:
        res = analyze(str(pair.base), [str(pair.fts[0])], texts, samples=len(texts), metrics=[], sample_mi=est,
                      max_tokens=max(lengths), batch_size=2, device="cpu", dtype=dtype, chat_template=False,
                      show_progress=False)
        out[est] = summarize(res, _config(pair.base))
        log(f"[mi-vs-length] 1.5B stand-in {est}: overall r {out[est]['overall_r']:.3f}, median per-point r "
            f"{out[est]['median_point_r']:.3f} (tokens {out[est]['tokens']}, {out[est]['seconds']:.0f} s)")
    return out


def table(block: dict, estimators) -> str:
    """One row per activation point: r and slope per estimator, mean MI and MI / log n (labels)."""
    head = ["point"]
    for est in estimators:
        head += [f"r ({est})", f"slope ({est}, nats)", f"mean MI ({est})", f"MI ÷ log n ({est})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = block[estimators[0]]
    for i, row in enumerate(first["points"]):
        cells = [row["point"]]
        for est in estimators:
            r = block[est]["points"][i]
            cells += [f"{r['r']:.3f}", f"{r['slope']:.3f}", f"{r['mean_mi']:.3f}", f"{r['mi_over_log_n']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**overall** (mean over points)"]
    for est in estimators:
        b = block[est]
        cells += [f"**{b['overall_r']:.3f}**", f"{b['overall_slope']:.3f}", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    cells = ["median / min of per-point r"]
    for est in estimators:
        b = block[est]
        cells += [f"{b['median_point_r']:.3f} / {b['min_point_r']:.3f}", "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mi_vs_length", description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--skip-fullsize", action="store_true")
    ap.add_argument("--fullsize-lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--dtype", default="float32", help="1.5B stand-in compute dtype")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    from benchmarks.common import machine_info, save_result

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = {"benchmark": "mi-vs-length", "machine": machine_info(), "estimators": args.estimators,
            "loadavg_start": os.getloadavg()[0],
            "command": " ".join(["python -m benchmarks.mi_vs_length", *sys.argv[1:]])}
    if not args.skip_demo:
        data["demo"] = run_demo(args.estimators)
        print("\n" + data["demo"]["pair"] + ", " + data["demo"]["calibration"] + "\n")
        print(table(data["demo"], args.estimators))
    if not args.skip_fullsize:
        data["fullsize"] = run_fullsize(args.estimators, args.fullsize_lengths, dtype=args.dtype)
        print("\n" + data["fullsize"]["pair"] + f", tokens {data['fullsize'][args.estimators[0]]['tokens']}\n")
        print(table(data["fullsize"], args.estimators))
    data["seconds"] = round(time.perf_counter() - t0, 1)
    data["loadavg_end"] = os.getloadavg()[0]
    path = save_result("mi-vs-length", data, args.out)
    print(f"[mi-vs-length] {data['seconds']} s, load {data['loadavg_start']:.1f}–{data['loadavg_end']:.1f}; "
          f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
