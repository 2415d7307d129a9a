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
import sys
from typing import Sequence

from acm import __version__
from acm.errors import ACMError

# Order here is the order shown in --help.
COMMAND_MODULES = ("analyze", "coefficients", "merge", "eval", "build_demo")


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
    try:
        return int(args.func(args) or 0)
    except ACMError as exc:
        if args.debug:
            raise
        print(f"acm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"acm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(f"acm {args.command}: error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def main_entry() -> None:
    """Console-script entry point (``acm ...`` after ``pip install .``)."""
    sys.exit(main())
