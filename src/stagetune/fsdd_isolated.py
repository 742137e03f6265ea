"""FSDD's isolated recordings as utterance-classification data dirs (task ``utt``).

Two layouts of the Free Spoken Digit Dataset's recordings
(``{digit}_{speaker}_{index}.wav``, 6 speakers x 10 digits x 50 takes):

* ``speakers``: speaker identification over all six speakers.  The test set is
  takes 0-4 of every digit (FSDD's own train/test split), dev is takes 5-9, train
  the other 40 takes; ``utt2class`` holds the speaker.
* ``digits``: isolated-digit recognition on unseen speakers, split by speaker as
  the connected corpus is (:data:`~stagetune.fsdd.FSDD_SPLITS`: four training
  speakers, theo for dev, lucas for test); ``utt2class`` holds the digit word.
* ``verification``: a speaker model of the four training speakers (train: their
  takes 5-49, dev: takes 0-4, ``utt2class`` the speaker) and a test set of the two
  speakers it never sees (theo and lucas, every take) with ``trials``: every pair
  of test utterances, ``1`` for the same speaker, else ``0``.

Each split is a Kaldi data dir (``wav/``, ``wav.scp``, ``text`` with the digit
word, ``utt2spk``, ``utt2class``); features come from ``stagetune prep``.  The
recordings are copied unchanged (CC BY-SA 4.0, as is the result).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Mapping

from stagetune.audio import Utterance, read_wav, write_wav_data_dir
from stagetune.errors import UsageError
from stagetune.fsdd import DIGIT_WORDS, FSDD_SPLITS, SAMPLE_RATE, _find_recordings, _Recording

__all__ = ["LAYOUTS", "build_isolated_fsdd"]

#: Takes of every digit in each split of the ``speakers`` layout (test: FSDD's own).
SPEAKER_TAKES: Mapping[str, range] = {"train": range(10, 50), "dev": range(5, 10), "test": range(0, 5)}


def _speaker_split(recording: _Recording) -> str | None:
    return next((split for split, takes in SPEAKER_TAKES.items() if recording.index in takes), None)


def _digit_split(recording: _Recording) -> str | None:
    return next((split for split, speakers in FSDD_SPLITS.items() if recording.speaker in speakers), None)


def _verification_split(recording: _Recording) -> str | None:
    if recording.speaker not in FSDD_SPLITS["train"]:
        return "test"
    return "dev" if recording.index < 5 else "train"


#: Layout -> (the split of a recording, its class).
LAYOUTS: Mapping[str, tuple[Callable[[_Recording], str | None], Callable[[_Recording], str]]] = {
    "speakers": (_speaker_split, lambda r: r.speaker),
    "digits": (_digit_split, lambda r: DIGIT_WORDS[r.digit]),
    "verification": (_verification_split, lambda r: r.speaker),
}


def _utt_id(recording: _Recording) -> str:
    return f"{recording.speaker}-{recording.digit}-{recording.index:02d}"


def _write_trials(path: Path, recordings: list[_Recording]) -> None:
    """Every unordered pair of ``recordings``: ``1 A B`` for one speaker, ``0 A B`` for two."""
    ordered = sorted(recordings, key=_utt_id)
    with open(path, "w", encoding="utf-8") as out:
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                out.write(f"{int(a.speaker == b.speaker)} {_utt_id(a)} {_utt_id(b)}\n")


def build_isolated_fsdd(recordings_dir: str | Path, out_dir: str | Path, layout: str) -> Path:
    """Write ``out_dir/{train,dev,test}`` for ``layout`` (a :data:`LAYOUTS` key); returns ``out_dir``."""
    if layout not in LAYOUTS:
        raise UsageError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    split_of, class_of = LAYOUTS[layout]
    by_split: dict[str, list[_Recording]] = {}
    for recordings in _find_recordings(Path(recordings_dir)).values():
        for recording in recordings:
            split = split_of(recording)
            if split is not None:
                by_split.setdefault(split, []).append(recording)
    out_dir = Path(out_dir)
    for split, recordings in sorted(by_split.items()):
        split_dir = out_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        utterances = (
            Utterance(_utt_id(r), r.speaker, [DIGIT_WORDS[r.digit]], read_wav(r.path)[0]) for r in recordings
        )
        write_wav_data_dir(split_dir, utterances, SAMPLE_RATE)
        lines = sorted(f"{_utt_id(r)} {class_of(r)}\n" for r in recordings)
        (split_dir / "utt2class").write_text("".join(lines), encoding="utf-8")
        if layout == "verification" and split == "test":
            _write_trials(split_dir / "trials", recordings)
    return out_dir
