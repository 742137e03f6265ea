"""Learning-rate schedule counted in optimizer updates.

``lr(update) = learning_rate * warmup(update) * reduction``:

* ``warmup`` rises linearly from ``1 / (warmup_updates + 1)`` to 1 over the
  first ``training.warmup_updates`` updates;
* ``reduction`` starts at 1 and is multiplied by ``training.reduce_lr_factor``
  when the dev error has not improved for more than ``training.reduce_lr_patience``
  validations *and* ``training.reduce_lr_patience_updates`` updates.  The plateau rule is *armed* only after
  ``training.reduce_lr_burnin_updates`` updates **and** once the model emits
  something other than blanks on the dev set: a CTC model on its all-blank
  plateau (every dev token deleted) has nothing to gain from a smaller step,
  and halving it there is what kept small corpora stuck.

The schedule depends only on the update count and the dev errors seen so far,
never on the planned training length, so a 3-epoch trial is the exact prefix
of a 30-epoch one (what pruners and short-trial rankings assume).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stagetune.config import TrainingConfig
from stagetune.metrics import ErrorCounts

__all__ = ["LearningRateSchedule", "emits_only_blanks"]


def emits_only_blanks(counts: ErrorCounts) -> bool:
    """Whether every reference symbol was deleted (a CTC model that outputs only blanks)."""
    return counts.ref_length > 0 and counts.deletions == counts.ref_length


class LearningRateSchedule:
    """Warm-up per update, then plateau reductions gated on the model leaving the blank plateau.

    Call :meth:`step` after every optimizer update and :meth:`validated` after
    every dev evaluation; both set the optimizer's learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: TrainingConfig) -> None:
        self.optimizer = optimizer
        self.config = config
        self.updates = 0
        self.reduction = 1.0
        self.armed = False
        self.best = math.inf
        self.bad_validations = 0
        self.updates_at_best = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The learning rate of the next update."""
        warmup = self.config.warmup_updates
        ramp = min(1.0, (self.updates + 1) / (warmup + 1)) if warmup > 0 else 1.0
        return self.config.learning_rate * ramp * self.reduction

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """One optimizer update happened."""
        self.updates += 1
        self._apply()

    def validated(self, dev_error: float, counts: ErrorCounts) -> bool:
        """Account for one dev evaluation; ``True`` when it reduced the learning rate."""
        t = self.config
        if t.reduce_lr_factor >= 1.0:
            return False
        if not self.armed:
            if self.updates < t.reduce_lr_burnin_updates or emits_only_blanks(counts):
                return False
            self.armed = True
        if dev_error < self.best * (1.0 - t.reduce_lr_threshold):
            self.best, self.bad_validations, self.updates_at_best = dev_error, 0, self.updates
            return False
        self.bad_validations += 1
        waited = self.updates - self.updates_at_best
        if self.bad_validations <= t.reduce_lr_patience or waited < t.reduce_lr_patience_updates:
            return False
        self.reduction *= t.reduce_lr_factor
        self.bad_validations, self.updates_at_best = 0, self.updates
        self._apply()
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (the config is stored beside it)."""
        return {
            "updates": self.updates,
            "reduction": self.reduction,
            "armed": self.armed,
            "best": self.best,
            "bad_validations": self.bad_validations,
            "updates_at_best": self.updates_at_best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values and set the optimizer's learning rate."""
        self.updates = int(state["updates"])
        self.reduction = float(state["reduction"])
        self.armed = bool(state["armed"])
        self.best = float(state["best"])
        self.bad_validations = int(state["bad_validations"])
        self.updates_at_best = int(state["updates_at_best"])
        self._apply()
