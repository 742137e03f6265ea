"""The ``stagetune`` command line.

Each command lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers its sub-parser and sets ``func`` to a
``run(args) -> int`` callable.  Heavy imports (torch, optuna) happen inside
``run`` so that ``stagetune --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from stagetune import __version__
from stagetune.errors import StagetuneError

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = ("prep", "train", "evaluate", "optim")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other error.

    Sub-parsers inherit the class (``add_subparsers`` uses the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"stagetune: error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with the global config options and every command."""
    parser = _Parser(
        prog="stagetune",
        description="Staged hyperparameter search for PyTorch speech models on Kaldi data.",
    )
    parser.add_argument("--version", action="version", version=f"stagetune {__version__}")
    parser.add_argument(
        "--read-ini",
        metavar="FILE",
        action="append",
        default=[],
        help="read configuration from this INI file (repeatable; later files win)",
    )
    parser.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        dest="overrides",
        action="append",
        default=[],
        help="override one configuration value (repeatable; applied after --read-ini)",
    )
    parser.add_argument(
        "--print-ini",
        action="store_true",
        help="print the full resolved configuration, every field documented, and exit",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device for training (cpu, cuda, cuda:1); default: cuda if available",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"stagetune.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stagetune`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.print_ini:
            from stagetune.config import load_config, write_ini

            sys.stdout.write(write_ini(load_config(args.read_ini, args.overrides)))
            return 0
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except StagetuneError as exc:
        print(f"stagetune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stagetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
