"""A TDNN encoder for stagetune: the ``[tdnn]`` section and the plugin entry point.

This module is what the entry point loads, so it must not import torch: the
model itself lives in :mod:`stagetune_tdnn.encoder`, imported only when a model
is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagetune.plugins import Plugin
from stagetune.space import Space, param

__all__ = ["TDNNConfig", "plugin"]


@dataclass
class TDNNConfig:
    """[tdnn]: a time-delay neural network, dilated 1-D convolutions over time (model.encoder = tdnn)."""

    layers: int = param(
        3,
        "Number of 1-D convolutional layers over time; layer i (0-based) is dilated by 2**i.",
        min=1,
        max=8,
        search=Space(1, 4),
    )
    channels: int = param(
        64,
        "Output channels of every layer (the units per frame the task's head reads).",
        min=1,
        max=4096,
        search=Space(8, 256, log=True),
    )
    context: int = param(
        1,
        "Frames each layer reads on either side of a frame, before dilation (kernel 2 * context + 1).",
        min=0,
        max=5,
        search=Space(0, 3),
    )


#: What the ``stagetune.encoders`` entry point ``tdnn`` loads.
plugin = Plugin(build="stagetune_tdnn.encoder:TDNN", section=TDNNConfig)
