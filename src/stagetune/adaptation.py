"""Adaptation to a base model (``stagetune train --adapt-from BASE.pt``).

A model adapted to new data is kept close to the model it started from: with
``rho = training.adapt_rho`` the training loss is

    (1 - rho) * task loss + rho * divergence(base outputs, model outputs)

where the divergence is KL(base || model) between the output distributions
(softmax over the classes; for CTC over the CTC outputs, blank included) per
valid output frame, averaged over the batch's valid output frames (one per
utterance for ``utt``), and the mean squared error between the outputs for
regression.  For ``multi`` each sub-task ``t`` with weight ``w_t`` gets
``rho_t = rho * w_t``: the loss is ``sum_t (w_t - rho_t) * loss_t + rho_t * divergence_t``,
which is ``(1 - rho) * task loss + rho * sum_t w_t * divergence_t``.

The base model (:class:`BaseModel`) is loaded once, frozen and in eval mode on
the training device; it reads each batch exactly as the model does (after
augmentation) and its forward runs without gradients.  The adapted model also
starts from the base's weights (as with ``--init-from``), and with
``adapt_rho = 0`` the base only initialises it: the step is that of plain
fine-tuning, bit for bit.  ``training.adapt_rho`` has no effect without a base
model (``stagetune train`` refuses it; an optim study tunes it only when created
with ``optim init --adapt-from BASE.pt``, whose trials all adapt that base).

Both models must normalise features alike (:func:`base_normalizer`): a base of
another ``data.normalization`` mode is refused, and with ``global`` the adapted
run keeps the base's statistics (``--init-from`` refits them on its data).

Regression targets are standardised alike too: the adapted model keeps the
base's target mean and std (buffers of the head, copied with its weights;
:mod:`stagetune.tasks.regression`), never refitted on the adaptation data.  Both
models' outputs are in the targets' units, and the head passes the gradient of
the squared difference as that of the difference of standardised outputs
(divided by ``std**2``), so the regulariser pulls towards the base in the same
standardised space the task loss trains in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stagetune.checkpoint import ModelFile, load_model_file
from stagetune.config import Config, subtasks
from stagetune.errors import UsageError
from stagetune.kaldi import DataDir
from stagetune.model import build_model
from stagetune.normalize import Normalizer, resolve_mode, stored_normalizer
from stagetune.tasks import Task, task_of
from stagetune.tasks.base import frame_mask

__all__ = ["ADAPT_KEY", "BaseModel", "Adaptation", "load_base", "check_base", "base_identity", "divergence",
           "file_hash", "base_change", "base_normalizer"]

#: Key of the base model's identity (``{"path", "hash"}``) in checkpoints and model files.
ADAPT_KEY = "adapt_from"
_HASH_CHARS = 16


def file_hash(path: str | Path) -> str:
    """A short SHA-256 of a file's bytes: the base model's identity wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:_HASH_CHARS]


def base_identity(path: str | Path) -> dict[str, str]:
    """``{"path", "hash"}`` of a base model file: what checkpoints and model files record (:data:`ADAPT_KEY`)."""
    path = Path(path)
    return {"path": str(path.resolve()), "hash": file_hash(path)}


@dataclass
class BaseModel:
    """A frozen base model on the training device, its model file and its identity."""

    model: nn.Module
    file: ModelFile
    identity: dict[str, str]


def _kl(logits: Tensor, base_logits: Tensor, out_lens: Tensor) -> Tensor:
    """KL(base || model) of the softmax over the last dimension, mean over valid frames."""
    log_p = base_logits.float().log_softmax(-1)
    log_q = logits.float().log_softmax(-1)
    per_frame = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = frame_mask(out_lens.to(logits.device), logits.size(1))
    return (per_frame * mask).sum() / mask.sum().clamp(min=1)


def _mse(outputs: Tensor, base_outputs: Tensor, out_lens: Tensor) -> Tensor:
    """Mean squared difference over valid frames and output dimensions.

    Of outputs in the targets' units; through the model's de-standardising head
    it trains as the mean squared difference of standardised outputs, as the
    task's MSE does (:func:`stagetune.tasks.regression.destandardise`).
    """
    mask = frame_mask(out_lens.to(outputs.device), outputs.size(1)).unsqueeze(-1)
    squared = (outputs.float() - base_outputs.float()) ** 2 * mask
    return squared.sum() / (mask.sum() * outputs.size(-1)).clamp(min=1)


def divergence(task: Task, logits: Tensor, base_logits: Tensor, out_lens: Tensor, targets: Tensor) -> Tensor:
    """How far the model's outputs are from the base's (0 when they are equal).

    Args:
        task: The task both models have.
        logits, base_logits: ``(B, T', C)`` outputs of the model and of the base.
        out_lens: ``(B,)`` valid output frames.
        targets: The batch's targets (``multi`` reads how many outputs are regression values).
    """
    if task.name == "regress":
        return _mse(logits, base_logits, out_lens)
    if task.name == "multi":
        dims = targets.size(-1) - 1
        classes = logits.size(-1) - dims
        parts = {
            "frame": _kl(logits[..., :classes], base_logits[..., :classes], out_lens),
            "regress": _mse(logits[..., classes:], base_logits[..., classes:], out_lens),
        }
        weights = getattr(task, "weights")
        return sum(w * parts[name] for name, w in zip(getattr(task, "tasks"), weights))  # type: ignore[return-value]
    return _kl(logits, base_logits, out_lens)


class Adaptation:
    """The adaptation term of :func:`stagetune.step.train_step`.

    Args:
        base: The frozen base model (:func:`load_base`).
        rho: ``training.adapt_rho``.
    """

    def __init__(self, base: nn.Module, rho: float) -> None:
        self.base, self.rho = base, float(rho)

    def loss(
        self, task: Task, task_loss: Tensor, logits: Tensor, out_lens: Tensor,
        feats: Tensor, feat_lens: Tensor, targets: Tensor,
    ) -> Tensor:
        """``(1 - rho) * task_loss + rho * divergence``; ``task_loss`` itself when rho is 0."""
        if self.rho == 0:
            return task_loss
        with torch.no_grad():
            base_logits, _ = self.base(feats, feat_lens)
        return (1 - self.rho) * task_loss + self.rho * divergence(task, logits, base_logits, out_lens, targets)


def _differences(config: Config, feat_dim: int, tokens: list[str], base: ModelFile) -> str | None:
    """What makes the base unusable for this run, in a phrase, or None."""
    own, theirs = config.model.task, base.config.model.task
    if own != theirs:
        return f"its task is {theirs!r}, this run's is {own!r}"
    if own == "multi" and subtasks(config) != subtasks(base.config):
        return f"its sub-tasks are {','.join(subtasks(base.config))}, this run's {','.join(subtasks(config))}"
    if base.feat_dim != feat_dim:
        return f"its features have dimension {base.feat_dim}, this data's {feat_dim}"
    if list(base.tokens) != list(tokens):
        missing = [t for t in tokens if t not in base.tokens]
        extra = [t for t in base.tokens if t not in tokens]
        if missing or extra:
            detail = "; ".join(
                part for part in (
                    missing and f"this data's {', '.join(missing[:3])} not among them",
                    extra and f"its {', '.join(extra[:3])} not in this data",
                ) if part
            )
        else:
            detail = "in another order"
        return f"its {len(base.tokens)} output symbols differ from this data's {len(tokens)} ({detail})"
    return None


def load_base(
    path: str | Path, config: Config, feat_dim: int, tokens: list[str], device: torch.device,
    *, time_stride: int,
) -> BaseModel:
    """Load ``path`` as the frozen base model of a run of ``config`` on data of ``feat_dim`` and ``tokens``.

    ``time_stride`` is the adapted model's: per-frame outputs must align with the base's.

    Raises:
        UsageError: When the base has another task, feature dimension or output
            symbols, or another time stride (per-frame tasks); nothing is written.
        StagetuneError: When ``path`` is not a readable model file.
    """
    path = Path(path)
    source = load_model_file(path)
    difference = _differences(config, feat_dim, tokens, source)
    if difference is not None:
        raise UsageError(f"--adapt-from {path}: the base model does not fit this run: {difference}")
    base_task = task_of(source.config)
    model = build_model(source.config, source.feat_dim, base_task.num_outputs(len(source.tokens)))
    model.load_state_dict(source.state_dict)
    if config.model.task != "utt" and model.time_stride != time_stride:
        raise UsageError(
            f"--adapt-from {path}: the base model does not fit this run: its time stride is "
            f"{model.time_stride}, this model's {time_stride} (their output frames must align)"
        )
    model.to(device).eval()
    model.requires_grad_(False)
    return BaseModel(model, source, base_identity(path))


def check_base(
    path: str | Path, config: Config, feat_dim: int, tokens: list[str], train: DataDir, *, flag: str = "--adapt-from"
) -> ModelFile:
    """The model file at ``path``, checked as :func:`load_base` and :func:`base_normalizer` check it.

    For a run of ``config`` on data of ``feat_dim`` and ``tokens`` whose training
    dir is ``train`` (``optim init --adapt-from``: before the study exists).  The
    time stride is not checked: a study's trials may tune it.

    Raises:
        UsageError: When the base has another task, feature dimension, output
            symbols or normalisation mode.
        StagetuneError: When ``path`` is not a readable model file.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file; give the model.pt that `stagetune train` wrote")
    source = load_model_file(path)
    difference = _differences(config, feat_dim, tokens, source)
    if difference is not None:
        raise UsageError(f"{flag} {path}: the base model does not fit this run: {difference}")
    _check_normalizer(source, config.data.normalization, train, path, flag)
    return source


def base_change(stored: Any, current: dict[str, str] | None, source: str) -> str | None:
    """How this run's base model differs from the one checkpoint ``source`` was adapted from, or None."""
    stored = stored or None
    if (stored and stored.get("hash")) == (current and current.get("hash")):
        return None
    if stored is None:
        return f"checkpoint {source} was trained without --adapt-from, this run adapts from {current['path']}"  # type: ignore[index]
    if current is None:
        return f"checkpoint {source} was adapted from {stored['path']} (hash {stored['hash'][:8]}); give --adapt-from"
    return (
        f"checkpoint {source} was adapted from {stored['path']} (hash {stored['hash'][:8]}), "
        f"this run from {current['path']} (hash {current['hash'][:8]})"
    )


def base_normalizer(base: BaseModel, mode: str, train: DataDir, path: str | Path) -> Normalizer | None:
    """The base model's normaliser where a fresh adapted run must use it, else None.

    The base reads the batches the adapted model reads, so both must normalise
    alike: another mode (``data.normalization`` as resolved on ``train``) is
    refused, and global statistics are the base's, not refitted on the
    adaptation data (other modes carry no statistics: None, fit as usual).

    Raises:
        UsageError: When the base normalised features another way.
    """
    return _check_normalizer(base.file, mode, train, path)


def _check_normalizer(
    source: ModelFile, mode: str, train: DataDir, path: str | Path, flag: str = "--adapt-from"
) -> Normalizer | None:
    """:func:`base_normalizer` of a base's model file."""
    theirs = stored_normalizer(source.extra.get("normalization"), source.config.data.normalization, train, str(path))
    own = resolve_mode(mode, train)
    if theirs.mode != own:
        raise UsageError(
            f"{flag} {path}: the base model does not fit this run: it normalises features "
            f"with mode {theirs.mode!r}, this run with {own!r}; set data.normalization = {theirs.mode}"
        )
    return theirs if own == "global" else None
