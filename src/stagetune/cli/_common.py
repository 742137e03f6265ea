"""Helpers shared by command modules."""

from __future__ import annotations

import argparse
import os

__all__ = ["add_threads_argument", "set_threads", "default_threads", "available_cpus"]


def available_cpus() -> int:
    """CPUs this process may use: a Slurm job's allocation, else its CPU affinity."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 2


def default_threads() -> int:
    """Half the CPUs available (at least one): two threads on a busy core ran 10-30x slower."""
    return max(1, available_cpus() // 2)


def add_threads_argument(parser: argparse.ArgumentParser, *, per_worker: bool = False) -> None:
    """``--threads N``: torch intra-op threads for this process (or each worker)."""
    default = (
        "1: workers share the machine"
        if per_worker
        else f"half the CPUs available (a Slurm job's SLURM_CPUS_PER_TASK, else the CPU affinity), "
        f"here {default_threads()}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"torch CPU threads {'per worker' if per_worker else 'for this process'} (default {default})",
    )


def set_threads(threads: int | None) -> None:
    """Apply the thread budget (imports torch)."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
