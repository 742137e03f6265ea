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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stagetune.config import Config
from stagetune.corpus import Corpus
from stagetune.errors import ConfigError
from stagetune.model import output_lengths, time_geometry
from stagetune.tasks import task_of

__all__ = ["Shortfall", "InfeasibleStride", "find_shortfall", "check_feasible"]


@dataclass
class Shortfall:
    """Utterances left with fewer output frames than their targets need.

    Attributes:
        time_stride: The model's total time stride.
        affected: Utterances short of frames, per split (``"train"``, ``"dev"``).
        totals: Utterances per split.
        example: The worst one: ``(split, utterance, input frames, output
            frames, frames needed, targets)``.
    """

    time_stride: int
    affected: dict[str, int]
    totals: dict[str, int]
    example: tuple[str, str, int, int, int, int]

    def message(self) -> str:
        """One line: what is wrong, how many utterances, an example and the fix."""
        counts = " and ".join(f"{self.affected[s]} of {self.totals[s]} {s}" for s in self.totals)
        split, utt, frames, out, needed, tokens = self.example
        return (
            f"a total time stride of {self.time_stride} leaves {counts} utterances fewer output "
            f"frames than CTC needs (e.g. {utt!r} in {split}: {_n(frames, 'frame')} -> "
            f"{_n(out, 'output frame')}, needs {needed} = {_n(tokens, 'token')} + "
            f"{_n(needed - tokens, 'adjacent repeat')}); "
            f"subsample time less: lower model.convolutional_time_factor, raise "
            f"model.convolutional_factor_sched or use fewer model.convolutional_layers"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class InfeasibleStride(ConfigError):
    """The model subsamples time too much for some utterances' targets."""


def find_shortfall(config: Config, corpus: Corpus) -> Shortfall | None:
    """The utterances ``config``'s model leaves short of output frames, or None."""
    task = task_of(config)
    affected: dict[str, int] = {}
    totals: dict[str, int] = {}
    worst: tuple[int, tuple[str, str, int, int, int, int]] | None = None
    splits = (("train", corpus.train, corpus.train_ids), ("dev", corpus.dev, corpus.dev_ids))
    for split, data, ids in splits:
        frames = np.array([data.num_frames[u] for u in ids], dtype=np.int64)
        needed = task.frames_needed([data.targets(u) for u in ids])
        out = output_lengths(config.model, frames)
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
    stride = math.prod(stride for _, stride in time_geometry(config.model))
    return Shortfall(stride, affected, totals, worst[1])


def check_feasible(config: Config, corpus: Corpus) -> None:
    """Raise :class:`InfeasibleStride` when :func:`find_shortfall` finds utterances."""
    shortfall = find_shortfall(config, corpus)
    if shortfall is not None:
        raise InfeasibleStride(shortfall.message())
