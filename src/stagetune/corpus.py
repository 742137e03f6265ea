"""Training and dev data as one unit: a train dir plus a dev dir or a dev split."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stagetune.errors import DataError, UsageError
from stagetune.kaldi import DataDir, load_data_dir, regression_symbols

__all__ = ["Corpus", "load_corpus", "split_dev", "check_targets", "subset_corpus"]


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


def _subset(utt_ids: Sequence[str], size: float) -> list[str]:
    """The ``size`` (a count >= 1, or a fraction below 1) ids of smallest hash, in their order."""
    keep = max(1, round(size * len(utt_ids))) if size < 1 else min(len(utt_ids), int(size))
    chosen = set(sorted(utt_ids, key=_unit_hash)[:keep])
    return [u for u in utt_ids if u in chosen]


def subset_corpus(corpus: Corpus, size: float) -> Corpus:
    """``corpus`` cut to a debug subset (``data.subset``); 0 keeps everything.

    ``size`` >= 1 keeps that many training and that many dev utterances, a size
    below 1 that fraction of each (at least one), chosen by the hash of their ids:
    the same utterances every run, and a larger subset holds a smaller one.
    """
    if not size:
        return corpus
    return Corpus(
        corpus.train, _subset(corpus.train_ids, size), corpus.dev, _subset(corpus.dev_ids, size), corpus.extra_dev
    )


@dataclass
class Corpus:
    """What training reads: utterances of a train and a dev :class:`DataDir`."""

    train: DataDir
    train_ids: list[str]
    dev: DataDir
    dev_ids: list[str]
    #: More dev sets, by name: scored every epoch beside ``dev``, which alone drives
    #: model selection, the learning-rate schedule, early stopping and pruning.
    extra_dev: dict[str, DataDir] = field(default_factory=dict)

    @property
    def feat_dim(self) -> int:
        """Feature dimension (equal in train and dev)."""
        return self.train.feat_dim

    @property
    def token_symbols(self) -> list[str]:
        """Output symbols by id (CTC tokens with blank 0, utterance classes, or frame classes),
        then any regression dimensions (``dim:0`` ...; :func:`~stagetune.kaldi.regression_symbols`)."""
        if self.train.classes is not None:
            return list(self.train.classes)
        if self.train.tokens is not None:
            return list(self.train.tokens.symbols)
        dims = regression_symbols(self.train.target_dim)
        if self.train.labels is None:
            return dims
        num_classes = 1 + max(int(lab.max()) for lab in self.train.labels.values())
        return [str(i) for i in range(num_classes)] + dims

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
    warn: Callable[[str], None] | None = None,
    extra_dev: Sequence[str | Path] = (),
) -> Corpus:
    """Load and validate the training data and its dev data.

    Args:
        train_dir: Kaldi data dir to train on.
        dev_dir: Separate dev dir (tokens come from ``train_dir``).
        dev_proportion: Otherwise, hold out this proportion of ``train_dir``,
            chosen deterministically by utterance id.
        task: ``"ctc"``, ``"frame"`` or ``"utt"``.
        warn: Receives warnings about the data (dev targets training never
            shows), without the ``stagetune: warning:`` prefix; default stderr.
        extra_dev: More dev dirs, scored every epoch but never driving selection
            (:attr:`Corpus.extra_dev`, named by :func:`extra_dev_names`).

    Raises:
        DataError: When a data dir is malformed, every dev or every training
            transcript is empty, or a frame-task dev label is beyond the
            training classes (see :func:`check_targets`).
        UsageError: When both ``dev_dir`` and ``dev_proportion`` are given, or
            train and dev features differ in dimension.
    """
    if dev_dir is not None and dev_proportion is not None:
        raise UsageError("give a dev dir or --dev-proportion, not both")
    train = load_data_dir(train_dir, task=task)
    if dev_dir is not None:
        dev = load_data_dir(dev_dir, task=task, tokens=train.tokens, classes=train.classes)
        if dev.feat_dim != train.feat_dim:
            raise UsageError(
                f"{dev_dir}: features have dimension {dev.feat_dim} but {train_dir} has "
                f"{train.feat_dim}; compute both with the same `stagetune prep` options"
            )
        corpus = _with_dev_targets(Corpus(train, list(train.utt_ids), dev, list(dev.utt_ids)), str(dev_dir))
    else:
        train_ids, dev_ids = split_dev(train.utt_ids, 0.1 if dev_proportion is None else dev_proportion)
        corpus = _with_dev_targets(Corpus(train, train_ids, train, dev_ids), f"the dev split of {train_dir}")
    check_targets(corpus, warn or _warn_to_stderr)
    for name, path in extra_dev_names(extra_dev).items():
        extra = load_data_dir(path, task=task, tokens=train.tokens, classes=train.classes)
        if extra.feat_dim != train.feat_dim:
            raise UsageError(
                f"{path}: features have dimension {extra.feat_dim} but {train_dir} has "
                f"{train.feat_dim}; compute both with the same `stagetune prep` options"
            )
        corpus.extra_dev[name] = extra
    return corpus


def extra_dev_names(paths: Sequence[str | Path]) -> dict[str, Path]:
    """A name per extra dev dir (its last path component; more of the path where two agree).

    Raises:
        UsageError: The same dir is given twice.
    """
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"--extra-dev names the same dir twice: {', '.join(map(str, paths))}")
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return dict(zip(names, paths))
        depth += 1


def _warn_to_stderr(message: str) -> None:
    print(f"stagetune: warning: {message}", file=sys.stderr, flush=True)


def _with_dev_targets(corpus: Corpus, dev_name: str) -> Corpus:
    """``corpus``, once its dev set is known to have a reference to measure an error against."""
    if all(len(corpus.dev.targets(u)) == 0 for u in corpus.dev_ids):
        what = "transcripts are" if corpus.dev.labels is None else "label sequences are"
        raise DataError(
            f"{dev_name}: all {len(corpus.dev_ids)} {what} empty, so no dev error can be "
            f"measured; give a dev set with transcribed utterances"
        )
    return corpus


_EXAMPLES = 5


def _targets_in(data: DataDir, utt_ids: Sequence[str]) -> set[int]:
    """Every token id (or frame label) the utterances' targets use.

    One utterance at a time: a large corpus' frame labels need not fit in memory at once.
    """
    used: set[int] = set()
    for utt in utt_ids:
        used.update(np.unique(data.labels[utt] if data.labels is not None else data.targets(utt)).tolist())
    return used


def check_targets(corpus: Corpus, warn: Callable[[str], None]) -> None:
    """Training targets to learn from; dev targets training never shows are named.

    :func:`load_corpus` runs this; a hand-built :class:`Corpus` is not checked.
    Dev targets training never shows go to ``warn`` (the bare message, without
    ``stagetune: warning:``).

    Raises:
        DataError: When every training transcript is empty, (frame task) a dev
            label is beyond the classes the training labels define, or (regression)
            the dev targets have another dimension than the training ones.
    """
    if corpus.train.values is not None:
        train_dim, dev_dim = corpus.train.target_dim, corpus.dev.target_dim
        if dev_dim != train_dim:
            raise DataError(
                f"{corpus.dev.path}: dev regression targets have {dev_dim} dimensions but the training "
                f"targets of {corpus.train.path} have {train_dim}; give both the same targets"
            )
        if corpus.train.labels is None:
            return
    frame = corpus.train.labels is not None
    seen = _targets_in(corpus.train, corpus.train_ids)
    if not seen:
        what = "label sequences" if frame else "transcripts"
        raise DataError(
            f"{corpus.train.path}: all {len(corpus.train_ids)} training {what} are empty, so there "
            f"is nothing to learn; give training data with transcribed utterances"
        )
    unseen = sorted(_targets_in(corpus.dev, corpus.dev_ids) - seen)
    if not unseen:
        return
    symbols = [s for s in corpus.token_symbols if s not in regression_symbols(corpus.train.target_dim)]
    if frame:
        beyond = [label for label in unseen if label >= len(symbols)]
        if beyond:
            raise DataError(
                f"{corpus.dev.path}: {len(beyond)} dev labels ({', '.join(map(str, beyond[:_EXAMPLES]))}"
                f"{', ...' if len(beyond) > _EXAMPLES else ''}) are beyond the {len(symbols)} classes "
                f"0..{len(symbols) - 1} of the training labels; train on data with every class"
            )
    names = [str(i) if frame else repr(symbols[i]) for i in unseen]
    what, where = ("label", "training labels") if frame else ("token", "training transcripts")
    many = len(unseen) > 1
    warn(
        f"{len(unseen)} dev {what}{'s never occur' if many else ' never occurs'} in the {where} "
        f"({', '.join(names[:_EXAMPLES])}{', ...' if len(names) > _EXAMPLES else ''}); the model "
        f"cannot learn {'them' if many else 'it'}, so {'they count' if many else 'it counts'} as errors"
    )
