"""``acm merge``: streamed merge of fine-tuned models into a base (plain or ACM coefficients)."""

from __future__ import annotations

import argparse
import logging
import sys

from acm.errors import InputError
from acm.sizes import format_bytes

log = logging.getLogger(__name__)

METHOD_CHOICES = ("linear", "task_arithmetic", "ties", "dare_ta", "dare_ties")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge", help="merge fine-tuned models into a base (linear / TA / TIES / DARE, plain or ACM)",
        description="Streamed, sharded merge. Plain methods use one coefficient α for the whole network; with "
                    "--acm analysis.json --t T every layer group k of fine-tuned model i gets its own λᵢ,ₖ from "
                    "the activation mutual information (see `acm analyze`). Output: a Hugging Face model folder "
                    "with safetensors shards, config, tokenizer, README.md model card and acm_recipe.json.")
    p.add_argument("--base", required=True, metavar="MODEL", help="base model: local folder or Hub id")
    p.add_argument("--ft", action="append", required=True, metavar="MODEL",
                   help="fine-tuned model (local folder or Hub id); repeat for several (up to 3)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="task_arithmetic")
    p.add_argument("--alpha", type=float, default=1.0, help="plain: λ for every group; ACM: the mean λ (default 1.0)")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of |τ| kept, in (0, 1] (default 0.2)")
    p.add_argument("--drop-rate", type=float, default=0.3, help="DARE: drop probability, in [0, 1) (default 0.3)")
    p.add_argument("--trim-scope", choices=("tensor", "global"), default="tensor",
                   help="TIES threshold per tensor (default) or one per model over all tensors (3 passes)")
    p.add_argument("--normalize", action="store_true", help="TIES: divide by the sum of agreeing λ")
    p.add_argument("--seed", type=int, default=0, help="DARE random seed (default 0)")
    p.add_argument("--acm", metavar="ANALYSIS_JSON", default=None,
                   help="use ACM coefficients from this analysis (from `acm analyze`); needs --t")
    p.add_argument("--t", type=float, default=None, help="ACM sharpness t >= 0 (t = 0 is the plain method)")
    p.add_argument("--clip-min", type=float, default=None, help="ACM: clip λ from below (after the formula)")
    p.add_argument("--clip-max", type=float, default=None, help="ACM: clip λ from above (after the formula)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="output dtype (default: the base's)")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="linear only: one weight per --ft (normalised to sum 1; default uniform)")
    p.add_argument("--tokenizer-from", default="base", metavar="base|ft|ft:N",
                   help="which model's tokenizer, chat template and generation defaults the merged model is "
                        "saved with: base (default), ft (the first --ft) or ft:N (the N-th --ft)")
    p.add_argument("--shard-size", default="2GB", help="maximum shard size, e.g. 2GB, 500MB or bytes (default 2GB)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU merges: torch threads (default: half the cores, at most 8; the maths is memory-bound)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle (.bin) checkpoints, which can run code when loaded: trusted sources only")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --force)")
    p.set_defaults(func=run)
    return p


def _lambdas_from_analysis(path: str, t: float, alpha: float, fts: list[str], clip=None):
    try:
        from acm.analysis import AnalysisResult
        from acm.coefficients import lambdas_by_group
    except ImportError as exc:  # pragma: no cover - both modules ship with the package
        raise InputError(f"ACM coefficients are unavailable in this install ({exc})") from None
    analysis = AnalysisResult.load(path)
    if len(analysis.models) != len(fts):
        raise InputError(f"{path} analyses {len(analysis.models)} fine-tuned model(s) but {len(fts)} --ft given; "
                         "pass the same fine-tuned models, in the same order, as in the analysis")
    for i, (m, spec) in enumerate(zip(analysis.models, fts)):
        if str(m.model) != spec:
            log.warning("warning: model %d of the analysis is %s but --ft is %s; using its coefficients anyway",
                        i + 1, m.model, spec)
    lambdas = lambdas_by_group(analysis, t, alpha, clip=clip)
    acm = {"analysis": analysis.provenance, "t": t, "alpha": alpha, "clip": list(clip) if clip else None,
           "source": str(path),
           "nmi": {str(m.model): [float(x) for x in m.nmi] for m in analysis.models},
           "groups": list(analysis.groups)}
    return lambdas, acm


def run(args: argparse.Namespace) -> int:
    import math

    from acm.merge import MergeOptions, merge_models

    if (args.acm is None) != (args.t is None):
        raise InputError("--acm and --t go together: pass both for an ACM merge, neither for the plain method")
    if args.t is not None and (not math.isfinite(args.t) or args.t < 0):
        raise InputError(f"--t must be a finite number >= 0, got {args.t}")
    if args.acm is not None and args.method == "linear":
        raise InputError("ACM coefficients scale task vectors and linear averaging has none; "
                         "use --method task_arithmetic, ties, dare_ta or dare_ties with --acm")
    clip = None
    if args.clip_min is not None or args.clip_max is not None:
        if args.acm is None:
            raise InputError("--clip-min/--clip-max apply to ACM coefficients: pass them with --acm and --t")
        for name, v in (("--clip-min", args.clip_min), ("--clip-max", args.clip_max)):
            if v is not None and (not math.isfinite(v) or v < 0):
                raise InputError(f"{name} must be a finite number >= 0, got {v}")
        if args.clip_min is not None and args.clip_max is not None and args.clip_min > args.clip_max:
            raise InputError(f"--clip-min {args.clip_min} is larger than --clip-max {args.clip_max}")
        clip = (args.clip_min, args.clip_max)
    options = MergeOptions(method=args.method, alpha=args.alpha, density=args.density, drop_rate=args.drop_rate,
                           trim_scope=args.trim_scope, normalize=args.normalize, seed=args.seed, dtype=args.dtype,
                           shard_size=args.shard_size, weights=args.weights,
                           device=None if args.device in (None, "", "auto") else args.device, threads=args.threads,
                           tokenizer_from=args.tokenizer_from)
    options.validate(len(args.ft))
    lambdas = acm = None
    if args.acm is not None:
        lambdas, acm = _lambdas_from_analysis(args.acm, args.t, args.alpha, args.ft, clip)
    report = merge_models(args.base, args.ft, args.out, options, lambdas=lambdas, acm=acm, force=args.force,
                          allow_pickle=args.allow_pickle, show_progress=sys.stderr.isatty())
    label = ("ACM " if acm else "") + args.method + (f" (t={args.t:g}, alpha={args.alpha:g})" if acm else "")
    print(f"merged {len(args.ft)} model(s) into {args.base} with {label}")
    print(f"wrote {report.out_dir}: {report.num_tensors} tensors, {report.num_shards} shard(s), "
          f"{format_bytes(report.bytes_written)} in {report.seconds:.2f} s")
    heads = report.recipe.get("output", {}).get("heads") or {}
    tok = report.recipe.get("output", {}).get("tokenizer") or {}
    if heads:
        print(f"output head: {heads.get('merged')} (base {heads.get('base')}, fine-tuned "
              f"{', '.join(heads.get('fine_tuned') or [])})")
    if tok:
        print(f"tokenizer and chat template ({tok.get('template')}) from {tok.get('from')}: {tok.get('model')}")
    for note in report.vocab_notes:
        print(f"note: {note}")
    return 0
