"""PyTorch data pipeline over a :class:`~stagetune.kaldi.DataDir`.

* :class:`UtteranceDataset` reads one utterance's features and targets on demand.
* :class:`BucketBatchSampler` groups utterances of similar length so little of a
  batch is padding, reshuffles deterministically per ``(seed, epoch)``, and for a
  partitioned (scp of scp) directory yields all batches of one part before the
  next, never mixing parts.
* :func:`collate` pads a list of items into a :class:`Batch`.
* :func:`make_loader` puts these together into a ``DataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stagetune.errors import DataError
from stagetune.kaldi import DataDir
from stagetune.normalize import Normalizer

__all__ = [
    "TARGET_PAD",
    "UtteranceDataset",
    "Batch",
    "collate",
    "BucketBatchSampler",
    "make_loader",
]

TARGET_PAD = -1
"""Padding value of :attr:`Batch.targets`; never a valid token id or label, and the
``ignore_index`` to give ``CrossEntropyLoss`` for frame targets."""

Item = tuple[torch.Tensor, torch.Tensor, str]


class UtteranceDataset(Dataset[Item]):
    """Utterances of a data directory, read lazily.

    Item ``i`` is ``(feats, targets, utt_id)``: float32 features (T, F) and int64
    targets, token ids (U,) for CTC or frame labels (T,); float32 targets (T, D)
    for regression and (T, 1 + D) for multitask (:meth:`DataDir.targets`).

    Args:
        data: The loaded data directory.
        utt_ids: The utterances to serve, in index order.
        normalizer: How features are normalised (see :func:`~stagetune.normalize.fit_normalizer`);
            default: as stored.

    Attributes:
        lengths: Frames T per item, from ``data.num_frames``.

    Raises:
        DataError: For unknown utterances, or data the normalizer cannot apply to
            (``speaker`` without ``cmvn.scp``, statistics of another dimension).
    """

    def __init__(
        self, data: DataDir, utt_ids: Sequence[str], *, normalizer: Normalizer | None = None
    ) -> None:
        unknown = [u for u in utt_ids if u not in data.num_frames]
        if unknown:
            raise DataError(
                f"{len(unknown)} utterances are not in {data.path}, e.g. {unknown[0]!r}; "
                "pass ids from that data directory"
            )
        self.normalizer = normalizer or Normalizer("none")
        self.normalizer.check(data)
        self.data = data
        self.utt_ids = list(utt_ids)
        self.lengths: list[int] = [data.num_frames[u] for u in self.utt_ids]

    def __len__(self) -> int:
        return len(self.utt_ids)

    def __getitem__(self, index: int) -> Item:
        utt = self.utt_ids[index]
        feats = torch.from_numpy(self.normalizer(self.data, utt, self.data.load_feats(utt)))
        raw = self.data.targets(utt)
        dtype = torch.float32 if np.issubdtype(raw.dtype, np.floating) else torch.long
        targets = torch.tensor(raw, dtype=dtype)
        return feats, targets, utt

    def part_indices(self) -> list[list[int]]:
        """Item indices per scp part of the data directory (empty parts dropped)."""
        index = {u: i for i, u in enumerate(self.utt_ids)}
        parts = [[index[u] for u in part if u in index] for part in self.data.parts]
        return [p for p in parts if p]


class Batch(NamedTuple):
    """A padded batch.

    Attributes:
        feats: float32 (B, T, F), zero padded after each utterance's frames.
        feat_lens: int64 (B,), frames per utterance.
        targets: int64 (B, U), padded with :data:`TARGET_PAD` (-1); U = max target
            length (for frame targets U = T).  Float targets (regression,
            multitask) are float32 (B, T, D), padded with 0: ``target_lens``
            says which rows are real.
        target_lens: int64 (B,), targets per utterance.
        utt_ids: The B utterance ids.
    """

    feats: torch.Tensor
    feat_lens: torch.Tensor
    targets: torch.Tensor
    target_lens: torch.Tensor
    utt_ids: list[str]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Move the tensors to ``device``."""
        return Batch(
            self.feats.to(device, non_blocking=non_blocking),
            self.feat_lens.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.target_lens.to(device, non_blocking=non_blocking),
            self.utt_ids,
        )


def collate(items: Sequence[Item]) -> Batch:
    """Pad ``(feats (T, F), targets (U, ...), utt_id)`` items into a :class:`Batch`.

    Integer targets are padded with :data:`TARGET_PAD`, float targets (with
    their trailing dimensions kept) with 0.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    feat_lens = torch.tensor([f.shape[0] for f, _, _ in items], dtype=torch.long)
    target_lens = torch.tensor([t.shape[0] for _, t, _ in items], dtype=torch.long)
    feats = items[0][0].new_zeros((len(items), int(feat_lens.max()), items[0][0].shape[1]))
    first = items[0][1]
    shape = (len(items), int(target_lens.max()), *first.shape[1:])
    if first.is_floating_point():
        targets = torch.zeros(shape, dtype=first.dtype)
    else:
        targets = torch.full(shape, TARGET_PAD, dtype=torch.long)
    for b, (f, t, _) in enumerate(items):
        feats[b, : f.shape[0]] = f
        targets[b, : t.shape[0]] = t
    return Batch(feats, feat_lens, targets, target_lens, [u for _, _, u in items])


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches, reshuffled deterministically each epoch.

    With ``shuffle``: within each part, items are sorted by length times a random
    factor in ``[1, 1 + jitter]`` and cut into batches, and the batch order is
    shuffled; parts come one after another in a shuffled order. The jitter varies
    batch composition across epochs at the cost of a little padding. Without
    ``shuffle``: sorted by length (ties by index), parts in their given order.

    Args:
        lengths: Frames per item.
        batch_size: Items per batch.
        shuffle: Randomise batch composition and order per epoch.
        seed: Base seed; the order depends only on ``(seed, epoch)``.
        drop_last: Drop items so every batch is full (with ``shuffle``, a random
            ``len(part) % batch_size`` items per part and epoch, so no utterance is
            always left out).
        jitter: Relative length noise for bucketing; 0 sorts strictly.
        parts: Item indices per part (each index exactly once); batches never mix
            parts and a part's batches are contiguous. Default: one part.
        ascending_epochs: With ``shuffle``, epochs ``1..ascending_epochs`` take each
            part's batches shortest first (SortaGrad, Amodei et al. 2016: short
            utterances are easier to align, which shortens CTC's all-blank start);
            batch composition is still drawn per epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        jitter: float = 0.1,
        parts: Sequence[Sequence[int]] | None = None,
        ascending_epochs: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        n = len(self.lengths)
        parts = [list(range(n))] if parts is None else [list(p) for p in parts]
        flat = sorted(i for p in parts for i in p)
        if flat != list(range(n)):
            raise ValueError(f"parts must hold each index 0..{n - 1} exactly once")
        self.parts = [np.asarray(p, dtype=np.int64) for p in parts if p]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.jitter = drop_last, jitter
        self.ascending_epochs = ascending_epochs
        self.epoch = 0
        self._batches: list[list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        if epoch != self.epoch:
            self.epoch, self._batches = epoch, None

    def _part_batches(self, part: np.ndarray, rng: np.random.Generator | None) -> list[list[int]]:
        bs = self.batch_size
        if rng is None:
            order = part[np.argsort(self.lengths[part], kind="stable")]
            cut = len(order) - len(order) % bs if self.drop_last else len(order)
            return [order[i : i + bs].tolist() for i in range(0, cut, bs)]
        if self.drop_last and len(part) % bs:
            part = rng.choice(part, size=len(part) - len(part) % bs, replace=False)
        keys = self.lengths[part] * rng.uniform(1.0, 1.0 + self.jitter, size=len(part))
        order = part[np.argsort(keys, kind="stable")]
        batches = [order[i : i + bs].tolist() for i in range(0, len(order), bs)]
        if self.ascending_epochs and self.epoch <= self.ascending_epochs:
            return batches  # cut from the length order: shortest first
        return [batches[i] for i in rng.permutation(len(batches))]

    def batches(self) -> list[list[int]]:
        """The batches (lists of item indices) of the current epoch, in order."""
        if self._batches is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                part_order = rng.permutation(len(self.parts))
            else:
                rng, part_order = None, range(len(self.parts))
            self._batches = [b for k in part_order for b in self._part_batches(self.parts[k], rng)]
        return self._batches

    def padding_fraction(self) -> float:
        """Padded frames / all frames of the padded (B, T) batches of the current epoch."""
        padded = real = 0
        for batch in self.batches():
            lens = self.lengths[batch]
            padded += int(lens.max()) * len(lens)
            real += int(lens.sum())
        return (padded - real) / padded if padded else 0.0

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(p) // self.batch_size for p in self.parts)
        return sum(-(-len(p) // self.batch_size) for p in self.parts)


def make_loader(
    data: DataDir,
    utt_ids: Sequence[str],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    normalizer: Normalizer | None = None,
    drop_last: bool = False,
    jitter: float = 0.1,
) -> DataLoader:
    """A ``DataLoader`` of :class:`Batch` using :class:`BucketBatchSampler`.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch;
    ``loader.batch_sampler.padding_fraction()`` reports the padding.

    Args:
        data: The loaded data directory.
        utt_ids: Utterances to load (e.g. one side of :func:`split_dev`).
        batch_size: Utterances per batch.
        shuffle: Reshuffle per epoch (training); else sorted by length.
        seed: Base seed of the batch order.
        num_workers: Reader processes (kept alive across epochs); 0 reads inline.
        normalizer: How features are normalised; default: as stored.
        drop_last: Keep only full batches.
        jitter: Relative length noise for bucketing.
    """
    dataset = UtteranceDataset(data, utt_ids, normalizer=normalizer)
    sampler = BucketBatchSampler(
        dataset.lengths, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
        jitter=jitter, parts=dataset.part_indices() if data.partitioned else None,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
