"""Task ``regress``: continuous targets per frame (``targets.scp`` or ``utt2value``), MSE, CCC.

Targets are ``(T, D)`` float matrices, one row per input frame.  They are taken
to the model's output frame rate as frame labels are
(:func:`~stagetune.tasks.frame.subsample_labels`: the input frame at the centre
of each output frame's stride window), a linear head predicts ``D`` values per
output frame, and the loss is the mean squared error over valid output frames
and dimensions.  The figures are the MSE and the concordance correlation
coefficient (:func:`stagetune.metrics.concordance_correlation`) over every
valid frame of the set, per dimension, averaged; training minimises
``1 - CCC`` (:attr:`TaskScore.error`), so lower is better as for error rates.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from stagetune.metrics import ErrorCounts, RegressionStats, TaskScore
from stagetune.tasks.base import Scorer, Task
from stagetune.tasks.frame import subsample_labels

__all__ = ["RegressionTask", "RegressionScorer", "subsample_values"]


def subsample_values(
    values: Tensor, lens: Tensor, factor: int, *, out_lens: Tensor, num_frames: int
) -> tuple[Tensor, Tensor]:
    """Per-frame ``(B, T, D)`` values at the output frame rate, by :func:`subsample_labels`' rule.

    Returns:
        ``(sub, valid)``: ``(B, num_frames, D)`` values (zero where not valid)
        and the ``(B, num_frames)`` bool mask of valid output frames.
    """
    batch, frames = values.shape[:2]
    index = torch.arange(frames, device=values.device).expand(batch, frames)
    positions, _ = subsample_labels(index, lens, factor, out_lens=out_lens, num_frames=num_frames)
    valid = positions >= 0
    gathered = values.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, values.size(-1)))
    return gathered.masked_fill(~valid.unsqueeze(-1), 0.0), valid


def _stride(time_stride: int | None) -> int:
    if time_stride is None:
        raise ValueError(
            "the regress task subsamples per-frame targets to the model's output frames; "
            "pass time_stride=model.time_stride"
        )
    return time_stride


class RegressionTask(Task):
    """``D`` continuous values per frame; MSE loss; MSE and CCC figures, 1 - CCC driving training."""

    name = "regress"
    error_name = "1-CCC"
    unit = "frame"
    hypotheses = False

    def num_outputs(self, num_symbols: int) -> int:
        """The target dimension ``D`` (the symbols are the dimensions' names)."""
        if num_symbols < 1:
            raise ValueError(f"regression needs at least one target dimension, got {num_symbols}")
        return num_symbols

    def _aligned(
        self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, time_stride: int | None
    ) -> tuple[Tensor, Tensor]:
        """``(squared errors (B, T', D), valid (B, T'))`` of the predictions against subsampled targets."""
        values = targets.to(logits.device, torch.float32)
        if values.dim() == 2:  # (B, T) one value per frame
            values = values.unsqueeze(-1)
        sub, valid = subsample_values(
            values, target_lens, _stride(time_stride), out_lens=out_lens, num_frames=logits.size(1)
        )
        errors = (logits.float() - sub) ** 2
        return errors.masked_fill(~valid.unsqueeze(-1), 0.0), valid

    def loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
             time_stride: int | None = None) -> Tensor:
        """Mean squared error over valid output frames and dimensions.

        ``targets`` are ``(B, T, D)`` float values per *input* frame (padding
        ignored: ``target_lens`` gives the frames), subsampled to the output frames.
        """
        errors, valid = self._aligned(logits, out_lens, targets, target_lens, time_stride)
        return errors.sum() / (valid.sum() * errors.size(-1)).clamp(min=1)

    def summed_loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
                    time_stride: int | None = None) -> tuple[Tensor, int]:
        """Summed squared error and the number of valid output frames times ``D``."""
        errors, valid = self._aligned(logits, out_lens, targets, target_lens, time_stride)
        return errors.sum(), int(valid.sum()) * errors.size(-1)

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[Any]]:
        """Each utterance's predictions: one ``D``-value list per valid output frame."""
        rows = logits.detach().float().cpu().tolist()
        return [row[:length] for row, length in zip(rows, out_lens.tolist())]

    def references(self, targets: Tensor, target_lens: Tensor, out_lens: Tensor, *,
                   time_stride: int | None = None) -> list[list[Any]]:
        """The targets at the output frame rate, as :meth:`decode` gives predictions."""
        values = targets.float() if targets.dim() == 3 else targets.float().unsqueeze(-1)
        num_frames = int(out_lens.max()) if out_lens.numel() else 0
        sub, _ = subsample_values(values, target_lens, _stride(time_stride), out_lens=out_lens,
                                  num_frames=num_frames)
        rows = sub.cpu().tolist()
        return [row[:length] for row, length in zip(rows, out_lens.tolist())]

    def errors(self, refs: Sequence[Sequence[Any]], hyps: Sequence[Sequence[Any]]) -> ErrorCounts:
        """Regression counts no errors; its figures come from :meth:`scorer`."""
        raise TypeError("task 'regress' has no error counts; score it with Task.scorer (MSE and CCC)")

    def scorer(self, time_stride: int | None, decode: Any = None) -> RegressionScorer:
        return RegressionScorer(time_stride)

    def synthetic_targets(self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        """``num_outputs`` values for every input frame."""
        targets = torch.randn(batch_size, max_frames, num_outputs, device=device)
        return targets, torch.full((batch_size,), max_frames, dtype=torch.long, device=device)


class RegressionScorer(Scorer):
    """MSE and CCC over every valid output frame added (:class:`~stagetune.metrics.RegressionStats`)."""

    def __init__(self, time_stride: int | None) -> None:
        self.time_stride = time_stride
        self.stats = RegressionStats()
        self.utterances = 0

    def add(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor) -> None:
        values = targets.float() if targets.dim() == 3 else targets.float().unsqueeze(-1)
        sub, valid = subsample_values(
            values.to(logits.device), target_lens, _stride(self.time_stride), out_lens=out_lens,
            num_frames=logits.size(1),
        )
        self.stats.add(logits.detach().float()[valid].cpu().numpy(), sub[valid].cpu().numpy())
        self.utterances += len(out_lens)
        return None

    def result(self) -> TaskScore:
        ccc = self.stats.ccc()
        dims = 0 if self.stats.sum_x is None else len(self.stats.sum_x)
        return TaskScore(
            error=1.0 - ccc if ccc == ccc else float("inf"),  # nothing scored: the worst
            counts=ErrorCounts(utterances=self.utterances),
            figures={"mse": self.stats.mse(), "ccc": ccc},
            units=f"{self.stats.count} output frames, D={dims}",
        )
