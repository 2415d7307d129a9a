"""Command line: ``python -m acm <command> ...``.

Each subcommand lives in ``acm/commands/<name>.py`` and exposes ``add_parser(subparsers)`` (which
registers its arguments and sets ``func``) and a ``run(args) -> int``. This module only wires
them together and turns ``ACMError`` into one line on stderr with the documented exit codes:
2 for bad usage/input, 1 for runtime failure. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from acm import __version__
from acm.errors import OOM_ADVICE, ACMError, first_line, is_out_of_memory, redact

# Order here is the order shown in --help.
COMMAND_MODULES = ("analyze", "coefficients", "merge", "eval", "tune", "presets", "build_demo")


class _OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage + message on error; we keep that but guarantee exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineArgumentParser(prog="acm", description="Activation-Guided Consensus Merging")
    parser.add_argument("--version", action="version", version=f"acm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineArgumentParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"acm.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still being built must not break the rest
            if exc.name != f"acm.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    if not args.debug:
        _quiet_hub_logs()
    try:
        return int(args.func(args) or 0)
    except ACMError as exc:
        if args.debug:
            raise
        _error_line(args.command, str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"acm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if is_out_of_memory(exc):
            advice = _OOM_ADVICE.get(args.command, "use a machine (or device) with more memory")
            _error_line(args.command, f"out of memory ({first_line(exc)}): {advice}")
            return 1
        _error_line(args.command, f"{type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)")
        return 1


# Libraries that print retry chatter ("Retrying in 8s [Retry 5/5]", twice: own handler + root) while
# the Hub is unreachable; their failure becomes our one-line error, so only their errors are shown.
_CHATTY_LOGGERS = ("huggingface_hub", "datasets")


def _quiet_hub_logs() -> None:
    # Both libraries set their logger's level when first imported (from these variables), so set
    # the variables for a later import and the levels for an earlier one.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


_OOM_ADVICE = {
    "analyze": OOM_ADVICE,
    "merge": "the merge holds only a few tensors at a time; try --device cpu, a smaller --shard-size "
             "or a machine with more memory",
    "eval": "use a smaller --batch-size or fewer --max-new-tokens",
}


def _error_line(command: str, message: str) -> None:
    """Exactly one line on stderr, with any Hub token masked (messages may quote requests)."""
    text = " ".join(redact(message).split())
    print(f"acm {command}: error: {text}", file=sys.stderr)


def main_entry() -> None:
    """Console-script entry point (``acm ...`` after ``pip install .``)."""
    sys.exit(main())
