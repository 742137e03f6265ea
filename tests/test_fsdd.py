"""Tests for the FSDD corpus builders: connected digits on a small copy of real
recordings, the tiny yesno-like corpus on all of them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stagetune.audio import read_wav
from stagetune.errors import DataError
from stagetune.fsdd import (
    DIGIT_WORDS,
    FSDD_SPLITS,
    TINY_SIZES,
    TINY_SPLITS,
    build_fsdd_corpus,
    build_tiny_fsdd_corpus,
)
from stagetune.kaldi import load_data_dir

REPO = Path(__file__).resolve().parents[1]
FSDD = Path(os.environ.get("FSDD_DIR", REPO.parent / "shared" / "data" / "fsdd" / "recordings"))
SPEAKERS = ("george", "theo", "lucas")  # one per split
PER_DIGIT = 3
RATE = 8000

pytestmark = pytest.mark.skipif(not FSDD.is_dir(), reason=f"FSDD recordings not at {FSDD}")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few real recordings per digit for one speaker of each split."""
    subset = tmp_path_factory.mktemp("fsdd") / "recordings"
    subset.mkdir()
    for speaker in SPEAKERS:
        for digit in range(10):
            for index in range(PER_DIGIT):
                name = f"{digit}_{speaker}_{index}.wav"
                shutil.copyfile(FSDD / name, subset / name)
    return subset


@pytest.fixture(scope="module")
def corpus(recordings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fsdd_corpus(recordings, tmp_path_factory.mktemp("out") / "corpus", seed=0)


def _table(path: Path) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in path.read_text().splitlines()}


def _find_in_order(haystack: np.ndarray, needles: list[np.ndarray]) -> list[tuple[int, int]]:
    """Sample spans where each needle occurs verbatim, in order, without overlap."""
    spans, start, data = [], 0, haystack.tobytes()
    for needle in needles:
        offset = data.find(needle.tobytes(), 2 * start)
        while offset >= 0 and offset % 2:  # only whole-sample alignments
            offset = data.find(needle.tobytes(), offset + 1)
        assert offset >= 0, "a source recording is missing from its utterance"
        begin = offset // 2
        spans.append((begin, begin + len(needle)))
        start = begin + len(needle)
    return spans


def test_every_recording_used_once_verbatim_with_short_gaps(recordings: Path, corpus: Path) -> None:
    used: list[str] = []
    for split in FSDD_SPLITS:
        split_dir = corpus / split
        texts = _table(split_dir / "text")
        for utt, sources in _table(split_dir / "utt2sources").items():
            assert 1 <= len(sources) <= 7
            assert texts[utt] == [DIGIT_WORDS[int(stem.split("_")[0])] for stem in sources]
            utterance, rate = read_wav(split_dir / "wav" / f"{utt}.wav")
            assert rate == RATE
            originals = [read_wav(recordings / f"{stem}.wav")[0] for stem in sources]
            spans = _find_in_order(utterance, originals)
            gaps = [b - a for (_, a), (b, _) in zip(spans, spans[1:])]
            assert all(0.05 * RATE - 1 <= gap <= 0.2 * RATE for gap in gaps)
            edges = (spans[0][0], len(utterance) - spans[-1][1])
            assert all(0.025 * RATE - 1 <= edge <= 0.1 * RATE for edge in edges)
            assert len(utterance) == sum(map(len, originals)) + sum(gaps) + sum(edges)
            used += sources
    assert sorted(used) == sorted(p.stem for p in recordings.iterdir())


def test_splits_are_by_speaker_with_shared_digit_tokens(corpus: Path) -> None:
    for split, speakers in FSDD_SPLITS.items():
        utt2spk = _table(corpus / split / "utt2spk")
        assert {s for (s,) in utt2spk.values()} == set(speakers) & set(SPEAKERS)
        assert all(utt.startswith(f"{s}-") for utt, (s,) in utt2spk.items())
        assert (corpus / split / "tokens.txt").read_text() == (
            corpus / "train" / "tokens.txt"
        ).read_text()
    assert "<blank> 0\nEIGHT 1\n" in (corpus / "train" / "tokens.txt").read_text()


def test_same_seed_same_bytes(recordings: Path, corpus: Path, tmp_path: Path) -> None:
    again = build_fsdd_corpus(recordings, tmp_path / "again", seed=0)
    other = build_fsdd_corpus(recordings, tmp_path / "other", seed=1)
    for split in FSDD_SPLITS:
        files = sorted(p.relative_to(corpus) for p in (corpus / split).rglob("*") if p.is_file())
        assert files == sorted(
            p.relative_to(again) for p in (again / split).rglob("*") if p.is_file()
        )
        assert all((again / f).read_bytes() == (corpus / f).read_bytes() for f in files)
    assert (other / "train" / "utt2sources").read_text() != (
        corpus / "train" / "utt2sources"
    ).read_text()


def test_split_without_speakers_is_skipped_and_bad_names_rejected(
    recordings: Path, tmp_path: Path
) -> None:
    subset = tmp_path / "george-only"
    subset.mkdir()
    for wav in recordings.glob("*_george_*.wav"):
        shutil.copyfile(wav, subset / wav.name)
    out = build_fsdd_corpus(subset, tmp_path / "out")
    assert (out / "train" / "wav.scp").is_file()
    assert not (out / "dev").exists() and not (out / "test").exists()

    (subset / "seven.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"seven\.wav: FSDD file names must look like"):
        build_fsdd_corpus(subset, tmp_path / "out")


def test_prep_script_builds_and_prepares_every_split(recordings: Path, tmp_path: Path) -> None:
    env = dict(os.environ, FSDD_DIR=str(recordings))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "prep_fsdd.sh"), str(tmp_path / "fsdd")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    for split in FSDD_SPLITS:
        loaded = load_data_dir(tmp_path / "fsdd" / split)
        assert loaded.feat_dim == 40 and loaded.cmvn is not None
        assert set(loaded.tokens.symbols[1:]) == set(DIGIT_WORDS)
        assert f"prepared {tmp_path / 'fsdd' / split}:" in done.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_fsdd_corpus(FSDD, tmp_path_factory.mktemp("tiny") / "corpus", seed=0)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_tiny_corpus_is_yesno_sized_with_two_digits_and_held_out_speakers(tiny: Path) -> None:
    sizes = {"train": 31, "dev": 10, "test": 29}
    assert TINY_SIZES == sizes
    speakers: dict[str, set[str]] = {}
    for split, count in sizes.items():
        split_dir = tiny / split
        assert (split_dir / "tokens.txt").read_text() == "<blank> 0\nONE 1\nSIX 2\n"
        texts, sources = _table(split_dir / "text"), _table(split_dir / "utt2sources")
        assert len(texts) == count and sources.keys() == texts.keys()
        assert all(len(tokens) == 8 and set(tokens) <= {"ONE", "SIX"} for tokens in texts.values())
        assert texts == {
            utt: [DIGIT_WORDS[int(stem.split("_")[0])] for stem in stems]
            for utt, stems in sources.items()
        }
        speakers[split] = {s for (s,) in _table(split_dir / "utt2spk").values()}
        assert speakers[split] == set(TINY_SPLITS[split]) and len(speakers[split]) == 1
        assert {stem.split("_")[1] for stems in sources.values() for stem in stems} == (
            speakers[split]
        )
        durations = [len(read_wav(split_dir / "wav" / f"{utt}.wav")[0]) / RATE for utt in texts]
        assert all(2.5 < d < 10.0 for d in durations)
    assert speakers["train"].isdisjoint(speakers["test"] | speakers["dev"])
    assert speakers["dev"].isdisjoint(speakers["test"])
    # 248 train tokens from jackson's 100 recordings of ONE and SIX: reuse, but broad coverage.
    train_sources = _table(tiny / "train" / "utt2sources").values()
    train_stems = [stem for stems in train_sources for stem in stems]
    assert 60 <= len(set(train_stems)) < len(train_stems) == 248
    train_words = [w for tokens in _table(tiny / "train" / "text").values() for w in tokens]
    assert 0.3 < train_words.count("ONE") / len(train_words) < 0.7


def test_tiny_corpus_same_seed_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = build_tiny_fsdd_corpus(FSDD, tmp_path / "again", seed=0)
    other = build_tiny_fsdd_corpus(FSDD, tmp_path / "other", seed=1)
    files = _files(tiny)
    assert files == _files(again) and len(files) == 3 * 5 + sum(TINY_SIZES.values())
    assert all((again / f).read_bytes() == (tiny / f).read_bytes() for f in files)
    for split in TINY_SPLITS:
        assert (other / split / "utt2sources").read_text() != (
            tiny / split / "utt2sources"
        ).read_text()


def test_tiny_corpus_needs_both_digits_of_a_present_speaker(tmp_path: Path) -> None:
    subset = tmp_path / "jackson-ones"
    subset.mkdir()
    for index in range(3):
        shutil.copyfile(FSDD / f"1_jackson_{index}.wav", subset / f"1_jackson_{index}.wav")
    with pytest.raises(DataError, match=r"speaker jackson has no recordings of SIX"):
        build_tiny_fsdd_corpus(subset, tmp_path / "out")


def test_prep_script_tiny_option(tmp_path: Path) -> None:
    env = dict(os.environ, FSDD_DIR=str(FSDD))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "prep_fsdd.sh"), "--tiny", str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'tiny' / 'train'}: 31 utterances of 248 recordings" in done.stdout
    for split, count in TINY_SIZES.items():
        loaded = load_data_dir(tmp_path / "tiny" / split)
        assert len(loaded.utt_ids) == count and loaded.cmvn is not None
        assert loaded.tokens.symbols == ["<blank>", "ONE", "SIX"]
