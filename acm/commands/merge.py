"""``acm merge``: streamed merge of fine-tuned models into a base (plain or ACM coefficients)."""

from __future__ import annotations

import argparse
import logging
import sys

from acm.commands.presets import add_preset_flags, fill, preset_values, require
from acm.errors import InputError
from acm.merging import methods as registry
from acm.sizes import format_bytes

log = logging.getLogger(__name__)

METHOD_CHOICES = registry.METHODS


def _method_help() -> str:
    return "; ".join(f"{k}: {s.label}" for k, s in registry.SPECS.items()) + " (default task_arithmetic)"


def _add_param(p: argparse.ArgumentParser, key: str) -> None:
    """One merge-parameter flag from its registry spec; the help names the methods that use it."""
    o = registry.OPTIONS[key]
    users = registry.methods_using(key)
    help_ = o.help if key == "alpha" or len(users) == len(registry.SPECS) else f"{o.help}; used by {', '.join(users)}"
    if o.kind == "list":
        p.add_argument(o.flag, type=float, nargs="+", default=o.default, metavar="W", help=o.help)
    elif o.kind == "bool":
        p.add_argument(o.flag, action="store_true", help=help_)
    elif o.kind == "choice":
        p.add_argument(o.flag, choices=o.choices, default=o.default, help=help_)
    else:
        p.add_argument(o.flag, type=int if o.kind == "int" else float, default=o.default, help=help_)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from acm.activations.similarity import keys_help  # torch-light: numpy only

    p = subparsers.add_parser(
        "merge", help="merge fine-tuned models into a base (TA / TIES / DARE / Breadcrumbs / DELLA / linear, "
                      "plain or ACM)",
        description="Streamed, sharded merge. Plain methods use one coefficient α for the whole network; with "
                    "--acm analysis.json --t T every layer group k of fine-tuned model i gets its own λᵢ,ₖ from "
                    "the activation mutual information (see `acm analyze`). Output: a Hugging Face model folder "
                    "with safetensors shards, config, tokenizer, README.md model card and acm_recipe.json.")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model: local folder or Hub id (required unless --preset)")
    p.add_argument("--ft", action="append", default=None, metavar="MODEL",
                   help=f"fine-tuned model (local folder or Hub id); repeat for several (up to "
                        f"{registry.MAX_FINE_TUNED}); required unless --preset")
    add_preset_flags(p, calibration=False)
    p.add_argument("--method", choices=METHOD_CHOICES, default="task_arithmetic", help=_method_help())
    for key in registry.OPTIONS:                 # every method parameter, declared once in its OptionSpec
        _add_param(p, key)
    p.add_argument("--acm", metavar="ANALYSIS_JSON", default=None,
                   help="ACM coefficients from this analysis (from `acm analyze`), with --rule (default acm) and --t")
    rules = p.add_argument_group(
        "coefficient rule",
        "acm (default) is the paper's rule (arXiv 2505.14009, Eq. 2-3): lambda_k = 1 - mean_j sigmoid(t*(MI_kj - "
        "max_j MI_kj)) from the per-sample MI of --acm FILE, merged as theta_0 + (1/N) sum_i lambda_i tau_i. "
        "--against merged measures the MI against a plain merge instead (needs --calibration, no --acm) and "
        "--applies merged-delta rescales a plain merge's delta (a public derivative of the authors' code). "
        "softmax is this project's alternative rule (--metric, --alpha).")
    rules.add_argument("--rule", default=None, metavar="acm|softmax|fim",
                       help="coefficient rule (default acm; 'sigmoid' = acm --against merged --applies merged-delta; "
                            "fim = the data-free Fisher rule, below)")
    rules.add_argument("--t", type=float, default=None,
                       help="the rule's t: acm in [-3, 3] (default 0.7, the paper's), softmax >= 0 (default 1), "
                            "fim in [0, 10] (default 1)")
    rules.add_argument("--against", default=None, metavar="fine-tuned|merged",
                       help="acm rule: MI of the base against each fine-tuned model (default) or a plain merge")
    rules.add_argument("--applies", default=None, metavar="task-vectors|merged-delta",
                       help="acm rule: lambda weights each task vector with 1/N (default) or a plain merge's delta")
    rules.add_argument("--theta", type=float, default=None, help=argparse.SUPPRESS)   # the old sigmoid rule's t
    rules.add_argument("--metric", default=None, metavar="NAME",
                       help=f"softmax rule: which similarity of the analysis drives λ: {keys_help()}")
    rules.add_argument("--clip-min", type=float, default=None, help="clip λ from below (after the formula)")
    rules.add_argument("--clip-max", type=float, default=None, help="clip λ from above (after the formula)")
    rules.add_argument("--rule-estimator", default=None, metavar="labels|binned",
                       help="--against merged: per-sample MI estimator (labels = discrete MI of bf16 values, default)")
    rules.add_argument("--rule-bins", type=int, default=None, help="--against merged, binned estimator: bins (64)")
    rules.add_argument("--rule-max-values", type=int, default=None, metavar="N",
                       help="--against merged: values per sample and activation point kept for the MI (262144; 0 = all)")
    rules.add_argument("--calibration", default=None, metavar="SRC",
                       help="--against merged: calibration text (bundled, a .jsonl/.json/.csv/.txt file or hub:org/name)")
    rules.add_argument("--field", default=None, help="--against merged: calibration text field")
    rules.add_argument("--samples", type=int, default=None,
                       help="--against merged: calibration samples (default: 10%% of each of 20 k-means clusters)")
    rules.add_argument("--max-tokens", type=int, default=None, help="--against merged: tokens per sample (512)")
    _add_fim_flags(p)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="output dtype (default: the base's)")
    p.add_argument("--tokenizer-from", default=None, metavar="base|ft|ft:N",
                   help="which model's tokenizer, chat template and generation defaults the merged model is "
                        "saved with: base (default; ft with --preset), ft (the first --ft) or ft:N (the N-th --ft)")
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


def _add_fim_flags(p: argparse.ArgumentParser) -> None:
    """The fim rule's flags (its Fisher pass and score), in their own help group."""
    fim = p.add_argument_group(
        "fim rule (data-free)",
        "--rule fim: alpha_k = sigmoid(-t*z_k), z = standardised log(F_k*|delta_k|^2) over the layers, F the base's "
        "diagonal Fisher on random tokens (a reading of FIM-Merging, arXiv 2603.21705); theta = theta_0 + sum_i "
        "alpha_i tau_i. With --acm FILE the file's Fisher pass is used (acm analyze --rule fim); without, the "
        "pass runs here on the base (seconds to minutes) and is recorded in the recipe.")
    fim.add_argument("--fim-score", default=None, metavar="fisher-delta|fisher-only",
                     help="fim: the layer score F*|delta|^2 (default) or the Fisher alone (the paper's ablation)")
    fim.add_argument("--fim-sequences", type=int, default=None, metavar="S", help="fim: random sequences (8)")
    fim.add_argument("--fim-length", type=int, default=None, metavar="L", help="fim: tokens per sequence (64)")
    fim.add_argument("--fim-seed", type=int, default=None, help="fim: seed of the random tokens (0)")
    fim.add_argument("--fim-loss", default=None, metavar="lm|sampled",
                     help="fim: next-token loss on the random tokens (lm) or on targets drawn from the base (sampled)")



def _load_analysis(path: str, fts: list[str]):
    from acm.activations.result import AnalysisResult

    analysis = AnalysisResult.load(path)
    if len(analysis.models) != len(fts):
        raise InputError(f"{path} analyses {len(analysis.models)} fine-tuned model(s) but {len(fts)} --ft given; "
                         "pass the same fine-tuned models, in the same order, as in the analysis")
    for i, (m, spec) in enumerate(zip(analysis.models, fts)):
        if str(m.model) != spec:
            log.warning("warning: model %d of the analysis is %s but --ft is %s; using its coefficients anyway",
                        i + 1, m.model, spec)
    return analysis


_MERGED_ONLY = (("--rule-estimator", "rule_estimator"), ("--rule-bins", "rule_bins"),
                ("--rule-max-values", "rule_max_values"), ("--calibration", "calibration"), ("--field", "field"),
                ("--samples", "samples"), ("--max-tokens", "max_tokens"))


def _clip(args: argparse.Namespace):
    import math

    if args.clip_min is None and args.clip_max is None:
        return None
    for name, v in (("--clip-min", args.clip_min), ("--clip-max", args.clip_max)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise InputError(f"{name} must be a finite number >= 0, got {v}")
    if args.clip_min is not None and args.clip_max is not None and args.clip_min > args.clip_max:
        raise InputError(f"--clip-min {args.clip_min} is larger than --clip-max {args.clip_max}")
    return args.clip_min, args.clip_max


def _rule_settings(args: argparse.Namespace) -> dict | None:
    """None for a plain merge; else the checked rule settings {rule, t, against, applies, estimator, …}."""
    from acm.rules import alias_params, check_t, get_rule

    if args.theta is not None:
        if args.t is not None:
            raise InputError("--theta is the old name of --t: give one of them")
        args.t = args.theta
    fim_flags = [f for f, v in (("--fim-score", args.fim_score), ("--fim-sequences", args.fim_sequences),
                                ("--fim-length", args.fim_length), ("--fim-seed", args.fim_seed),
                                ("--fim-loss", args.fim_loss)) if v is not None]
    if args.rule is not None and get_rule(args.rule).key == "fim":
        return _fim_settings(args, fim_flags)
    if fim_flags:
        raise InputError(f"{fim_flags[0]} belongs to the fim rule: add --rule fim")
    switches = alias_params(args.rule)
    against = args.against or switches.get("against")
    coefficient_flags = [f for f, v in (("--rule", args.rule), ("--t", args.t), ("--against", args.against),
                                        ("--applies", args.applies), ("--metric", args.metric),
                                        ("--clip-min", args.clip_min), ("--clip-max", args.clip_max)) if v is not None]
    merged_flags = [flag for flag, name in _MERGED_ONLY if getattr(args, name) is not None]
    if args.acm is None and against != "merged":
        if merged_flags:
            raise InputError(f"{merged_flags[0]} belongs to the acm rule with MI against a plain merge: "
                             "add --against merged")
        if coefficient_flags:
            raise InputError(f"{coefficient_flags[0]} sets ACM coefficients: pass --acm analysis.json (from "
                             "`acm analyze`), or --against merged --calibration SRC")
        return None
    spec = get_rule(args.rule)
    if args.method not in registry.ACM_METHODS:
        raise InputError("ACM coefficients scale task vectors and linear averaging has none; "
                         f"use --method {', '.join(registry.ACM_METHODS)} with --acm")
    if spec.key == "softmax":
        if args.against or args.applies or merged_flags:
            raise InputError(f"{(['--against', '--applies'] + merged_flags)[0]} belongs to the acm rule, not softmax")
        from acm.activations.similarity import get_metric

        return {"rule": "softmax", "t": check_t(spec, args.t), "metric": get_metric(args.metric or "nmi").key,
                "clip": _clip(args)}
    if args.metric is not None:
        raise InputError("--metric picks the softmax rule's similarity; the acm rule uses per-sample MI "
                         "(add --rule softmax)")
    settings = spec.validate({"t": args.t, "against": against, "applies": args.applies or switches.get("applies"),
                              "estimator": args.rule_estimator, "bins": args.rule_bins,
                              "max_values": args.rule_max_values})
    if settings["against"] == "merged":
        if args.acm is not None:
            raise InputError("--against merged measures MI against a plain merge of --ft: drop --acm")
        if args.calibration is None:
            raise InputError("--against merged needs --calibration (e.g. bundled, or a .jsonl file of texts)")
    elif merged_flags:
        raise InputError(f"{merged_flags[0]} belongs to --against merged (the analysis file fixes the calibration)")
    for flag, v in (("--samples", args.samples), ("--max-tokens", args.max_tokens)):
        if v is not None and v < 1:
            raise InputError(f"{flag} must be >= 1, got {v}")
    return {"rule": "acm", **settings, "clip": _clip(args)}


def apply_preset(args: argparse.Namespace) -> None:
    """``--preset`` fills models and tokenizer source; its rule, t and calibration only when the merge asks
    for ACM coefficients (--acm FILE or --against merged): a preset never turns a plain merge into an ACM one."""
    values = preset_values(args)
    keep = {"base", "ft", "tokenizer_from"}
    paper_rule = args.rule in (None, "acm") and args.theta is None      # the preset's t is the acm rule's
    if (args.acm is not None or args.against == "merged") and paper_rule:
        keep |= {"rule", "t"}
    if args.against == "merged":
        keep |= {"calibration", "field", "max_tokens"}
    fill(args, {k: v for k, v in values.items() if k in keep}, {"tokenizer_from": "base"})
    require(args, "--base", "--ft")


def _fim_settings(args: argparse.Namespace, fim_flags: list[str]) -> dict:
    """The fim rule's checked settings; its Fisher pass comes from --acm FILE or runs on the fly."""
    from acm.activations.fisher import FisherSettings
    from acm.rules import FIM, check_t

    if args.method not in registry.ACM_METHODS:
        raise InputError("the fim rule's α scale task vectors and linear averaging has none; "
                         f"use --method {', '.join(registry.ACM_METHODS)}")
    other = [f for f, v in (("--against", args.against), ("--applies", args.applies), ("--metric", args.metric))
             if v is not None] + [flag for flag, name in _MERGED_ONLY if getattr(args, name) is not None]
    if other:
        raise InputError(f"{other[0]} belongs to the acm / softmax rules, not fim")
    score = FIM.param("score").check(args.fim_score or "fisher-delta")
    pass_flags = [f for f in fim_flags if f != "--fim-score"]
    if args.acm is not None and pass_flags:
        raise InputError(f"{pass_flags[0]}: the analysis file (--acm) fixes the Fisher pass; drop it, or drop --acm "
                         "to run the pass here")
    fisher = None if args.acm is not None else FisherSettings(
        8 if args.fim_sequences is None else args.fim_sequences, 64 if args.fim_length is None else args.fim_length,
        0 if args.fim_seed is None else args.fim_seed, args.fim_loss or "lm").checked()
    return {"rule": "fim", "t": check_t("fim", args.t), "score": score, "fisher": fisher, "clip": _clip(args)}


def _run_fim_rule(args: argparse.Namespace, options, s: dict) -> int:
    from acm.merging.engine import merge_models
    from acm.rules.coefficients import compute

    if s["fisher"] is None:
        analysis = _load_analysis(args.acm, args.ft)
    else:
        from acm.activations.fisher import fisher_analysis

        analysis = fisher_analysis(args.base, list(args.ft), s["fisher"],
                                   device=None if args.device in (None, "", "auto") else args.device,
                                   allow_pickle=args.allow_pickle)
        fb = analysis.fisher
        print(f"Fisher pass on the base: {fb['sequences']} × {fb['length']} random tokens (seed {fb['seed']}, "
              f"loss {fb['loss']}) in {fb['seconds']:.1f}s on {fb['device']}")
    coef = compute(analysis, "fim", s["t"], clip=s["clip"], score=s["score"])
    report = merge_models(args.base, args.ft, args.out, options, lambdas=coef.weights(), acm=coef.entry(),
                          force=args.force, allow_pickle=args.allow_pickle, show_progress=sys.stderr.isatty())
    print(f"merged {len(args.ft)} model(s) into {args.base} with FIM {args.method} (fim rule, t={s['t']:g}, "
          f"score {s['score']})")
    for name, lam in zip(coef.models, coef.by_model()):
        print(f"α per layer ({name}): " + ", ".join(f"{g} {v:.3f}" for g, v in lam.items()))
    _print_output(report)
    return 0


def run(args: argparse.Namespace) -> int:
    from acm.merging.engine import MergeOptions, merge_models

    apply_preset(args)
    options = MergeOptions(method=args.method, **{k: getattr(args, k) for k in registry.OPTIONS}, dtype=args.dtype,
                           shard_size=args.shard_size,
                           device=None if args.device in (None, "", "auto") else args.device, threads=args.threads,
                           tokenizer_from=args.tokenizer_from)
    settings = _rule_settings(args)
    options.validate(len(args.ft))
    if settings is not None and settings["rule"] == "acm":
        return _run_acm_rule(args, options, settings)
    if settings is not None and settings["rule"] == "fim":
        return _run_fim_rule(args, options, settings)
    lambdas = acm = None
    label = args.method
    if settings is not None:
        from acm.rules.coefficients import compute

        coef = compute(_load_analysis(args.acm, args.ft), "softmax", settings["t"], args.alpha, settings["clip"],
                       metric=settings["metric"])
        lambdas, acm = coef.weights(), coef.entry()      # the same entry the app and the tuner record
        by = "" if settings["metric"] == "nmi" else ", by " + settings["metric"]
        label = f"ACM {args.method} (softmax rule, t={settings['t']:g}, alpha={args.alpha:g}{by})"
    report = merge_models(args.base, args.ft, args.out, options, lambdas=lambdas, acm=acm, force=args.force,
                          allow_pickle=args.allow_pickle, show_progress=sys.stderr.isatty())
    print(f"merged {len(args.ft)} model(s) into {args.base} with {label}")
    _print_output(report)
    return 0


def _print_output(report) -> None:
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


def _run_acm_rule(args: argparse.Namespace, options, s: dict) -> int:
    from acm.merging.rule_merge import merge_with_rule

    tty = sys.stderr.isatty()
    last = [""]

    def progress(frac: float, msg: str) -> None:   # one stdout line per stage when not on a terminal
        stage = msg.split(":", 1)[0]
        if stage != last[0]:
            print(f"[{frac:4.0%}] {stage}", flush=True)
            last[0] = stage

    staged = s["against"] == "merged" or s["applies"] == "merged-delta"
    analysis = _load_analysis(args.acm, args.ft) if s["against"] == "fine-tuned" else None
    aopts = {"field": args.field, "samples": args.samples, "max_tokens": args.max_tokens or 512, "seed": args.seed,
             "device": None if args.device in (None, "", "auto") else args.device}
    result = merge_with_rule(args.base, args.ft, args.out, options, t=s["t"], against=s["against"],
                             applies=s["applies"], analysis=analysis, calibration=args.calibration, clip=s["clip"],
                             estimator=s["estimator"], bins=s["bins"], max_values=s["max_values"],
                             analysis_options=aopts, force=args.force, allow_pickle=args.allow_pickle,
                             progress=None if (tty or not staged) else progress, show_progress=tty)
    report = result.merge
    print(f"merged {len(args.ft)} model(s) into {args.base} with ACM {args.method} (acm rule, t={s['t']:g}, "
          f"MI against {s['against']}, λ applied to {s['applies']})")
    if staged:
        print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.stage_seconds.items()))
    lam = result.coefficients.mean_over_models()
    print("λ per layer: " + ", ".join(f"{g} {v:.3f}" for g, v in lam.items()))
    _print_output(report)
    return 0
