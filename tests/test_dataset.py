"""Tests for stagetune.dataset: items, collate, bucketing, dev split, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir

from stagetune.dataset import (
    TARGET_PAD,
    Batch,
    BucketBatchSampler,
    UtteranceDataset,
    collate,
    make_loader,
)
from stagetune.corpus import split_dev
from stagetune.errors import DataError
from stagetune.kaldi import load_data_dir
from stagetune.normalize import Normalizer

torch.set_num_threads(1)


def _padding(lengths: np.ndarray, batches: list[list[int]]) -> float:
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return (padded - sum(int(lengths[b].sum()) for b in batches)) / padded


@pytest.fixture
def partitioned_dir(tmp_path: Path) -> Path:
    feats, utt2spk = random_feats(num_utts=30, min_frames=3, max_frames=40)
    text = {u: [TINY_TOKENS[i % 5]] * (1 + i % 3) for i, u in enumerate(feats)}
    return write_data_dir(
        tmp_path / "parts", feats, text, utt2spk=utt2spk, cmvn=True, relative=True, parts=4
    )


# --- dataset and collate -------------------------------------------------------------


def test_items_are_feature_and_target_tensors(tiny_data_dir: Path) -> None:
    data = load_data_dir(tiny_data_dir)
    ids = data.utt_ids[3:8]
    dataset = UtteranceDataset(data, ids, normalizer=Normalizer("speaker"))
    assert len(dataset) == 5 and dataset.lengths == [data.num_frames[u] for u in ids]
    feats, targets, utt = dataset[2]
    assert utt == ids[2]
    assert feats.dtype == torch.float32 and feats.shape == (data.num_frames[utt], 8)
    mean, std = data.cmvn_of(utt)
    assert torch.equal(feats, torch.from_numpy((data.load_feats(utt) - mean) / std))
    assert targets.dtype == torch.long and targets.tolist() == data.targets(utt).tolist()
    raw, _, _ = UtteranceDataset(data, ids)[2]  # as stored by default
    assert torch.equal(raw, torch.from_numpy(data.load_feats(utt)))
    assert not torch.allclose(raw, feats)


def test_dataset_rejects_unknown_utterances(tiny_data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"1 utterances are not in .*'ghost'"):
        UtteranceDataset(load_data_dir(tiny_data_dir), ["ghost"])


def test_collate_pads_features_with_zeros_and_targets_with_minus_one() -> None:
    items = [
        (torch.ones(3, 2), torch.tensor([1, 2]), "a"),
        (torch.full((5, 2), 2.0), torch.tensor([3, 4, 5, 1]), "b"),
    ]
    batch = collate(items)
    assert batch.feats.shape == (2, 5, 2) and batch.targets.shape == (2, 4)
    assert batch.feat_lens.tolist() == [3, 5] and batch.target_lens.tolist() == [2, 4]
    assert torch.equal(batch.feats[0, :3], torch.ones(3, 2))
    assert torch.count_nonzero(batch.feats[0, 3:]) == 0
    assert batch.targets.tolist() == [[1, 2, TARGET_PAD, TARGET_PAD], [3, 4, 5, 1]]
    assert TARGET_PAD == -1 and batch.utt_ids == ["a", "b"]
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.feats, batch.feats)


# --- bucketing -----------------------------------------------------------------------


def test_bucketing_keeps_padding_under_ten_percent() -> None:
    lengths = np.random.default_rng(0).integers(50, 801, size=2000)
    sampler = BucketBatchSampler(lengths, 16, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sampler.padding_fraction() <= 0.10
        assert sampler.padding_fraction() == pytest.approx(_padding(lengths, list(sampler)))
    plain = np.random.default_rng(1).permutation(len(lengths))
    random_padding = _padding(lengths, [plain[i : i + 16].tolist() for i in range(0, 2000, 16)])
    assert random_padding > 0.3 and random_padding > 4 * sampler.padding_fraction()


def test_sampler_is_deterministic_per_seed_and_epoch() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=300)

    def batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(lengths, 8, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 4) == batches(0, 4)
    assert batches(0, 4) != batches(0, 5)
    assert batches(0, 4) != batches(1, 4)
    # jitter changes batch composition, not only batch order, across epochs
    assert {tuple(sorted(b)) for b in batches(0, 4)} != {tuple(sorted(b)) for b in batches(0, 5)}


@pytest.mark.parametrize("parts", [None, [list(range(0, 101, 2)), list(range(1, 101, 2))]])
def test_every_index_once_per_epoch(parts: list[list[int]] | None) -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=101)
    sampler = BucketBatchSampler(lengths, 8, seed=7, parts=parts)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(101))
        assert all(1 <= len(b) <= 8 for b in batches)


def test_drop_last_keeps_full_batches_and_drops_different_items() -> None:
    sampler = BucketBatchSampler(list(range(1, 38)), 8, seed=0, drop_last=True)
    used = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert len(batches) == len(sampler) == 4 and all(len(b) == 8 for b in batches)
        assert len(set(flat)) == 32
        used.append(frozenset(flat))
    assert len(set(used)) > 1 and frozenset().union(*used) == frozenset(range(37))


def test_no_shuffle_is_sorted_by_length_every_epoch() -> None:
    lengths = [5, 3, 9, 1, 7, 3, 8]
    sampler = BucketBatchSampler(lengths, 3, shuffle=False)
    first = list(sampler)
    assert first == [[3, 1, 5], [0, 4, 6], [2]]
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_parts_are_not_mixed_and_come_one_at_a_time() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=60)
    parts = [list(range(k, 60, 4)) for k in range(4)]
    part_of = {i: k for k, p in enumerate(parts) for i in p}
    sampler = BucketBatchSampler(lengths, 4, seed=1, parts=parts)
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        sequence = []
        for batch in sampler:
            (k,) = {part_of[i] for i in batch}
            if not sequence or sequence[-1] != k:
                sequence.append(k)
        assert sorted(sequence) == [0, 1, 2, 3]  # each part visited in one stretch
        orders.add(tuple(sequence))
    assert len(orders) > 1


def test_parts_must_cover_every_index_once() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        BucketBatchSampler([1, 2, 3], 2, parts=[[0, 1], [1, 2]])


# --- dev split -----------------------------------------------------------------------


def test_split_dev_is_deterministic_and_order_independent() -> None:
    ids = [f"utt{i:04d}" for i in range(1000)]
    train, dev = split_dev(ids, 0.1)
    assert sorted(train + dev) == ids and not set(train) & set(dev)
    assert 60 <= len(dev) <= 140
    assert (train, dev) == split_dev(list(ids), 0.1)
    rtrain, rdev = split_dev(ids[::-1], 0.1)
    assert set(rdev) == set(dev) and set(rtrain) == set(train)


def test_split_dev_is_stable_when_ids_are_added() -> None:
    ids = [f"utt{i:04d}" for i in range(500)]
    _, dev = split_dev(ids, 0.2)
    _, bigger_dev = split_dev(ids + [f"new{i}" for i in range(500)], 0.2)
    assert set(bigger_dev) & set(ids) == set(dev)


@pytest.mark.parametrize("proportion", [1.5, 0.0, 1.0, -0.1])
def test_split_dev_proportion_must_be_in_open_unit_interval(proportion: float) -> None:
    with pytest.raises(DataError, match=rf"dev proportion must be in \(0, 1\), got {proportion}"):
        split_dev(["a", "b"], proportion)


def test_split_dev_refuses_empty_side() -> None:
    with pytest.raises(DataError, match="of 3 utterances leaves the dev set empty; raise"):
        split_dev(["a", "b", "c"], 1e-9)
    with pytest.raises(DataError, match="of 1 utterances leaves the train set empty; lower"):
        split_dev(["a"], 1 - 1e-12)


# --- loaders -------------------------------------------------------------------------


def _epoch(loader: torch.utils.data.DataLoader, epoch: int) -> list[Batch]:
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def test_loader_with_workers_yields_the_same_batches(partitioned_dir: Path) -> None:
    data = load_data_dir(partitioned_dir)
    kwargs = dict(batch_size=4, shuffle=True, seed=5)
    inline = make_loader(data, data.utt_ids, num_workers=0, **kwargs)
    workers = make_loader(data, data.utt_ids, num_workers=2, **kwargs)
    for epoch in (0, 1):
        expected, got = _epoch(inline, epoch), _epoch(workers, epoch)
        assert [b.utt_ids for b in got] == [b.utt_ids for b in expected]
        for a, b in zip(got, expected):
            assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4]))


def test_loader_batches_follow_scp_parts(partitioned_dir: Path) -> None:
    data = load_data_dir(partitioned_dir)
    part_of = {u: k for k, part in enumerate(data.parts) for u in part}
    loader = make_loader(data, data.utt_ids, batch_size=3, shuffle=True)
    batches = _epoch(loader, 0)
    sequence = []
    for batch in batches:
        (k,) = {part_of[u] for u in batch.utt_ids}
        if not sequence or sequence[-1] != k:
            sequence.append(k)
    assert sorted(sequence) == list(range(len(data.parts)))
    assert sorted(u for b in batches for u in b.utt_ids) == data.utt_ids
    assert loader.batch_sampler.padding_fraction() < 0.5


def test_loader_on_frame_task_pads_labels(tiny_frame_data_dir: Path) -> None:
    data = load_data_dir(tiny_frame_data_dir, task="frame")
    train, dev = split_dev(data.utt_ids, 0.3)
    loader = make_loader(data, dev, batch_size=4, shuffle=False)
    for batch in loader:
        assert torch.equal(batch.target_lens, batch.feat_lens)
        assert batch.targets.shape == batch.feats.shape[:2]
        for b, utt in enumerate(batch.utt_ids):
            n = data.num_frames[utt]
            assert batch.targets[b, :n].tolist() == data.targets(utt).tolist()
            assert (batch.targets[b, n:] == TARGET_PAD).all()


def test_sortagrad_epochs_come_shortest_first_then_shuffled() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=200)
    sampler = BucketBatchSampler(lengths, 8, seed=2, jitter=0.0, ascending_epochs=2)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        longest = [int(lengths[b].max()) for b in sampler]
        assert longest == sorted(longest)
        assert sorted(i for b in sampler for i in b) == list(range(200))
    sampler.set_epoch(3)
    longest = [int(lengths[b].max()) for b in sampler]
    assert longest != sorted(longest)
    # ascending_epochs=0 (the default) never sorts, epoch 0 included
    plain = BucketBatchSampler(lengths, 8, seed=2, jitter=0.0)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        assert [int(lengths[b].max()) for b in plain] != sorted(int(lengths[b].max()) for b in plain)
