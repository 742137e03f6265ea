"""Which parameters a study tunes, and how a trial samples them.

Everything here is derived from the declarations in :mod:`stagetune.config`;
no parameter is named in this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from stagetune.config import Config, FieldInfo, active, field_info, flatten, iter_fields, with_values
from stagetune.errors import UsageError
from stagetune.space import Ref

__all__ = ["Selection", "select_tunable", "sample_values", "sample_config", "distribution_args"]


@dataclass(frozen=True)
class Selection:
    """The tuned names and those dropped because they cannot matter."""

    tuned: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]  # (name, reason)


def _compile(patterns: Sequence[str], flag: str, names: Sequence[str]) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise UsageError(f"{flag} {pattern!r} is not a regular expression: {exc}") from None
        if not any(regex.fullmatch(n) for n in names):
            raise UsageError(
                f"{flag} {pattern!r} matches no tunable parameter; valid names: " + " ".join(names)
            )
        compiled.append(regex)
    return compiled


def select_tunable(
    base: Config, whitelist: Sequence[str] = (), blacklist: Sequence[str] = ()
) -> Selection:
    """Tunable dotted names after white/blacklists (full regex match).

    Parameters whose declared condition is false under ``base`` while every
    parameter the condition depends on stays fixed are dropped, with a reason.
    """
    tunable = [i.name for i in iter_fields() if i.search_space() is not None]
    allow = _compile(whitelist, "--whitelist", tunable)
    deny = _compile(blacklist, "--blacklist", tunable)
    chosen = [
        n
        for n in tunable
        if (not allow or any(r.fullmatch(n) for r in allow)) and not any(r.fullmatch(n) for r in deny)
    ]
    if not chosen:
        raise UsageError("the white/blacklists leave no parameter to tune; valid names: " + " ".join(tunable))
    values = flatten(base)
    tuned: list[str] = []
    dropped: list[tuple[str, str]] = []
    for name in chosen:
        info = field_info(name)
        fixed_false = [c for c in info.spec.when if c.name not in tuned and not c.holds(values)]
        if fixed_false:
            dropped.append((name, f"{fixed_false[0]} is false in the base config and not tuned"))
        else:
            tuned.append(name)
    if not tuned:
        raise UsageError(
            "no parameter left to tune: " + "; ".join(f"{n} ({why})" for n, why in dropped)
        )
    return Selection(tuple(tuned), tuple(dropped))


def distribution_args(info: FieldInfo, values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(kind, kwargs)`` for the trial's ``suggest_<kind>`` given current values."""
    space = info.search_space()
    assert space is not None, info.name
    if space.choices is not None:
        return "categorical", {"choices": list(space.choices)}

    def resolve(bound: int | float | Ref) -> int | float:
        return bound.resolve(values) if isinstance(bound, Ref) else bound

    low, high = resolve(space.low), resolve(space.high)
    high = max(low, high)
    kwargs: dict[str, Any] = {"low": low, "high": high, "log": space.log}
    if space.step is not None:
        kwargs["step"] = space.step
    if info.type is int:
        kwargs["low"], kwargs["high"] = int(low), int(high)
        kwargs.setdefault("step", 1)
        return "int", kwargs
    return "float", {**kwargs, "low": float(low), "high": float(high)}


def sample_values(trial: Any, base: Config, tuned: Sequence[str]) -> dict[str, Any]:
    """Suggest each tuned parameter whose conditions hold, in declaration order.

    ``trial`` is anything with optuna's ``suggest_int/float/categorical``.
    Returns only the sampled dotted names and values.
    """
    values = flatten(base)
    sampled: dict[str, Any] = {}
    wanted = set(tuned)
    for info in iter_fields():
        if info.name not in wanted or not active(info, values):
            continue
        kind, kwargs = distribution_args(info, values)
        suggest = getattr(trial, f"suggest_{kind}")
        value = suggest(info.name, **kwargs)
        values[info.name] = value
        sampled[info.name] = value
    return sampled


def sample_config(trial: Any, base: Config, tuned: Sequence[str]) -> Config:
    """The base config with a trial's sampled values, validated."""
    return with_values(base, sample_values(trial, base, tuned))
