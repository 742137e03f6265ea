"""Example stagetune plugins: a TDNN encoder (``[tdnn]``) and a focal-loss task (``[focal]``).

This module is what the entry point loads, so it must not import torch: the
model itself lives in :mod:`stagetune_tdnn.encoder`, imported only when a model
is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagetune.plugins import Plugin
from stagetune.space import Space, param

__all__ = ["TDNNConfig", "FocalConfig", "plugin", "focal"]


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
    time_stride: int = param(
        1,
        "Time subsampling of the first layer: T input frames give ceil(T / time_stride) output frames. "
        "CTC needs an output frame per token (and a blank between repeats): too much leaves utterances "
        "stagetune refuses to train (optim prunes the trial).",
        min=1,
        max=8,
        search=Space(choices=(1, 2, 4)),
    )


#: What the ``stagetune.encoders`` entry point ``tdnn`` loads.
plugin = Plugin(build="stagetune_tdnn.encoder:TDNN", section=TDNNConfig)


@dataclass
class FocalConfig:
    """[focal]: utterance classification with the focal loss (model.task = focal)."""

    gamma: float = param(
        2.0,
        "Focusing parameter: how much utterances the model already classifies well are down-weighted "
        "(0 = cross-entropy).",
        min=0.0,
        max=5.0,
        search=Space(0.0, 4.0),
    )


#: What the ``stagetune.tasks`` entry point ``focal`` loads: it reads utt2class, as task utt does.
focal = Plugin(build="stagetune_tdnn.focal:FocalTask", section=FocalConfig, reads="utt")
