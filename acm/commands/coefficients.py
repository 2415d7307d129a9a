"""``acm coefficients``: per-group λ for a sharpness t from an analysis JSON (no model work)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from acm.errors import InputError
from acm.merging import methods as registry


def add_parser(subparsers) -> argparse.ArgumentParser:
    from acm.activations.similarity import keys_help  # torch-light: numpy only

    p = subparsers.add_parser(
        "coefficients", help="per-layer-group merge coefficients λ(t) from an analysis JSON",
        description="acm rule (default, the paper's Eq. 2-3): lambda_k = 1 - mean_j sigmoid(t*(MI_kj - max_j MI_kj)) "
                    "from per-sample MI, merged as theta_0 + (1/N) sum_i lambda_i tau_i. softmax rule (this "
                    "project's alternative): lambda_k = alpha*K*exp(-t*s_k)/sum_j exp(-t*s_j). Optionally clipped "
                    "after. Prints JSON (the table) or a mergekit-style YAML config.")
    p.add_argument("--analysis", required=True, metavar="FILE", help="analysis JSON written by 'acm analyze'")
    p.add_argument("--rule", default=None, metavar="acm|softmax|fim",
                   help="coefficient rule (default: acm, the paper's; fim needs a Fisher pass: acm analyze --rule fim)")
    p.add_argument("--fim-score", default="fisher-delta", metavar="fisher-delta|fisher-only",
                   help="fim rule: layer score F*|delta|^2 (default) or the Fisher alone")
    p.add_argument("--t", type=float, default=None,
                   help="the rule's t: acm in [-3, 3] (default 0.7, the paper's); softmax >= 0 (default 1)")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="softmax rule: base coefficient alpha > 0 = mean lambda (default: 1)")
    p.add_argument("--clip-min", type=float, default=None, help="clip lambda from below (after the formula)")
    p.add_argument("--clip-max", type=float, default=None, help="clip lambda from above (after the formula)")
    p.add_argument("--metric", default="nmi", metavar="NAME",
                   help=f"softmax rule: which similarity of the analysis drives lambda: {keys_help()}")
    p.add_argument("--format", choices=("json", "yaml"), default="json", help="json table or mergekit YAML")
    p.add_argument("--bands", type=float, nargs="?", const=0.9, default=None, metavar="LEVEL",
                   help="acm rule: bootstrap band of each lambda at this level (default 0.9 when given without a "
                        "value; lambda_lo/lambda_hi per row) and the sample count at which lambda settles")
    p.add_argument("--resamples", type=int, default=300, help="--bands: bootstrap resamples (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="--bands: seed of the resamples and subsets (default: 0)")
    p.add_argument("--settle-tol", type=float, default=0.01,
                   help="--bands: lambda counts as settled within this of its full-set value (default: 0.01)")
    p.add_argument("--settle-seeds", type=int, default=5,
                   help="--bands: subsets drawn per sample count (default: 5)")
    p.add_argument("--method", default="task_arithmetic",
                   help=f"YAML only: {', '.join(k for k in registry.ACM_METHODS)} (default: task_arithmetic); "
                        "a comment-only file says so when mergekit cannot reproduce the method")
    p.add_argument("--density", type=float, default=None,
                   help="YAML only: kept fraction for ties / breadcrumbs (dare: mergekit's keep fraction)")
    p.add_argument("--drop-rate", type=float, default=None, help="YAML only: the merge's DARE drop rate p")
    p.add_argument("--gamma", type=float, default=None, help="YAML only: Breadcrumbs outlier share")
    p.add_argument("--normalize", action="store_true", help="YAML only: the merge's --normalize (sign election)")
    p.add_argument("--base-model", default=None, help="YAML only: base model reference (default: from the analysis)")
    p.set_defaults(func=run)
    return p


def validate(args: argparse.Namespace) -> tuple[float | None, float | None] | None:
    from acm.rules import check_t, get_rule

    rule = get_rule(args.rule)
    args.rule = rule.key
    try:
        args.t = check_t(rule, args.t)
    except InputError as exc:
        raise InputError(f"--{exc}") from None
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise InputError(f"--alpha must be a finite number > 0, got {args.alpha}")
    for name, v in (("--clip-min", args.clip_min), ("--clip-max", args.clip_max)):
        if v is not None and not math.isfinite(v):
            raise InputError(f"{name} must be finite, got {v}")
    if args.clip_min is not None and args.clip_max is not None and args.clip_min > args.clip_max:
        raise InputError(f"--clip-min {args.clip_min} is larger than --clip-max {args.clip_max}")
    if args.bands is not None:
        from acm.rules.bands import check_band_settings

        try:
            check_band_settings(args.bands, args.resamples, args.settle_tol, args.settle_seeds)
        except InputError as exc:
            raise InputError(f"--bands: {exc}") from None
    if args.density is not None and not (0 < args.density <= 1):
        raise InputError(f"--density must be in (0, 1], got {args.density}")
    if args.clip_min is None and args.clip_max is None:
        return None
    return args.clip_min, args.clip_max


def run(args: argparse.Namespace) -> int:
    from acm.activations.analysis import AnalysisResult
    from acm.activations.similarity import get_metric
    from acm.merging.mergekit import to_mergekit_yaml
    from acm.rules.coefficients import coefficient_table

    clip = validate(args)
    if args.rule != "fim" and args.fim_score != "fisher-delta":
        raise InputError("--fim-score belongs to the fim rule: add --rule fim")
    if args.rule != "softmax" and str(args.metric).strip().lower() != "nmi":
        raise InputError(f"--metric picks the softmax rule's similarity; the {args.rule} rule uses "
                         f"{'per-sample MI' if args.rule == 'acm' else 'the Fisher pass'} "
                         "(add --rule softmax)")
    args.metric = get_metric(args.metric).key
    analysis = AnalysisResult.load(args.analysis)
    if args.format == "yaml":
        print(to_mergekit_yaml(analysis, args.t, args.alpha, method=args.method, base_model=args.base_model,
                               density=args.density, drop_rate=args.drop_rate, gamma=args.gamma,
                               normalize=args.normalize, clip=clip, metric=args.metric, rule=args.rule,
                               score=args.fim_score), end="")
    else:
        table = coefficient_table(analysis, args.t, args.alpha, clip=clip, metric=args.metric, rule=args.rule,
                                  score=args.fim_score)
        table["analysis"] = str(args.analysis)
        lines = add_bands(table, analysis, args, clip) if args.bands is not None else []
        print(json.dumps(table, indent=2))
        for line in lines:
            print(line, file=sys.stderr)
    return 0


def add_bands(table: dict, analysis, args: argparse.Namespace, clip) -> list[str]:
    """Put the bootstrap band (per row ``lambda_lo``/``lambda_hi``, and ``bands``) and the settle count
    (``settle``) into ``table``; return the human lines for stderr (stdout stays one JSON document)."""
    from acm.rules.bands import NO_BAND, analysis_band, analysis_curve, supports_bands

    if not supports_bands(args.rule):
        table["bands"] = {"note": NO_BAND}
        return [NO_BAND]
    band = analysis_band(analysis, args.t, level=args.bands, resamples=args.resamples, seed=args.seed, clip=clip)
    curve = analysis_curve(analysis, args.t, tol=args.settle_tol, seeds=args.settle_seeds, seed=args.seed, clip=clip)
    for i, m in enumerate(table["models"]):
        for k, row in enumerate(m["groups"]):
            row["lambda_lo"], row["lambda_hi"] = float(band.lo[i, k]), float(band.hi[i, k])
    info = band.to_dict()
    table["bands"] = {k: v for k, v in info.items() if k not in ("lo", "hi")}
    table["settle"] = curve.to_dict()
    return [f"lambda {args.bands:.0%} band ({args.resamples} resamples of {band.samples} samples, seed {args.seed}): "
            f"mean width {info['mean_width']:.4f}, widest {info['max_width']:.4f} at {info['widest']}", curve.line()]
