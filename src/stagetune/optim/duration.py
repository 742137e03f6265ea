"""Projected training time of a trial, from one timed training step.

Before a trial trains, the optimizer checks that its projected training time
fits in ``--time-limit``, as it checks its memory against
``--mem-limit-bytes`` (:mod:`stagetune.optim.memory`).  The step timed is
the memory check's :class:`~stagetune.optim.estimate.SyntheticStep` (the
trial's largest batch: ``batch_size`` utterances of the longest utterance):
the fastest of :data:`TIMED_STEPS` steps after a warm-up step, so one-off
costs (oneDNN primitives, cuDNN plans, allocator growth) and another
process's moment on a shared machine do not count.  When the memory check
measures, its step is the warm-up and the timed steps follow it on the same
model (two more steps); otherwise :func:`time_step` builds the step and runs
three.  Each worker times each architecture once (the figure is its
machine's).

The projection (:func:`project_training`) assumes a step's time grows with
its padded frames (utterances x longest utterance): every training batch
counts as its padded frames over the timed batch's, the batches being those
of :class:`stagetune.dataset.BucketBatchSampler` (sorted by length within
each part; the jitter's extra padding is left out), and a dev batch counts
:data:`DEV_SHARE` of that (forward only, no gradients).  So the projection
is ``step seconds x (train units + DEV_SHARE x dev units) x num_epochs``.
Left out: data loading, normalisation statistics, checkpoints, and the fixed
cost per step (Python, kernel launches), which a short batch pays in full,
so the projection reads low for a model so small that this cost dominates.
On a GPU a batch too small to fill the device costs more than its frames
say, so there too it can read low: compare ``projected_train_s`` with
``train_s`` (trial user attributes) before trusting a tight limit.  Early
stopping and the study's pruner only shorten training: the projection is of
all ``num_epochs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stagetune.config import Config
from stagetune.optim.estimate import SyntheticStep

__all__ = [
    "DEV_SHARE",
    "TIMED_STEPS",
    "TrainingProjection",
    "time_step",
    "project_training",
    "batch_units",
    "format_seconds",
]

#: A dev batch's time as a share of a training step of the same padded frames:
#: forward only (backward is about twice the forward; no optimizer step).
DEV_SHARE = 1 / 3
#: Steps timed after the warm-up; the fastest counts.
TIMED_STEPS = 2


def time_step(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    *,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    device: torch.device | str,
    base: Config | None = None,
) -> float:
    """Wall seconds of one training step on the largest batch: the fastest of
    :data:`TIMED_STEPS` after a warm-up step.

    ``base``: the config of a base model the trial adapts (its forward is timed too).

    Builds the model and optimizer on ``device`` (the global RNG state is
    left untouched) and frees them on return.

    Raises:
        RuntimeError / torch.OutOfMemoryError: When the step does not fit.
    """
    device = torch.device(device)
    sizes = dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda"
    ) else []
    with torch.random.fork_rng(devices=devices):
        step = SyntheticStep(config, feat_dim, num_outputs, device=device, base=base, **sizes)
        step()  # warm-up
        return step.timed(TIMED_STEPS)


def batch_units(
    parts: Sequence[Sequence[int]], batch_size: int, unit_frames: int, *, drop_last: bool = False
) -> tuple[int, float]:
    """``(batches, units)`` of one pass over utterances of the given frame counts.

    Each part is sorted by length and cut into batches of ``batch_size`` (the
    last one short, or dropped with ``drop_last``); ``units`` is their padded
    frames (utterances x longest) over ``unit_frames``, the timed batch's.

    Args:
        parts: Frames per utterance, per part (batches never mix parts).
    """
    batches, padded = 0, 0
    for lengths in parts:
        ordered = sorted(lengths)
        cut = len(ordered) - len(ordered) % batch_size if drop_last else len(ordered)
        for first in range(0, cut, batch_size):
            chunk = ordered[first : first + batch_size]
            batches += 1
            padded += len(chunk) * chunk[-1]
    return batches, padded / unit_frames


@dataclass(frozen=True)
class TrainingProjection:
    """A trial's projected training time.

    Attributes:
        seconds: The projection: ``step_seconds x epoch_units x num_epochs``.
        step_seconds: One training step on the largest batch.
        train_batches: Training batches (optimizer updates) per epoch.
        dev_batches: Dev batches per epoch.
        epoch_units: Largest-batch steps an epoch costs (dev batches at
            :data:`DEV_SHARE`).
        num_epochs: Epochs the trial trains at most.
    """

    seconds: float
    step_seconds: float
    train_batches: int
    dev_batches: int
    epoch_units: float
    num_epochs: int

    def describe(self) -> str:
        """How the projection was made, for a log line or a prune reason."""
        return (
            f"{format_seconds(self.step_seconds)} s per step of the largest batch; "
            f"{self.train_batches} training and {self.dev_batches} dev batches per epoch "
            f"cost {self.epoch_units:.3g} such steps; {self.num_epochs} epochs"
        )


def project_training(
    step_seconds: float,
    config: Config,
    *,
    train_parts: Sequence[Sequence[int]],
    dev_lengths: Sequence[int],
    max_frames: int,
) -> TrainingProjection:
    """The training time of ``config`` projected from its largest batch's ``step_seconds``.

    Training batches use ``config.data.batch_size_for`` the training utterances
    (and ``drop_last``), dev batches ``config.data.batch_size``, as
    :func:`stagetune.training.fit` does; every epoch trains and validates.

    Args:
        step_seconds: One step on ``batch_size_for(...)`` utterances of ``max_frames``.
        train_parts: Frames per training utterance, per part of the training dir.
        dev_lengths: Frames per dev utterance.
        max_frames: The timed batch's utterance length (the longest utterance).
    """
    data = config.data
    batch_size = data.batch_size_for(sum(len(part) for part in train_parts))
    timed = batch_size * max_frames
    train_batches, train_units = batch_units(train_parts, batch_size, timed, drop_last=data.drop_last)
    dev_batches, dev_units = batch_units([dev_lengths], data.batch_size, timed)
    epoch_units = train_units + DEV_SHARE * dev_units
    epochs = config.training.num_epochs
    return TrainingProjection(
        seconds=step_seconds * epoch_units * epochs,
        step_seconds=step_seconds,
        train_batches=train_batches,
        dev_batches=dev_batches,
        epoch_units=epoch_units,
        num_epochs=epochs,
    )


def format_seconds(value: float) -> str:
    """Seconds to 3 significant figures, without an exponent for large values."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
