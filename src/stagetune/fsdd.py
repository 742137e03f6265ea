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
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from stagetune.audio import Utterance, read_wav, to_int16, write_wav_data_dir
from stagetune.errors import DataError, StagetuneError
from stagetune.kaldi import BLANK, TokenTable

__all__ = ["DIGIT_WORDS", "FSDD_SPLITS", "SAMPLE_RATE", "build_fsdd_corpus", "main"]

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


def _speaker_utterances(
    speaker: str, recordings: list[_Recording], seed: int, sources: list[str]
) -> Iterator[Utterance]:
    """One speaker's utterances; appends each one's ``UTT REC1 REC2 ...`` line to ``sources``."""
    # Seeded by name, so a speaker's utterances do not depend on who else is present.
    rng = np.random.default_rng([seed, zlib.crc32(speaker.encode("utf-8"))])
    order = rng.permutation(len(recordings))
    start = 0
    for number, size in enumerate(_group_sizes(len(recordings), rng)):
        group = [recordings[i] for i in order[start : start + size]]
        start += size
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
        utt = f"{speaker}-{number:04d}"
        sources.append(f"{utt} {' '.join(r.path.stem for r in group)}")
        tokens = [DIGIT_WORDS[r.digit] for r in group]
        yield Utterance(utt, speaker, tokens, np.concatenate(pieces).astype(np.int16))


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
    recordings_dir, out_dir = Path(recordings_dir), Path(out_dir)
    by_speaker = _find_recordings(recordings_dir)
    for split, speakers in FSDD_SPLITS.items():
        split_dir = out_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        present = [speaker for speaker in speakers if speaker in by_speaker]
        if not present:
            continue
        sources: list[str] = []
        utterances = (
            utterance
            for speaker in present
            for utterance in _speaker_utterances(speaker, by_speaker[speaker], seed, sources)
        )
        write_wav_data_dir(split_dir, utterances, SAMPLE_RATE)
        with open(split_dir / "utt2sources", "w", encoding="utf-8") as out:
            out.writelines(f"{line}\n" for line in sorted(sources))
        # Every split gets all ten digits, so token ids agree across splits.
        TokenTable([BLANK, *sorted(DIGIT_WORDS)]).write(split_dir / "tokens.txt")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stagetune.fsdd RECORDINGS_DIR OUT_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m stagetune.fsdd",
        description="Build connected-digit Kaldi data dirs from FSDD recordings.",
    )
    parser.add_argument("recordings_dir", metavar="RECORDINGS_DIR", type=Path)
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        out_dir = build_fsdd_corpus(args.recordings_dir, args.out_dir, seed=args.seed)
    except StagetuneError as exc:
        print(f"stagetune.fsdd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for split, speakers in FSDD_SPLITS.items():
        split_dir = out_dir / split
        if not split_dir.is_dir():
            print(f"{split_dir}: skipped, no recordings of {', '.join(speakers)}")
            continue
        lines = (split_dir / "utt2sources").read_text(encoding="utf-8").splitlines()
        num_recordings = sum(len(line.split()) - 1 for line in lines)
        print(
            f"{split_dir}: {len(lines)} utterances of {num_recordings} recordings "
            f"({', '.join(speakers)})"
        )
    print(f"built in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
