"""Which parameters a study tunes, and how a trial samples them.

Everything here is derived from the declarations in :mod:`stagetune.config`;
no parameter is named in this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from stagetune.config import Config, FieldInfo, active, field_info, flatten, iter_fields, with_values
from stagetune.errors import UsageError
from stagetune.space import Ref

__all__ = [
    "Selection",
    "select_tunable",
    "drop_matching",
    "sample_values",
    "sample_config",
    "distribution_args",
    "bounding_range",
    "window_range",
    "windows_around",
]

#: ``{dotted name: [low, high]}``: narrowed ranges that replace declared bounds.
Ranges = Mapping[str, Sequence[int | float]]


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


#: Parameters that change nothing without a base model to adapt (``train --adapt-from``):
#: tuned only in a study created with ``optim init --adapt-from``; in any other never
#: tuned, and not listed as dropped.
NEEDS_BASE_MODEL = ("training.adapt_rho",)


def select_tunable(
    base: Config, whitelist: Sequence[str] = (), blacklist: Sequence[str] = (), *, adapting: bool = False
) -> Selection:
    """Tunable dotted names after white/blacklists (full regex match).

    Parameters whose declared condition is false under ``base`` while every
    parameter the condition depends on stays fixed are dropped, with a reason;
    silently when the condition is on a field no study searches (``model.task``,
    ``model.encoder``: another task's or encoder's settings) or on one dropped so.
    :data:`NEEDS_BASE_MODEL` are silently skipped unless ``adapting`` (the study's
    trials adapt a base model).
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
    # Skipped without a notice: what can never apply to this study (another task's or
    # encoder's settings: conditions on fields no study searches), and what depends on those.
    silent: set[str] = set() if adapting else set(NEEDS_BASE_MODEL)
    for name in chosen:
        info = field_info(name)
        if name in silent:
            continue
        fixed_false = [c for c in info.spec.when if c.name not in tuned and not c.holds(values)]
        if fixed_false and all(c.name in silent or field_info(c.name).search_space() is None for c in fixed_false):
            silent.add(name)
        elif fixed_false:
            dropped.append((name, f"{fixed_false[0]} is false in the base config and not tuned"))
        else:
            tuned.append(name)
    if not tuned:
        raise UsageError(
            "no parameter left to tune: " + "; ".join(f"{n} ({why})" for n, why in dropped)
        )
    return Selection(tuple(tuned), tuple(dropped))


def drop_matching(names: Sequence[str], patterns: Sequence[str], flag: str = "--blacklist") -> list[str]:
    """``names`` less those fully matching one of ``patterns`` (checked as :func:`select_tunable` does)."""
    tunable = [i.name for i in iter_fields() if i.search_space() is not None]
    deny = _compile(patterns, flag, tunable)
    return [n for n in names if not any(r.fullmatch(n) for r in deny)]


def distribution_args(
    info: FieldInfo, values: Mapping[str, Any], ranges: Ranges | None = None
) -> tuple[str, dict[str, Any]]:
    """``(kind, kwargs)`` for the trial's ``suggest_<kind>`` given current values.

    A numeric parameter in ``ranges`` is sampled from its narrowed range, clipped
    to its declared bounds as resolved for ``values`` (a dependent bound may be
    tighter than the range): one wholly outside them shrinks to the nearest bound.
    """
    space = info.search_space()
    assert space is not None, info.name
    if space.choices is not None:
        return "categorical", {"choices": list(space.choices)}

    def resolve(bound: int | float | Ref) -> int | float:
        return bound.resolve(values) if isinstance(bound, Ref) else bound

    low, high = resolve(space.low), resolve(space.high)
    high = max(low, high)
    if ranges is not None and info.name in ranges:
        narrow_low, narrow_high = ranges[info.name]
        low, high = min(max(narrow_low, low), high), max(min(narrow_high, high), low)
    kwargs: dict[str, Any] = {"low": low, "high": high, "log": space.log}
    if space.step is not None:
        kwargs["step"] = space.step
    if info.type is int:
        kwargs["low"], kwargs["high"] = int(low), int(high)
        kwargs.setdefault("step", 1)
        return "int", kwargs
    return "float", {**kwargs, "low": float(low), "high": float(high)}


def sample_values(
    trial: Any, base: Config, tuned: Sequence[str], ranges: Ranges | None = None
) -> dict[str, Any]:
    """Suggest each tuned parameter whose conditions hold, in declaration order.

    ``trial`` is anything with optuna's ``suggest_int/float/categorical``;
    ``ranges`` are a study's narrowed ranges (:attr:`StudySpec.ranges`).
    Returns only the sampled dotted names and values.
    """
    values = flatten(base)
    sampled: dict[str, Any] = {}
    wanted = set(tuned)
    for info in iter_fields():
        if info.name not in wanted or not active(info, values):
            continue
        kind, kwargs = distribution_args(info, values, ranges)
        suggest = getattr(trial, f"suggest_{kind}")
        value = suggest(info.name, **kwargs)
        values[info.name] = value
        sampled[info.name] = value
    return sampled


def sample_config(
    trial: Any, base: Config, tuned: Sequence[str], ranges: Ranges | None = None
) -> Config:
    """The base config with a trial's sampled values, validated."""
    return with_values(base, sample_values(trial, base, tuned, ranges))


def bounding_range(info: FieldInfo, seen: Sequence[int | float]) -> list[int | float] | None:
    """The narrowed range of a numeric parameter: the bounding box of ``seen`` values.

    The box is clipped to the declared numeric bounds (a dependent bound is applied
    when sampling) and aligned to the declared step; integers stay integers. A box
    of one value widens to the neighbouring steps of an integer or stepped space;
    a continuous one keeps its declared range (None), as does a categorical one or
    one with no value seen.
    """
    space = info.search_space()
    if space is None or space.choices is not None or not seen:
        return None
    low, high = min(seen), max(seen)
    step = space.step if space.step is not None else (1 if info.type is int else None)
    if step is not None:
        origin = space.low if not isinstance(space.low, Ref) else 0
        low = origin + math.floor((low - origin) / step + 1e-9) * step
        high = origin + math.ceil((high - origin) / step - 1e-9) * step
        if low == high:
            low, high = low - step, high + step
    elif low == high:
        return None
    if not isinstance(space.low, Ref):
        low = max(low, space.low)
    if not isinstance(space.high, Ref):
        high = min(high, space.high)
    if info.type is int:
        return [int(low), int(high)]
    return [float(low), float(high)]


def window_range(info: FieldInfo, center: int | float, fraction: float) -> list[int | float] | None:
    """A window of ``fraction`` of a numeric parameter's declared range around ``center``.

    The window's width is ``fraction`` of the declared range's (of its logarithm's, for
    a log space); it is centred on ``center`` (moved into the range first: a log range
    excludes 0) and slid, keeping its width, to lie inside the range.  Integer and
    stepped windows round outwards to the step and span at least one step on each side
    that the range allows, so they always hold ``center``.  None for a categorical
    parameter, or one whose bounds depend on another parameter (it keeps its range).
    """
    space = info.search_space()
    if space is None or space.choices is not None or isinstance(space.low, Ref) or isinstance(space.high, Ref):
        return None
    low, high = float(space.low), float(space.high)
    center = min(max(float(center), low), high)
    to, back = (math.log, math.exp) if space.log else (float, float)
    lo, hi, mid = to(low), to(high), to(center)
    half = fraction * (hi - lo) / 2
    start = min(max(mid - half, lo), hi - 2 * half)
    w_low, w_high = min(back(start), center), max(back(start + 2 * half), center)  # rounding keeps it in
    step = space.step if space.step is not None else (1 if info.type is int else None)
    if step is not None:
        w_low = low + math.floor((w_low - low) / step + 1e-9) * step
        w_high = low + math.ceil((w_high - low) / step - 1e-9) * step
        if w_low == center:
            w_low -= step
        if w_high == center:
            w_high += step
    w_low, w_high = max(w_low, low), min(w_high, high)
    if info.type is int:
        return [int(round(w_low)), int(round(w_high))]
    return [w_low, w_high]


def windows_around(
    values: Mapping[str, Any], names: Sequence[str], fraction: float, ranges: Ranges
) -> dict[str, list[int | float]]:
    """``ranges`` with each numeric parameter of ``names`` cut to its :func:`window_range` around ``values``.

    A parameter already in ``ranges`` (narrowed) keeps the part of its range the window
    overlaps, or its range when they do not overlap (its value lies outside it).
    """
    cut = {name: list(bounds) for name, bounds in ranges.items()}
    for name in names:
        window = window_range(field_info(name), values[name], fraction)
        if window is None:
            continue
        if name in cut:
            low, high = cut[name]
            if window[1] < low or high < window[0]:
                continue
            window = [max(window[0], low), min(window[1], high)]
        cut[name] = window
    return cut
