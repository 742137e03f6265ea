"""Task ``frame``: one class per input frame (``utt2label``), cross-entropy, frame error rate."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stagetune.metrics import ErrorCounts
from stagetune.tasks.base import Task, check_pairs, unpad

__all__ = ["FrameTask", "subsample_labels"]


def subsample_labels(
    labels: Tensor,
    lens: Tensor,
    factor: int,
    *,
    out_lens: Tensor | None = None,
    num_frames: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Frame labels at the output frame rate of a model with time stride ``factor``.

    Output frame ``j`` covers input frames ``[j * factor, (j + 1) * factor)``
    (its stride window) and takes the label at the window's centre, input frame
    ``j * factor + factor // 2``, clamped to the utterance's last frame (the
    last window may be cut short, and even kernels add a trailing frame).

    Args:
        labels: ``(B, T)`` long labels per input frame, padded (any value).
        lens: ``(B,)`` labelled input frames per utterance.
        factor: The model's :attr:`AcousticModel.time_stride`.
        out_lens: ``(B,)`` output frames per utterance; defaults to
            ``ceil(lens / factor)``.  Pass the model's ``out_lens`` so the
            labels line up with its logits.
        num_frames: Width of the result (``T'``); defaults to ``max(out_lens)``.

    Returns:
        ``(sub_labels, out_lens)``: ``(B, T')`` long labels, ``-1`` beyond each
        utterance's ``out_lens``, and the ``(B,)`` lengths used.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    lens = lens.to(labels.device, torch.long)
    if out_lens is None:
        out_lens = (lens + factor - 1) // factor
    out_lens = out_lens.to(labels.device, torch.long)
    if num_frames is None:
        num_frames = int(out_lens.max()) if out_lens.numel() else 0
    frames = torch.arange(num_frames, device=labels.device)
    positions = frames * factor + factor // 2  # (T',)
    positions = torch.minimum(positions.unsqueeze(0), (lens - 1).clamp(min=0).unsqueeze(1))
    valid = (frames.unsqueeze(0) < out_lens.unsqueeze(1)) & (lens > 0).unsqueeze(1)
    if labels.size(1) == 0:
        return labels.new_full(valid.shape, -1), out_lens
    sub = labels.long().gather(1, positions.clamp(max=labels.size(1) - 1))
    return sub.masked_fill(~valid, -1), out_lens


class FrameTask(Task):
    """One class per input frame, subsampled to the output frame rate; cross-entropy."""

    name = "frame"
    error_name = "FER"

    def num_outputs(self, num_symbols: int) -> int:
        """The number of classes."""
        if num_symbols < 1:
            raise ValueError(f"the frame task needs at least one class, got {num_symbols}")
        return num_symbols

    @staticmethod
    def _stride(time_stride: int | None) -> int:
        if time_stride is None:
            raise ValueError(
                "the frame task subsamples per-frame labels to the model's output frames; "
                "pass time_stride=model.time_stride"
            )
        return time_stride

    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """Cross-entropy averaged over valid output frames.

        ``targets`` are ``(B, T)`` labels per *input* frame and ``target_lens``
        the labelled input frames; they are subsampled with
        :func:`subsample_labels` to the model's output frames.  Frames whose
        label is ``-1`` are ignored.
        """
        losses, frames = self._summed(logits, out_lens, targets, target_lens, time_stride)
        # A batch without labelled frames gives 0 rather than 0/0.
        return losses / frames.clamp(min=1)

    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """Summed cross-entropy and the number of labelled output frames."""
        losses, frames = self._summed(logits, out_lens, targets, target_lens, time_stride)
        return losses, int(frames)

    def _summed(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        time_stride: int | None,
    ) -> tuple[Tensor, Tensor]:
        labels, _ = subsample_labels(
            targets.to(logits.device),
            target_lens,
            self._stride(time_stride),
            out_lens=out_lens,
            num_frames=logits.size(1),
        )
        flat_labels = labels.reshape(-1)
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            flat_labels,
            ignore_index=-1,
            reduction="sum",
        )
        return losses, (flat_labels >= 0).sum()

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """The most likely class of every valid output frame."""
        best = logits.argmax(-1).cpu().tolist()
        return [path[:length] for path, length in zip(best, out_lens.tolist())]

    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """Labels at the output frame rate (:func:`subsample_labels`), one per output frame."""
        sub, lens = subsample_labels(
            targets, target_lens, self._stride(time_stride), out_lens=out_lens
        )
        return unpad(sub, lens)

    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Per-frame mismatches, counted as substitutions (frame error rate).

        Args:
            refs: One label per *output* frame (:meth:`references`).
            hyps: One label per output frame (:meth:`decode`).

        Raises:
            ValueError: If a reference and its hypothesis differ in length
                (typically references at the input frame rate).
        """
        check_pairs(refs, hyps)
        total = ErrorCounts()
        for index, (ref, hyp) in enumerate(zip(refs, hyps)):
            if len(ref) != len(hyp):
                raise ValueError(
                    f"utterance {index}: {len(ref)} reference labels but {len(hyp)} output "
                    f"frames; frame references must be subsampled to the output frames "
                    f"(Task.references)"
                )
            total += ErrorCounts(
                substitutions=sum(r != h for r, h in zip(ref, hyp)),
                ref_length=len(ref),
                utterances=1,
            )
        return total

    def synthetic_targets(
        self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """A label for every input frame."""
        targets = torch.randint(0, num_outputs, (batch_size, max_frames), device=device)
        return targets, torch.full((batch_size,), max_frames, dtype=torch.long, device=device)
