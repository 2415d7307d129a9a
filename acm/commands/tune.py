"""``acm tune``: sweep the coefficient rule's t and switches, methods / α / density / drop rate, stream results,
write the frontier."""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import replace

from acm.commands.presets import add_preset_flags, fill, preset_values, require
from acm.errors import InputError

DESCRIPTION = (
    "The grid is the paper's rule (--rules acm, the default) at each --ts, plus the plain method; --rules acm softmax "
    "adds this project's softmax rule. Every setting of the grid is merged into a temporary folder, evaluated "
    "greedily (same prompts and answer extraction as `acm eval`) on the tune split and removed unless --keep. "
    "Results stream to OUT/tune.jsonl (a killed run resumes where it stopped); OUT/frontier.json and frontier.md "
    "hold the Pareto frontier and the recommended setting, re-measured on a disjoint held-out split.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune", help="sweep t (and the rule's switches, α, density, method): accuracy-vs-length frontier and a "
                     "recommended setting", description=DESCRIPTION)
    _model_flags(p.add_argument_group("models and analysis"))
    _problem_flags(p.add_argument_group("problems (tune and held-out splits)"))
    _grid_flags(p.add_argument_group("grid: methods and their knobs"))
    _rule_flags(p.add_argument_group("grid: coefficient rules"))
    _objective_flags(p.add_argument_group("recommendation"))
    _run_flags(p.add_argument_group("generation and the run"))
    _executor_flags(p.add_argument_group("where the settings run (docs/tuning_on_ray.md)"))
    p.set_defaults(func=run)
    return p


def _model_flags(g) -> None:
    g.add_argument("--base", default=None, metavar="MODEL",
                   help="base model: local folder or Hub id (required unless --preset)")
    g.add_argument("--ft", action="append", default=None, metavar="MODEL",
                   help="fine-tuned model; repeatable (required unless --preset)")
    add_preset_flags(g)
    g.add_argument("--analysis", default=None, metavar="JSON",
                   help="analysis from `acm analyze` (computed and saved there if the file does not exist; "
                        "default OUT/analysis.json)")
    g.add_argument("--calibration", default=None, metavar="SRC",
                   help="calibration for a computed analysis and for --against merged: bundled (default), a file "
                        "or a Hub dataset id")
    g.add_argument("--samples", type=int, default=None, help="calibration prompts for a computed analysis")


def _problem_flags(g) -> None:
    from acm.tune import DEFAULT_HOLDOUT

    g.add_argument("--data", default="bundled", metavar="SRC",
                   help="evaluation set: bundled (default), a .jsonl/.json file or a Hub dataset id")
    g.add_argument("--split", default="test", help="Hub dataset split (default test)")
    g.add_argument("--field-question", default="question")
    g.add_argument("--field-answer", default="answer")
    g.add_argument("--limit", type=int, default=None,
                   help="use N problems, drawn evenly over difficulty levels (seeded), before the holdout split")
    g.add_argument("--holdout", type=float, default=DEFAULT_HOLDOUT,
                   help=f"share of problems held out to report the recommended setting (default {DEFAULT_HOLDOUT}; "
                        "0 = none)")
    g.add_argument("--seed", type=int, default=0, help="seed of the problem split")


def _grid_flags(g) -> None:
    from acm.tune import MAX_SETTINGS, TUNABLE_METHODS

    g.add_argument("--methods", nargs="+", default=["ties"], metavar="M",
                   help=f"{', '.join(TUNABLE_METHODS)} (default: ties)")
    g.add_argument("--alphas", nargs="+", type=float, default=[0.7], metavar="A",
                   help="α values (default 0.7) of the plain merges, softmax and the acm rule's merged variants")
    g.add_argument("--densities", nargs="+", type=float, default=[0.7], metavar="D",
                   help="TIES / Breadcrumbs density, DELLA mean keep probability (default 0.7)")
    g.add_argument("--drop-rates", nargs="+", type=float, default=[0.3], metavar="P", help="DARE drop rate")
    g.add_argument("--no-plain", action="store_true", help="do not include the plain method (λ = α) per point")
    g.add_argument("--max-settings", type=int, default=MAX_SETTINGS,
                   help=f"refuse grids larger than this (default {MAX_SETTINGS})")


def _rule_flags(g) -> None:
    from acm.activations.similarity import keys_help
    from acm.tune import DEFAULT_ACM_TS, DEFAULT_SOFTMAX_TS

    g.add_argument("--rules", nargs="+", default=["acm"], metavar="R",
                   help="coefficient rules to compare (acm.rules): acm (default) = the paper's rule, lambda_k = "
                        "1 - mean_j sigmoid(t*(MI_kj - max_j MI_kj)), theta = theta_0 + (1/N) sum lambda*tau "
                        "(arXiv 2505.14009, Eq. 2-3); softmax = this project's alternative rule (lambda from NMI, "
                        "CKA or cosine; --metrics); sigmoid = acm --against merged --applies merged-delta; fim = the "
                        "data-free Fisher rule (--fim-ts; its Fisher pass is added to the analysis)")
    g.add_argument("--ts", nargs="+", type=float, default=None, metavar="T",
                   help=f"t values of every rule in --rules, each in its rule's range: acm t in [-3, 3] (default "
                        f"{' '.join(f'{t:g}' for t in DEFAULT_ACM_TS)}: the paper's 0.7 inside its ablation "
                        "0.5-0.9, and -1 as a contrast); softmax t >= 0 (default "
                        f"{' '.join(f'{t:g}' for t in DEFAULT_SOFTMAX_TS)}; t = 0 equals plain)")
    g.add_argument("--softmax-ts", nargs="+", type=float, default=None, metavar="T",
                   help="t values of the softmax rule when they differ from --ts (e.g. --rules acm softmax "
                        "--ts 0.5 0.7 0.9 --softmax-ts 1 2 4)")
    g.add_argument("--fim-ts", nargs="+", type=float, default=None, metavar="T",
                   help="t values of the fim rule (default 0.5 1 2; t in [0, 10])")
    g.add_argument("--against", nargs="+", default=["fine-tuned"], metavar="fine-tuned|merged",
                   help="acm rule: MI of the base against each fine-tuned model (default; the paper's text) and/or "
                        "against a plain merge at each alpha (a public derivative of the authors' code; one extra "
                        "analysis per setting); several values are one grid dimension")
    g.add_argument("--applies", nargs="+", default=["task-vectors"], metavar="task-vectors|merged-delta",
                   help="acm rule: lambda weights each task vector with 1/N (default; Eq. 3, no alpha) and/or "
                        "rescales a plain merge's delta from the base (the derivative; alpha kept)")
    g.add_argument("--rule-estimators", nargs="+", default=["labels"], metavar="E",
                   help="acm rule --against merged: per-sample MI estimators of that analysis: labels (default), "
                        "binned (--against fine-tuned uses the analysis file's estimator)")
    g.add_argument("--thetas", nargs="+", type=float, default=None, metavar="T",
                   help="deprecated: the old sigmoid rule's θ, now the acm rule's t values")
    g.add_argument("--metrics", nargs="+", default=None, metavar="M",
                   help=f"softmax rule: similarity metric(s) that drive its λ, one grid dimension: {keys_help()} "
                        "(all computed in one analysis)")


def _objective_flags(g) -> None:
    from acm.tune import DEFAULT_TOLERANCE, OBJECTIVES

    g.add_argument("--objective", choices=OBJECTIVES, default="shortest",
                   help="shortest (default): shortest answers with accuracy >= base and >= fine-tuned − tolerance; "
                        "acc-per-1k: accuracy per 1k answer tokens; max-accuracy")
    g.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"accuracy (fraction) the recommendation may lose vs the fine-tuned model "
                        f"(default {DEFAULT_TOLERANCE})")


def _run_flags(g) -> None:
    from acm.evaluation.engines import ENGINES

    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--no-chat-template", action="store_true")
    g.add_argument("--budget-minutes", type=float, default=None, help="stop cleanly after this many minutes")
    g.add_argument("--keep", action="store_true", help="keep every merged model under OUT/")
    g.add_argument("--restart", action="store_true", help="discard OUT/tune.jsonl and start over")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    g.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="generation engine for every evaluation: transformers (default) or vllm (optional: pip "
                        "install vllm, needs a CUDA GPU; unverified, see README)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for models under 200 MB, else torch's default)")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder (tune.jsonl, frontier.json/.md)")


def _executor_flags(g) -> None:
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local (default): one setting after another in this process; ray: each setting is one Ray "
                        "task on --ray-address, or on a local cluster started for the run (optional: pip install "
                        "'.[ray]')")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="a running Ray cluster (host:port or ray://host:port); default: a local cluster on 127.0.0.1")
    g.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local cluster (default: this machine's); each setting takes --threads of them")
    g.add_argument("--max-retries", type=int, default=None, metavar="N",
                   help="ray: times a setting runs again when its worker dies (default 2), then it is recorded as "
                        "failed")


def _executor(args: argparse.Namespace):
    """None (the local executor) or an unstarted ``acm.tune_ray.RayExecutor``; one line for flags that do not fit."""
    ray_only = [f for f, v in (("--ray-address", args.ray_address), ("--ray-cpus", args.ray_cpus),
                               ("--max-retries", args.max_retries)) if v is not None]
    if args.executor == "local":
        if ray_only:
            raise InputError(f"{', '.join(ray_only)} only apply to --executor ray")
        return None
    if args.keep:
        raise InputError("--keep keeps every merge under OUT, which only the local executor writes to; drop --keep "
                         "or use --executor local")
    if args.ray_address and args.ray_cpus is not None:
        raise InputError("--ray-cpus sizes the local cluster; a running cluster (--ray-address) has its own CPUs")
    from acm.tune_ray import DEFAULT_MAX_RETRIES, RayExecutor, import_ray

    import_ray()   # one line now if Ray is missing, before the analysis or any model work
    return RayExecutor(args.ray_address, num_cpus=args.ray_cpus,
                       max_retries=DEFAULT_MAX_RETRIES if args.max_retries is None else args.max_retries)


def options_from_args(args: argparse.Namespace):
    """The ``acm.tune.TuneOptions`` of the command line."""
    from acm.tune import TuneOptions

    return TuneOptions(data=args.data, field_question=args.field_question, field_answer=args.field_answer,
                       split=args.split, limit=args.limit, holdout=args.holdout, seed=args.seed,
                       analysis=args.analysis, calibration=args.calibration, samples=args.samples,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       chat_template=not args.no_chat_template, objective=args.objective, tolerance=args.tolerance,
                       keep=args.keep, restart=args.restart, budget_minutes=args.budget_minutes, device=args.device,
                       threads=args.threads, engine=args.engine)


def apply_preset(args: argparse.Namespace) -> None:
    """``--preset`` fills the models and the calibration dataset of a computed analysis (flags given win); the
    grid keeps its own t values (the paper's 0.7 is in the default --ts)."""
    values = preset_values(args)
    fill(args, {k: v for k, v in values.items() if k in ("base", "ft", "calibration")}, {})
    require(args, "--base", "--ft")


def run(args: argparse.Namespace) -> int:
    from acm.tune import expand_grid, run_tune

    apply_preset(args)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.max_settings < 1:
        raise InputError(f"--max-settings must be at least 1, got {args.max_settings}")
    executor = _executor(args)
    options = replace(options_from_args(args), executor=executor)
    options.validate()   # the engine among them: before the analysis or any merge
    with contextlib.suppress(Exception):   # one tqdm bar for the run, not one per model load (cosmetic)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    grid = expand_grid(args.methods, args.alphas, args.ts, args.densities, args.drop_rates, plain=not args.no_plain,
                       rules=args.rules, softmax_ts=args.softmax_ts, against=args.against, applies=args.applies,
                       thetas=args.thetas, estimators=args.rule_estimators, max_settings=args.max_settings,
                       metrics=args.metrics, fim_ts=args.fim_ts)
    where = "" if executor is None else f", executor: ray at {args.ray_address or 'a local cluster'}"
    print(f"tune: {len(grid)} settings -> {args.out}/tune.jsonl (engine: {args.engine}{where})", flush=True)
    with executor if executor is not None else contextlib.nullcontext():   # a local cluster lives for the run
        report = run_tune(args.base, args.ft, args.out, grid, options, on_record=_show)
    _print_outcome(report, args.out)
    return 0


def _show(rec: dict) -> None:
    if rec["kind"] == "resumed":
        print(f"resuming: {rec['done']} of {rec['of']} settings already done")
    elif rec["kind"] in ("reference", "setting", "holdout"):
        print(json.dumps({k: rec[k] for k in ("kind", "label", "split", "accuracy", "mean_length")}), flush=True)
    elif rec["kind"] == "failed":
        print(json.dumps({k: rec.get(k) for k in ("kind", "label", "split", "reason", "attempts")}), flush=True)


def _print_outcome(report: dict, out: str) -> None:
    rec = report["recommended"]
    if rec.get("key"):
        h = rec.get("holdout")
        held = f"; held-out accuracy {h['accuracy']:.3f}, mean length {h['mean_length']:.1f}" if h else ""
        print(f"recommended: {rec['label']} ({rec['why']}){held}")
    else:
        print(f"no recommendation: {rec['why']}")
    if report.get("failed"):
        print(f"{len(report['failed'])} setting(s) failed (see frontier.md); run the same command again to retry them")
    if report.get("stopped"):
        print(f"stopped early ({report['stopped']}): {report['done']} of {report['grid_size']} settings done; "
              "run the same command again to continue")
    print(f"wrote {out}/frontier.json and frontier.md in {report['seconds']} s")
