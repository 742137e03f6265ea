"""Checkpoints and model files (``stagetune.checkpoint``)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir

from stagetune.checkpoint import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    atomic_save,
    data_change,
    data_identity,
    load_checkpoint,
    load_model_file,
    previous_path,
    rng_state,
    save_model_file,
    set_rng_state,
    versions,
)
from stagetune.config import load_config
from stagetune.corpus import load_corpus
from stagetune.errors import StagetuneError


def test_atomic_save_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "x.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]


def test_failed_save_keeps_the_old_file_and_leaves_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"a": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save({"unpicklable": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_rng_state_round_trip_restores_every_generator() -> None:
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_rng_state_survives_a_save(tmp_path: Path) -> None:
    atomic_save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = torch.rand(5)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=False)["rng"])
    assert torch.equal(torch.rand(5), expected)


def test_model_file_round_trip(tmp_path: Path) -> None:
    config = load_config([], ["model.recurrent_size=17", "training.seed=3"])
    weights = {"w": torch.randn(2, 3, requires_grad=True), "b": torch.zeros(2)}
    save_model_file(
        tmp_path / "model.pt", state_dict=weights, config=config, feat_dim=40,
        tokens=["<blank>", "a", "b"], extra={"best_epoch": 4},
    )
    loaded = load_model_file(tmp_path / "model.pt")
    assert loaded.config == config
    assert loaded.feat_dim == 40
    assert loaded.tokens == ["<blank>", "a", "b"]
    assert loaded.extra["best_epoch"] == 4
    assert loaded.extra["format"] == MODEL_FORMAT
    assert loaded.extra["versions"] == versions()
    assert loaded.state_dict.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(loaded.state_dict[name], tensor.detach())
        assert not loaded.state_dict[name].requires_grad


def test_versions_name_stagetune_torch_and_python() -> None:
    assert set(versions()) == {"stagetune", "torch", "python"}
    assert versions()["torch"] == torch.__version__


def test_load_checkpoint_reads_what_training_writes(tmp_path: Path) -> None:
    atomic_save({"format": CHECKPOINT_FORMAT, "epoch": 2}, tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("loader", [load_checkpoint, load_model_file])
def test_missing_file_is_a_clear_error(tmp_path: Path, loader) -> None:
    with pytest.raises(StagetuneError, match="no such"):
        loader(tmp_path / "none.pt")


@pytest.mark.parametrize("loader", [load_checkpoint, load_model_file])
def test_corrupt_file_is_a_clear_error(tmp_path: Path, loader) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"format": CHECKPOINT_FORMAT, "w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StagetuneError, match=r"x\.pt: cannot read"):
        loader(path)


def _ckpt(epoch: int) -> dict:
    return {"format": CHECKPOINT_FORMAT, "state": {"epoch": epoch}, "w": torch.full((256,), float(epoch))}


def test_keep_previous_links_the_replaced_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save(_ckpt(1), path, keep_previous=True)
    assert not previous_path(path).exists()  # nothing replaced yet
    atomic_save(_ckpt(2), path, keep_previous=True)
    atomic_save(_ckpt(3), path, keep_previous=True)
    assert previous_path(path).name == "checkpoint.pt.prev"
    assert load_checkpoint(path)["state"]["epoch"] == 3
    assert load_checkpoint(previous_path(path))["state"]["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.prev"]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save(_ckpt(4), path, keep_previous=True)
    atomic_save(_ckpt(5), path, keep_previous=True)
    path.write_bytes(path.read_bytes()[:300])  # a full disk or a crash outside the atomic write
    warnings: list[str] = []
    assert load_checkpoint(path, warnings.append)["state"]["epoch"] == 4
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "checkpoint.pt: cannot read checkpoint" in warnings[0]
    assert "resuming from the previous checkpoint checkpoint.pt.prev (epoch 4)" in warnings[0]


def test_no_fallback_when_both_are_bad_when_the_file_is_gone_or_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save(_ckpt(1), path, keep_previous=True)
    atomic_save(_ckpt(2), path, keep_previous=True)
    for bad in (path, previous_path(path)):
        bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(StagetuneError, match=r"checkpoint\.pt: cannot read"):  # the newer one's error
        load_checkpoint(path, lambda _m: None)
    path.unlink()  # removed on purpose (to start over): never resume the older one
    atomic_save(_ckpt(1), previous_path(path))
    with pytest.raises(StagetuneError, match="no such"):
        load_checkpoint(path)
    atomic_save(_ckpt(1), path, keep_previous=True)  # a new run's first save drops the stale one
    assert not previous_path(path).exists()


def test_checkpoint_and_model_file_are_not_interchangeable(tmp_path: Path) -> None:
    save_model_file(tmp_path / "model.pt", state_dict={}, config=load_config(), feat_dim=1, tokens=["0"])
    atomic_save({"format": CHECKPOINT_FORMAT}, tmp_path / "checkpoint.pt")
    with pytest.raises(StagetuneError, match="not a stagetune training checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    with pytest.raises(StagetuneError, match="pass the model.pt that `stagetune train` wrote"):
        load_model_file(tmp_path / "checkpoint.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(StagetuneError, match="not a stagetune model file"):
        load_model_file(tmp_path / "list.pt")


def _subset_dir(path: Path, source_seed: int, keep: slice) -> Path:
    """A CTC data dir holding some of :func:`random_feats`' utterances."""
    feats, utt2spk = random_feats(seed=source_seed)
    chosen = list(feats)[keep]
    text = {u: list(TINY_TOKENS[: 1 + i % 5]) for i, u in enumerate(chosen)}
    return write_data_dir(path, {u: feats[u] for u in chosen}, text, tokens=TINY_TOKENS)


def test_data_identity_follows_the_utterances_not_the_path(tmp_path: Path, tiny_data_dir: Path) -> None:
    same = data_identity(load_corpus(tiny_data_dir, dev_proportion=0.3))
    assert data_change(same, data_identity(load_corpus(tiny_data_dir, dev_proportion=0.3)), "c") is None
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data_dir, moved)
    assert data_change(same, data_identity(load_corpus(moved, dev_proportion=0.3)), "c") is None
    train = same["train"]
    assert train["dir"] == str(tiny_data_dir) and 0 < train["utterances"] < 12
    other_split = data_identity(load_corpus(tiny_data_dir, dev_proportion=0.6))["train"]
    assert data_change(same, data_identity(load_corpus(tiny_data_dir, dev_proportion=0.6)), "c") == (
        f"checkpoint c was trained on {train['utterances']} utterances of {tiny_data_dir} (hash "
        f"{train['hash'][:8]}), this data has {other_split['utterances']} (hash {other_split['hash'][:8]})"
    )


def test_data_identity_tells_dev_sets_apart(tmp_path: Path, tiny_data_dir: Path) -> None:
    dev_a, dev_b = _subset_dir(tmp_path / "a", 5, slice(0, 6)), _subset_dir(tmp_path / "b", 5, slice(0, 5))
    stored = data_identity(load_corpus(tiny_data_dir, dev_a))
    current = data_identity(load_corpus(tiny_data_dir, dev_b))
    assert stored["train"] == current["train"]
    assert data_change(stored, current, "c") == (
        f"checkpoint c was validated on 6 dev utterances of {dev_a} (hash {stored['dev']['hash'][:8]}), "
        f"this data has 5 of {dev_b} (hash {current['dev']['hash'][:8]})"
    )
