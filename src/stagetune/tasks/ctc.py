"""Task ``ctc``: token sequences (``text`` + ``tokens.txt``), CTC loss, greedy decoding, token error rate."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stagetune.metrics import ErrorCounts, ctc_collapse, edit_distance
from stagetune.tasks.base import Task, check_pairs, frame_mask, unpad

__all__ = ["CTCTask"]


class CTCTask(Task):
    """Token sequences with CTC; blank is id 0 of the token table."""

    name = "ctc"
    error_name = "TER"
    blank = 0

    def num_outputs(self, num_symbols: int) -> int:
        """The token table size, which already includes ``<blank>`` at id 0."""
        if num_symbols < 2:
            raise ValueError(
                f"a CTC token table needs <blank> and at least one token, got {num_symbols} entries"
            )
        return num_symbols

    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """CTC loss, ``reduction='mean'`` (per-utterance loss / target length, batch mean).

        ``targets`` may be ``(B, U)`` padded or ``(sum U,)`` concatenated.
        Infeasible utterances (more targets than frames allow) contribute zero
        loss and gradient instead of infinity; training refuses such data
        beforehand (:mod:`stagetune.feasibility`).
        """
        return self._ctc_loss(logits, out_lens, targets, target_lens, "mean")

    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """Summed CTC loss and the number of target tokens (loss per token = ratio of sums)."""
        loss = self._ctc_loss(logits, out_lens, targets, target_lens, "sum")
        return loss, int(target_lens.sum())

    def _ctc_loss(
        self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, reduction: str
    ) -> Tensor:
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T', B, C)
        target_lens = target_lens.to(torch.long)
        if targets.dim() == 2:
            mask = frame_mask(target_lens.to(targets.device), targets.size(1))
            targets = targets[mask]
        return F.ctc_loss(
            log_probs,
            targets.to(logits.device, torch.long),
            out_lens.to(torch.long),
            target_lens,
            blank=self.blank,
            reduction=reduction,
            zero_infinity=True,
        )

    def frames_needed(self, targets: Sequence[Sequence[int]]) -> np.ndarray:
        """Tokens plus adjacent repeats: CTC must put a blank between two equal tokens."""
        lens = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
        if not lens.sum():
            return lens
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
        starts = np.cumsum(lens) - lens
        repeat = np.zeros(len(flat), dtype=bool)  # token i equals token i - 1 of its utterance
        repeat[1:] = flat[1:] == flat[:-1]
        repeat[starts[lens > 0]] = False
        counted = np.concatenate([[0], np.cumsum(repeat)])
        return lens + counted[starts + lens] - counted[starts]

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """Greedy (best-path) decoding: argmax, merge repeats, drop blanks."""
        best = logits.argmax(-1).cpu().tolist()
        lengths = out_lens.tolist()
        return [ctc_collapse(path[:length], self.blank) for path, length in zip(best, lengths)]

    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """The unpadded token sequences."""
        return unpad(targets, target_lens)

    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Summed edit distances (token error rate)."""
        check_pairs(refs, hyps)
        total = ErrorCounts()
        for ref, hyp in zip(refs, hyps):
            total += edit_distance(ref, hyp)
        return total

    def synthetic_targets(
        self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Token ids in ``1..num_outputs-1``; concatenated on meta (unpadding would need values)."""
        meta = device.type == "meta"
        shape = (batch_size * max_target_len,) if meta else (batch_size, max_target_len)
        targets = torch.randint(1, max(num_outputs, 2), shape, device=device)
        return targets, torch.full((batch_size,), max_target_len, dtype=torch.long, device=device)
