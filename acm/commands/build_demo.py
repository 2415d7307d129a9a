"""``acm build-demo``: rebuild the offline demo world (two tiny models + calibration/eval sets)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from acm.errors import InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("build-demo", help="rebuild the bundled tiny Long-to-Short demo models and data",
                              description="Train, from scratch and seeded, a terse base model and its "
                                          "long-reasoning fine-tune, and write the held-out calibration and "
                                          "evaluation sets (CPU, minutes).")
    p.add_argument("--out", default="assets", metavar="DIR",
                   help="folder receiving demo-models/, calibration/ and eval/ (default: assets)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke build (tiny, untrained-ish models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-steps", type=int, default=None, help="optimiser steps for the base model")
    p.add_argument("--long-steps", type=int, default=None, help="optimiser steps for the long fine-tune")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from acm.demo.build import BuildConfig, build

    cfg = BuildConfig.quick(args.seed) if args.quick else BuildConfig(seed=args.seed)
    for name, value in (("base_steps", args.base_steps), ("long_steps", args.long_steps), ("threads", args.threads)):
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.base_steps:
        cfg = replace(cfg, base=replace(cfg.base, steps=args.base_steps))
    if args.long_steps:
        cfg = replace(cfg, long=replace(cfg.long, steps=args.long_steps))
    cfg = replace(cfg, threads=args.threads)
    report = build(args.out, cfg)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "losses"}, indent=2))
    return 0
