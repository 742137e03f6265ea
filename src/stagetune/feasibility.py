"""Whether a model's time stride leaves every utterance the output frames its task needs.

CTC emits at most one token per output frame and needs a blank between two
equal adjacent tokens, so an utterance of ``U`` tokens with ``R`` adjacent
repeats needs ``U + R`` output frames (:meth:`Task.frames_needed`).  A model
whose convolutions subsample time too much leaves some utterances fewer: their
CTC loss is infinite, zeroed by ``zero_infinity``, and they would silently
train nothing.  This module finds them from ``num_frames`` and the targets
alone (no feature is read) before anything trains: ``stagetune train`` refuses
with :class:`InfeasibleStride`, an optim trial is pruned.  The frame task
needs no particular number of frames.

The built-in encoder's output frames follow from its config
(:func:`~stagetune.model.output_lengths`).  A plugin encoder's come from the
encoder itself, built on the meta device (no weights are allocated): its
``output_lengths(feat_lens)`` and ``time_stride`` where it has them, else
measured by running it on a few lengths (:func:`measured_lengths`; on the CPU
where the meta device cannot run it).  The message says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stagetune.config import Config
from stagetune.corpus import Corpus
from stagetune.errors import ConfigError
from stagetune.model import (
    EncoderModel,
    build_encoder,
    measure_output_lengths,
    output_lengths,
    stride_of,
    time_geometry,
)
from stagetune.tasks import task_of

__all__ = [
    "Shortfall", "InfeasibleStride", "TimeGeometry", "time_geometry_of", "measured_lengths", "find_shortfall",
    "check_feasible",
]

#: What to change when the built-in encoder subsamples time too much.
BUILT_IN_FIX = (
    "subsample time less: lower model.convolutional_time_factor, raise model.convolutional_factor_sched "
    "or use fewer model.convolutional_layers"
)


@dataclass
class Shortfall:
    """Utterances left with fewer output frames than their targets need.

    Attributes:
        time_stride: The model's total time stride.
        affected: Utterances short of frames, per split (``"train"``, ``"dev"``).
        totals: Utterances per split.
        example: The worst one: ``(split, utterance, input frames, output
            frames, frames needed, targets)``.
        source: How a plugin encoder's stride and output frames were found
            (empty for the built-in encoder, whose config gives them).
        fix: What to change.
    """

    time_stride: int
    affected: dict[str, int]
    totals: dict[str, int]
    example: tuple[str, str, int, int, int, int]
    source: str = ""
    fix: str = BUILT_IN_FIX

    def message(self) -> str:
        """One line: what is wrong, how many utterances, an example and the fix."""
        counts = " and ".join(f"{self.affected[s]} of {self.totals[s]} {s}" for s in self.totals)
        split, utt, frames, out, needed, tokens = self.example
        source = f" ({self.source})" if self.source else ""
        return (
            f"a total time stride of {self.time_stride}{source} leaves {counts} utterances fewer output "
            f"frames than CTC needs (e.g. {utt!r} in {split}: {_n(frames, 'frame')} -> "
            f"{_n(out, 'output frame')}, needs {needed} = {_n(tokens, 'token')} + "
            f"{_n(needed - tokens, 'adjacent repeat')}); {self.fix}"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class InfeasibleStride(ConfigError):
    """The model subsamples time too much for some utterances' targets."""


@dataclass(frozen=True)
class TimeGeometry:
    """What a config's model does to time.

    Attributes:
        time_stride: Its total time stride.
        output_lengths: Input frames (an int64 array) -> output frames (same shape).
        source: How a plugin encoder's were found (empty for the built-in encoder).
        fix: What to change to subsample time less.
    """

    time_stride: int
    output_lengths: Callable[[np.ndarray], np.ndarray]
    source: str = ""
    fix: str = BUILT_IN_FIX


def time_geometry_of(config: Config, feat_dim: int, lengths: np.ndarray) -> TimeGeometry:
    """The time geometry of ``config``'s model for utterances of ``lengths`` input frames.

    A plugin encoder is built from its section on the meta device (on the CPU
    if it cannot be built or run there); an encoder without ``output_lengths``
    is measured (:func:`measured_lengths`) at the distinct lengths in
    ``lengths``, and only those are answered.

    Raises:
        Whatever building the plugin encoder raises, or running one without
        ``output_lengths`` on the CPU (as training it would).
    """
    if config.model.encoder == "crnn":
        stride = math.prod(stride for _, stride in time_geometry(config.model))
        return TimeGeometry(stride, lambda frames: output_lengths(config.model, frames))
    name = config.model.encoder
    fix = f"subsample time less: change the [{name}] settings that stride time"
    encoder, device = _plugin_encoder(config, feat_dim)
    declared = getattr(encoder, "time_stride", None)
    if hasattr(encoder, "output_lengths"):
        hook = encoder.output_lengths

        def from_hook(frames: np.ndarray) -> np.ndarray:
            out = hook(torch.as_tensor(frames, dtype=torch.long))
            return np.asarray(torch.as_tensor(out).cpu(), dtype=np.int64).reshape(np.shape(frames))

        if declared is None:
            probes = np.array(EncoderModel.STRIDE_PROBES, dtype=np.int64)
            declared = stride_of(dict(zip(probes.tolist(), from_hook(probes).tolist())))
            return TimeGeometry(int(declared), from_hook, f"from the {name} encoder's output_lengths", fix)
        return TimeGeometry(
            int(declared), from_hook, f"declared by the {name} encoder's time_stride and output_lengths", fix
        )
    try:
        measured = measured_lengths(encoder, feat_dim, lengths.tolist())
    except Exception:  # whatever the plugin's encode raises on the meta device: try the CPU
        if device != "meta":
            raise
        encoder, device = _plugin_encoder(config, feat_dim, on_cpu=True)
        measured = measured_lengths(encoder, feat_dim, lengths.tolist())
    stride = int(declared) if declared is not None else stride_of(measured)
    source = f"measured by running the {name} encoder on the {'meta device' if device == 'meta' else 'CPU'}"
    if declared is not None:
        source = f"the {name} encoder's time_stride; output frames {source}"

    def from_measured(frames: np.ndarray) -> np.ndarray:
        return np.array([measured[int(n)] for n in np.ravel(frames)], dtype=np.int64).reshape(np.shape(frames))

    return TimeGeometry(stride, from_measured, source, fix)


#: Lengths besides the extremes that check a period found by :func:`measured_lengths`.
_CHECKS = 8


def measured_lengths(encoder: torch.nn.Module, feat_dim: int, lengths: list[int]) -> dict[int, int]:
    """Output frames of ``encoder`` for each distinct input length of ``lengths``, by running it.

    Conv and pooling stacks of total stride ``S`` give one more output frame
    per ``S`` more input frames, so one period of ``S`` lengths, run, gives
    every length; the shortest and longest lengths find ``S`` and a few others
    check the period.  An encoder that does not follow it is run on every
    distinct length.
    """
    distinct = sorted(set(lengths))
    low, high = distinct[0], distinct[-1]
    run = measure_output_lengths(encoder, feat_dim, [low, high])
    stride = stride_of(run)
    if stride < len(distinct):
        run.update(measure_output_lengths(encoder, feat_dim, range(low, min(low + stride, high + 1))))

        def predicted(length: int) -> int:
            return run[low + (length - low) % stride] + (length - low) // stride

        picks = np.linspace(0, len(distinct) - 1, _CHECKS + 2).round().astype(int)
        run.update(measure_output_lengths(encoder, feat_dim, [distinct[i] for i in picks if distinct[i] not in run]))
        if all(predicted(length) == out for length, out in run.items()):
            return {length: predicted(length) for length in distinct}
    run.update(measure_output_lengths(encoder, feat_dim, [n for n in distinct if n not in run]))
    return {length: run[length] for length in distinct}


def _plugin_encoder(config: Config, feat_dim: int, *, on_cpu: bool = False) -> tuple[torch.nn.Module, str]:
    """``config``'s plugin encoder and its device: the meta device where it builds there, else the CPU."""
    if not on_cpu:
        try:
            with torch.device("meta"):
                return build_encoder(config, feat_dim), "meta"
        except Exception:  # whatever the plugin's constructor raises on the meta device
            pass
    return build_encoder(config, feat_dim), "cpu"


def find_shortfall(config: Config, corpus: Corpus) -> Shortfall | None:
    """The utterances ``config``'s model leaves short of output frames, or None."""
    task = task_of(config)
    affected: dict[str, int] = {}
    totals: dict[str, int] = {}
    worst: tuple[int, tuple[str, str, int, int, int, int]] | None = None
    splits = (("train", corpus.train, corpus.train_ids), ("dev", corpus.dev, corpus.dev_ids))
    lengths = [
        (split, data, ids, np.array([data.num_frames[u] for u in ids], dtype=np.int64),
         task.frames_needed([data.targets(u) for u in ids]))
        for split, data, ids in splits
    ]
    if not any(len(needed) and needed.max() > 0 for *_, needed in lengths):
        return None  # e.g. the frame task: any stride will do, and no encoder is built
    geometry = time_geometry_of(config, corpus.feat_dim, np.concatenate([frames for *_, frames, _ in lengths]))
    for split, data, ids, frames, needed in lengths:
        out = geometry.output_lengths(frames)
        short = np.flatnonzero(out < needed)
        affected[split], totals[split] = len(short), len(ids)
        if len(short):
            i = int(short[np.argmax(needed[short] - out[short])])
            if worst is None or needed[i] - out[i] > worst[0]:
                tokens = len(data.targets(ids[i]))
                example = (split, ids[i], int(frames[i]), int(out[i]), int(needed[i]), tokens)
                worst = (int(needed[i] - out[i]), example)
    if worst is None:
        return None
    return Shortfall(geometry.time_stride, affected, totals, worst[1], geometry.source, geometry.fix)


def check_feasible(config: Config, corpus: Corpus) -> None:
    """Raise :class:`InfeasibleStride` when :func:`find_shortfall` finds utterances."""
    shortfall = find_shortfall(config, corpus)
    if shortfall is not None:
        raise InfeasibleStride(shortfall.message())
