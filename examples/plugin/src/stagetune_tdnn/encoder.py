"""The TDNN encoder module (imports torch; loaded when a model is built)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stagetune_tdnn import TDNNConfig

__all__ = ["TDNN"]


class TDNN(nn.Module):
    """Dilated 1-D convolutions over time; one output frame per input frame.

    Layer ``i`` has kernel ``2 * context + 1``, dilation ``2 ** i`` and padding
    keeping the length, then ReLU and dropout (``training.dropout_prob``).
    Frames past each utterance's length are zeroed after every layer, so padding
    never changes another utterance's states.

    Args:
        section: The ``[tdnn]`` section.
        feat_dim: Feature bins per frame.
        config: The whole configuration (for ``training.dropout_prob``).
    """

    #: No subsampling: the task sees every input frame.
    time_stride = 1

    def __init__(self, section: TDNNConfig, feat_dim: int, config: Any) -> None:
        super().__init__()
        kernel = 2 * section.context + 1
        self.convs = nn.ModuleList(
            nn.Conv1d(
                feat_dim if i == 0 else section.channels, section.channels, kernel,
                dilation=2**i, padding=section.context * 2**i,
            )
            for i in range(section.layers)
        )
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(config.training.dropout_prob)
        #: Units per output frame.
        self.state_dim = section.channels

    def output_lengths(self, feat_lens: Any) -> Any:
        """Output frames: the input frames (an int, array or tensor)."""
        return feat_lens

    def encode(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """``(states (B, T, channels), out_lens (B,))`` from ``feats (B, T, F)``."""
        lens = feat_lens.to(feats.device)
        keep = (torch.arange(feats.size(1), device=feats.device) < lens.unsqueeze(1)).unsqueeze(1)
        x = feats.transpose(1, 2).masked_fill(~keep, 0.0)  # (B, F, T)
        for conv in self.convs:
            x = self.dropout(self.activation(conv(x))).masked_fill(~keep, 0.0)
        return x.transpose(1, 2), feat_lens
