"""Declarative parameter metadata: valid bounds, search spaces, conditions.

Each config field declares, once and beside it, what values are valid and how an
optimizer may search it.  The optimizer enumerates and samples fields from these
declarations alone; it never names a parameter.

Example::

    recurrent_size: int = param(
        128, "Hidden units per recurrent layer and direction.",
        min=1, search=Space(16, 512, log=True),
        when=When("model.recurrent_layers", ">", 0),
    )
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["Ref", "When", "Space", "ParamSpec", "param", "spec_of"]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda a, b: a in b,
}


@dataclass(frozen=True)
class Ref:
    """A bound that depends on another parameter: ``value(name) + offset``."""

    name: str
    offset: int | float = 0

    def resolve(self, values: Mapping[str, Any]) -> int | float:
        """The bound given the current dotted-name -> value mapping."""
        return values[self.name] + self.offset

    def __str__(self) -> str:
        if not self.offset:
            return self.name
        sign = "+" if self.offset > 0 else "-"
        return f"{self.name} {sign} {abs(self.offset)}"


@dataclass(frozen=True)
class When:
    """A condition on another parameter: ``value(name) <op> value``."""

    name: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown operator {self.op!r}; use one of {sorted(_OPS)}")

    def holds(self, values: Mapping[str, Any]) -> bool:
        """Whether the condition is true for the given dotted-name -> value mapping."""
        return _OPS[self.op](values[self.name], self.value)

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.value!r}"


Bound = "int | float | Ref | None"


@dataclass(frozen=True)
class Space:
    """How an optimizer may search a field.

    Numeric fields give ``low``/``high`` (either may be a :class:`Ref`), with
    optional ``log`` scale or ``step``.  Categorical fields give ``choices``; a
    ``Space()`` on a bool or choice field searches all its valid values.
    """

    low: int | float | Ref | None = None
    high: int | float | Ref | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        """A short human-readable form, used in written INI files."""
        if self.choices is not None:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        text = f"[{self.low}, {self.high}]"
        if self.log:
            text += " log"
        if self.step is not None:
            text += f" step {self.step}"
        return text


@dataclass(frozen=True)
class ParamSpec:
    """Everything declared about one config field besides its type and default."""

    doc: str
    min: int | float | Ref | None = None
    max: int | float | Ref | None = None
    choices: tuple[Any, ...] | None = None
    search: Space | None = None
    when: tuple[When, ...] = field(default_factory=tuple)


def param(
    default: Any,
    doc: str,
    *,
    min: int | float | Ref | None = None,  # noqa: A002 - mirrors the INI vocabulary
    max: int | float | Ref | None = None,  # noqa: A002
    choices: tuple[Any, ...] | None = None,
    search: Space | None = None,
    when: When | tuple[When, ...] = (),
) -> Any:
    """A dataclass field carrying its :class:`ParamSpec`.

    Args:
        default: Default value (also sets the field's type in the INI).
        doc: One or two sentences for ``--print-ini`` and error messages.
        min: Smallest valid value (inclusive); may be a :class:`Ref`.
        max: Largest valid value (inclusive); may be a :class:`Ref`.
        choices: Valid values for a categorical field.
        search: The search space; ``None`` means the field is never tuned.
        when: Condition(s) under which the field has any effect; an optimizer
            only samples it when all hold.
    """
    if isinstance(when, When):
        when = (when,)
    spec = ParamSpec(doc=doc, min=min, max=max, choices=choices, search=search, when=tuple(when))
    return dataclasses.field(default=default, metadata={"stagetune": spec})


def spec_of(f: dataclasses.Field) -> ParamSpec:
    """The :class:`ParamSpec` attached to a dataclass field by :func:`param`."""
    return f.metadata["stagetune"]
