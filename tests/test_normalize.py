"""Tests for stagetune.normalize on real Kaldi ark/scp files, through training and evaluate."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import write_data_dir

import stagetune.normalize as normalize
from stagetune.checkpoint import load_checkpoint, load_model_file
from stagetune.cli import main
from stagetune.config import NORMALIZATIONS, from_dict, load_config, parse_ini_text
from stagetune.corpus import load_corpus
from stagetune.errors import DataError
from stagetune.evaluate import evaluate_model
from stagetune.kaldi import load_data_dir
from stagetune.model import build_model
from stagetune.tasks import TASKS
from stagetune.normalize import (
    MODES,
    Normalizer,
    fit_normalizer,
    global_stats,
    resolve_mode,
    stored_normalizer,
)
from stagetune.training import fit

torch.set_num_threads(1)

#: A tiny frame-task model: its per-frame outputs show what features it was given.
SETTINGS = (
    "model.task=frame",
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=16",
    "training.num_epochs=1",
    "data.batch_size=4",
)


def mfcc_like(num_utts: int, *, seed: int = 0, shift: float = 0.0) -> dict[str, np.ndarray]:
    """13-dim features like raw MFCCs: c0 has mean 9 and std 3, the others std 0.1-0.8."""
    rng = np.random.default_rng(seed)
    scales = np.array([3.0, *np.linspace(0.8, 0.1, 12)])
    means = np.array([9.0, *rng.normal(0.0, 0.5, 12)])
    return {
        f"spk{i % 3}-u{seed}{i:03d}": (
            means + shift + scales * rng.standard_normal((int(rng.integers(20, 41)), 13))
        ).astype(np.float32)
        for i in range(num_utts)
    }


def write_frame_dir(path: Path, feats: dict[str, np.ndarray], *, cmvn: bool = False) -> Path:
    """A ``frame`` task dir whose labels follow c0, so a model has something to learn."""
    labels = {u: np.digitize(m[:, 0], [6.0, 9.0, 12.0]).tolist() for u, m in feats.items()}
    utt2spk = {u: u.split("-")[0] for u in feats}
    return write_data_dir(path, feats, utt2spk=utt2spk, utt2label=labels, cmvn=cmvn)


def numpy_stats(data_dir: Path, utt_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = load_data_dir(data_dir, task="frame")
    frames = np.concatenate([data.load_feats(u) for u in utt_ids]).astype(np.float64)
    return frames.mean(axis=0), frames.std(axis=0)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every matrix the statistics computation reads."""
    seen: list[str] = []
    real = normalize.iter_matrices

    def counting(items):
        for key, spec, where in items:
            seen.append(spec)
            yield from real([(key, spec, where)])

    monkeypatch.setattr(normalize, "iter_matrices", counting)
    return seen


# --- modes ---------------------------------------------------------------------------


def test_modes_match_config_choices() -> None:
    assert set(NORMALIZATIONS) == {"auto", *MODES}


def test_auto_picks_speaker_with_cmvn_and_global_without(tmp_path: Path) -> None:
    feats = mfcc_like(6)
    with_cmvn = load_data_dir(write_frame_dir(tmp_path / "a", feats, cmvn=True), task="frame")
    without = load_data_dir(write_frame_dir(tmp_path / "b", feats), task="frame")
    assert resolve_mode("auto", with_cmvn) == "speaker"
    assert resolve_mode("auto", without) == "global"
    assert fit_normalizer("auto", without, without.utt_ids).mode == "global"
    assert fit_normalizer("auto", with_cmvn, with_cmvn.utt_ids).mode == "speaker"
    for mode in ("none", "utterance", "global"):
        assert resolve_mode(mode, with_cmvn) == mode


def test_speaker_without_cmvn_names_the_dir_and_the_fix(tmp_path: Path) -> None:
    data = load_data_dir(write_frame_dir(tmp_path / "d", mfcc_like(4)), task="frame")
    with pytest.raises(DataError) as info:
        resolve_mode("speaker", data)
    message = str(info.value)
    assert f"{tmp_path / 'd' / 'cmvn.scp'} is missing" in message
    assert "compute_cmvn_stats.sh" in message and "data.normalization to global" in message
    assert "\n" not in message


def test_utterance_mode_normalises_each_utterance_by_itself(tmp_path: Path) -> None:
    data = load_data_dir(write_frame_dir(tmp_path / "d", mfcc_like(4)), task="frame")
    for utt in data.utt_ids:
        out = Normalizer("utterance")(data, utt, data.load_feats(utt)).astype(np.float64)
        np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-4)


def test_normalizer_survives_pickle_and_dict() -> None:
    norm = Normalizer("global", np.arange(3, dtype=np.float32) / 7, np.ones(3, np.float32) * 1.5)
    for copy in (pickle.loads(pickle.dumps(norm)), Normalizer.from_dict(norm.to_dict())):
        assert copy.mode == "global"
        assert np.array_equal(copy.mean, norm.mean) and np.array_equal(copy.std, norm.std)
    assert Normalizer.from_dict(Normalizer("speaker").to_dict()).mean is None


# --- global statistics ---------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 3])
def test_global_stats_equal_numpy_over_the_train_utterances(tmp_path: Path, parts: int) -> None:
    feats = mfcc_like(30)
    d = write_data_dir(tmp_path / "d", feats, {u: ["A"] for u in feats}, parts=parts)
    corpus = load_corpus(d, dev_proportion=0.3)
    stats = global_stats(corpus.train, corpus.train_ids)
    data = corpus.train
    frames = np.concatenate([data.load_feats(u) for u in corpus.train_ids]).astype(np.float64)
    np.testing.assert_allclose(stats.mean, frames.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.std, frames.std(axis=0), rtol=1e-6)
    assert stats.num_frames == len(frames) and stats.mean.dtype == np.float32
    # Dev utterances are left out: the statistics of all utterances differ.
    everything = np.concatenate([data.load_feats(u) for u in data.utt_ids]).astype(np.float64)
    assert not np.allclose(stats.mean, everything.mean(axis=0), rtol=1e-6, atol=1e-6)
    # And they normalise the training frames.
    norm = Normalizer("global", stats.mean, stats.std)
    normed = np.concatenate([norm(data, u, data.load_feats(u)) for u in corpus.train_ids])
    np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed.std(axis=0), 1.0, atol=1e-4)


def test_a_constant_dimension_is_floored_not_divided_by_zero(tmp_path: Path) -> None:
    feats = mfcc_like(5)
    for mat in feats.values():
        mat[:, 4] = 1000.0
    data = load_data_dir(write_frame_dir(tmp_path / "d", feats), task="frame")
    stats = global_stats(data, data.utt_ids)
    assert stats.std[4] == pytest.approx(1e-5 * 1000.0)
    utt = data.utt_ids[0]
    normed = Normalizer("global", stats.mean, stats.std)(data, utt, data.load_feats(utt))
    assert np.all(normed[:, 4] == 0.0) and np.isfinite(normed).all()


def test_cache_is_reused_then_invalidated_when_features_change(
    tmp_path: Path, reads: list[str]
) -> None:
    d = write_frame_dir(tmp_path / "d", mfcc_like(8))
    data = load_data_dir(d, task="frame")
    first = global_stats(data, data.utt_ids)
    assert not first.cached and len(reads) == 8
    assert first.path is not None and first.path.parent == d / ".stagetune"
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]  # no temp files left

    again = global_stats(load_data_dir(d, task="frame"), data.utt_ids)
    assert again.cached and len(reads) == 8  # not a single matrix read again
    assert np.array_equal(again.mean, first.mean) and np.array_equal(again.std, first.std)

    # Another utterance list is another key.
    subset = global_stats(data, data.utt_ids[:5])
    assert not subset.cached and subset.path != first.path

    # New features with the same shapes: feats.scp is byte-identical, the ark is not.
    scp = (d / "feats.scp").read_text()
    write_frame_dir(d, mfcc_like(8, shift=2.0))
    assert (d / "feats.scp").read_text() == scp
    ark = d / "feats.ark"
    st = ark.stat()  # a rewrite a second later (not within one timestamp tick)
    os.utime(ark, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    before = len(reads)
    changed = global_stats(load_data_dir(d, task="frame"), data.utt_ids)
    assert not changed.cached and len(reads) == before + 8
    np.testing.assert_allclose(changed.mean, numpy_stats(d, data.utt_ids)[0], rtol=1e-6)


def test_unwritable_data_dir_caches_under_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = write_frame_dir(tmp_path / "d", mfcc_like(4))
    (d / ".stagetune").write_text("not a directory")  # works as root too, unlike chmod
    data = load_data_dir(d, task="frame")
    first = global_stats(data, data.utt_ids)
    assert first.path is not None and first.path.parent == tmp_path / "xdg" / "stagetune"
    assert global_stats(data, data.utt_ids).cached and len(reads) == 4


def test_a_damaged_cache_file_is_recomputed_and_replaced(tmp_path: Path) -> None:
    d = write_frame_dir(tmp_path / "d", mfcc_like(4))
    data = load_data_dir(d, task="frame")
    first = global_stats(data, data.utt_ids)
    first.path.write_bytes(b"PK\x03\x04 truncated")
    second = global_stats(data, data.utt_ids)
    assert not second.cached and np.array_equal(second.mean, first.mean)
    assert global_stats(data, data.utt_ids).cached


def test_concurrent_workers_agree_and_leave_one_whole_file(tmp_path: Path) -> None:
    d = write_frame_dir(tmp_path / "d", mfcc_like(20))
    data = load_data_dir(d, task="frame")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: global_stats(data, data.utt_ids), range(8)))
    assert all(np.array_equal(r.mean, results[0].mean) for r in results)
    assert len(list((d / ".stagetune").iterdir())) == 1
    assert global_stats(data, data.utt_ids).cached


# --- configuration -------------------------------------------------------------------


def test_old_apply_cmvn_configs_still_read() -> None:
    assert parse_ini_text("[data]\napply_cmvn = false\n", "old.ini").data.normalization == "none"
    assert parse_ini_text("[data]\napply_cmvn = true\n", "old.ini").data.normalization == "auto"
    assert load_config([], ["data.apply_cmvn=no"]).data.normalization == "none"
    assert from_dict({"data": {"apply_cmvn": True}}).data.normalization == "auto"
    assert load_config([], ["data.normalization=utterance"]).data.normalization == "utterance"


# --- training and evaluate -----------------------------------------------------------


def _greedy_frames(
    model_path: Path, data_dir: Path, mean: np.ndarray, std: np.ndarray
) -> dict[str, list[int]]:
    """Per-frame classes of the model on features normalised with ``mean``/``std``, in numpy."""
    mf = load_model_file(model_path)
    model = build_model(mf.config, mf.feat_dim, TASKS["frame"].num_outputs(len(mf.tokens)))
    model.load_state_dict(mf.state_dict)
    model.eval()
    data = load_data_dir(data_dir, task="frame")
    out = {}
    with torch.no_grad():
        for utt in data.utt_ids:
            x = ((data.load_feats(utt) - mean) / std).astype(np.float32)
            logits, lens = model(torch.from_numpy(x)[None], torch.tensor([len(x)]))
            out[utt] = TASKS["frame"].decode(logits, lens)[0]
    return out


def test_evaluate_without_cmvn_uses_the_training_statistics_from_model_pt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_dir = write_frame_dir(tmp_path / "train", mfcc_like(24))
    corpus = load_corpus(train_dir, dev_proportion=0.25, task="frame")
    lines: list[str] = []
    result = fit(load_config([], SETTINGS), corpus, tmp_path / "model", device="cpu", quiet=True,
                 log=lines.append)
    assert lines[0].startswith("global normalisation: statistics of ")

    # model.pt (and the checkpoint) carry the statistics of the training part only.
    mean, std = numpy_stats(train_dir, corpus.train_ids)
    stored = load_model_file(result.model_path).extra["normalization"]
    assert stored["mode"] == "global"
    np.testing.assert_allclose(stored["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(stored["std"], std, rtol=1e-6)
    assert load_checkpoint(tmp_path / "model" / "checkpoint.pt")["normalization"] == stored

    # A test dir from a shifted distribution, without cmvn.scp: evaluate must not
    # recompute statistics on it (that would remove the shift), but use model.pt's.
    test_dir = write_frame_dir(tmp_path / "test", mfcc_like(6, seed=1, shift=4.0))
    monkeypatch.setattr(normalize, "_compute", lambda *a: pytest.fail("statistics recomputed"))
    hyps = evaluate_model(result.model_path, test_dir, device=torch.device("cpu")).hypotheses
    train_stats = np.array(stored["mean"]), np.array(stored["std"])
    expected = _greedy_frames(result.model_path, test_dir, *train_stats)
    assert {u: [int(s) for s in h] for u, h in hyps.items()} == expected
    own = numpy_stats(test_dir, sorted(expected))
    assert _greedy_frames(result.model_path, test_dir, *own) != expected  # the test can fail


def test_resuming_uses_the_checkpoints_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_dir = write_frame_dir(tmp_path / "train", mfcc_like(12))
    corpus = load_corpus(train_dir, dev_proportion=0.25, task="frame")
    fit(load_config([], SETTINGS), corpus, tmp_path / "model", device="cpu", quiet=True)
    carried = load_checkpoint(tmp_path / "model" / "checkpoint.pt")["normalization"]
    assert carried["mode"] == "global"
    for cached in (train_dir / ".stagetune").iterdir():
        cached.unlink()
    monkeypatch.setattr(normalize, "_compute", lambda *a: pytest.fail("statistics recomputed"))
    config = load_config([], [*SETTINGS, "training.num_epochs=2"])
    result = fit(config, corpus, tmp_path / "model", device="cpu", quiet=True)
    assert result.resumed_from_epoch == 1 and result.epochs_run == 2
    assert load_checkpoint(tmp_path / "model" / "checkpoint.pt")["normalization"] == carried
    assert load_model_file(tmp_path / "model" / "model.pt").extra["normalization"] == carried


def test_old_model_files_normalise_as_apply_cmvn_did(tmp_path: Path) -> None:
    feats = mfcc_like(4)
    with_cmvn = load_data_dir(write_frame_dir(tmp_path / "a", feats, cmvn=True), task="frame")
    without = load_data_dir(write_frame_dir(tmp_path / "b", feats), task="frame")
    assert stored_normalizer(None, "auto", with_cmvn, "old.pt").mode == "speaker"
    assert stored_normalizer(None, "auto", without, "old.pt").mode == "none"
    assert stored_normalizer(None, "none", with_cmvn, "old.pt").mode == "none"


def test_speaker_model_on_a_dir_without_cmvn_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_dir = write_frame_dir(tmp_path / "train", mfcc_like(8), cmvn=True)
    corpus = load_corpus(train_dir, dev_proportion=0.25, task="frame")
    result = fit(load_config([], SETTINGS), corpus, tmp_path / "model", device="cpu", quiet=True)
    assert load_model_file(result.model_path).extra["normalization"] == {"mode": "speaker"}
    test_dir = write_frame_dir(tmp_path / "test", mfcc_like(3, seed=1))
    capsys.readouterr()
    code = main(
        ["--device", "cpu", "evaluate", "--threads", "1", str(result.model_path), str(test_dir)]
    )
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"stagetune: error: {test_dir / 'cmvn.scp'} is missing; ")
    assert "trained with per-speaker normalisation" in err
