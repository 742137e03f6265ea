"""Helpers shared by command modules."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

__all__ = [
    "add_global_options",
    "merge_late_global_options",
    "add_threads_argument",
    "set_threads",
    "default_threads",
    "available_cpus",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "check_output_file",
    "write_output_file",
]


#: The global options: flag -> (dest, default before the command, add_argument keywords).
_GLOBAL_OPTIONS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "--read-ini": (
        "read_ini",
        [],
        {
            "metavar": "FILE",
            "action": "append",
            "help": "read configuration from this INI file (repeatable; later files win)",
        },
    ),
    "--set": (
        "overrides",
        [],
        {
            "metavar": "SECTION.KEY=VALUE",
            "action": "append",
            "help": "override one configuration value (repeatable; applied after --read-ini)",
        },
    ),
    "--device": (
        "device",
        None,
        {"metavar": "DEVICE", "help": "torch device for training (cpu, cuda, cuda:1); default: cuda if available"},
    ),
}
_LATE = "late_"


def add_global_options(
    parser: argparse.ArgumentParser, *, after_command: bool = False, skip: tuple[str, ...] = ()
) -> None:
    """``--read-ini``, ``--set`` and ``--device``, before the command or after it.

    After a command they fill ``late_*`` attributes, absent unless given (argparse
    parses a sub-command into a namespace of its own, whose values would replace
    those given before the command); :func:`merge_late_global_options` appends them.

    Args:
        parser: The top-level parser, or a command's.
        after_command: ``parser`` is a command's.
        skip: Flags the command defines itself (``optim init --set``).
    """
    target: Any = parser
    if after_command:
        target = parser.add_argument_group("global options (also accepted before the command)")
    for flag, (dest, default, keywords) in _GLOBAL_OPTIONS.items():
        if flag in skip:
            continue
        if after_command:
            target.add_argument(flag, dest=_LATE + dest, default=argparse.SUPPRESS, **keywords)
        else:
            target.add_argument(flag, dest=dest, default=default, **keywords)


def merge_late_global_options(args: argparse.Namespace) -> None:
    """Fold global options given after the command into those given before it.

    Repeatable ones accumulate in command-line order; a single value given after
    the command wins.
    """
    for dest, default, keywords in _GLOBAL_OPTIONS.values():
        if not hasattr(args, _LATE + dest):
            continue
        late = getattr(args, _LATE + dest)
        delattr(args, _LATE + dest)
        setattr(args, dest, [*getattr(args, dest), *late] if keywords.get("action") == "append" else late)


def _number(text: str, kind: type, lowest: int, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and value >= lowest) or (kind is float and value == 0):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return int(_number(text, int, 1, "an integer >= 1"))


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return int(_number(text, int, 0, "an integer >= 0"))


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return float(_number(text, float, 0, "a finite number > 0"))


def check_output_file(out: str | Path, what: str, example: str) -> Path:
    """``out`` as a path, refused before any work when it is an existing directory.

    Args:
        out: The output file the user named.
        what: How the user named it, for the message (``--out``, ``OUT``).
        example: A file name to suggest inside the directory.

    Raises:
        UsageError: ``out`` is a directory.
    """
    from stagetune.errors import UsageError

    path = Path(out)
    if path.is_dir():
        raise UsageError(f"{what} {out} is a directory; name a file, e.g. {path / example}")
    return path


def write_output_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so that ``path`` is whole or absent.

    Raises:
        StagetuneError: The file cannot be written (read-only filesystem, disk
            full, ...); no temporary file is left behind.
    """
    from stagetune.errors import StagetuneError

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise StagetuneError(f"cannot write {path}: {exc.strerror or exc}") from None


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
        type=positive_int,
        default=None,
        metavar="N",
        help=f"torch CPU threads {'per worker' if per_worker else 'for this process'} (default {default})",
    )


def set_threads(threads: int | None) -> None:
    """Apply the thread budget (imports torch)."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
