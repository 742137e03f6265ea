"""Task ``multi``: several per-frame tasks over one encoder, a weighted sum of their losses.

The sub-tasks (``model.multitask``, e.g. ``frame,regress``) are drawn from
:data:`~stagetune.config.SUBTASKS`: frame classification (``utt2label``) and
frame regression (``targets.scp`` or ``utt2value``).  Each has its own head,
targets, loss and weight ``w_t`` (``training.task_weights``): the loss is
``sum_t w_t * loss_t``.  Every sub-task's figures are logged per epoch
(prefixed with its name: ``frame_fer``, ``regress_mse``, ``regress_ccc``); the
one named by ``training.main_task`` drives model selection, the learning-rate
schedule, early stopping and optim (:attr:`TaskScore.error`).

Layout.  A data directory read for ``multi`` gives one float32 ``(T, 1 + D)``
matrix per utterance (:meth:`stagetune.kaldi.DataDir.targets`): column 0 the
frame label, columns ``1..D`` the regression values, whatever the order of
``model.multitask``.  The heads are one linear layer whose first ``C`` outputs
are the frame classes and last ``D`` the regression values (the same as one
linear head per task); ``D`` is the targets' width less one, ``C`` the rest of
the outputs.  The output symbols are the frame classes then the regression
dimensions (:func:`stagetune.kaldi.regression_symbols`).

The regression outputs are standardised as for ``regress``
(:class:`~stagetune.tasks.regression.StandardisedHead`: the head keeps a mean
and std per output, those of the training targets for the ``D`` values, 0 and 1
for the class logits, which are thus left as they are), so a target in large
units neither dominates the weighted loss's gradient nor trains slowly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from stagetune.config import Config, main_task, subtasks, task_weights
from stagetune.metrics import ErrorCounts, TaskScore
from stagetune.tasks.base import Scorer, Task
from stagetune.tasks.frame import FrameTask
from stagetune.tasks.regression import RegressionTask, StandardisedHead, fit_target_stats

__all__ = ["MultiTask", "MultiScorer", "split_outputs"]

_SUBTASKS: dict[str, Task] = {"frame": FrameTask(), "regress": RegressionTask()}


def split_outputs(logits: Tensor, dims: int) -> dict[str, Tensor]:
    """Sub-task name -> its share of ``(B, T, C + D)`` multitask outputs with ``D = dims`` values."""
    if dims < 1 or logits.size(-1) <= dims:
        raise ValueError(
            f"multitask targets of width {dims + 1} (a label and D values) do not fit "
            f"{logits.size(-1)} outputs (classes and D values)"
        )
    classes = logits.size(-1) - dims
    return {"frame": logits[..., :classes], "regress": logits[..., classes:]}


def _split(logits: Tensor, targets: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Sub-task name -> ``(its logits, its targets)`` of a ``(B, T, 1 + D)`` multitask batch."""
    outputs = split_outputs(logits, targets.size(-1) - 1)
    labels = targets[..., 0].round().long()
    return {
        "frame": (outputs["frame"], labels),
        "regress": (outputs["regress"], targets[..., 1:]),
    }


@dataclass(frozen=True)
class MultiTask(Task):
    """Frame classification and frame regression over one encoder, losses weighted.

    Args:
        tasks: Sub-task names in ``model.multitask`` order.
        weights: Their loss weights (``training.task_weights``).
        main: The sub-task whose error drives training (``training.main_task``).
    """

    tasks: tuple[str, ...] = ("frame", "regress")
    weights: tuple[float, ...] = (1.0, 1.0)
    main: str = "frame"

    name = "multi"
    unit = "frame"
    hypotheses = False

    @classmethod
    def of(cls, config: Config) -> MultiTask:
        names = subtasks(config)
        return cls(names, task_weights(config), main_task(config))

    @property
    def error_name(self) -> str:  # type: ignore[override]
        return _SUBTASKS[self.main].error_name

    def num_outputs(self, num_symbols: int) -> int:
        """Frame classes plus regression dimensions: one output per symbol."""
        if num_symbols < 2:
            raise ValueError(f"multitask needs a frame class and a regression dimension, got {num_symbols} symbols")
        return num_symbols

    def build_head(self, in_dim: int, num_outputs: int, config: Config) -> nn.Module:
        """One linear layer for classes and values, the values de-standardised (:class:`StandardisedHead`)."""
        return StandardisedHead(in_dim, num_outputs)

    def fit_head(self, head: nn.Module, data: Any, utt_ids: Sequence[str]) -> str | None:
        """Standardise the ``D`` value outputs by the training targets' mean and std, as ``regress`` does."""
        return fit_target_stats(head, (data.values[u] for u in utt_ids), data.target_dim)

    @property
    def driving(self) -> Task:
        """The sub-task ``training.main_task`` names (``stagetune evaluate --out`` writes its outputs)."""
        return _SUBTASKS[self.main]

    def main_outputs(self, logits: Tensor, dims: int) -> Tensor:
        """The driving sub-task's share of ``(B, T, C + D)`` outputs with ``D = dims`` values."""
        return split_outputs(logits, dims)[self.main]

    def _losses(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor,
                time_stride: int | None, summed: bool) -> list[tuple[Any, Any]]:
        parts = _split(logits, targets)
        out = []
        for name in self.tasks:
            sub_logits, sub_targets = parts[name]
            task = _SUBTASKS[name]
            if summed:
                out.append(task.summed_loss(sub_logits, out_lens, sub_targets, target_lens, time_stride=time_stride))
            else:
                out.append(task.loss(sub_logits, out_lens, sub_targets, target_lens, time_stride=time_stride))
        return out

    def loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
             time_stride: int | None = None) -> Tensor:
        """``sum_t w_t * loss_t``, each sub-task's mean loss."""
        losses = self._losses(logits, out_lens, targets, target_lens, time_stride, summed=False)
        return sum(w * loss for w, loss in zip(self.weights, losses))  # type: ignore[return-value]

    def summed_loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
                    time_stride: int | None = None) -> tuple[Tensor, int]:
        """Summed over the valid output frames, so that sums / frames is ``sum_t w_t * loss_t``.

        Each sub-task's units are the frames times a constant (1 label, ``D``
        values), so its sum is rescaled to per-frame before weighting.
        """
        summed = self._losses(logits, out_lens, targets, target_lens, time_stride, summed=True)
        frames = summed[self.tasks.index("frame")][1]
        total = sum(w * loss * (frames / units) for w, (loss, units) in zip(self.weights, summed) if units)
        return (total if torch.is_tensor(total) else torch.zeros((), device=logits.device)), frames

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[Any]]:
        raise TypeError("task 'multi' decodes per sub-task; score it with Task.scorer")

    def references(self, targets: Tensor, target_lens: Tensor, out_lens: Tensor, *,
                   time_stride: int | None = None) -> list[list[Any]]:
        raise TypeError("task 'multi' has references per sub-task; score it with Task.scorer")

    def errors(self, refs: Sequence[Sequence[Any]], hyps: Sequence[Sequence[Any]]) -> ErrorCounts:
        raise TypeError("task 'multi' has figures per sub-task; score it with Task.scorer")

    def scorer(self, time_stride: int | None, decode: Any = None) -> MultiScorer:
        return MultiScorer(self, time_stride)

    def synthetic_targets(self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        """A label (of ``num_outputs - 1`` classes) and one value per input frame."""
        labels = torch.randint(0, max(num_outputs - 1, 1), (batch_size, max_frames, 1), device=device)
        values = torch.randn(batch_size, max_frames, 1, device=device)
        targets = torch.cat([labels.float(), values], dim=-1)
        return targets, torch.full((batch_size,), max_frames, dtype=torch.long, device=device)


class MultiScorer(Scorer):
    """Each sub-task's scorer on its share of the outputs and targets; the main one's error."""

    def __init__(self, task: MultiTask, time_stride: int | None) -> None:
        self.task = task
        self.scorers = {name: _SUBTASKS[name].scorer(time_stride) for name in task.tasks}

    def add(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor) -> None:
        parts = _split(logits, targets)
        for name, scorer in self.scorers.items():
            sub_logits, sub_targets = parts[name]
            scorer.add(sub_logits, out_lens, sub_targets, target_lens)
        return None

    def result(self) -> TaskScore:
        figures: dict[str, float] = {}
        units = []
        for name, scorer in self.scorers.items():
            score = scorer.result()
            if score.figures:
                figures.update({f"{name}_{key}": value for key, value in score.figures.items()})
            else:
                figures[f"{name}_{_SUBTASKS[name].error_name.lower()}"] = score.counts.rate
            units.append(f"{name}: {score.units or f'{score.counts.ref_length} output frames'}")
        main = self.scorers[self.task.main].result()
        error = main.error if not math.isnan(main.error) else math.inf
        return TaskScore(error=error, counts=main.counts, figures=figures, units="; ".join(units))
