"""Study metrics: what a trial's value is, from the dev figures of an epoch.

Every epoch of a trial gives a dev error rate and a dev loss per unit
(:class:`stagetune.training.EpochResult`).  The study's metric turns them
into the value reported to the pruner after that epoch; the trial's value is
the lowest of them (every value is minimised):

* ``error``: the dev error rate (token error for CTC, frame error for frames).
* ``loss``: the dev loss per unit (CTC: per target token; frame: per
  labelled output frame; infinity when it is NaN).  Short CTC trials often
  sit on the all-blank plateau at 100% error, where only the loss still
  ranks configurations.
* ``error+loss``: the dev error with the loss as tie-breaker,
  ``error + TIE_BREAK * loss / (1 + loss)``.  The loss term is monotone in the
  loss and below ``TIE_BREAK`` (``1e-6``), so it orders trials of equal error
  (the plateau) by their loss and never reorders trials whose errors differ
  by more than one error in a million reference units; a NaN or infinite
  loss counts as the largest.

A study stores its metric in its spec (``optim init --metric``); studies
created before metrics existed read as :data:`LEGACY_METRIC`.  This module
imports nothing heavy: the CLI builds its help from :data:`METRICS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "Metric",
    "METRICS",
    "DEFAULT_METRIC",
    "LEGACY_METRIC",
    "TIE_BREAK",
    "VALUE_EPOCH_ATTR",
    "DEV_ERROR_ATTR",
    "DEV_LOSS_ATTR",
]

#: ``optim init``'s metric when ``--metric`` is not given (nor inherited with ``--from-study``).
DEFAULT_METRIC = "error"
#: The metric of a study whose spec names none (created before metrics existed).
LEGACY_METRIC = "error"
#: Weight of the squashed loss in ``error+loss``: below one error in a million.
TIE_BREAK = 1e-6

# User attributes of a ``train`` trial, updated after every epoch that lowers its
# value (so pruned and retried trials carry them too): the epoch the value comes
# from and that epoch's dev figures, whatever the metric.
VALUE_EPOCH_ATTR = "value_epoch"
DEV_ERROR_ATTR = "dev_error"
DEV_LOSS_ATTR = "dev_loss"


@dataclass(frozen=True)
class Metric:
    """A named way to score an epoch.

    Attributes:
        label: What the value is, for status lines (``"dev error"``).
        value: ``(dev_error, dev_loss) -> value`` to minimise.
    """

    label: str
    value: Callable[[float, float], float]


def _squashed(loss: float) -> float:
    """``loss / (1 + loss)`` in [0, 1], increasing; 1 for NaN or infinity."""
    if not math.isfinite(loss):
        return 1.0
    loss = max(loss, 0.0)
    return loss / (1.0 + loss)


#: ``optim init --metric`` choices.
METRICS: dict[str, Metric] = {
    "error": Metric("dev error", lambda error, loss: error),
    "loss": Metric("dev loss", lambda error, loss: loss if math.isfinite(loss) else math.inf),
    "error+loss": Metric("dev error+loss", lambda error, loss: error + TIE_BREAK * _squashed(loss)),
}
