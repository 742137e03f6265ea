"""The TDNN encoder module (imports torch; loaded when a model is built)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stagetune_tdnn import TDNNConfig

__all__ = ["TDNN"]


class TDNN(nn.Module):
    """Dilated 1-D convolutions over time; one output frame per ``time_stride`` input frames.

    Layer ``i`` has kernel ``2 * context + 1``, dilation ``2 ** i`` and padding
    keeping the length, then ReLU and dropout (``training.dropout_prob``); the
    first layer strides by ``time_stride`` (``T`` frames -> ``ceil(T / time_stride)``).
    Frames past each utterance's length are zeroed after every layer, so padding
    never changes another utterance's states.

    ``time_stride`` and :meth:`output_lengths` tell stagetune what it does to
    time, so it can check before training that CTC has enough output frames for
    every utterance (an encoder without them is measured by running it).

    Args:
        section: The ``[tdnn]`` section.
        feat_dim: Feature bins per frame.
        config: The whole configuration (for ``training.dropout_prob``).
    """

    def __init__(self, section: TDNNConfig, feat_dim: int, config: Any) -> None:
        super().__init__()
        kernel = 2 * section.context + 1
        self.convs = nn.ModuleList(
            nn.Conv1d(
                feat_dim if i == 0 else section.channels, section.channels, kernel,
                dilation=2**i, padding=section.context * 2**i, stride=section.time_stride if i == 0 else 1,
            )
            for i in range(section.layers)
        )
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(config.training.dropout_prob)
        #: Units per output frame.
        self.state_dim = section.channels
        #: Total subsampling of the time axis.
        self.time_stride = section.time_stride

    def output_lengths(self, feat_lens: Any) -> Any:
        """Output frames ``ceil(T / time_stride)`` per input frames ``T`` (an int, array or tensor)."""
        return (feat_lens - 1) // self.time_stride + 1

    def encode(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """``(states (B, T', channels), out_lens (B,))`` from ``feats (B, T, F)``."""
        x = feats.transpose(1, 2).masked_fill(~self._keep(feat_lens, feats.size(1), feats.device), 0.0)  # (B, F, T)
        out_lens = self.output_lengths(feat_lens)
        for conv in self.convs:
            x = self.activation(conv(x))
            x = self.dropout(x).masked_fill(~self._keep(out_lens, x.size(2), x.device), 0.0)
        return x.transpose(1, 2), out_lens

    @staticmethod
    def _keep(lens: Tensor, frames: int, device: torch.device) -> Tensor:
        """``(B, 1, frames)``: True on each utterance's valid frames."""
        return (torch.arange(frames, device=device) < lens.to(device).unsqueeze(1)).unsqueeze(1)
