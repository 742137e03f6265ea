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

Standardisation.  Targets in large or tiny units (F0 in Hz) train badly as they
are, so the head (:class:`StandardisedHead`) predicts each dimension ``d``
standardised, ``z_d``, and outputs ``mean_d + std_d * z_d``: the mean and std of
the training data's target frames, computed once before training
(:meth:`RegressionTask.fit_head`, a constant dimension gets std 1) and kept as
buffers of the head, so they travel in ``checkpoint.pt`` and ``model.pt``.  The
model's outputs are thus in the targets' own units wherever they are read (dev
figures, ``stagetune evaluate`` and its ``--out``), while its gradient is that
of the MSE on standardised targets: the head passes ``d/dz`` of any squared
error on its outputs divided by ``std_d**2`` (:func:`destandardise`), so the
loss trains exactly as ``mean(((output - target) / std)**2)`` does, though its
value (train and dev loss) stays in the targets' units squared.  A model file
written before the statistics has mean 0 and std 1: outputs as its head computes them.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stagetune.config import Config
from stagetune.metrics import ErrorCounts, RegressionStats, TaskScore
from stagetune.normalize import frame_moments
from stagetune.tasks.base import FrameHead, Scorer, Task
from stagetune.tasks.frame import subsample_labels

__all__ = [
    "RegressionTask", "RegressionScorer", "StandardisedHead", "subsample_values", "destandardise",
    "target_stats", "fit_target_stats",
]


class _Destandardise(torch.autograd.Function):
    """``mean + std * z`` forward; backward the incoming gradient divided by ``std``, not multiplied."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, mean: Tensor, std: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(std)
        ctx.dtype = z.dtype
        return z * std + mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (std,) = ctx.saved_tensors
        return (grad / std).to(ctx.dtype), None, None


def destandardise(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Standardised predictions ``z (..., C)`` in the targets' units: ``mean + std * z``.

    The gradient reaching ``z`` is that of the same loss on ``(output - mean) / std``:
    for a squared error ``(output - y)**2`` it is ``2 (output - y) / std``, which is
    ``d/dz (z - (y - mean) / std)**2``.  With mean 0 and std 1 it is the identity,
    forward and backward.
    """
    return _Destandardise.apply(z, mean.to(z.device), std.to(z.device))


class StandardisedHead(FrameHead):
    """A :class:`FrameHead` whose outputs are de-standardised by per-output ``target_mean`` and
    ``target_std`` buffers (mean 0, std 1 until :func:`fit_target_stats` sets them).

    A state dict with the head's weights but no statistics (a model file or
    checkpoint written before them) loads with mean 0 and std 1.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("target_mean", torch.zeros(out_features))
        self.register_buffer("target_std", torch.ones(out_features))

    def forward(self, states: Tensor, out_lens: Tensor | None = None) -> Any:  # type: ignore[override]
        outputs = destandardise(nn.Linear.forward(self, states), self.target_mean, self.target_std)
        return outputs if out_lens is None else (outputs, out_lens)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:  # type: ignore[override]
        if prefix + "weight" in state_dict:  # load_state_dict passes its own copy of the dict
            state_dict.setdefault(prefix + "target_mean", torch.zeros_like(self.target_mean))
            state_dict.setdefault(prefix + "target_std", torch.ones_like(self.target_std))
        super()._load_from_state_dict(state_dict, prefix, *args)


def target_stats(values: Iterable[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension mean and std of ``(T, dim)`` target matrices over all their frames, and the frames.

    A constant dimension (every value equal; also one with no frames) gets std 1,
    so it is never divided by 0; its outputs are that constant plus what the head adds.
    """
    lowest, highest = np.full(dim, np.inf), np.full(dim, -np.inf)

    def ranged() -> Iterable[np.ndarray]:  # one pass: the range alongside the moments
        for matrix in values:
            x = np.asarray(matrix).reshape(-1, dim)
            if len(x):
                np.minimum(lowest, x.min(axis=0), out=lowest)
                np.maximum(highest, x.max(axis=0), out=highest)
            yield x

    mean, var, count = frame_moments(ranged(), dim)
    std = np.sqrt(var)
    constant = (lowest == highest) | ~(std > 0) | ~np.isfinite(std)
    return mean.astype(np.float32), np.where(constant, 1.0, std).astype(np.float32), count


def fit_target_stats(head: nn.Module, values: Iterable[np.ndarray], dim: int) -> str | None:
    """Set the statistics of ``head``'s last ``dim`` outputs from the training targets ``values``.

    Returns a log line, or None when ``head`` keeps no statistics (a plugin's head).
    """
    if not isinstance(head, StandardisedHead):
        return None
    mean, std, count = target_stats(values, dim)
    with torch.no_grad():
        head.target_mean[-dim:] = torch.from_numpy(mean)
        head.target_std[-dim:] = torch.from_numpy(std)
    shown = ", ".join(f"{m:.4g} +- {s:.4g}" for m, s in zip(mean[:4], std[:4])) + (", ..." if dim > 4 else "")
    return f"regression targets standardised by their training statistics over {count} frames: {shown}"


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

    def build_head(self, in_dim: int, num_outputs: int, config: Config) -> nn.Module:
        """A linear head de-standardised by the training targets' statistics (:class:`StandardisedHead`)."""
        return StandardisedHead(in_dim, num_outputs)

    def fit_head(self, head: nn.Module, data: Any, utt_ids: Sequence[str]) -> str | None:
        """Standardise by the mean and std of ``utt_ids``' target frames in ``data`` (:func:`fit_target_stats`)."""
        return fit_target_stats(head, (data.values[u] for u in utt_ids), data.target_dim)

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
