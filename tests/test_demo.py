"""Tests for the synthetic demo corpus (``stagetune.demo``), on tiny corpora."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest

from stagetune.audio import read_wav
from stagetune.demo import (
    DEFAULT_VARIANT,
    SPEAKERS,
    TOKENS,
    VARIANTS,
    make_demo_corpus,
    synthesize_utterance,
)
from stagetune.errors import UsageError
from stagetune.kaldi import TokenTable, load_data_dir

SPLITS = ("train", "dev", "test")
SIZES = {"num_train": 12, "num_dev": 4, "num_test": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", seed=0, **SIZES)


def _texts(split_dir: Path) -> dict[str, list[str]]:
    lines = (split_dir / "text").read_text().splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines}


def _speakers(split_dir: Path) -> set[str]:
    return {line.split()[1] for line in (split_dir / "utt2spk").read_text().splitlines()}


def test_splits_are_prepared_data_dirs(corpus: Path) -> None:
    for split, count in zip(SPLITS, SIZES.values()):
        loaded = load_data_dir(corpus / split)  # what training reads
        assert len(loaded.utt_ids) == count
        assert loaded.feat_dim == 40
        for utt in loaded.utt_ids:
            samples, rate = read_wav(corpus / split / "wav" / f"{utt}.wav")
            assert rate == 8000 and 0.25 < len(samples) / rate < 5.5
            feats = kaldiio.load_mat(loaded.feat_paths[utt])
            assert np.all(np.isfinite(feats))


def test_vocabulary_lengths_and_shared_token_ids(corpus: Path) -> None:
    assert len(TOKENS) >= 10
    tables = [TokenTable.read(corpus / split / "tokens.txt") for split in SPLITS]
    assert tables[0] == tables[1] == tables[2]
    assert set(tables[0].symbols[1:]) == set(TOKENS)
    for split in SPLITS:
        for tokens in _texts(corpus / split).values():
            assert 1 <= len(tokens) <= 7
            assert set(tokens) <= set(TOKENS)


def test_dev_and_test_speakers_are_held_out(corpus: Path) -> None:
    train, dev, test = (_speakers(corpus / split) for split in SPLITS)
    assert train == {s.name for s in SPEAKERS["train"]} and len(train) >= 4
    assert dev and test and not (train & dev) and not (train & test) and not (dev & test)


def test_same_seed_same_bytes_other_seed_differs(corpus: Path, tmp_path: Path) -> None:
    again = make_demo_corpus(tmp_path / "again", seed=0, **SIZES)
    other = make_demo_corpus(tmp_path / "other", seed=1, **SIZES)
    for split in SPLITS:
        for name in ("text", "feats.ark", "cmvn.ark"):
            assert (again / split / name).read_bytes() == (corpus / split / name).read_bytes()
        wavs = sorted((corpus / split / "wav").iterdir())
        assert [w.read_bytes() for w in wavs] == [
            (again / split / "wav" / w.name).read_bytes() for w in wavs
        ]
    assert (other / "train" / "text").read_bytes() != (corpus / "train" / "text").read_bytes()


def test_bad_sizes_and_variants_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="num_train >= 1"):
        make_demo_corpus(tmp_path, num_train=0)
    with pytest.raises(UsageError, match="variant must be one of easy, hard, got 'medium'"):
        make_demo_corpus(tmp_path, variant="medium")


def test_easy_variant_is_the_original_corpus() -> None:
    # Samples of the corpus as it was before the hard variant (within 2 of int16
    # rounding, for other CPUs' FFTs): old results stay reproducible.
    speaker = VARIANTS["easy"].speakers["train"][0]
    rng = np.random.default_rng(0)
    samples = synthesize_utterance(["ASI", "EME", "UXO"], speaker, rng, variant="easy")
    assert samples.shape == (11543,)
    expected = [2516, -4365, -138, -363, 798, 6408]
    assert np.allclose(samples[[1000, 2500, 4000, 6000, 8000, 10000]], expected, atol=2)


def test_hard_variant_is_the_default_with_confusable_tokens_and_edge_speakers() -> None:
    hard = VARIANTS["hard"]
    assert DEFAULT_VARIANT == "hard" and TOKENS == hard.tokens and SPEAKERS == hard.speakers
    # Tokens that differ only in a long vowel or only in the fricative.
    assert {"ASI", "AASI", "AXI", "ISA", "ISAA", "IXA"} <= set(hard.tokens)
    assert len(set(hard.tokens.values())) == len(hard.tokens)
    # Dev and test speakers at opposite edges of the training speakers' range.
    train, (dev,), (test,) = (hard.speakers[split] for split in ("train", "dev", "test"))
    for attribute in ("pitch_hz", "formant_scale"):
        values = sorted(getattr(s, attribute) for s in train)
        assert values[0] <= getattr(dev, attribute) < values[1]
        assert values[-2] < getattr(test, attribute) <= values[-1]
    rates = [s.rate for s in train]
    assert max(rates) / min(rates) > 1.7 and dev.rate < 0.85 < 1.25 < test.rate


def test_module_cli_reports_what_it_made(tmp_path: Path) -> None:
    args = ["--num-train", "3", "--num-dev", "1", "--num-test", "1", "--seed", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "stagetune.demo", str(tmp_path / "c"), *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'c' / 'train'}: 3 utterances" in done.stdout
    assert f"hard variant, {len(TOKENS)} tokens, seed 5" in done.stdout
    assert (tmp_path / "c" / "test" / "feats.scp").is_file()

    done = subprocess.run(
        [sys.executable, "-m", "stagetune.demo", str(tmp_path / "e"), *args, "--variant", "easy"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "easy variant, 12 tokens, seed 5" in done.stdout
    tokens = TokenTable.read(tmp_path / "e" / "train" / "tokens.txt")
    assert set(tokens.symbols[1:]) == set(VARIANTS["easy"].tokens) != set(TOKENS)
