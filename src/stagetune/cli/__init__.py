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
from typing import Callable, NoReturn, Sequence

from stagetune import __version__
from stagetune.cli._common import add_global_options, merge_late_global_options
from stagetune.errors import StagetuneError, UsageError

__all__ = ["main", "run_command", "build_parser", "COMMAND_MODULES"]

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = ("prep", "train", "evaluate", "extract", "optim", "plan", "demo", "fsdd", "packaged")

#: The commands that read ``--read-ini``/``--set``; anywhere else they would do nothing.
_CONFIG_READERS = {
    "--read-ini": ("train", "optim init"),
    "--set": ("train", "optim init", "optim best"),
}
#: Why a command reads no configuration (by command, else by its top-level command);
#: a command in neither table is not checked.
_WHY_NO_CONFIG = {
    "prep": "it computes features and reads no model configuration",
    "evaluate": "MODEL_PT holds the configuration it was trained with",
    "optim": "a study's configuration is the one optim init stored",
    "optim best": "its output is the best trial's configuration (its --set edits that)",
    "plan": "the plan file declares every stage's configuration",
    "demo": "the packaged demo plan declares its configuration",
    "prep-fsdd": "it builds a corpus and reads no model configuration",
    "list-configs": "it lists the packaged configs (read one with --read-ini @NAME)",
    "slurm-template": "it prints a job script",
}


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
    add_global_options(parser)
    parser.add_argument(
        "--print-ini",
        action="store_true",
        help="print the full resolved configuration, every field documented, and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"stagetune.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stagetune`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_late_global_options(args)

    def command() -> int:
        if args.print_ini:
            from stagetune.config import load_config, write_ini

            sys.stdout.write(write_ini(load_config(args.read_ini, args.overrides)))
            return 0
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        _refuse_unread_config(args)
        return int(args.func(args) or 0)

    return run_command(command)


def run_command(command: Callable[[], int | None]) -> int:
    """Run ``command`` as the CLI runs one: its exit code, or an error as one line.

    A :class:`StagetuneError` is ``stagetune: error: <message>`` on stderr and its
    exit code; Ctrl-C is ``stagetune: interrupted`` and 130. A pool's worker
    process (:mod:`stagetune.optim.pool_child`) runs its worker through this too.
    """
    try:
        return int(command() or 0)
    except StagetuneError as exc:
        print(f"stagetune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stagetune: interrupted", file=sys.stderr)
        return 130


def _refuse_unread_config(args: argparse.Namespace) -> None:
    """``--read-ini``/``--set`` given to a command that would silently ignore them.

    Raises:
        UsageError: Naming the commands the option belongs to.
    """
    command = args.command
    if command == "optim":
        if not args.optim_command:
            return  # `optim` reports the missing command
        command = f"optim {args.optim_command}"
    for flag, given in (("--read-ini", args.read_ini), ("--set", args.overrides)):
        readers = _CONFIG_READERS[flag]
        why = _WHY_NO_CONFIG.get(command) or _WHY_NO_CONFIG.get(args.command)
        if given and command not in readers and why:
            raise UsageError(
                f"{flag} has no effect on {command}: {why}; {flag} goes with "
                f"{', '.join(readers[:-1])} or {readers[-1]} (before or after the command)"
            )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
