"""``acm merge``: streamed merge of fine-tuned models into a base (plain or ACM coefficients)."""

from __future__ import annotations

import argparse
import logging
import sys

from acm import methods as registry
from acm.errors import InputError
from acm.sizes import format_bytes

log = logging.getLogger(__name__)

METHOD_CHOICES = registry.METHODS
# Parameter flags added from the registry's option specs (acm.methods.OPTIONS), in this order.
_PARAM_FLAGS = ("density", "drop_rate", "gamma", "epsilon", "trim_scope", "normalize", "seed")


def _method_help() -> str:
    return "; ".join(f"{k}: {s.label}" for k, s in registry.SPECS.items()) + " (default task_arithmetic)"


def _add_param(p: argparse.ArgumentParser, key: str) -> None:
    """One merge-parameter flag from its registry spec; the help names the methods that use it."""
    o = registry.OPTIONS[key]
    help_ = f"{o.help}; used by {', '.join(registry.methods_using(key))}"
    if o.kind == "bool":
        p.add_argument(o.flag, action="store_true", help=help_)
    elif o.kind == "choice":
        p.add_argument(o.flag, choices=o.choices, default=o.default, help=help_)
    else:
        p.add_argument(o.flag, type=int if o.kind == "int" else float, default=o.default, help=help_)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from acm.similarity import keys_help  # torch-light: numpy only

    p = subparsers.add_parser(
        "merge", help="merge fine-tuned models into a base (TA / TIES / DARE / Breadcrumbs / DELLA / linear, "
                      "plain or ACM)",
        description="Streamed, sharded merge. Plain methods use one coefficient α for the whole network; with "
                    "--acm analysis.json --t T every layer group k of fine-tuned model i gets its own λᵢ,ₖ from "
                    "the activation mutual information (see `acm analyze`). Output: a Hugging Face model folder "
                    "with safetensors shards, config, tokenizer, README.md model card and acm_recipe.json.")
    p.add_argument("--base", required=True, metavar="MODEL", help="base model: local folder or Hub id")
    p.add_argument("--ft", action="append", required=True, metavar="MODEL",
                   help=f"fine-tuned model (local folder or Hub id); repeat for several (up to "
                        f"{registry.MAX_FINE_TUNED})")
    p.add_argument("--method", choices=METHOD_CHOICES, default="task_arithmetic", help=_method_help())
    p.add_argument("--alpha", type=float, default=registry.OPTIONS["alpha"].default, help=registry.OPTIONS["alpha"].help)
    for key in _PARAM_FLAGS:
        _add_param(p, key)
    p.add_argument("--acm", metavar="ANALYSIS_JSON", default=None,
                   help="use ACM coefficients from this analysis (from `acm analyze`); needs --t")
    p.add_argument("--t", type=float, default=None, help="ACM sharpness t >= 0 (t = 0 is the plain method)")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help=f"ACM: which similarity of the analysis drives λ: {keys_help()}")
    p.add_argument("--clip-min", type=float, default=None, help="ACM: clip λ from below (after the formula)")
    p.add_argument("--clip-max", type=float, default=None, help="ACM: clip λ from above (after the formula)")
    rules = p.add_argument_group(
        "coefficient rule", "softmax (default) is the ACM rule above (--acm/--t). sigmoid runs the whole two-stage "
        "workflow in one command: the plain merge given by --method/--alpha/…, per-sample MI between base and "
        "merged activations on --calibration, then each layer group keeps 1 − s of its delta (from a public "
        "derivative of the authors' code, not the paper; README \"Coefficient rules\")")
    rules.add_argument("--rule", default="softmax", metavar="softmax|sigmoid", help="coefficient rule (default softmax)")
    rules.add_argument("--theta", type=float, default=None, help="sigmoid rule: θ > 0 (default 0.7)")
    rules.add_argument("--rule-estimator", default=None, metavar="labels|binned",
                       help="sigmoid rule: per-sample MI estimator, labels = scikit-learn mutual_info_score of bf16 "
                            "values as labels (default), binned = 64-bin joint histogram")
    rules.add_argument("--rule-bins", type=int, default=None, help="sigmoid rule, binned estimator: bins (default 64)")
    rules.add_argument("--rule-max-values", type=int, default=None, metavar="N",
                       help="sigmoid rule: values per sample and activation point kept for the MI (default 262144)")
    rules.add_argument("--calibration", default=None, metavar="SRC",
                       help="sigmoid rule: calibration text (bundled, a .jsonl/.json/.csv/.txt file or hub:org/name)")
    rules.add_argument("--field", default=None, help="sigmoid rule: calibration text field")
    rules.add_argument("--samples", type=int, default=None,
                       help="sigmoid rule: calibration samples (default: 10%% of each of 20 k-means clusters)")
    rules.add_argument("--max-tokens", type=int, default=None, help="sigmoid rule: tokens per sample (default 512)")
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


def _lambdas_from_analysis(path: str, t: float, alpha: float, fts: list[str], clip=None, metric: str = "nmi"):
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
    lambdas = lambdas_by_group(analysis, t, alpha, clip=clip, metric=metric)
    acm = {"analysis": analysis.provenance, "t": t, "alpha": alpha, "clip": list(clip) if clip else None,
           "source": str(path),
           "nmi": {str(m.model): [float(x) for x in m.nmi] for m in analysis.models},
           "groups": list(analysis.groups)}
    if metric != "nmi":          # NMI-driven merges keep the recipe they always had
        acm["metric"] = metric
        acm["similarity"] = {str(m.model): [float(x) for x in m.values(metric)] for m in analysis.models}
        if not all(m.nmi for m in analysis.models):
            del acm["nmi"]
    return lambdas, acm


def run(args: argparse.Namespace) -> int:
    import math

    from acm.merge import MergeOptions, merge_models

    if (args.acm is None) != (args.t is None):
        raise InputError("--acm and --t go together: pass both for an ACM merge, neither for the plain method")
    if args.t is not None and (not math.isfinite(args.t) or args.t < 0):
        raise InputError(f"--t must be a finite number >= 0, got {args.t}")
    if args.acm is not None and args.method not in registry.ACM_METHODS:
        raise InputError("ACM coefficients scale task vectors and linear averaging has none; "
                         f"use --method {', '.join(registry.ACM_METHODS)} with --acm")
    if args.metric is not None and args.acm is None:
        raise InputError("--metric picks which similarity drives the ACM coefficients: pass it with --acm and --t")
    if args.metric is not None:
        from acm.similarity import get_metric

        args.metric = get_metric(args.metric).key
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
    options = MergeOptions(method=args.method, alpha=args.alpha, **{k: getattr(args, k) for k in _PARAM_FLAGS},
                           dtype=args.dtype,
                           shard_size=args.shard_size, weights=args.weights,
                           device=None if args.device in (None, "", "auto") else args.device, threads=args.threads,
                           tokenizer_from=args.tokenizer_from)
    options.validate(len(args.ft))
    rule = _rule_args(args)
    if rule is not None:
        return _run_sigmoid(args, options, rule)
    lambdas = acm = None
    if args.acm is not None:
        lambdas, acm = _lambdas_from_analysis(args.acm, args.t, args.alpha, args.ft, clip, args.metric or "nmi")
    report = merge_models(args.base, args.ft, args.out, options, lambdas=lambdas, acm=acm, force=args.force,
                          allow_pickle=args.allow_pickle, show_progress=sys.stderr.isatty())
    label = ("ACM " if acm else "") + args.method + (
        f" (t={args.t:g}, alpha={args.alpha:g}{'' if acm.get('metric', 'nmi') == 'nmi' else ', by ' + acm['metric']})"
        if acm else "")
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


_SIGMOID_ONLY = (("--theta", "theta"), ("--rule-estimator", "rule_estimator"), ("--rule-bins", "rule_bins"),
                 ("--rule-max-values", "rule_max_values"), ("--calibration", "calibration"), ("--field", "field"),
                 ("--samples", "samples"), ("--max-tokens", "max_tokens"))


def _rule_args(args: argparse.Namespace) -> dict | None:
    """None for the softmax rule (the classic path); the checked sigmoid parameters otherwise."""
    from acm.rules import get_rule

    rule = get_rule(args.rule)
    if rule.key == "softmax":
        given = [flag for flag, name in _SIGMOID_ONLY if getattr(args, name) is not None]
        if given:
            raise InputError(f"{given[0]} belongs to the sigmoid rule: add --rule sigmoid")
        return None
    if args.acm is not None:
        raise InputError("--acm/--t set the softmax rule's coefficients; the sigmoid rule starts from a plain "
                         "merge: drop --acm and --t")
    if args.calibration is None:
        raise InputError("--rule sigmoid needs --calibration (e.g. bundled, or a .jsonl file of texts)")
    params = rule.validate({"theta": args.theta, "estimator": args.rule_estimator, "bins": args.rule_bins,
                            "max_values": args.rule_max_values})
    if args.samples is not None and args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InputError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return params


def _run_sigmoid(args: argparse.Namespace, options, params: dict) -> int:
    from acm.sigmoid_rule import merge_with_sigmoid_rule

    tty = sys.stderr.isatty()
    last = [""]

    def progress(frac: float, msg: str) -> None:   # one stdout line per stage when not on a terminal
        stage = msg.split(":", 1)[0]
        if stage != last[0]:
            print(f"[{frac:4.0%}] {stage}", flush=True)
            last[0] = stage

    result = merge_with_sigmoid_rule(
        args.base, args.ft, args.out, options, calibration=args.calibration, field=args.field, samples=args.samples,
        max_tokens=args.max_tokens or 512, seed=args.seed, force=args.force, allow_pickle=args.allow_pickle,
        analysis_device=None if args.device in (None, "", "auto") else args.device,
        progress=None if tty else progress, show_progress=tty, **params)
    report = result.merge
    print(f"merged {len(args.ft)} model(s) into {args.base} with {args.method} + sigmoid rule "
          f"(θ={params['theta']:g}, estimator {params['estimator']})")
    print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.stage_seconds.items()))
    kept = result.scales
    print("delta kept per group (1 − s): " + ", ".join(f"{g} {v:.3f}" for g, v in kept.items()))
    print(f"wrote {report.out_dir}: {report.num_tensors} tensors, {report.num_shards} shard(s), "
          f"{format_bytes(report.bytes_written)}")
    return 0
