"""The utterances of a data dir's audio, and their samples.

Without a ``segments`` file each ``wav.scp`` line is an utterance; with one
(``UTT RECORDING START END``, seconds, END -1 for the end of the recording) the
utterances are its segments, cut as Kaldi's ``extract-segments`` cuts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from stagetune.audio import read_wav
from stagetune.errors import DataError

__all__ = [
    "MAX_OVERSHOOT_S",
    "WavEntry",
    "Utterance",
    "Recordings",
    "read_wav_scp",
    "read_wav_entries",
    "read_utterances",
    "kaldi_lines",
]

#: How far a segment may end past its recording, in seconds, before it is an
#: error; within it the segment is clipped (Kaldi's extract-segments --max-overshoot).
MAX_OVERSHOOT_S = 0.5


@dataclass(frozen=True)
class WavEntry:
    """One ``wav.scp`` line: a recording id, its wav file and the line number."""

    utt: str
    path: Path
    line: int


def read_wav_scp(data_dir: str | Path) -> list[tuple[str, Path]]:
    """The ``(utterance, wav path)`` pairs of ``DATA_DIR/wav.scp``, in file order.

    Paths relative to the data directory are resolved against it.

    Raises:
        DataError: wav.scp is missing, empty, malformed, names an utterance twice,
            uses a pipe command, or names a wav file that does not exist.
    """
    return [(entry.utt, entry.path) for entry in read_wav_entries(Path(data_dir))]


def read_wav_entries(data_dir: Path) -> list[WavEntry]:
    """The lines of ``DATA_DIR/wav.scp`` as :class:`WavEntry`; raises as :func:`read_wav_scp`."""
    scp = data_dir / "wav.scp"
    if not scp.is_file():
        raise DataError(f"{scp}: no wav.scp; a data dir needs 'UTT PATH' lines for its audio")
    entries: list[WavEntry] = []
    seen: dict[str, int] = {}
    for line_no, fields in kaldi_lines(scp, maxsplit=1):
        if len(fields) != 2:
            raise DataError(f"{scp} line {line_no}: expected 'UTT PATH', got {fields[0]!r}")
        utt, location = fields[0], fields[1].strip()
        if location.endswith("|") or location == "-":
            raise DataError(
                f"{scp} line {line_no}: {location!r} is a pipe command; only wav file paths "
                f"are supported, so write the audio to wav files and list their paths"
            )
        if utt in seen:
            raise DataError(
                f"{scp} line {line_no}: utterance {utt!r} already listed on line {seen[utt]}; "
                f"utterance ids must be unique"
            )
        seen[utt] = line_no
        path = Path(location)
        if not path.is_absolute():
            path = data_dir / path
        if not path.is_file():
            raise DataError(
                f"{scp} line {line_no}: wav file {str(path)!r} of utterance {utt!r} does not "
                f"exist; relative paths are resolved against {data_dir}"
            )
        entries.append(WavEntry(utt, path, line_no))
    if not entries:
        raise DataError(f"{scp}: wav.scp is empty; it needs one 'UTT PATH' line per utterance")
    return entries


def kaldi_lines(path: Path, *, maxsplit: int = -1) -> Iterable[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of a Kaldi text file, skipping blank lines."""
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            fields = line.split(maxsplit=maxsplit)
            if fields:
                yield line_no, fields


@dataclass(frozen=True)
class Utterance:
    """One output utterance: a whole wav, or a segment ``[start, end)`` of one in seconds."""

    utt: str
    wav: WavEntry
    source: str  # the file and line that define it: "wav.scp" or "segments"
    line: int
    start: float = 0.0
    end: float = -1.0  # -1: to the end of the recording, as in Kaldi


def read_utterances(data_dir: Path, entries: list[WavEntry]) -> tuple[list[Utterance], bool]:
    """The utterances to compute features for, and whether they come from ``segments``."""
    path = data_dir / "segments"
    if not path.is_file():
        return [Utterance(e.utt, e, "wav.scp", e.line) for e in entries], False
    recordings = {entry.utt: entry for entry in entries}
    utterances: list[Utterance] = []
    seen: dict[str, int] = {}
    for line_no, fields in kaldi_lines(path):
        where = f"{path} line {line_no}"
        start, end = _parse_times(fields, where)
        utt, recording = fields[0], fields[1]
        if recording not in recordings:
            raise DataError(
                f"{where}: recording {recording!r} of segment {utt!r} is not in wav.scp; "
                f"segments must name recordings by their wav.scp ids"
            )
        if utt in seen:
            raise DataError(
                f"{where}: segment {utt!r} already listed on line {seen[utt]}; "
                f"segment ids must be unique"
            )
        seen[utt] = line_no
        utterances.append(
            Utterance(utt, recordings[recording], "segments", line_no, start, end)
        )
    if not utterances:
        raise DataError(
            f"{path}: segments is empty; it needs one 'UTT RECORDING START END' line per "
            f"utterance, or delete it to use each wav as one utterance"
        )
    return utterances, True


def _parse_times(fields: list[str], where: str) -> tuple[float, float]:
    """Start and end of a ``segments`` line, checked as far as they can be without audio."""
    expected = "expected 'UTT RECORDING START END' (seconds, END -1 for the end of the wav)"
    # Kaldi allows a fifth field, the channel; only mono wavs are read, so only channel 0.
    if len(fields) not in (4, 5) or fields[4:] not in ([], ["0"]):
        raise DataError(f"{where}: {expected}, got {' '.join(fields)!r}")
    try:
        start, end = float(fields[2]), float(fields[3])
    except ValueError:
        raise DataError(f"{where}: {expected}, got {' '.join(fields)!r}") from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
        raise DataError(
            f"{where}: start and end must be finite seconds, start >= 0; "
            f"got {fields[2]} and {fields[3]}"
        )
    if end != -1 and start >= end:
        raise DataError(
            f"{where}: segment {fields[0]!r} starts at {fields[2]} s, not before its end "
            f"{fields[3]} s; start must be < end (or end -1 for the end of the recording)"
        )
    return start, end



class Recordings:
    """Samples of utterances: whole wavs, or segments cut as Kaldi's extract-segments.

    Keeps the last wav read, since the segments of a recording are usually
    adjacent, and checks that all wavs share one sample rate.
    """

    def __init__(self, data_dir: Path, sample_rate: int | None) -> None:
        self._data_dir = data_dir
        self._last: tuple[WavEntry, np.ndarray] | None = None
        self._rate_source = (sample_rate, "--sample-rate") if sample_rate else None

    @property
    def rate(self) -> int:
        """The common sample rate; known once a wav was read or ``sample_rate`` given."""
        assert self._rate_source is not None
        return self._rate_source[0]

    def samples(self, utterance: Utterance) -> np.ndarray:
        entry = utterance.wav
        if self._last is None or self._last[0] is not entry:
            self._last = (entry, self._read(entry))
        samples = self._last[1]
        return samples if utterance.source == "wav.scp" else self._cut(samples, utterance)

    def _read(self, entry: WavEntry) -> np.ndarray:
        scp = self._data_dir / "wav.scp"
        where = f"{scp} line {entry.line}"
        try:
            samples, rate = read_wav(entry.path)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if self._rate_source is None:
            self._rate_source = (rate, f"{entry.path} ({scp.name} line {entry.line})")
        elif rate != self.rate:
            raise DataError(
                f"{where}: {entry.path} has sample rate {rate} Hz but {self._rate_source[1]} "
                f"says {self.rate} Hz; all wavs of a data dir must share one rate, "
                f"so resample them (e.g. 'sox IN -r {self.rate} OUT.wav')"
            )
        return samples

    def _cut(self, samples: np.ndarray, utterance: Utterance) -> np.ndarray:
        where = f"{self._data_dir / utterance.source} line {utterance.line}"
        rate, length = self.rate, len(samples)
        recording = (
            f"recording {utterance.wav.utt!r} ({utterance.wav.path}, {length / rate:.3f} s)"
        )
        begin = math.floor(utterance.start * rate + 0.5)
        if begin >= length:
            raise DataError(
                f"{where}: segment {utterance.utt!r} starts at {utterance.start:g} s, at or "
                f"past the end of {recording}; fix its times or drop it"
            )
        end = length if utterance.end == -1 else math.floor(utterance.end * rate + 0.5)
        if end - length >= int(MAX_OVERSHOOT_S * rate):  # Kaldi's test
            raise DataError(
                f"{where}: segment {utterance.utt!r} ends at {utterance.end:g} s, past the end "
                f"of {recording} by more than the {MAX_OVERSHOOT_S:g} s that is clipped; fix "
                f"its times or drop it"
            )
        return samples[begin : min(end, length)]

