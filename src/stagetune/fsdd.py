"""Connected digits from the Free Spoken Digit Dataset (FSDD) recordings.

``python -m stagetune.fsdd RECORDINGS_DIR OUT_DIR`` turns the isolated-digit
recordings (``{digit}_{speaker}_{index}.wav``, 8 kHz 16-bit mono) into Kaldi
data dirs ``OUT_DIR/{train,dev,test}`` of connected-digit utterances: each
utterance joins 1 to 7 recordings of one speaker, unchanged, with 50 to 200 ms
of low-level Gaussian noise between them and 25 to 100 ms at each end.  Every
recording is used exactly once.  Splits are by speaker (:data:`FSDD_SPLITS`),
tokens are ``ZERO`` ... ``NINE``, and the same seed gives the same bytes.

Besides ``wav/``, ``wav.scp``, ``text``, ``utt2spk`` and ``tokens.txt`` (the
same in every split), each split gets ``utt2sources``: ``UTT REC1 REC2 ...``,
the recordings each utterance joins.
With ``--tiny`` (:func:`build_tiny_fsdd_corpus`) it builds instead a corpus
shaped like Kaldi's "yesno" (31 training utterances of one speaker, 8 words each
from a 2-word vocabulary, 8 kHz): :data:`TINY_SPLITS` speakers, :data:`TINY_SIZES`
utterances of :data:`TINY_TOKENS_PER_UTTERANCE` digits from :data:`TINY_DIGITS`.
One speaker has only 50 recordings of each digit, so each token draws its digit
uniformly and then one of that speaker's recordings of it uniformly, with
replacement, from a generator seeded by ``(seed, speaker)``: a recording may recur
across (and within) utterances, and the same seed gives the same bytes.  The
joining (noise level, gaps, ends), the files and ``utt2sources`` are those of the
connected corpus; ``tokens.txt`` holds only the two digit words.

Features are computed separately, with ``stagetune prep`` (see
``scripts/prep_fsdd.sh``).  The recordings are CC BY-SA 4.0, and so is
everything built from them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from stagetune.audio import Utterance, read_wav, to_int16, write_wav_data_dir
from stagetune.errors import DataError, StagetuneError
from stagetune.kaldi import BLANK, TokenTable

__all__ = [
    "DIGIT_WORDS",
    "FSDD_SPLITS",
    "SAMPLE_RATE",
    "TINY_DIGITS",
    "TINY_SIZES",
    "TINY_SPLITS",
    "TINY_TOKENS_PER_UTTERANCE",
    "build_fsdd_corpus",
    "build_tiny_fsdd_corpus",
    "main",
]

#: Token of each digit.
DIGIT_WORDS = ("ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE")

#: Speakers of each split.
FSDD_SPLITS: Mapping[str, tuple[str, ...]] = {
    "train": ("george", "jackson", "nicolas", "yweweler"),
    "dev": ("theo",),
    "test": ("lucas",),
}

#: The rate of every FSDD recording, in Hz.
SAMPLE_RATE = 8000

#: The two digits of the tiny corpus, ONE and SIX: like "yes" and "no", one word
#: is voiced throughout with a nasal and a back rounded onset (/wʌn/), the other
#: is mostly voiceless frication (/sɪks/); they share no phone, so the tiny corpus
#: checks a pipeline and speaker generalisation, not fine phonetic contrasts.
TINY_DIGITS = (1, 6)

#: Speakers of each split of the tiny corpus: the same dev and test speakers as the
#: connected corpus (theo, lucas), so no decision made on either corpus's dev set
#: ever looks at a test speaker.  jackson, FSDD's first speaker with clean,
#: normal-level recordings, trains (nicolas's hold runs of digital zeros).  Dev is
#: an unseen speaker, not held-out jackson recordings: with one training speaker a
#: same-speaker dev set reads about 0% for most models and cannot rank them.
TINY_SPLITS: Mapping[str, tuple[str, ...]] = {
    "train": ("jackson",),
    "dev": ("theo",),
    "test": ("lucas",),
}

#: Utterances per speaker in each split of the tiny corpus (yesno: 31 train, 29 test).
TINY_SIZES: Mapping[str, int] = {"train": 31, "dev": 10, "test": 29}

#: Digits in every utterance of the tiny corpus (yesno: 8 words).
TINY_TOKENS_PER_UTTERANCE = 8

_NAME = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[a-z]+)_(?P<index>[0-9]+)\.wav$")
_MAX_DIGITS = 7
_GAP_S = (0.05, 0.2)
_EDGE_S = (0.025, 0.1)
_NOISE_STD = (2.0, 20.0)  # int16 scale, log-uniform per utterance: -64 to -44 dBFS


class _Recording(NamedTuple):
    path: Path
    digit: int
    speaker: str
    index: int


def _find_recordings(recordings_dir: Path) -> dict[str, list[_Recording]]:
    """Recordings by speaker, each list sorted by (digit, index)."""
    if not recordings_dir.is_dir():
        raise DataError(
            f"{recordings_dir}: recordings dir does not exist; pass the FSDD 'recordings' folder"
        )
    by_speaker: dict[str, list[_Recording]] = {}
    for path in recordings_dir.glob("*.wav"):
        match = _NAME.match(path.name)
        if match is None:
            raise DataError(
                f"{path}: FSDD file names must look like DIGIT_SPEAKER_INDEX.wav "
                f"(e.g. 7_jackson_32.wav); rename or remove it"
            )
        recording = _Recording(path, int(match["digit"]), match["speaker"], int(match["index"]))
        by_speaker.setdefault(recording.speaker, []).append(recording)
    if not by_speaker:
        raise DataError(f"{recordings_dir}: no *.wav recordings found")
    known = {speaker for speakers in FSDD_SPLITS.values() for speaker in speakers}
    unknown = sorted(set(by_speaker) - known)
    if unknown:
        raise DataError(
            f"{recordings_dir}: speaker(s) {', '.join(unknown)} belong to no split; the "
            f"splits know {', '.join(sorted(known))}; remove their recordings"
        )
    for recordings in by_speaker.values():
        recordings.sort(key=lambda r: (r.digit, r.index))
    return by_speaker


def _group_sizes(total: int, rng: np.random.Generator) -> list[int]:
    """Sizes in 1..7 summing to ``total``."""
    sizes: list[int] = []
    remaining = total
    while remaining:
        size = min(int(rng.integers(1, _MAX_DIGITS + 1)), remaining)
        sizes.append(size)
        remaining -= size
    return sizes


def _speaker_rng(seed: int, speaker: str) -> np.random.Generator:
    # Seeded by name, so a speaker's utterances do not depend on who else is present.
    return np.random.default_rng([seed, zlib.crc32(speaker.encode("utf-8"))])


def _join(
    utt: str, speaker: str, group: Sequence[_Recording], rng: np.random.Generator
) -> Utterance:
    """One utterance of ``group``'s recordings, unchanged, with low-level noise around them."""
    noise_std = float(np.exp(rng.uniform(*np.log(_NOISE_STD))))
    pieces = [_noise(rng.uniform(*_EDGE_S), noise_std, rng)]
    for position, recording in enumerate(group):
        if position:
            pieces.append(_noise(rng.uniform(*_GAP_S), noise_std, rng))
        samples, rate = read_wav(recording.path)
        if rate != SAMPLE_RATE:
            raise DataError(
                f"{recording.path}: sample rate {rate} Hz, but FSDD recordings are "
                f"{SAMPLE_RATE} Hz; use the original files"
            )
        pieces.append(samples)
    pieces.append(_noise(rng.uniform(*_EDGE_S), noise_std, rng))
    tokens = [DIGIT_WORDS[r.digit] for r in group]
    return Utterance(utt, speaker, tokens, np.concatenate(pieces).astype(np.int16))


def _speaker_utterances(
    speaker: str, recordings: list[_Recording], seed: int
) -> Iterator[tuple[Utterance, list[_Recording]]]:
    """One speaker's connected-digit utterances, each with the recordings it joins."""
    rng = _speaker_rng(seed, speaker)
    order = rng.permutation(len(recordings))
    start = 0
    for number, size in enumerate(_group_sizes(len(recordings), rng)):
        group = [recordings[i] for i in order[start : start + size]]
        start += size
        yield _join(f"{speaker}-{number:04d}", speaker, group, rng), group


def _tiny_speaker_utterances(
    speaker: str, recordings: list[_Recording], seed: int, count: int
) -> Iterator[tuple[Utterance, list[_Recording]]]:
    """``count`` tiny-corpus utterances of one speaker, recordings drawn with replacement."""
    by_digit = [[r for r in recordings if r.digit == digit] for digit in TINY_DIGITS]
    missing = [DIGIT_WORDS[d] for d, found in zip(TINY_DIGITS, by_digit) if not found]
    if missing:
        raise DataError(
            f"speaker {speaker} has no recordings of {', '.join(missing)}; the tiny corpus "
            f"needs {speaker}'s recordings of every digit in "
            f"{', '.join(DIGIT_WORDS[d] for d in TINY_DIGITS)}"
        )
    rng = _speaker_rng(seed, speaker)
    for number in range(count):
        choices = rng.integers(len(TINY_DIGITS), size=TINY_TOKENS_PER_UTTERANCE)
        group = [by_digit[c][int(rng.integers(len(by_digit[c])))] for c in choices]
        yield _join(f"{speaker}-{number:04d}", speaker, group, rng), group


def _noise(seconds: float, std: float, rng: np.random.Generator) -> np.ndarray:
    return to_int16(rng.normal(0.0, std, int(seconds * SAMPLE_RATE)))


def build_fsdd_corpus(recordings_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build connected-digit data dirs ``out_dir/{train,dev,test}`` from FSDD recordings.

    Each speaker's recordings are shuffled and cut into groups of 1 to 7; each
    group becomes one utterance (recordings unchanged, noise between them).  A
    split whose speakers have no recordings in ``recordings_dir`` is not written.

    Args:
        recordings_dir: The FSDD ``recordings`` folder (or a subset of its files).
        out_dir: Output directory; existing split dirs in it are replaced.
        seed: Seed of the grouping and the noise.

    Returns:
        ``out_dir``.

    Raises:
        DataError: A file name does not follow FSDD's pattern, a speaker is in no
            split, or a recording is not 8 kHz 16-bit mono PCM.
    """
    return _write_splits(
        _find_recordings(Path(recordings_dir)),
        Path(out_dir),
        FSDD_SPLITS,
        DIGIT_WORDS,
        lambda split, speaker, recordings: _speaker_utterances(speaker, recordings, seed),
    )


def build_tiny_fsdd_corpus(
    recordings_dir: str | Path, out_dir: str | Path, *, seed: int = 0
) -> Path:
    """Build the tiny, yesno-like data dirs ``out_dir/{train,dev,test}`` from FSDD recordings.

    Split ``s`` holds :data:`TINY_SIZES` ``[s]`` utterances of each speaker in
    :data:`TINY_SPLITS` ``[s]``, each of :data:`TINY_TOKENS_PER_UTTERANCE` digits
    from :data:`TINY_DIGITS`: every token draws its digit uniformly, then one of
    the speaker's recordings of that digit uniformly, with replacement.  Joining,
    files and ``utt2sources`` are as in :func:`build_fsdd_corpus`; ``tokens.txt``
    holds only the two digit words.  A split whose speakers have no recordings in
    ``recordings_dir`` is not written.

    Args:
        recordings_dir: The FSDD ``recordings`` folder (or a subset of its files).
        out_dir: Output directory; existing split dirs in it are replaced.
        seed: Seed of the digits, the recordings drawn and the noise.

    Returns:
        ``out_dir``.

    Raises:
        DataError: As :func:`build_fsdd_corpus`, or a present speaker has no
            recordings of one of the two digits.
    """
    return _write_splits(
        _find_recordings(Path(recordings_dir)),
        Path(out_dir),
        TINY_SPLITS,
        [DIGIT_WORDS[d] for d in TINY_DIGITS],
        lambda split, speaker, recordings: _tiny_speaker_utterances(
            speaker, recordings, seed, TINY_SIZES[split]
        ),
    )


#: ``(split, speaker, recordings)`` -> the speaker's utterances, each with its recordings.
_SpeakerUtterances = Callable[
    [str, str, list[_Recording]], Iterator[tuple[Utterance, list[_Recording]]]
]


def _write_splits(
    by_speaker: Mapping[str, list[_Recording]],
    out_dir: Path,
    splits: Mapping[str, tuple[str, ...]],
    words: Sequence[str],
    speaker_utterances: _SpeakerUtterances,
) -> Path:
    """Write each split that has a speaker in ``by_speaker``: wavs, lists, ``utt2sources``.

    Every split's ``tokens.txt`` holds all of ``words``, not only those in its
    text, so token ids agree across splits.
    """
    for split, speakers in splits.items():
        split_dir = out_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        present = [speaker for speaker in speakers if speaker in by_speaker]
        if not present:
            continue
        sources: list[str] = []
        pairs = (
            pair
            for speaker in present
            for pair in speaker_utterances(split, speaker, by_speaker[speaker])
        )
        write_wav_data_dir(split_dir, _noting_sources(pairs, sources), SAMPLE_RATE)
        with open(split_dir / "utt2sources", "w", encoding="utf-8") as out:
            out.writelines(f"{line}\n" for line in sorted(sources))
        TokenTable([BLANK, *sorted(words)]).write(split_dir / "tokens.txt")
    return out_dir


def _noting_sources(
    pairs: Iterator[tuple[Utterance, list[_Recording]]], sources: list[str]
) -> Iterator[Utterance]:
    """The utterances of ``pairs``; appends each one's ``UTT REC1 REC2 ...`` line to ``sources``."""
    for utterance, group in pairs:
        sources.append(f"{utterance.utt} {' '.join(r.path.stem for r in group)}")
        yield utterance


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stagetune.fsdd [--tiny] RECORDINGS_DIR OUT_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m stagetune.fsdd",
        description="Build connected-digit Kaldi data dirs from FSDD recordings.",
    )
    parser.add_argument("recordings_dir", metavar="RECORDINGS_DIR", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny yesno-like corpus instead: 2 digits (ONE, SIX), 8 per utterance, "
        "31/10/29 utterances of one speaker each in train/dev/test",
    )
    args = parser.parse_args(argv)
    build = build_tiny_fsdd_corpus if args.tiny else build_fsdd_corpus
    started = time.monotonic()
    try:
        out_dir = build(args.recordings_dir, args.out_dir, seed=args.seed)
    except StagetuneError as exc:
        print(f"stagetune.fsdd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    report(out_dir, tiny=args.tiny, started=started)
    return 0


def report(out_dir: Path, *, tiny: bool, started: float) -> None:
    """Print a line per split (utterances, recordings used) and the time since ``started``."""
    splits = TINY_SPLITS if tiny else FSDD_SPLITS
    for split, speakers in splits.items():
        split_dir = out_dir / split
        if not split_dir.is_dir():
            print(f"{split_dir}: skipped, no recordings of {', '.join(speakers)}")
            continue
        lines = (split_dir / "utt2sources").read_text(encoding="utf-8").splitlines()
        used = [stem for line in lines for stem in line.split()[1:]]
        print(
            f"{split_dir}: {len(lines)} utterances of {len(used)} recordings, "
            f"{len(set(used))} distinct ({', '.join(speakers)})"
        )
    print(f"built in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
