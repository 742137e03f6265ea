"""Task ``utt``: one class per utterance (``utt2class``), pooled over time.

The head pools the encoder's states over each utterance's valid frames
(``model.pooling``: mean, max, mean + standard deviation, or attentive
statistics), maps them to an embedding of ``model.embedding_size`` units (what
``stagetune extract`` writes, e.g. x-vector-style speaker embeddings) and from
there to one logit per class.  With ``training.margin`` > 0 the classes are
scored by the cosine between the normalised embedding and class vectors, and
the loss is the additive angular margin softmax (ArcFace: the target's angle
grows by the margin, logits are scaled by ``training.margin_scale``); with 0 it
is a linear layer and plain cross-entropy.  The output is one frame per
utterance, so decoding and error counting are those of a single frame: the
error rate is 1 - accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stagetune.config import Config
from stagetune.metrics import ErrorCounts
from stagetune.tasks.base import Task, check_pairs, frame_mask, unpad

__all__ = ["POOLINGS", "Pooling", "UtteranceHead", "UtteranceTask"]

#: ``model.pooling`` values.
POOLINGS = ("mean", "max", "meanstd", "attentive")
_STD_FLOOR = 1e-5


class Pooling(nn.Module):
    """``(states (B, T, H), lens (B,)) -> (B, D)`` over each utterance's valid frames.

    ``D`` is ``H`` for mean and max, ``2 H`` for meanstd and attentive (weighted
    mean and standard deviation, the weights a softmax over frames of a small
    attention layer).
    """

    def __init__(self, kind: str, in_dim: int, attention_dim: int = 64) -> None:
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown pooling {kind!r}; allowed: {', '.join(POOLINGS)}")
        self.kind = kind
        self.out_dim = in_dim * (2 if kind in ("meanstd", "attentive") else 1)
        self.attention = (
            nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1))
            if kind == "attentive" else None
        )

    def forward(self, states: Tensor, lens: Tensor) -> Tensor:
        mask = frame_mask(lens.to(states.device), states.size(1)).unsqueeze(-1)  # (B, T, 1)
        if self.kind == "max":
            return states.masked_fill(~mask, float("-inf")).amax(1)
        if self.attention is not None:
            scores = self.attention(states).masked_fill(~mask, float("-inf"))
            weights = scores.softmax(1)
        else:
            weights = mask.to(states.dtype) / lens.to(states.device, states.dtype).clamp(min=1).view(-1, 1, 1)
        mean = (weights * states).sum(1)
        if self.kind == "mean":
            return mean
        var = (weights * (states - mean.unsqueeze(1)) ** 2).sum(1)
        return torch.cat([mean, var.clamp(min=_STD_FLOOR).sqrt()], dim=-1)


class UtteranceHead(nn.Module):
    """Pooling -> embedding -> class scores; ``(states, lens) -> (logits (B, 1, C), ones (B,))``.

    Args:
        in_dim: Units per encoder frame.
        num_outputs: Classes.
        pooling: A :data:`POOLINGS` value.
        embedding_size: Units of the embedding.
        cosine: Score classes by cosine similarity (for the angular margin loss).
    """

    def __init__(self, in_dim: int, num_outputs: int, pooling: str, embedding_size: int, cosine: bool) -> None:
        super().__init__()
        self.pool = Pooling(pooling, in_dim)
        self.embedding = nn.Linear(self.pool.out_dim, embedding_size)
        self.cosine = cosine
        self.classes = nn.Linear(embedding_size, num_outputs, bias=not cosine)

    def embed(self, states: Tensor, lens: Tensor) -> Tensor:
        """``(B, embedding_size)`` utterance embeddings (before the nonlinearity)."""
        return self.embedding(self.pool(states, lens))

    def forward(self, states: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.embed(states, lens)
        if self.cosine:
            logits = F.normalize(embedding, dim=-1) @ F.normalize(self.classes.weight, dim=-1).t()
        else:
            logits = self.classes(F.relu(embedding))
        return logits.unsqueeze(1), torch.ones_like(lens)


@dataclass(frozen=True)
class UtteranceTask(Task):
    """One class per utterance; cross-entropy, or the additive angular margin softmax.

    Args:
        pooling: ``model.pooling``.
        embedding_size: ``model.embedding_size``.
        margin: ``training.margin`` in radians (0: a linear layer and plain cross-entropy).
        scale: ``training.margin_scale``, the logits' scale with a margin.
    """

    pooling: str = "meanstd"
    embedding_size: int = 128
    margin: float = 0.0
    scale: float = 30.0

    name = "utt"
    error_name = "UER"
    unit = "utterance"

    @classmethod
    def of(cls, config: Config) -> UtteranceTask:
        return cls(config.model.pooling, config.model.embedding_size, config.training.margin,
                   config.training.margin_scale)

    def num_outputs(self, num_symbols: int) -> int:
        if num_symbols < 2:
            raise ValueError(f"utterance classification needs at least two classes, got {num_symbols}")
        return num_symbols

    def build_head(self, in_dim: int, num_outputs: int, config: Config) -> nn.Module:
        return UtteranceHead(in_dim, num_outputs, self.pooling, self.embedding_size, cosine=self.margin > 0)

    def _scaled(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Logits as the loss sees them: cos(theta + m) for the target, all times the scale."""
        if self.margin <= 0:
            return logits
        cos = logits.clamp(-1 + 1e-7, 1 - 1e-7)
        target = F.one_hot(labels.clamp(min=0), cos.size(-1)).bool()
        theta = torch.acos(cos)
        # Past pi - m, cos(theta + m) would rise again: use cos(theta) - m sin(m) m there (ArcFace's fallback).
        with_margin = torch.where(
            theta + self.margin < math.pi, torch.cos(theta + self.margin), cos - self.margin * math.sin(self.margin)
        )
        return self.scale * torch.where(target, with_margin, cos)

    def _summed(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        labels = targets.reshape(targets.size(0), -1)[:, 0].to(logits.device, torch.long)
        scores = self._scaled(logits[:, 0].float(), labels)
        losses = F.cross_entropy(scores, labels, ignore_index=-1, reduction="sum")
        return losses, (labels >= 0).sum()

    def loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
             time_stride: int | None = None) -> Tensor:
        """Mean cross-entropy over the batch's utterances (with the margin, if any)."""
        losses, count = self._summed(logits, targets)
        return losses / count.clamp(min=1)

    def summed_loss(self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, *,
                    time_stride: int | None = None) -> tuple[Tensor, int]:
        losses, count = self._summed(logits, targets)
        return losses, int(count)

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """The most likely class of each utterance (the margin never changes the argmax)."""
        return [[c] for c in logits[:, 0].argmax(-1).cpu().tolist()]

    def references(self, targets: Tensor, target_lens: Tensor, out_lens: Tensor, *,
                   time_stride: int | None = None) -> list[list[int]]:
        return unpad(targets, target_lens)

    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Misclassified utterances, as substitutions out of one reference each."""
        check_pairs(refs, hyps)
        wrong = sum(list(r) != list(h) for r, h in zip(refs, hyps))
        return ErrorCounts(substitutions=wrong, ref_length=len(refs), utterances=len(refs))

    def synthetic_targets(self, batch_size: int, max_frames: int, max_target_len: int, num_outputs: int,
                          device: torch.device) -> tuple[Tensor, Tensor]:
        targets = torch.randint(0, num_outputs, (batch_size, 1), device=device)
        return targets, torch.ones(batch_size, dtype=torch.long, device=device)
