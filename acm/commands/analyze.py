"""``acm analyze``: per-layer-group similarity (NMI by default) between a base and fine-tuned models → JSON."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from acm.activations.estimators import DEFAULT_MAX_VALUES as MAX_VALUES
from acm.activations.estimators import DEFAULT_PAIR_BUDGET as PAIR_BUDGET
from acm.activations.estimators import DEFAULT_ROW_BUDGET as ROW_BUDGET
from acm.activations.similarity import DEFAULT_SKETCH_DIM as SKETCH_DIM
from acm.commands.presets import add_preset_flags, fill, preset_values, require
from acm.errors import InputError
from acm.merging.methods import MAX_FINE_TUNED, check_num_fine_tuned
from acm.sizes import format_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    from acm.activations.similarity import keys_help  # torch-light: numpy only

    p = subparsers.add_parser(
        "analyze", help="measure per-layer NMI between base and fine-tuned activations (forward passes only)",
        description="Run base and fine-tuned models on calibration text and write the per-layer-group "
                    "normalised mutual information (NMI) of their activations as JSON (or, with --metric, "
                    "other similarities, several at once in the same passes).")
    p.add_argument("--base", default=None, metavar="MODEL", help="base model: local folder or Hub id (required "
                   "unless --preset)")
    p.add_argument("--ft", action="append", default=None, metavar="MODEL",
                   help=f"fine-tuned model (folder or Hub id); repeat for several (at most {MAX_FINE_TUNED}); "
                        "required unless --preset")
    p.add_argument("--calibration", default=None, metavar="SRC",
                   help="calibration text: .jsonl/.json/.csv/.txt file, Hub dataset id, or 'bundled' (required "
                        "unless --preset or --calibration-preset, or --rule fim alone)")
    p.add_argument("--rule", default=None, metavar="acm|softmax|fim|acm,fim",
                   help="what the analysis serves: acm / softmax (default: the activation MI and similarity on "
                        "--calibration), fim (only the data-free Fisher pass on the base and ‖δ‖² per layer: "
                        "no calibration), or a comma list with fim (both in one file)")
    p.add_argument("--fim-sequences", type=int, default=8, metavar="S",
                   help="fim: random-token sequences of the Fisher pass (default: 8)")
    p.add_argument("--fim-length", type=int, default=64, metavar="L", help="fim: tokens per sequence (default: 64)")
    p.add_argument("--fim-loss", default="lm", metavar="lm|sampled",
                   help="fim: the base's next-token loss on the random tokens (lm, default) or targets drawn from "
                        "its own prediction (sampled: the expected Fisher); the tokens are seeded by --seed")
    p.add_argument("--field", default=None, help="text field (default: text, question, prompt, instruction, input)")
    p.add_argument("--split", default=None, help="Hub dataset split (default: train)")
    p.add_argument("--samples", type=int, default=None,
                   help="number of calibration samples in total (default: --fraction of each cluster)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default: 20)")
    p.add_argument("--fraction", type=float, default=None, help="share drawn from each cluster (default: 0.1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per sample, truncated (default: 512; 1024 with a preset)")
    add_preset_flags(p)
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw text, not a one-turn chat")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help=f"similarity metric(s): {keys_help()}; repeat or give a comma list "
                        "(e.g. --metric nmi,cka,cosine) to compute several in one analysis")
    p.add_argument("--sketch-dim", type=int, default=SKETCH_DIM, metavar="K",
                   help=f"row metrics (all but nmi): random-projection width for wider layer groups (default: {SKETCH_DIM})")
    p.add_argument("--row-budget", type=int, default=ROW_BUDGET, metavar="N",
                   help=f"row metrics (all but nmi): tokens paired per layer group; beyond it a seeded subset (default: {ROW_BUDGET})")
    p.add_argument("--mi-estimator", default="labels", metavar="labels|binned|off",
                   help="per-sample MI at the paper's activation points, for the acm rule: labels = discrete MI of "
                        "the bf16 values as labels (default, as scikit-learn's mutual_info_score), binned = "
                        "--bins-bin histogram per sample, off = none (softmax rule only)")
    p.add_argument("--mi-max-values", type=int, default=MAX_VALUES, metavar="N",
                   help=f"per-sample MI: values per (sample, activation point), a seeded subset beyond it "
                        f"(default: {MAX_VALUES} = 2^18; 0 = every value)")
    p.add_argument("--save-calibration", default=None, metavar="FILE",
                   help="also write the exact token sequences fed to the models: JSON lines with input_ids and text")
    p.add_argument("--bins", type=int, default=64, help="histogram bins per axis, 2..1024 (default: 64)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per forward pass (default: 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for sampling, the head vocabulary subset and the paired positions")
    p.add_argument("--pair-budget", type=int, default=PAIR_BUDGET, metavar="N",
                   help="paired values kept per layer group; beyond it a seeded sample of N (token, feature) "
                        f"positions is used, the same for every model (default: {PAIR_BUDGET} = 2^22, "
                        "4 MiB of stored base bins per group)")
    p.add_argument("--device", default=None, help="auto (GPU when available, big models spread), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights — only if you trust them")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the repo (unsafe)")
    p.add_argument("--out", required=True, metavar="FILE", help="analysis JSON to write (overwritten atomically)")
    p.set_defaults(func=run)
    return p


DEFAULTS = {"split": "train", "clusters": 20, "fraction": 0.1, "max_tokens": 512}


def apply_preset(args: argparse.Namespace) -> None:
    """Flags given win; ``--preset`` / ``--calibration-preset`` fill the rest; then the defaults above."""
    values = preset_values(args)
    values.pop("tokenizer_from", None), values.pop("rule", None), values.pop("t", None)   # merge settings
    fim_only = _rule_names(args) == ["fim"]
    if fim_only and not getattr(args, "calibration_preset", None):
        for key in ("calibration", "split", "field"):       # the Fisher pass alone reads no calibration text
            values.pop(key, None)
    fill(args, values, DEFAULTS)
    require(args, "--base", "--ft", *(() if fim_only else ("--calibration",)))


def _rule_names(args: argparse.Namespace) -> list[str]:
    """The registry names of --rule's comma list (default acm); one line for an unknown rule."""
    from acm.rules import get_rule

    return sorted({get_rule(r.strip()).key for r in str(args.rule or "acm").split(",") if r.strip()} or {"acm"})


def _rules(args: argparse.Namespace) -> tuple[bool, bool]:
    """(run the MI / similarity analysis, run the Fisher pass) from --rule; one line for a bad rule."""
    from acm.activations.fisher import FisherSettings

    names = _rule_names(args)
    fim = "fim" in names
    if fim:
        args.fim = FisherSettings(args.fim_sequences, args.fim_length, args.seed, args.fim_loss).checked()
    mi = any(n != "fim" for n in names)
    if not mi and args.calibration is not None:
        raise InputError("--rule fim alone needs no --calibration (it runs no activation analysis); drop it, or "
                         "use --rule acm,fim for both in one file")
    if mi and args.calibration is None:
        raise InputError("--calibration is needed for the activation analysis (the acm and softmax rules); "
                         "only --rule fim runs without calibration text")
    return mi, fim


def validate(args: argparse.Namespace) -> None:
    """Range checks before any model work, one line each."""
    args.run_mi, args.run_fim = _rules(args)
    if args.samples is not None and args.samples < 1:
        raise InputError(f"--samples must be at least 1, got {args.samples}")
    if args.clusters < 1:
        raise InputError(f"--clusters must be at least 1, got {args.clusters}")
    if not (math.isfinite(args.fraction) and 0.0 < args.fraction <= 1.0):
        raise InputError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 2 <= args.bins <= 1024:
        raise InputError(f"--bins must be between 2 and 1024, got {args.bins}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.pair_budget < 1:
        raise InputError(f"--pair-budget must be at least 1, got {args.pair_budget}")
    if args.sketch_dim < 1:
        raise InputError(f"--sketch-dim must be at least 1, got {args.sketch_dim}")
    if args.row_budget < 1:
        raise InputError(f"--row-budget must be at least 1, got {args.row_budget}")
    from acm.activations.similarity import parse_metrics

    args.metric = parse_metrics(args.metric)
    from acm.rules import ACM

    args.mi_estimator = None if str(args.mi_estimator).lower() in ("off", "none") else \
        ACM.param("estimator").check(args.mi_estimator)
    args.mi_max_values = ACM.param("max_values").check(args.mi_max_values)
    check_num_fine_tuned(len(args.ft))
    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {args.out} is a folder; give a file name such as analysis.json")
    if not out.parent.is_dir() and str(out.parent) not in ("", "."):
        raise InputError(f"--out folder {out.parent} does not exist")
    folder = out.parent if str(out.parent) else Path(".")
    if not os.access(folder, os.W_OK | os.X_OK):     # before minutes of forward passes, not after
        raise InputError(f"--out folder {folder} is not writable; choose another --out")
    if args.save_calibration is not None:
        cal = Path(args.save_calibration)
        if cal.is_dir() or not (cal.parent if str(cal.parent) else Path(".")).is_dir():
            raise InputError(f"--save-calibration {args.save_calibration}: give a file in an existing folder")


def run(args: argparse.Namespace) -> int:
    from acm.activations.analysis import AnalysisOptions, analyze, summarize

    apply_preset(args)
    validate(args)
    interactive = sys.stderr.isatty()
    if not interactive:  # keep logs and CI output clean: no weight-loading bars when not on a terminal
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic only
            pass
    if not args.run_mi:
        return _run_fim_only(args)
    options = AnalysisOptions(
        field=args.field, split=args.split, samples=args.samples, clusters=args.clusters, fraction=args.fraction,
        max_tokens=args.max_tokens, bins=args.bins, batch_size=args.batch_size, seed=args.seed, device=args.device,
        dtype=args.dtype, chat_template=not args.no_chat_template, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code, pair_budget=args.pair_budget, metrics=args.metric,
        sketch_dim=args.sketch_dim, row_budget=args.row_budget, sample_mi=args.mi_estimator,
        sample_max_values=args.mi_max_values)
    result = analyze(args.base, list(args.ft), args.calibration, options, show_progress=interactive)
    if args.run_fim:
        _add_fisher(args, result)
    path = result.save(args.out)
    if args.save_calibration is not None:
        print(f"wrote the {len(result.calibration or [])} token sequences fed to the models to "
              f"{result.save_calibration(args.save_calibration)}")
    cal = result.provenance.get("calibration", {})
    print(f"analysed {len(result.groups)} layer groups on {cal.get('samples')} samples "
          f"({cal.get('tokens')} tokens) in {result.provenance.get('seconds', 0):.1f}s")
    print(summarize(result))
    mem = result.provenance.get("memory") or {}
    if mem.get("peak_rss_bytes"):
        cuda = mem.get("cuda_max_allocated_bytes")
        print(f"peak memory: {format_bytes(mem['peak_rss_bytes'])} RSS"
              + (f", {format_bytes(cuda)} CUDA" if cuda else "")
              + f"; estimator {format_bytes(mem.get('estimator_bytes', 0))}"
              + (f"; pairs subsampled in {len(result.provenance['subsampled_groups'])} groups"
                 if result.provenance.get("subsampled_groups") else ""))
    for note in result.provenance.get("vocab_notes") or []:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def _add_fisher(args: argparse.Namespace, result) -> None:
    """Put the fim rule's Fisher pass (and ‖δ‖² per model) into an activation analysis: one file, both rules."""
    from acm.activations.fisher import fisher_analysis

    fim = fisher_analysis(args.base, list(args.ft), args.fim, device=args.device, dtype=args.dtype,
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    result.fisher = fim.fisher
    print(_fisher_line(fim.fisher))


def _fisher_line(block: dict) -> str:
    keys, scores = block["keys"], block["scores"]
    hi = max(range(len(keys)), key=lambda k: scores[k])
    return (f"Fisher pass ({block['sequences']} random sequences × {block['length']} tokens, seed {block['seed']}, "
            f"loss {block['loss']}) in {block['seconds']:.1f}s on {block['device']}: highest at {keys[hi]} "
            f"({scores[hi]:.3g}); peak RSS {format_bytes(block.get('peak_rss_bytes') or 0)}")


def _run_fim_only(args: argparse.Namespace) -> int:
    """``--rule fim``: the Fisher pass on the base and ‖δ‖² per layer; no calibration, no activation analysis."""
    from acm.activations.fisher import fisher_analysis

    result = fisher_analysis(args.base, list(args.ft), args.fim, device=args.device, dtype=args.dtype,
                             allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    path = result.save(args.out)
    print(_fisher_line(result.fisher))
    print(f"wrote {path}")
    return 0
