"""``stagetune optim``: placeholder until the optim issue lands."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optim", help="hyperparameter search studies in SQL")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    raise UsageError("optim is not available yet")
