"""A task plugin: utterance classification with the focal loss (Lin et al., 2017).

Reads the same targets as the built-in ``utt`` task (``utt2class``), pools the
same way, and down-weights utterances the model already gets right:
loss = -(1 - p_target) ** gamma * log p_target, gamma from ``[focal]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stagetune.config import Config
from stagetune.tasks.utterance import UtteranceTask


@dataclass(frozen=True)
class FocalTask(UtteranceTask):
    gamma: float = 2.0

    name = "focal"

    @classmethod
    def of(cls, config: Config) -> "FocalTask":
        base = UtteranceTask.of(config)
        return cls(base.pooling, base.embedding_size, 0.0, base.scale, gamma=config.focal.gamma)

    def _summed(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        labels = targets.reshape(targets.size(0), -1)[:, 0].to(logits.device, torch.long)
        valid = labels >= 0
        log_p = logits[:, 0].float().log_softmax(-1).gather(1, labels.clamp(min=0).unsqueeze(1))[:, 0]
        losses = -((1 - log_p.exp()) ** self.gamma) * log_p
        return losses[valid].sum(), valid.sum()
