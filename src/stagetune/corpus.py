"""Training and dev data as one unit: a train dir plus a dev dir or a dev split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stagetune.errors import DataError, UsageError
from stagetune.kaldi import DataDir, load_data_dir

__all__ = ["Corpus", "load_corpus", "split_dev"]


def _unit_hash(utt_id: str) -> float:
    """Map an id to [0, 1), uniformly and independently of any other id."""
    return int.from_bytes(hashlib.sha1(utt_id.encode("utf-8")).digest()[:8], "big") / 2**64


def split_dev(utt_ids: Sequence[str], proportion: float) -> tuple[list[str], list[str]]:
    """Split utterances into ``(train, dev)`` by hashing each id.

    An utterance is in dev iff ``sha1(id)`` mapped to [0, 1) is below
    ``proportion``: the split does not depend on order or on the other ids, so
    adding data never moves an utterance between train and dev.

    Args:
        utt_ids: Utterance ids; each output keeps their order.
        proportion: Expected fraction of dev utterances, in (0, 1).

    Returns:
        ``(train_ids, dev_ids)``, both non-empty.

    Raises:
        DataError: If ``proportion`` is outside (0, 1) or a side ends up empty.
    """
    if isinstance(proportion, bool) or not 0.0 < proportion < 1.0:
        raise DataError(f"dev proportion must be in (0, 1), got {proportion}")
    train, dev = [], []
    for utt in utt_ids:
        (dev if _unit_hash(utt) < proportion else train).append(utt)
    for name, ids in (("dev", dev), ("train", train)):
        if not ids:
            raise DataError(
                f"dev proportion {proportion} of {len(utt_ids)} utterances leaves the {name} "
                f"set empty; {'raise' if name == 'dev' else 'lower'} the dev proportion or "
                "give a separate dev data directory"
            )
    return train, dev


@dataclass
class Corpus:
    """What training reads: utterances of a train and a dev :class:`DataDir`."""

    train: DataDir
    train_ids: list[str]
    dev: DataDir
    dev_ids: list[str]

    @property
    def feat_dim(self) -> int:
        """Feature dimension (equal in train and dev)."""
        return self.train.feat_dim

    @property
    def token_symbols(self) -> list[str]:
        """Output symbols by id (CTC tokens with blank 0, or frame classes)."""
        if self.train.tokens is not None:
            return list(self.train.tokens.symbols)
        num_classes = 1 + max(int(lab.max()) for lab in self.train.labels.values())
        return [str(i) for i in range(num_classes)]

    def longest_utterance(self) -> int:
        """Frames in the longest train or dev utterance."""
        lengths = [self.train.num_frames[u] for u in self.train_ids]
        lengths += [self.dev.num_frames[u] for u in self.dev_ids]
        return max(lengths)


def load_corpus(
    train_dir: str | Path,
    dev_dir: str | Path | None = None,
    *,
    dev_proportion: float | None = None,
    task: str = "ctc",
) -> Corpus:
    """Load and validate the training data and its dev data.

    Args:
        train_dir: Kaldi data dir to train on.
        dev_dir: Separate dev dir (tokens come from ``train_dir``).
        dev_proportion: Otherwise, hold out this proportion of ``train_dir``,
            chosen deterministically by utterance id.
        task: ``"ctc"`` or ``"frame"``.
    """
    if dev_dir is not None and dev_proportion is not None:
        raise UsageError("give a dev dir or --dev-proportion, not both")
    train = load_data_dir(train_dir, task=task)
    if dev_dir is not None:
        dev = load_data_dir(dev_dir, task=task, tokens=train.tokens)
        if dev.feat_dim != train.feat_dim:
            raise UsageError(
                f"{dev_dir}: features have dimension {dev.feat_dim} but {train_dir} has "
                f"{train.feat_dim}; compute both with the same `stagetune prep` options"
            )
        return _with_dev_targets(Corpus(train, list(train.utt_ids), dev, list(dev.utt_ids)), str(dev_dir))
    train_ids, dev_ids = split_dev(train.utt_ids, 0.1 if dev_proportion is None else dev_proportion)
    return _with_dev_targets(Corpus(train, train_ids, train, dev_ids), f"the dev split of {train_dir}")


def _with_dev_targets(corpus: Corpus, dev_name: str) -> Corpus:
    """``corpus``, once its dev set is known to have a reference to measure an error against."""
    if all(len(corpus.dev.targets(u)) == 0 for u in corpus.dev_ids):
        what = "transcripts are" if corpus.dev.labels is None else "label sequences are"
        raise DataError(
            f"{dev_name}: all {len(corpus.dev_ids)} {what} empty, so no dev error can be "
            f"measured; give a dev set with transcribed utterances"
        )
    return corpus
