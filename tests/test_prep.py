"""Tests for ``stagetune.prep`` and the ``stagetune prep`` command, on real wav files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kaldi_native_fbank as knf
import kaldiio
import numpy as np
import pytest

from stagetune.audio import write_wav
from stagetune.errors import DataError, UsageError
from stagetune.kaldi import load_data_dir
from stagetune.prep import compute_fbank, num_frames, prep_data_dir

RATE = 8000
FRAME_LENGTH = 200  # 25 ms at 8 kHz
FRAME_SHIFT = 80  # 10 ms at 8 kHz
LOG_FLOOR = float(np.log(np.finfo(np.float32).eps))  # knf's log(max(eps, energy))


def _speechlike(num_samples: int, seed: int) -> np.ndarray:
    """A random chirp plus noise on the int16 scale."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / RATE
    tone = 3000 * np.sin(2 * np.pi * (200 + 800 * t) * t)
    return np.clip(tone + rng.normal(0, 300, num_samples), -32768, 32767).astype(np.int16)


def _make_dir(
    root: Path,
    lengths: dict[str, int],
    *,
    text: dict[str, str] | None = None,
    utt2spk: dict[str, str] | None = None,
    rates: dict[str, int] | None = None,
) -> Path:
    data = root / "data"
    (data / "wav").mkdir(parents=True)
    lines = []
    for index, (utt, length) in enumerate(lengths.items()):
        rate = (rates or {}).get(utt, RATE)
        write_wav(data / "wav" / f"{utt}.wav", _speechlike(length, index), rate)
        lines.append(f"{utt} {data / 'wav' / f'{utt}.wav'}\n")
    (data / "wav.scp").write_text("".join(lines))
    if text is not None:
        (data / "text").write_text("".join(f"{u} {t}\n" for u, t in text.items()))
    if utt2spk is not None:
        (data / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in utt2spk.items()))
    return data


def _knf_fbank(samples: np.ndarray, num_bins: int) -> np.ndarray:
    """Features computed directly with kaldi-native-fbank, as the reference."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = RATE
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = num_bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(RATE, samples.astype(np.float32))
    fbank.input_finished()
    return np.stack([np.array(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)])


def _read_kv(path: Path) -> dict[str, str]:
    return dict(line.split(maxsplit=1) for line in path.read_text().splitlines())


def test_features_match_knf_and_kaldi_frame_count(tmp_path: Path) -> None:
    lengths = {"a": 4000, "b": 1234, "c": FRAME_LENGTH}
    data = _make_dir(tmp_path, lengths)
    summary = prep_data_dir(data, num_mel_bins=23, dither=0.0)

    feats = dict(kaldiio.load_scp(str(data / "feats.scp")))
    assert sorted(feats) == ["a", "b", "c"]
    frames = {u: int(n) for u, n in _read_kv(data / "utt2num_frames").items()}
    for index, (utt, length) in enumerate(lengths.items()):
        expected_frames = 1 + (length - FRAME_LENGTH) // FRAME_SHIFT
        assert feats[utt].shape == (expected_frames, 23)
        assert frames[utt] == expected_frames == num_frames(length, RATE)
        assert np.all(np.isfinite(feats[utt]))
        expected = _knf_fbank(_speechlike(length, index), 23)
        np.testing.assert_allclose(feats[utt], expected, rtol=1e-6)
    assert (summary.num_utterances, summary.feature_dim, summary.sample_rate) == (3, 23, RATE)
    assert summary.num_frames == sum(frames.values())
    assert summary.num_seconds == pytest.approx(sum(lengths.values()) / RATE)


def test_cmvn_stats_are_kaldi_per_speaker_sums(tmp_path: Path) -> None:
    lengths = {"s1-a": 3000, "s1-b": 2000, "s2-a": 2500}
    data = _make_dir(tmp_path, lengths, utt2spk={"s1-a": "s1", "s1-b": "s1", "s2-a": "s2"})
    prep_data_dir(data, num_mel_bins=10)

    feats = dict(kaldiio.load_scp(str(data / "feats.scp")))
    cmvn = dict(kaldiio.load_scp(str(data / "cmvn.scp")))
    assert sorted(cmvn) == ["s1", "s2"]
    for spk, utts in {"s1": ["s1-a", "s1-b"], "s2": ["s2-a"]}.items():
        stacked = np.concatenate([feats[u] for u in utts]).astype(np.float64)
        stats = cmvn[spk]
        assert stats.shape == (2, 11) and stats.dtype == np.float64
        np.testing.assert_allclose(stats[0, :-1], stacked.sum(axis=0), rtol=1e-9)
        np.testing.assert_allclose(stats[1, :-1], np.square(stacked).sum(axis=0), rtol=1e-9)
        assert stats[0, -1] == len(stacked) and stats[1, -1] == 0
    assert _read_kv(data / "spk2utt") == {"s1": "s1-a s1-b", "s2": "s2-a"}


def test_tokens_and_utt2spk_are_derived_when_absent(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"u1": 2000, "u2": 2000}, text={"u1": "ONE TWO", "u2": "TWO ZERO"})
    summary = prep_data_dir(data)

    assert (data / "tokens.txt").read_text() == "<blank> 0\nONE 1\nTWO 2\nZERO 3\n"
    assert _read_kv(data / "utt2spk") == {"u1": "u1", "u2": "u2"}
    assert summary.wrote_tokens and summary.wrote_utt2spk
    assert "each utterance is its own speaker" in summary.describe()
    loaded = load_data_dir(data)  # what training reads
    assert loaded.utt_ids == ["u1", "u2"] and loaded.feat_dim == 40


def test_existing_tokens_are_kept_and_unknown_tokens_named(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"u1": 2000}, text={"u1": "B A"})
    (data / "tokens.txt").write_text("<blank> 0\nB 1\nA 2\nC 3\n")
    assert not prep_data_dir(data).wrote_tokens
    assert (data / "tokens.txt").read_text() == "<blank> 0\nB 1\nA 2\nC 3\n"

    (data / "text").write_text("u1 A Q\n")
    with pytest.raises(DataError, match=r"text line 1: token\(s\) Q not in .*tokens.txt"):
        prep_data_dir(data)


def test_digital_silence_gives_finite_features_off_the_log_floor(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_wav(data / "zeros.wav", np.zeros(4000, dtype=np.int16), RATE)
    (data / "wav.scp").write_text("zeros zeros.wav\n")

    prep_data_dir(data, dither=0.0)
    undithered = kaldiio.load_mat(_read_kv(data / "feats.scp")["zeros"])
    assert np.all(np.isfinite(undithered)) and undithered.max() == pytest.approx(LOG_FLOOR)

    prep_data_dir(data)  # default dither, like Kaldi's
    dithered = kaldiio.load_mat(_read_kv(data / "feats.scp")["zeros"])
    assert np.all(np.isfinite(dithered)) and dithered.min() > LOG_FLOOR + 5


def test_dither_is_reproducible_for_a_seed(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"a": 3000, "b": 3000})
    prep_data_dir(data, seed=7)
    first = (data / "feats.ark").read_bytes()
    prep_data_dir(data, seed=7)
    assert (data / "feats.ark").read_bytes() == first
    prep_data_dir(data, seed=8)
    assert (data / "feats.ark").read_bytes() != first


def test_compressed_features_are_close(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"a": 4000})
    prep_data_dir(data, dither=0.0)
    plain = dict(kaldiio.load_scp(str(data / "feats.scp")))["a"]
    prep_data_dir(data, dither=0.0, compress=True)
    compressed = dict(kaldiio.load_scp(str(data / "feats.scp")))["a"]
    assert (data / "feats.ark").stat().st_size < plain.nbytes / 2
    np.testing.assert_allclose(compressed, plain, atol=0.1)


def test_relative_wav_paths_resolve_against_the_data_dir(tmp_path: Path, monkeypatch) -> None:
    data = _make_dir(tmp_path, {"a": 2000})
    (data / "wav.scp").write_text("a wav/a.wav\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    prep_data_dir(Path(os.path.relpath(data, elsewhere)))
    ark_spec = _read_kv(data / "feats.scp")["a"]
    assert Path(ark_spec.rsplit(":", 1)[0]).is_absolute()
    assert kaldiio.load_mat(ark_spec).shape == (num_frames(2000, RATE), 40)


def test_sample_rate_mismatch_names_the_file(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"a": 2000, "b": 4000}, rates={"b": 16000})
    with pytest.raises(DataError, match=r"wav.scp line 2: .*b\.wav has sample rate 16000 Hz.*8000"):
        prep_data_dir(data)
    with pytest.raises(DataError, match=r"wav.scp line 1: .*a\.wav has sample rate 8000 Hz.*16000"):
        prep_data_dir(data, sample_rate=16000)


def test_failure_leaves_the_directory_as_it_was(tmp_path: Path) -> None:
    lengths = {"a": 2000, "b": 2000, "c": 2000}
    data = _make_dir(tmp_path, lengths, text={"a": "X", "b": "X", "c": "X"})
    (data / "wav" / "b.wav").write_bytes(b"RIFF not really a wav file")
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(DataError, match=r"wav.scp line 2: .*b\.wav: cannot read as a PCM wav"):
        prep_data_dir(data)
    assert sorted(p.name for p in data.iterdir()) == before  # no feats.*, no temp files


@pytest.mark.parametrize(
    ("wav_scp", "message"),
    [
        ("", r"wav.scp is empty"),
        ("a wav/missing.wav\n", r"wav.scp line 1: wav file .*missing\.wav.* does not exist"),
        ("a sox in.flac -t wav - |\n", r"wav.scp line 1: .* is a pipe command; only wav file"),
        ("a wav/short.wav\n", r"wav.scp line 1: .*short\.wav has 199 samples, shorter than one"),
        ("a wav/short.wav\na wav/short.wav\n", r"line 2: utterance 'a' already listed on line 1"),
    ],
)
def test_bad_wav_scp_is_a_data_error_naming_the_line(
    tmp_path: Path, wav_scp: str, message: str
) -> None:
    data = tmp_path / "data"
    (data / "wav").mkdir(parents=True)
    write_wav(data / "wav" / "short.wav", np.ones(FRAME_LENGTH - 1, dtype=np.int16), RATE)
    (data / "wav.scp").write_text(wav_scp)
    with pytest.raises(DataError, match=message):
        prep_data_dir(data)


def test_options_out_of_range_are_usage_errors(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"a": 2000})
    with pytest.raises(UsageError, match="num_mel_bins must be >= 3, got 0"):
        prep_data_dir(data, num_mel_bins=0)
    with pytest.raises(UsageError, match="num_mel_bins must be >= 3, got 2"):  # Kaldi's minimum
        prep_data_dir(data, num_mel_bins=2)
    with pytest.raises(UsageError, match="dither must be >= 0"):
        prep_data_dir(data, dither=-1.0)
    with pytest.raises(ValueError, match="needs an rng"):
        compute_fbank(np.zeros(400), RATE, dither=1.0)


def _segmented_dir(root: Path, segments: str) -> Path:
    """Recordings r1 (2.0 s) and r2 (1.5 s), with ``segments`` as given."""
    data = _make_dir(root, {"r1": 2 * RATE, "r2": 3 * RATE // 2})
    (data / "segments").write_text(segments)
    return data


def test_segments_are_the_utterances_cut_as_kaldi_extract_segments(tmp_path: Path) -> None:
    data = _segmented_dir(
        tmp_path,
        "r1-a r1 0.0 0.75\n"
        "r1-b r1 0.75 2.0\n"
        "r2-a r2 0.3 -1\n"  # -1: to the end of the recording
        "r2-b r2 1.0 1.8 0\n",  # 0.3 s past the end: within Kaldi's slack, so clipped
    )
    segment_ids = ["r1-a", "r1-b", "r2-a", "r2-b"]
    (data / "text").write_text("".join(f"{u} X\n" for u in segment_ids))
    (data / "utt2spk").write_text("r1-a s1\nr1-b s1\nr2-a s2\nr2-b s2\n")
    summary = prep_data_dir(data, num_mel_bins=23, dither=0.0)

    bounds = {  # samples round(start * rate) to round(end * rate), clipped
        "r1-a": (0, 6000),
        "r1-b": (6000, 16000),
        "r2-a": (2400, 12000),
        "r2-b": (8000, 12000),
    }
    recordings = {"r1": _speechlike(2 * RATE, 0), "r2": _speechlike(3 * RATE // 2, 1)}
    feats = dict(kaldiio.load_scp(str(data / "feats.scp")))
    assert list(feats) == segment_ids
    frames = {u: int(n) for u, n in _read_kv(data / "utt2num_frames").items()}
    for utt, (begin, end) in bounds.items():
        samples = recordings[utt[:2]][begin:end]
        assert frames[utt] == feats[utt].shape[0] == num_frames(end - begin, RATE)
        np.testing.assert_allclose(feats[utt], _knf_fbank(samples, 23), rtol=1e-6)
    assert _read_kv(data / "utt2dur")["r2-b"] == "0.5000"
    assert (summary.num_utterances, summary.num_recordings) == (4, 2)
    assert "4 utterances (segments of 2 recordings)" in summary.describe()
    assert summary.num_seconds == pytest.approx(0.75 + 1.25 + 1.2 + 0.5)
    assert sorted(dict(kaldiio.load_scp(str(data / "cmvn.scp")))) == ["s1", "s2"]
    loaded = load_data_dir(data)  # what training reads: transcripts keyed by segment
    assert loaded.utt_ids == segment_ids


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("r1-b r1 0.5\n", r"segments line 2: expected 'UTT RECORDING START END'"),
        ("r1-b r1 half 1.0\n", r"segments line 2: expected 'UTT RECORDING START END'"),
        ("r1-b r1 0.5 1.0 1\n", r"segments line 2: expected 'UTT RECORDING START END'"),
        ("r1-b r3 0.5 1.0\n", r"segments line 2: recording 'r3' of segment 'r1-b' is not in"),
        ("r1-a r1 0.5 1.0\n", r"segments line 2: segment 'r1-a' already listed on line 1"),
        ("r1-b r1 1.0 1.0\n", r"segments line 2: segment 'r1-b' starts at 1.0 s, not before"),
        ("r1-b r1 -0.5 1.0\n", r"segments line 2: start and end must be finite seconds"),
        ("r1-b r1 2.0 -1\n", r"segments line 2: segment 'r1-b' starts at 2 s, at or past the end "
                              r"of recording 'r1' \(.*r1\.wav, 2\.000 s\)"),
        ("r1-b r1 1.0 2.5\n", r"segments line 2: segment 'r1-b' ends at 2.5 s, past the end of "
                               r"recording 'r1' .* by more than the 0.5 s that is clipped"),
        ("r1-b r1 1.0 1.02\n", r"segments line 2: segment 'r1-b' has 160 samples, shorter"),
        ("r1-b r1 1.0 1.5\n", r"utt2spk: no speaker for utterance 'r1-b' \(segments line 2\)"),
    ],
    ids=[
        "three fields",
        "start not a number",
        "channel 1 of a mono wav",
        "unknown recording",
        "segment id twice",
        "start equals end",
        "negative start",
        "start past the recording",
        "end far past the recording",
        "shorter than a frame",
        "no speaker",
    ],
)
def test_bad_segments_are_a_data_error_naming_the_line(
    tmp_path: Path, bad_line: str, message: str
) -> None:
    data = _segmented_dir(tmp_path, "r1-a r1 0.0 0.5\n" + bad_line)
    if "no speaker" in message:
        (data / "utt2spk").write_text("r1-a s1\n")
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(DataError, match=message):
        prep_data_dir(data)
    assert sorted(p.name for p in data.iterdir()) == before


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagetune", "prep", *args], capture_output=True, text=True
    )


def test_cli_prints_one_line_and_maps_errors_to_exit_codes(tmp_path: Path) -> None:
    data = _make_dir(tmp_path, {"a": 2000, "b": 3000}, text={"a": "X", "b": "Y"})
    done = _cli(str(data), "--num-mel-bins", "30", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert "2 utterances" in done.stdout and "x 30 mel bins" in done.stdout
    assert kaldiio.load_mat(_read_kv(data / "feats.scp")["a"]).shape[1] == 30

    (data / "wav.scp").write_text("a nowhere.wav\n")
    failed = _cli(str(data))
    assert failed.returncode == 1
    assert failed.stderr.startswith("stagetune: error: ") and "wav.scp line 1" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert _cli(str(data), "--num-mel-bins", "0").returncode == 2
