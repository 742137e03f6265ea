"""One training step, the same for training and for the memory check's synthetic step.

:func:`stagetune.epoch.train_one_epoch` calls :func:`train_step` per batch;
:class:`stagetune.optim.estimate.SyntheticStep` calls it on its largest batch,
so what the memory check measures is what training allocates: augmentation,
autocast, the gradient scaler and clipping included.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from stagetune.adaptation import Adaptation
from stagetune.augment import augment_batch, augmentation_enabled
from stagetune.config import TrainingConfig
from stagetune.tasks import Task

__all__ = ["train_step"]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    feats: Tensor,
    feat_lens: Tensor,
    targets: Tensor,
    target_lens: Tensor,
    training: TrainingConfig,
    *,
    scaler: torch.amp.GradScaler | None = None,
    generator: torch.Generator | None = None,
    augment: bool = True,
    adaptation: Adaptation | None = None,
) -> Tensor:
    """Augment (when ``training`` asks), forward, task loss, backward, clip, optimizer step.

    Args:
        model: The model, in train mode.
        task: Its task (:func:`stagetune.tasks.task_of`).
        feats, feat_lens, targets, target_lens: One batch, on the model's device.
        training: The ``[training]`` section (augmentation, clipping).
        scaler: The gradient scaler of mixed-precision training (autocast on
            ``feats``' device type); None: float32.
        generator: Draws the augmentation (default: a fresh unseeded one).
        augment: False skips augmentation (the meta device's estimate: it reads no values).
        adaptation: Regularises the loss towards a base model's outputs
            (``--adapt-from``, :class:`stagetune.adaptation.Adaptation`); None: the task loss.

    Returns:
        The batch's mean loss, still attached to the graph's outputs (detach to keep it).
    """
    if augment and augmentation_enabled(training):
        feats = augment_batch(feats, feat_lens, training, generator or torch.Generator())
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(feats.device.type) if scaler is not None else nullcontext():
        logits, out_lens = model(feats, feat_lens)
        loss = task.loss(logits, out_lens, targets, target_lens, time_stride=model.time_stride)
        if adaptation is not None:
            loss = adaptation.loss(task, loss, logits, out_lens, feats, feat_lens, targets)
    if scaler is not None:
        scaler.scale(loss).backward()
        if training.clip_grad_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if training.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad_norm)
        optimizer.step()
    return loss
