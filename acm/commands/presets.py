"""``acm presets``: the paper's pairs with download size and hardware; ``--preset`` for analyze, merge and tune.

Why one module: every command that takes ``--preset`` fills its arguments the same way — a flag given on
the command line always wins, the preset fills what was left out, and the command's own default fills the
rest — so the rule lives here once.
"""

from __future__ import annotations

import argparse
import json

from acm.errors import InputError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "presets", help="the paper's model pairs and calibration sets: download size and hardware, before fetching",
        description="List the presets that `--preset NAME` (analyze, merge, tune) fills in: base and fine-tuned "
                    "Hub ids, whose tokenizer and chat template the merge keeps, the paper's rule and t, the "
                    "calibration set; with each pair's download size and the hardware its steps need (estimates "
                    "from this project's measurements; `--json` adds the basis and the sources of every fact).")
    p.add_argument("name", nargs="?", default=None, help="show one preset in full (default: the table)")
    p.add_argument("--json", action="store_true", help="machine-readable output with sources and estimate basis")
    p.set_defaults(func=run)
    return p


def add_preset_flags(p: argparse.ArgumentParser, *, calibration: bool = True) -> None:
    """``--preset NAME`` (and ``--calibration-preset NAME``) on a command that takes models."""
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="fill --base, --ft, the tokenizer source, the paper's rule and t and the calibration from a "
                        "preset (`acm presets` lists them, e.g. qwen2.5-math-1.5b); flags you give win")
    if calibration:
        p.add_argument("--calibration-preset", default=None, metavar="NAME",
                       help="calibration from a preset: s1k (the paper's: 20 clusters x 10%%) or limo; sets the "
                            "dataset, split, text field, clusters, fraction and max tokens unless given")


def fill(args: argparse.Namespace, values: dict, defaults: dict) -> None:
    """For each ``dest``: keep a value given on the command line (not None), else the preset's, else the default."""
    for dest in set(values) | set(defaults):
        if getattr(args, dest, None) is None:
            setattr(args, dest, values.get(dest, defaults.get(dest)))


def preset_values(args: argparse.Namespace, *, models: bool = True) -> dict:
    """What ``--preset`` / ``--calibration-preset`` of ``args`` fill, as argparse dests (empty when neither)."""
    from acm.presets import get_calibration, get_pair

    values: dict = {}
    pair = get_pair(args.preset) if getattr(args, "preset", None) else None
    cal_key = getattr(args, "calibration_preset", None) or (pair.calibration if pair else None)
    if pair is not None and models:
        values.update(base=pair.base.repo, ft=[pair.ft.repo], tokenizer_from=pair.tokenizer_from, rule=pair.rule,
                      t=pair.t)
    if cal_key:
        cal = get_calibration(cal_key)
        values.update(calibration=cal.dataset, split=cal.split, field=cal.field, clusters=cal.clusters,
                      fraction=cal.fraction, max_tokens=cal.max_tokens)
    return values


def require(args: argparse.Namespace, *names: str) -> None:
    """One line naming the first required flag neither given nor filled by a preset."""
    for name in names:
        if getattr(args, name.lstrip("-").replace("-", "_"), None) in (None, []):
            raise InputError(f"{name} is required (or pass --preset NAME; `acm presets` lists them)")


def _show(name: str, as_json: bool) -> int:
    from acm.presets import calibration_presets, estimate, get_pair

    pair = get_pair(name)
    hw = estimate(pair)
    if as_json:
        cal = calibration_presets().get(pair.calibration)
        print(json.dumps({"preset": pair.to_dict(), "hardware": hw.__dict__,
                          "calibration": cal.__dict__ if cal else None}, indent=2, default=list))
        return 0
    print(f"{pair.key}: {pair.label}")
    for role, m in (("base", pair.base), ("fine-tuned", pair.ft)):
        print(f"  {role}: {m.repo} ({m.params / 1e9:.2f} B parameters, {m.layers} layers, hidden {m.hidden}, "
              f"vocabulary {m.vocab}, {'tied' if m.tied else 'untied'} head{', GATED' if m.gated else ''})")
        for s in m.sources:
            print(f"    source: {s}")
        for u in m.unverified:
            print(f"    UNVERIFIED: {u}")
    print(f"  tokenizer and chat template from: {pair.tokenizer_from}; rule {pair.rule}, t = {pair.t:g}; "
          f"calibration {pair.calibration}")
    for line in hw.lines():
        print(f"  {line}")
    for key, text in hw.basis.items():
        print(f"    basis ({key}): {text}")
    if pair.note:
        print(f"  note: {pair.note}")
    return 0


def run(args: argparse.Namespace) -> int:
    from acm.presets import calibration_presets, table_rows

    if args.name:
        return _show(args.name, args.json)
    rows = table_rows()
    if args.json:
        print(json.dumps({"pairs": rows, "calibrations": {k: c.__dict__ for k, c in calibration_presets().items()}},
                         indent=2, default=list))
        return 0
    print(f"{'preset':<18} {'download':>9} {'analyse':>9}  {'GPU to analyse on':<34} base + fine-tuned")
    for r in rows:
        flag = "  [gated]" if r["gated"] else ""
        print(f"{r['preset']:<18} {r['download']:>9} {r['gpu_analysis']:>9}  {r['gpu']:<34} "
              f"{r['base']} + {r['fine_tuned']}{flag}")
    print("\nevery preset: tokenizer and chat template from the fine-tuned (R1) model, rule acm, t = 0.7, "
          "calibration s1k; GPU = estimated memory for `acm analyze` in bf16 (`acm presets NAME` for the basis)")
    print("calibration presets: " + "; ".join(f"{c.key} = {c.dataset} [{c.split}], field {c.field}, "
                                              f"{c.clusters} clusters x {c.fraction:.0%}" for c in calibration_presets().values()))
    return 0
