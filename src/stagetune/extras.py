"""Optional features and the pip extra that installs each one's packages.

A sampler or importance evaluator whose package is missing is refused in one line
naming the extra (``pip install 'stagetune[samplers]'``) before a study is
created or a trial is asked for: optuna imports these packages lazily, so without
this check a CMA-ES worker would store a FAIL trial per attempt and an ``mdi``
ranking would end in an ImportError traceback.  The database drivers have their
own check in :mod:`stagetune.optim.storage`.
"""

from __future__ import annotations

import importlib

from stagetune.errors import StagetuneError

__all__ = ["SAMPLER_NEEDS", "EVALUATOR_NEEDS", "MissingExtra", "require", "require_sampler", "require_evaluator"]

#: Sampler name -> (module it imports, pip package, extra).
SAMPLER_NEEDS: dict[str, tuple[str, str, str]] = {
    "cmaes": ("cmaes", "cmaes", "samplers"),
    "gp": ("scipy", "scipy", "samplers"),
    "qmc": ("scipy", "scipy", "samplers"),
}
#: Importance evaluator name -> (module it imports, pip package, extra).
EVALUATOR_NEEDS: dict[str, tuple[str, str, str]] = {
    "fanova": ("sklearn", "scikit-learn", "importance"),
    "mdi": ("sklearn", "scikit-learn", "importance"),
}


class MissingExtra(StagetuneError):
    """An optional feature was asked for whose package is not installed."""


def require(feature: str, need: tuple[str, str, str] | None) -> None:
    """Import ``need``'s module, or raise the one-line error naming its extra.

    Args:
        feature: What the user asked for, as they wrote it (``--sampler cmaes``).
        need: ``(module, pip package, extra)``, or ``None`` when nothing is needed.

    Raises:
        MissingExtra: The module cannot be imported.
    """
    if need is None:
        return
    module, package, extra = need
    try:
        importlib.import_module(module)
    except ImportError as exc:  # also a broken install: name what failed
        why = "is not installed" if getattr(exc, "name", None) == module else f"cannot be imported ({exc})"
        raise MissingExtra(
            f"{feature} needs {package}, which {' '.join(why.split())}: "
            f"pip install 'stagetune[{extra}]' (or stagetune[all])"
        ) from None


def require_sampler(name: str, flag: str = "--sampler") -> None:
    """Refuse sampler ``name`` when its package is missing (see :func:`require`)."""
    require(f"{flag} {name}", SAMPLER_NEEDS.get(name))


def require_evaluator(name: str, flag: str = "--evaluator") -> None:
    """Refuse importance evaluator ``name`` when its package is missing (see :func:`require`)."""
    require(f"{flag} {name}", EVALUATOR_NEEDS.get(name))
