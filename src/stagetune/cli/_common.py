"""Helpers shared by command modules."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_threads_argument", "set_threads", "default_threads"]


def default_threads() -> int:
    """Half the cores (at least one): a step with two threads on a busy core ran 10-30x slower."""
    return max(1, (os.cpu_count() or 2) // 2)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch intra-op threads for this process."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"torch CPU threads for this process (default: half the cores, here {default_threads()})",
    )


def set_threads(threads: int | None) -> None:
    """Apply the thread budget (imports torch)."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
