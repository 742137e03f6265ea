"""One epoch of training, and decoding for validation: ``train_one_epoch``, ``validate``.

:func:`stagetune.training.fit` runs these epoch after epoch; ``stagetune
evaluate`` decodes through :func:`decode_batches` too, so its figures agree with
validation's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from stagetune.adaptation import Adaptation
from stagetune.config import Config
from stagetune.metrics import TaskScore
from stagetune.model import AcousticModel
from stagetune.tasks import Task, task_of
from stagetune.schedule import LearningRateSchedule
from stagetune.step import train_step

__all__ = ["EpochStopped", "train_one_epoch", "decode_batches", "validate"]


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    """Torch's seed for a batch: a run resumed mid-epoch draws what an uninterrupted one does."""
    return (seed * 1_000_003 + epoch * 10_007 + batch) % (2**63 - 1)


class EpochStopped(Exception):
    """``should_stop()`` turned true mid-epoch, after ``batches_done`` batches.

    Raised by :func:`train_one_epoch`; :func:`stagetune.training.fit` saves a
    mid-epoch checkpoint from ``batches_done`` and ``loss_sum``.
    """

    def __init__(self, batches_done: int, loss_sum: float) -> None:
        super().__init__(batches_done)
        self.batches_done = batches_done
        self.loss_sum = loss_sum


def train_one_epoch(
    model: AcousticModel,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    config: Config,
    *,
    epoch: int,
    first_batch: int = 0,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: tqdm | None = None,
    schedule: LearningRateSchedule | None = None,
    start_loss_sum: float = 0.0,
    adaptation: Adaptation | None = None,
) -> tuple[float, int]:
    """Train over ``loader`` (batches ``first_batch`` onwards of this epoch).

    Each :class:`Batch` holds feats (B, T, F), feat_lens (B,), targets (B, U)
    and target_lens (B,).  Returns (sum of batch losses, frames seen), the sum
    starting from ``start_loss_sum`` (the earlier batches' sum when resuming
    mid-epoch, so it adds up in the same order as an uninterrupted epoch).
    With a gradient ``scaler`` (mixed precision), a batch whose loss overflows to
    inf/NaN is one the scaler skipped (the weights did not move): it adds nothing
    to the sum, and only an epoch in which every batch overflowed returns a NaN sum
    (the caller's non-finite check). In float32 any non-finite batch makes the sum
    non-finite, since its step has already spoilt the weights.
    Raises ``EpochStopped`` between batches when ``should_stop()`` turns true.
    ``adaptation`` (``--adapt-from``) regularises every step towards a base model.
    """
    task = task_of(config)
    t = config.training
    model.train()
    loss_sum = torch.full((), start_loss_sum, device=device)
    frames = 0
    overflowed = torch.zeros((), dtype=torch.long, device=device)  # batches the scaler skipped
    batches = 0
    for index, batch in enumerate(loader, start=first_batch):
        batches += 1
        seed = _batch_seed(t.seed, epoch, index)
        torch.manual_seed(seed)
        batch = batch.to(device)
        loss = train_step(
            model, optimizer, task, batch.feats, batch.feat_lens, batch.targets, batch.target_lens, t,
            scaler=scaler, generator=torch.Generator().manual_seed(seed), adaptation=adaptation,
        )
        if schedule is not None:
            schedule.step()
        loss = loss.detach()
        if scaler is not None:  # no host sync per batch: the test stays on the device
            finite = torch.isfinite(loss)
            overflowed += ~finite
            loss = torch.where(finite, loss, torch.zeros_like(loss))
        loss_sum += loss
        frames += int(batch.feat_lens.sum())
        if progress is not None:
            progress.update(1)
        if should_stop():
            raise EpochStopped(index + 1, float(loss_sum))
    if scaler is not None and batches and int(overflowed) == batches:
        return math.nan, frames
    return float(loss_sum), frames


def decode_batches(
    model: AcousticModel,
    batches: Iterable[Any],
    task: Task,
    device: torch.device,
    decode: Callable[[Tensor, Tensor], list[list[int]]] | None = None,
    observe: Callable[[Any, Tensor, Tensor], None] | None = None,
) -> Iterator[tuple[Any, list[list[int]], list[list[int]]]]:
    """Run ``model`` (in eval mode) over ``batches``; yield ``(batch, hypotheses, references)``.

    Args:
        decode: ``(logits, out_lens) -> hypotheses``; default the task's greedy decoder.
        observe: Called with ``(batch, logits, out_lens)`` of every batch before
            it is decoded; logits are ``(B, T', C)``.

    Validation during training and ``stagetune evaluate`` both decode and score
    through here, so their figures agree.
    """
    decode = decode or task.decode
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        logits, out_lens = model(batch.feats, batch.feat_lens)
        if observe is not None:
            observe(batch, logits, out_lens)
        refs = task.references(batch.targets, batch.target_lens, out_lens, time_stride=model.time_stride)
        yield batch, decode(logits, out_lens), refs


@torch.no_grad()
def validate(
    model: AcousticModel, loader: Any, task: Task, device: torch.device
) -> tuple[TaskScore, float]:
    """Score ``loader`` with the task's scorer (greedy decoding) and compute the loss per unit.

    Returns:
        ``(score, dev_loss)``: the task's figures (:meth:`Task.scorer`: error
        counts and their rate, or regression's MSE and CCC), and the task's
        loss summed over every utterance divided by the summed units
        (:meth:`Task.summed_loss`: target tokens for CTC, labelled output
        frames for the frame task), so padding and batching do not change it.
    """
    scorer = task.scorer(model.time_stride)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    units = 0
    model.eval()
    for batch in loader:
        batch = batch.to(device)
        logits, out_lens = model(batch.feats, batch.feat_lens)
        loss, n = task.summed_loss(
            logits, out_lens, batch.targets, batch.target_lens, time_stride=model.time_stride
        )
        loss_sum += loss.double()
        units += n
        scorer.add(logits, out_lens, batch.targets, batch.target_lens)
    return scorer.result(), float(loss_sum) / max(units, 1)
