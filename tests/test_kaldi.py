"""Tests for stagetune.kaldi on real Kaldi ark/scp files written with kaldiio."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import FORMS, TINY_TOKENS, random_feats, write_data_dir

from stagetune.errors import ConfigError, DataError
from stagetune.kaldi import TokenTable, load_data_dir


def _text(feats: dict[str, np.ndarray], seed: int = 0) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    return {u: [TINY_TOKENS[j] for j in rng.integers(0, 5, size=3)] for u in feats}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


# --- reading -------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_reads_matrices_as_written(tmp_path: Path, form: str) -> None:
    feats, _ = random_feats(num_utts=6, feat_dim=5)
    data = load_data_dir(write_data_dir(tmp_path / "d", feats, _text(feats), form=form))
    assert data.utt_ids == sorted(feats)
    assert data.feat_dim == 5
    assert data.num_frames == {u: len(m) for u, m in feats.items()}
    for utt, written in feats.items():
        got = data.load_feats(utt)
        assert got.dtype == np.float32 and got.shape == written.shape
        if form == "compressed":  # 8 bits per value, per-column ranges
            span = written.max(axis=0) - written.min(axis=0)
            assert np.all(np.abs(got - written) <= 0.02 * span + 1e-6)
        else:
            np.testing.assert_allclose(got, written, rtol=1e-6, atol=1e-6)


def test_reads_text_ark_as_kaldi_writes_it(tmp_path: Path) -> None:
    # copy-feats ark,t prints integral values without a point; they are still floats
    d = tmp_path / "d"
    d.mkdir()
    ark = "u1  [\n  0 1.5 2 \n  3 4.25 -1 ]\nu2  [\n  1 2 3 ]\n"
    (d / "feats.ark").write_text(ark)
    _write(d / "feats.scp", [f"{u} feats.ark:{ark.index(f'{u} ') + 3}" for u in ("u1", "u2")])
    _write(d / "text", ["u1 A", "u2 B"])
    _write(d / "tokens.txt", ["<blank> 0", "A 1", "B 2"])
    data = load_data_dir(d)
    np.testing.assert_array_equal(data.load_feats("u1"), [[0, 1.5, 2], [3, 4.25, -1]])
    assert data.load_feats("u2").dtype == np.float32 and data.num_frames == {"u1": 2, "u2": 1}


def test_relative_ark_paths_resolve_against_data_dir_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feats, utt2spk = random_feats(num_utts=4)
    d = write_data_dir(
        tmp_path / "d", feats, _text(feats), utt2spk=utt2spk, relative=True, cmvn=True
    )
    assert " feats.ark:" in (d / "feats.scp").read_text()
    assert " cmvn.ark:" in (d / "cmvn.scp").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = load_data_dir(Path("..") / "d")
    for utt, written in feats.items():
        np.testing.assert_array_equal(data.load_feats(utt), written)


@pytest.mark.parametrize("relative", [False, True])
def test_scp_of_scp_is_partitioned(tmp_path: Path, relative: bool) -> None:
    feats, _ = random_feats(num_utts=10)
    d = write_data_dir(tmp_path / "d", feats, _text(feats), relative=relative, parts=3)
    assert _lines(d / "feats.scp")[0].endswith("feats.1.scp")
    data = load_data_dir(d)
    order = list(feats)
    assert data.parts == [sorted(order[:4]), sorted(order[4:7]), sorted(order[7:])]
    assert data.partitioned and data.utt_ids == sorted(feats)
    for utt, written in feats.items():
        np.testing.assert_array_equal(data.load_feats(utt), written)


def test_cmvn_normalises_each_speaker(tiny_data_dir: Path) -> None:
    data = load_data_dir(tiny_data_dir)
    assert data.utt2spk is not None and data.cmvn is not None
    for spk in set(data.utt2spk.values()):
        utts = [u for u in data.utt_ids if data.utt2spk[u] == spk]
        raw = np.concatenate([data.load_feats(u) for u in utts])
        mean, std = data.cmvn_of(utts[0])
        assert all(np.array_equal(data.cmvn_of(u)[0], mean) for u in utts)
        normed = (raw - mean) / std
        assert np.abs(raw.mean(axis=0)).min() > 1.0  # far from normalised before CMVN
        np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(normed.std(axis=0), 1.0, atol=1e-4)


def test_ctc_targets_are_token_ids(tiny_data_dir: Path) -> None:
    data = load_data_dir(tiny_data_dir)
    assert data.tokens is not None and data.text is not None
    assert data.tokens.symbols == ["<blank>", *TINY_TOKENS]
    for utt in data.utt_ids:
        ids = data.targets(utt)
        assert ids.dtype == np.int64 and 0 not in ids
        assert data.tokens.decode(ids) == data.text[utt]


def test_dev_dir_uses_training_token_table(tmp_path: Path, tiny_data_dir: Path) -> None:
    train = load_data_dir(tiny_data_dir)
    feats, _ = random_feats(num_utts=3, seed=5)
    dev_dir = write_data_dir(tmp_path / "dev", feats, {u: ["E", "A"] for u in feats})
    (dev_dir / "tokens.txt").unlink()
    dev = load_data_dir(dev_dir, tokens=train.tokens)
    assert dev.targets(dev.utt_ids[0]).tolist() == [5, 1]


def test_frame_task_reads_labels(tiny_frame_data_dir: Path) -> None:
    data = load_data_dir(tiny_frame_data_dir, task="frame")
    assert data.tokens is None and data.labels is not None
    rows = [line.split() for line in _lines(tiny_frame_data_dir / "utt2label")]
    lines = {row[0]: row[1:] for row in rows}
    for utt in data.utt_ids:
        assert data.targets(utt).tolist() == [int(x) for x in lines[utt]]
        assert len(data.targets(utt)) == data.num_frames[utt]


def test_utt2num_frames_gives_lengths_without_reading_matrices(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=4)
    d = write_data_dir(tmp_path / "d", feats, _text(feats), num_frames=True)
    with open(d / "feats.ark", "r+b") as f:  # corrupt every matrix after the first
        f.seek(len(feats[next(iter(feats))]) * 8 * 4 + 100)
        f.write(b"\xff" * 4000)
    data = load_data_dir(d, check=False)
    assert data.num_frames == {u: len(m) for u, m in feats.items()}
    with pytest.raises(DataError, match=r"feats\.scp line \d+.*cannot read"):
        load_data_dir(d)


def test_validates_thousands_of_utterances_quickly(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=2000, feat_dim=40, min_frames=50, max_frames=150)
    d = write_data_dir(tmp_path / "d", feats, _text(feats))
    start = time.perf_counter()
    data = load_data_dir(d)
    assert time.perf_counter() - start < 2.0
    assert len(data.utt_ids) == 2000


# --- validation errors ---------------------------------------------------------------


def _edit(path: Path, line: int, new: str | None) -> None:
    """Replace (or with None delete) 1-based ``line`` of ``path``."""
    lines = _lines(path)
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    _write(path, lines)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data_dir(tmp_path / "nope")


def test_missing_feats_scp_says_how_to_compute_them(tiny_data_dir: Path) -> None:
    (tiny_data_dir / "feats.scp").unlink()
    with pytest.raises(DataError, match=r"feats\.scp is missing; run `stagetune prep"):
        load_data_dir(tiny_data_dir)


def test_empty_feats_scp(tiny_data_dir: Path) -> None:
    _write(tiny_data_dir / "feats.scp", [])
    with pytest.raises(DataError, match=r"feats\.scp is empty"):
        load_data_dir(tiny_data_dir)


@pytest.mark.parametrize(
    ("name", "task", "pattern"),
    [
        ("text", "ctc", r"/text is missing"),
        ("tokens.txt", "ctc", r"tokens\.txt is missing"),
        ("utt2label", "frame", r"utt2label is missing"),
    ],
)
def test_missing_target_files(
    tiny_data_dir: Path, tiny_frame_data_dir: Path, name: str, task: str, pattern: str
) -> None:
    d = tiny_data_dir if task == "ctc" else tiny_frame_data_dir
    (d / name).unlink()
    with pytest.raises(DataError, match=pattern):
        load_data_dir(d, task=task)


def test_unknown_task(tiny_data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"task must be one of \['ctc', 'frame', 'utt', 'regress', 'multi'\], got 'asr'"):
        load_data_dir(tiny_data_dir, task="asr")


def test_missing_ark_names_scp_line(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "feats.scp", 3, "spk2-u02 /no/such.ark:9")
    with pytest.raises(DataError, match=r"feats\.scp line 3: ark file /no/such\.ark of 'spk2-u02'"):
        load_data_dir(tiny_data_dir)


def test_missing_transcript(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "text", 5, None)
    with pytest.raises(
        DataError,
        match=r"feats\.scp line 5: utterance 'spk1-u04' has no transcript in .*/text \(1 of 12",
    ):
        load_data_dir(tiny_data_dir)


def test_transcript_without_features(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "feats.scp", 2, None)
    with pytest.raises(
        DataError, match=r"/text line 2: utterance 'spk1-u01' has a transcript but no features"
    ):
        load_data_dir(tiny_data_dir)


def test_unknown_token_names_text_line(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "text", 7, "spk0-u06 A FOO B")
    with pytest.raises(
        DataError,
        match=r"/text line 7: utterance 'spk0-u06' has token 'FOO' not in .*/tokens\.txt; add it",
    ):
        load_data_dir(tiny_data_dir)


@pytest.mark.parametrize("name", ["feats.scp", "text", "utt2spk"])
def test_duplicate_utterance_ids(tiny_data_dir: Path, name: str) -> None:
    lines = _lines(tiny_data_dir / name)
    _write(tiny_data_dir / name, [*lines, lines[3]])
    with pytest.raises(
        DataError, match=rf"{name} line 13: duplicate .*'spk0-u03' \(first .*line 4\)"
    ):
        load_data_dir(tiny_data_dir)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path: Path, bad: float) -> None:
    feats, _ = random_feats(num_utts=5)
    feats["spk0-u03"][2, 1] = bad
    d = write_data_dir(tmp_path / "d", feats, _text(feats))
    with pytest.raises(
        DataError, match=r"feats\.scp line 4: utterance 'spk0-u03' has non-finite .*\[2\]"
    ):
        load_data_dir(d)


def test_inconsistent_feature_dims(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=5)
    feats["spk1-u04"] = np.zeros((7, 9), dtype=np.float32)
    d = write_data_dir(tmp_path / "d", feats, _text(feats))
    with pytest.raises(
        DataError, match=r"feats\.scp line 5: utterance 'spk1-u04' has feature dim 9, but"
    ):
        load_data_dir(d)


def test_label_count_must_match_frames(tiny_frame_data_dir: Path) -> None:
    path = tiny_frame_data_dir / "utt2label"
    _edit(path, 2, _lines(path)[1] + " 0")
    with pytest.raises(
        DataError, match=r"utt2label line 2: utterance 'spk1-u01' has \d+ labels but \d+ frames"
    ):
        load_data_dir(tiny_frame_data_dir, task="frame")


def test_labels_must_be_integers(tiny_frame_data_dir: Path) -> None:
    path = tiny_frame_data_dir / "utt2label"
    _edit(path, 3, _lines(path)[2].rsplit(" ", 1)[0] + " 1.5")
    with pytest.raises(
        DataError, match=r"utt2label line 3: utterance 'spk2-u02' has a non-integer"
    ):
        load_data_dir(tiny_frame_data_dir, task="frame")


def test_utterance_without_speaker(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "utt2spk", 9, None)
    with pytest.raises(
        DataError, match=r"feats\.scp line 9: utterance 'spk2-u08' has no speaker in .*utt2spk"
    ):
        load_data_dir(tiny_data_dir)


def test_scp_mixing_matrices_and_part_files(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "feats.scp", 4, "other.scp")
    with pytest.raises(DataError, match=r"feats\.scp line 4: expected `UTT PATH:OFFSET`"):
        load_data_dir(tiny_data_dir)


def test_speaker_without_cmvn_stats(tiny_data_dir: Path) -> None:
    _edit(tiny_data_dir / "utt2spk", 6, "spk2-u05 newspk")
    with pytest.raises(
        DataError, match=r"utt2spk line 6: speaker 'newspk' of utterance 'spk2-u05' has no stats"
    ):
        load_data_dir(tiny_data_dir)


def test_cmvn_dim_mismatch(tmp_path: Path, tiny_data_dir: Path) -> None:
    feats, utt2spk = random_feats(feat_dim=6)
    other = write_data_dir(tmp_path / "other", feats, utt2spk=utt2spk, cmvn=True)
    shutil.copy(other / "cmvn.scp", tiny_data_dir / "cmvn.scp")
    with pytest.raises(
        DataError,
        match=r"cmvn\.scp line 1 \('spk0'\): CMVN stats have dim 6 but the features have dim 8",
    ):
        load_data_dir(tiny_data_dir)


def test_utt2num_frames_mismatch(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=4)
    d = write_data_dir(tmp_path / "d", feats, _text(feats), num_frames=True)
    _edit(d / "utt2num_frames", 2, "spk1-u01 999")
    with pytest.raises(
        DataError, match=r"utt2num_frames line 2: utterance 'spk1-u01' has 999 frames"
    ):
        load_data_dir(d)


def test_missing_part_scp(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=6)
    d = write_data_dir(tmp_path / "d", feats, _text(feats), parts=2)
    (d / "feats.2.scp").unlink()
    with pytest.raises(
        DataError, match=r"feats\.scp line 2: part file .*feats\.2\.scp does not exist"
    ):
        load_data_dir(d)


def test_error_inside_part_names_part_file(tmp_path: Path) -> None:
    feats, _ = random_feats(num_utts=6)
    d = write_data_dir(tmp_path / "d", feats, _text(feats), parts=2)
    _edit(d / "feats.2.scp", 2, "spk1-u04 missing.ark:3")
    with pytest.raises(
        DataError, match=r"feats\.2\.scp line 2: ark file .*missing\.ark of 'spk1-u04'"
    ):
        load_data_dir(d)


# --- token table ---------------------------------------------------------------------


def test_token_table_round_trip(tmp_path: Path) -> None:
    table = TokenTable.from_transcripts([["b", "a"], ["c", "a"]])
    assert table.symbols == ["<blank>", "a", "b", "c"] and len(table) == 4
    table.write(tmp_path / "tokens.txt")
    assert _lines(tmp_path / "tokens.txt") == ["<blank> 0", "a 1", "b 2", "c 3"]
    again = TokenTable.read(tmp_path / "tokens.txt")
    assert again == table
    assert again.encode(["c", "a"]) == [3, 1] and again.decode([3, 1]) == ["c", "a"]


def test_token_table_reads_ids_in_any_line_order(tmp_path: Path) -> None:
    _write(tmp_path / "tokens.txt", ["b 2", "<blank> 0", "a 1"])
    assert TokenTable.read(tmp_path / "tokens.txt").symbols == ["<blank>", "a", "b"]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["<eps> 0", "a 1"], r"line 1: got `<eps> 0`, but the blank must be `<blank> 0`"),
        (["<blank> 1", "a 0"], r"line 1: got `<blank> 1`"),
        (["<blank> 0", "a 1", "b 3"], r"ids must be contiguous 0\.\.2, but id 2 is missing"),
        (["<blank> 0", "a 1", "a 2"], r"line 3: symbol 'a' already defined on line 2"),
        (["<blank> 0", "a 1", "b 1"], r"line 3: id 1 already used by 'a'"),
        (["<blank> 0", "a x"], r"line 2: expected `SYMBOL ID`"),
        ([], r"is empty"),
    ],
)
def test_token_table_rules(tmp_path: Path, lines: list[str], pattern: str) -> None:
    _write(tmp_path / "tokens.txt", lines)
    with pytest.raises(DataError, match=pattern):
        TokenTable.read(tmp_path / "tokens.txt")


def test_transcripts_may_not_use_blank() -> None:
    with pytest.raises(DataError, match="reserved blank"):
        TokenTable.from_transcripts([["a", "<blank>"]])


def test_encode_unknown_token() -> None:
    with pytest.raises(DataError, match="token 'z' is not in the token table"):
        TokenTable.from_transcripts([["a"]]).encode(["z"])
