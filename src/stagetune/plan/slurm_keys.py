"""The Slurm settings of a plan (``partition``, ``gres``, ``time``, ``sbatch``), checked before anything runs.

The same checks serve the plan file's keys and ``plan submit``'s options: each
function returns the value to use or raises :class:`ValueError` with what is
wrong, which the caller turns into one error line naming the file, section and
key (or the option).
"""

from __future__ import annotations

import re
import shlex

__all__ = ["SIGNAL_SECONDS", "check_partition", "check_gres", "check_time", "split_sbatch"]

#: A worker is warned this many seconds before its time limit (``--signal=B:USR1@...``).
SIGNAL_SECONDS = 120

_PARTITION = re.compile(r"[\w.-]+(,[\w.-]+)*")
_GRES = re.compile(r"[A-Za-z][\w/.-]*(:[\w.-]+)*(,[A-Za-z][\w/.-]*(:[\w.-]+)*)*")
# minutes | minutes:seconds | hours:minutes:seconds | days-hours[:minutes[:seconds]]
_TIME = re.compile(r"(?:(\d+)-(\d+)(?::(\d+))?(?::(\d+))?|(\d+)(?::(\d+))?(?::(\d+))?)")
#: sbatch options a plan sets on its own jobs, and the plan key (and submit option) to use instead.
_OWN = {
    "--partition": "partition", "--gres": "gres", "--time": "time", "--array": "workers",
    "--dependency": None, "--job-name": None, "--output": None, "--chdir": None,
    "--parsable": None, "--signal": None, "--requeue": None, "--no-requeue": None, "--open-mode": None,
    "--kill-on-invalid-dep": None, "--wrap": None, "--wait": None,
}
_SHORT = {"-p": "--partition", "-t": "--time", "-a": "--array", "-d": "--dependency", "-J": "--job-name",
          "-o": "--output", "-D": "--chdir", "-W": "--wait"}


def check_partition(text: str) -> str:
    text = text.strip()
    if not _PARTITION.fullmatch(text):
        raise ValueError("expected a partition name (or several, comma-separated), e.g. gpu")
    return text


def check_gres(text: str) -> str:
    text = text.strip()
    if not _GRES.fullmatch(text):
        raise ValueError("expected generic resources as sbatch --gres takes them, e.g. gpu:1 or gpu:a100:2")
    return text


def time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (None: no limit); ValueError if it is none of Slurm's formats."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.fullmatch(text)
    if match is None:
        raise ValueError("expected a Slurm time limit: minutes, minutes:seconds, hours:minutes:seconds, "
                         "days-hours[:minutes[:seconds]] or UNLIMITED")
    days, hours, d_min, d_sec, minutes, m_sec, h_sec = (int(g) if g else 0 for g in match.groups())
    if match[1] is not None:
        seconds = ((days * 24 + hours) * 60 + d_min) * 60 + d_sec
    elif match[7] is not None:  # hours:minutes:seconds
        seconds = (minutes * 60 + m_sec) * 60 + h_sec
    else:
        seconds = minutes * 60 + m_sec
    return seconds or None  # 0: no limit, as for sbatch


def check_time(text: str) -> str:
    seconds = time_seconds(text)
    if seconds is not None and seconds <= SIGNAL_SECONDS:
        raise ValueError(
            f"workers are warned {SIGNAL_SECONDS} s before their time limit (--signal=B:USR1@{SIGNAL_SECONDS}) "
            f"to hand their trial back; give more than {SIGNAL_SECONDS // 60} minutes"
        )
    return text.strip()


def split_sbatch(words: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Extra sbatch options, as shell words (a string is split as a shell would)."""
    if isinstance(words, str):
        try:
            words = shlex.split(words)
        except ValueError as exc:
            raise ValueError(f"not shell words ({exc})") from None
    if words and not words[0].startswith("-"):
        raise ValueError(f"{words[0]!r} is no sbatch option; give options such as --qos=normal --account=x")
    for word in words:
        name = word.split("=", 1)[0]
        if name.startswith("--"):
            # sbatch takes any unambiguous abbreviation of a long option
            own = [o for o in _OWN if len(name) > 3 and o.startswith(name)]
        elif name.startswith("-") and len(name) >= 2:
            own = [_SHORT[name[:2]]] if name[:2] in _SHORT else []
        else:
            continue
        if own:
            instead = _OWN[own[0]]
            raise ValueError(
                f"{word.split('=', 1)[0]}: the plan sets {own[0]} of its jobs itself"
                + (f"; use the {instead} key (or submit --{instead})" if instead else "")
            )
    return tuple(words)
