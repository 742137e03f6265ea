"""What every task declares: its output head, loss, decoding, error counts and synthetic targets.

A task turns the encoder's per-frame states into outputs (its *head*, a module
built by :meth:`Task.build_head`), and those outputs into a loss, hypotheses and
error counts.  Targets arrive padded with ``-1`` (:data:`stagetune.dataset.TARGET_PAD`).
A head maps ``(states (B, T', H), out_lens (B,))`` to ``(logits (B, T'', C),
out_lens'' (B,))``: per-frame heads keep the frames, an utterance head pools
them to one output frame per utterance, so losses, decoding and error counting
share one shape everywhere.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stagetune.config import Config
from stagetune.metrics import ErrorCounts, TaskScore

__all__ = ["Task", "FrameHead", "Scorer", "CountingScorer", "frame_mask", "unpad", "check_pairs"]


def frame_mask(lengths: Tensor, num_frames: int) -> Tensor:
    """``(B, num_frames)`` bool mask, true on frames ``< lengths``."""
    return torch.arange(num_frames, device=lengths.device) < lengths.unsqueeze(1)


def unpad(targets: Tensor, target_lens: Tensor) -> list[list[int]]:
    """Rows of a ``(B, U)`` padded tensor, or pieces of a concatenated ``(sum U,)`` one."""
    lens = target_lens.tolist()
    if targets.dim() == 1:
        pieces = torch.split(targets.detach().cpu(), lens)
        return [piece.tolist() for piece in pieces]
    rows = targets.detach().cpu().tolist()
    return [row[:length] for row, length in zip(rows, lens)]


def check_pairs(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")


class FrameHead(nn.Linear):
    """A linear layer applied to every frame; ``(states, lens) -> (logits, lens)``.

    A subclass of ``nn.Linear`` so its parameters keep the names ``output.weight``
    and ``output.bias`` that model files written before tasks had heads use.
    """

    def forward(self, states: Tensor, out_lens: Tensor | None = None) -> Any:  # type: ignore[override]
        logits = super().forward(states)
        return logits if out_lens is None else (logits, out_lens)


class Scorer(abc.ABC):
    """Accumulates a task's figures batch by batch (validation and ``stagetune evaluate``)."""

    @abc.abstractmethod
    def add(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor) -> list[list[Any]] | None:
        """Score one batch; returns its hypotheses where the task has symbol hypotheses, else None."""

    @abc.abstractmethod
    def result(self) -> TaskScore:
        """The figures of every batch added."""


class CountingScorer(Scorer):
    """Decode, compare with the references, sum :class:`ErrorCounts`; the error is their rate.

    Args:
        task: The task whose :meth:`Task.decode`, :meth:`Task.references` and
            :meth:`Task.errors` it uses.
        time_stride: The model's time stride.
        decode: ``(logits, out_lens) -> hypotheses`` instead of the task's greedy decoder.
    """

    def __init__(self, task: Task, time_stride: int | None, decode: Any = None) -> None:
        self.task, self.time_stride = task, time_stride
        self.decode = decode or task.decode
        self.counts = ErrorCounts()

    def add(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor) -> list[list[Any]]:
        refs = self.task.references(targets, target_lens, out_lens, time_stride=self.time_stride)
        hyps = self.decode(logits, out_lens)
        self.counts += self.task.errors(refs, hyps)
        return hyps

    def result(self) -> TaskScore:
        return TaskScore(self.counts.rate, self.counts)


class Task(abc.ABC):
    """An output head: output size, loss, decoding and error counting.

    :meth:`loss` and :meth:`references` take the model's
    :attr:`~stagetune.model.AcousticModel.time_stride` as ``time_stride``; heads
    that do not need it (CTC) ignore it, heads that do (frame) raise
    :class:`ValueError` without it rather than silently misalign labels.
    """

    #: Registry key (``model.task``).
    name: str = ""
    #: Short name of the error rate, e.g. ``"TER"``, for :meth:`ErrorCounts.describe`.
    error_name: str = "ER"
    #: What the error counts are of, in one phrase (``--help`` and logs).
    unit: str = "token"
    #: Which way the figure training drives (``dev_error``, :attr:`TaskScore.error`) is
    #: better; every task states its figure so that lower is better (regression: 1 - CCC).
    direction: str = "minimize"
    #: Whether :meth:`decode` gives symbol hypotheses (``stagetune evaluate --out`` writes them).
    hypotheses: bool = True

    def scorer(self, time_stride: int | None, decode: Any = None) -> Scorer:
        """A fresh :class:`Scorer` of this task's figures (default: error counts, :class:`CountingScorer`).

        Args:
            time_stride: The model's time stride.
            decode: A decoder to use instead of :meth:`decode` (CTC beam search).
        """
        return CountingScorer(self, time_stride, decode)

    @abc.abstractmethod
    def num_outputs(self, num_symbols: int) -> int:
        """Output units for a symbol inventory of ``num_symbols`` entries."""

    def build_head(self, in_dim: int, num_outputs: int, config: Config) -> nn.Module:
        """The module from the encoder's states to logits (default: :class:`FrameHead`)."""
        return FrameHead(in_dim, num_outputs)

    def fit_head(self, head: nn.Module, data: Any, utt_ids: Sequence[str]) -> str | None:
        """Fit what ``head`` takes from the training targets, once before a fresh run trains.

        Default: nothing.  Regression sets its targets' mean and std
        (:meth:`stagetune.tasks.regression.RegressionTask.fit_head`); they are
        buffers of the head, so checkpoints and model files keep them and a resumed
        run or an adapted one (``--adapt-from``, the base's) does not refit them.

        Args:
            head: The model's head (``model.output``), built by :meth:`build_head`.
            data: The training :class:`~stagetune.kaldi.DataDir`.
            utt_ids: Its training utterances.

        Returns:
            A line for the training log, or None.
        """
        return None

    @abc.abstractmethod
    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """Scalar mean loss (float32).

        Args:
            logits: ``(B, T', C)`` head output.
            out_lens: ``(B,)`` valid output frames.
            targets: ``(B, U)`` targets padded with ``-1``.
            target_lens: ``(B,)`` valid targets per utterance.
            time_stride: The model's time stride.
        """

    @abc.abstractmethod
    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """``(loss summed over the batch, number of units it is summed over)``.

        Summed over batches and divided by the summed units, this is the loss
        per unit whatever the batching and padding; the dev loss of validation.
        Arguments as for :meth:`loss`.
        """

    def frames_needed(self, targets: Sequence[Sequence[int]]) -> np.ndarray:
        """Fewest output frames each utterance needs for its targets (0: any number will do)."""
        return np.zeros(len(targets), dtype=np.int64)

    @abc.abstractmethod
    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """Best hypothesis per utterance from ``(B, T', C)`` logits."""

    @abc.abstractmethod
    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """Per-utterance references in the form :meth:`decode` hypotheses take."""

    @abc.abstractmethod
    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Error counts summed over utterances."""

    @abc.abstractmethod
    def synthetic_targets(
        self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The largest targets a batch of ``batch_size`` utterances of ``max_frames`` can hold.

        For the memory check's synthetic step; on the meta device a task may
        return a layout its loss reads without looking at values.
        """
