"""Feature extraction for a Kaldi data directory (``stagetune prep DATA_DIR``).

Follows Kaldi's ``steps/make_fbank.sh`` + ``steps/compute_cmvn_stats.sh``: reads
``wav.scp`` (and ``segments``, ``utt2spk``, ``text`` when present) and writes, next
to them:

- ``feats.ark`` / ``feats.scp``: log-mel filterbank features, float32 (T, D),
  computed with kaldi-native-fbank on int16-scale samples (Kaldi's scale).
- ``utt2num_frames`` and ``utt2dur``.
- ``cmvn.ark`` / ``cmvn.scp``: per-speaker CMVN statistics in Kaldi's format, a
  float64 matrix (2, D + 1): row 0 the feature sums with the frame count last,
  row 1 the sums of squares with 0 last.
- ``spk2utt``, and ``utt2spk`` when it was absent (each utterance its own speaker).
- ``tokens.txt`` derived from ``text`` when absent: ``<blank> 0`` then the sorted
  unique tokens ``1..N``, one ``SYMBOL ID`` a line.

With a ``segments`` file (``UTT RECORDING START END``, seconds, END -1 for the
end of the recording) the utterances are its segments, cut as Kaldi's
``extract-segments`` cuts them, and ``utt2spk``/``text`` are keyed by segment id;
without one, each ``wav.scp`` line is an utterance.

Every output is written under a temporary name (``.NAME.tmp-PID@HOST``) and
renamed only after all utterances succeeded, so a failure, Ctrl-C or SIGTERM
leaves the directory as it was.  Temporary files of a run that was killed
(SIGKILL, power loss) are removed by the next run once their PID is gone.  scp
files hold absolute ark paths.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

from stagetune.audio import read_wav
from stagetune.errors import DataError, StagetuneError, UsageError
from stagetune.kaldi import TokenTable

__all__ = [
    "PrepSummary",
    "PrepInterrupted",
    "prep_data_dir",
    "compute_fbank",
    "num_frames",
    "read_wav_scp",
]

# Kaldi's CompressionMethod kAutomaticMethod, what compute-fbank-feats --compress uses.
_COMPRESSION_METHOD = 1

#: How far a segment may end past its recording, in seconds, before it is an
#: error; within it the segment is clipped (Kaldi's extract-segments --max-overshoot).
MAX_OVERSHOOT_S = 0.5

#: Every file prep writes; only temporary files of these names are ever cleaned up.
_OUTPUT_NAMES = (
    "utt2spk",
    "spk2utt",
    "tokens.txt",
    "feats.ark",
    "feats.scp",
    "utt2num_frames",
    "utt2dur",
    "cmvn.ark",
    "cmvn.scp",
)


class PrepInterrupted(StagetuneError):
    """SIGTERM arrived and prep stopped; the message says whether it had written anything.

    Before the outputs are renamed into place, the temporary files are removed and
    the data dir is as it was. The exit code is the shell's for the signal (143).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class PrepSummary:
    """What :func:`prep_data_dir` wrote.

    Attributes:
        data_dir: The data directory.
        num_utterances: Utterances: lines of ``segments`` if present, else of ``wav.scp``.
        num_speakers: Speakers in ``spk2utt``.
        num_frames: Feature frames over all utterances.
        feature_dim: Mel bins per frame.
        num_seconds: Audio duration over all utterances.
        sample_rate: The common sample rate of the wavs, in Hz.
        wrote_utt2spk: ``utt2spk`` was absent and was written (one speaker per utterance).
        wrote_tokens: ``tokens.txt`` was absent and was derived from ``text``.
        num_recordings: Recordings the segments were cut from; ``None`` without
            a ``segments`` file.
        num_stale_removed: Temporary files of earlier, killed runs that were removed.
    """

    data_dir: Path
    num_utterances: int
    num_speakers: int
    num_frames: int
    feature_dim: int
    num_seconds: float
    sample_rate: int
    wrote_utt2spk: bool
    wrote_tokens: bool
    num_recordings: int | None = None
    num_stale_removed: int = 0

    def describe(self) -> str:
        """One line for the CLI."""
        utterances = f"{self.num_utterances} utterances"
        if self.num_recordings is not None:
            utterances += f" (segments of {self.num_recordings} recordings)"
        line = (
            f"prepared {self.data_dir}: {utterances}, "
            f"{self.num_speakers} speaker{'s' if self.num_speakers != 1 else ''}, "
            f"{self.num_seconds:.1f} s at {self.sample_rate} Hz, "
            f"{self.num_frames} frames x {self.feature_dim} mel bins"
        )
        if self.wrote_tokens:
            line += "; derived tokens.txt from text"
        if self.wrote_utt2spk:
            line += "; no utt2spk, so each utterance is its own speaker"
        if self.num_stale_removed:
            line += f"; removed {self.num_stale_removed} temporary file(s) of killed runs"
        return line


def num_frames(
    num_samples: int,
    sample_rate: int,
    *,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Kaldi's frame count with ``snip_edges=true``: ``1 + (N - length) // shift``.

    Returns 0 when the audio is shorter than one frame.
    """
    frame_length = int(sample_rate * 0.001 * frame_length_ms)
    frame_shift = int(sample_rate * 0.001 * frame_shift_ms)
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


#: Kaldi's (and kaldi-native-fbank's) smallest filterbank.
_MIN_MEL_BINS = 3


def _max_mel_bins(sample_rate: int, frame_length_ms: float) -> int:
    """The most mel bins kaldi-native-fbank accepts at this rate and frame length."""
    import kaldi_native_fbank as knf

    def fits(bins: int) -> bool:
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(sample_rate)
        opts.frame_opts.frame_length_ms = float(frame_length_ms)
        opts.mel_opts.num_bins = bins
        try:
            knf.OnlineFbank(opts)
        except ValueError:
            return False
        return True

    low, high = _MIN_MEL_BINS, 2 * _MIN_MEL_BINS  # fits(low) (or nothing does), not fits(high)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def compute_fbank(
    samples: np.ndarray,
    sample_rate: int,
    *,
    num_mel_bins: int = 40,
    dither: float = 0.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Log-mel filterbank features of one utterance with kaldi-native-fbank.

    Args:
        samples: 1-D samples on the int16 scale (int16 or float).
        sample_rate: Rate of ``samples`` in Hz.
        num_mel_bins: Mel bins (feature dimension D).
        dither: Standard deviation of Gaussian noise added to the samples (Kaldi's
            ``--dither``); drawn from ``rng`` so results are reproducible.
        frame_length_ms: Window length.
        frame_shift_ms: Window shift.
        rng: Source of the dither noise; required when ``dither > 0``.

    Returns:
        float32 array (T, D), T as given by :func:`num_frames`.
    """
    import kaldi_native_fbank as knf

    waveform = np.asarray(samples, dtype=np.float32)
    if dither > 0.0:
        if rng is None:
            raise ValueError("dither > 0 needs an rng so that features are reproducible")
        # Added here rather than by knf, whose dither is unseeded.
        waveform = waveform + np.float32(dither) * rng.standard_normal(
            waveform.shape[0], dtype=np.float32
        )
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = float(frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(frame_shift_ms)
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = int(num_mel_bins)
    try:
        fbank = knf.OnlineFbank(opts)
    except ValueError as exc:
        if "num_mel_bins" not in str(exc):
            raise
        raise UsageError(
            f"--num-mel-bins {num_mel_bins} is too many for {sample_rate} Hz audio in "
            f"{frame_length_ms:g} ms frames (some mel bins would cover no FFT bin); use at "
            f"most {_max_mel_bins(sample_rate, frame_length_ms)}"
        ) from None
    fbank.accept_waveform(float(sample_rate), waveform)
    fbank.input_finished()
    count = fbank.num_frames_ready
    if count == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    # np.array copies: get_frame's buffer belongs to the extractor.
    return np.stack([np.array(fbank.get_frame(i), dtype=np.float32) for i in range(count)])


@dataclass(frozen=True)
class _WavEntry:
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
    return [(entry.utt, entry.path) for entry in _read_wav_scp(Path(data_dir))]


def _read_wav_scp(data_dir: Path) -> list[_WavEntry]:
    scp = data_dir / "wav.scp"
    if not scp.is_file():
        raise DataError(f"{scp}: no wav.scp; a data dir needs 'UTT PATH' lines for its audio")
    entries: list[_WavEntry] = []
    seen: dict[str, int] = {}
    for line_no, fields in _kaldi_lines(scp, maxsplit=1):
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
        entries.append(_WavEntry(utt, path, line_no))
    if not entries:
        raise DataError(f"{scp}: wav.scp is empty; it needs one 'UTT PATH' line per utterance")
    return entries


def _kaldi_lines(path: Path, *, maxsplit: int = -1) -> Iterable[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of a Kaldi text file, skipping blank lines."""
    with open(path, encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            fields = line.split(maxsplit=maxsplit)
            if fields:
                yield line_no, fields


@dataclass(frozen=True)
class _Utterance:
    """One output utterance: a whole wav, or a segment ``[start, end)`` of one in seconds."""

    utt: str
    wav: _WavEntry
    source: str  # the file and line that define it: "wav.scp" or "segments"
    line: int
    start: float = 0.0
    end: float = -1.0  # -1: to the end of the recording, as in Kaldi


def _read_utterances(data_dir: Path, entries: list[_WavEntry]) -> tuple[list[_Utterance], bool]:
    """The utterances to compute features for, and whether they come from ``segments``."""
    path = data_dir / "segments"
    if not path.is_file():
        return [_Utterance(e.utt, e, "wav.scp", e.line) for e in entries], False
    recordings = {entry.utt: entry for entry in entries}
    utterances: list[_Utterance] = []
    seen: dict[str, int] = {}
    for line_no, fields in _kaldi_lines(path):
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
            _Utterance(utt, recordings[recording], "segments", line_no, start, end)
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


def _read_utt2spk(data_dir: Path, utterances: list[_Utterance]) -> dict[str, str] | None:
    path = data_dir / "utt2spk"
    if not path.is_file():
        return None
    utt2spk: dict[str, str] = {}
    for line_no, fields in _kaldi_lines(path):
        if len(fields) != 2:
            raise DataError(
                f"{path} line {line_no}: expected 'UTT SPEAKER', got {' '.join(fields)!r}"
            )
        utt2spk[fields[0]] = fields[1]
    for utterance in utterances:
        if utterance.utt not in utt2spk:
            raise DataError(
                f"{path}: no speaker for utterance {utterance.utt!r} "
                f"({utterance.source} line {utterance.line}); "
                f"add it, or delete utt2spk to make each utterance its own speaker"
            )
    return utt2spk


def _read_text(data_dir: Path) -> list[tuple[int, list[str]]] | None:
    path = data_dir / "text"
    if not path.is_file():
        return None
    return list(_kaldi_lines(path))


def _check_options(
    num_mel_bins: int, dither: float, frame_length_ms: float, frame_shift_ms: float
) -> None:
    if num_mel_bins < _MIN_MEL_BINS:
        raise UsageError(f"num_mel_bins must be >= {_MIN_MEL_BINS}, got {num_mel_bins}")
    if not dither >= 0.0:
        raise UsageError(f"dither must be >= 0 (Kaldi uses 1.0, 0 turns it off), got {dither}")
    if not 0.0 < frame_shift_ms <= frame_length_ms:
        raise UsageError(
            f"frame shift must be in (0, frame length]; got shift {frame_shift_ms} ms, "
            f"length {frame_length_ms} ms"
        )


def _host() -> str:
    """This host's name as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


# ".feats.ark.tmp-PID@HOST"; names without "@HOST" were written by older versions, here.
_TEMP_NAME = re.compile(
    r"\.(?P<name>" + "|".join(map(re.escape, _OUTPUT_NAMES)) + r")"
    r"\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?"
)


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temp_files(data_dir: Path) -> int:
    """Remove temporary files of prep runs on this host whose process is gone.

    Only names prep itself writes are touched; files of live processes and of
    other hosts (a data dir on a shared filesystem) are left alone.

    Returns:
        How many files were removed.
    """
    host = _host()
    removed = 0
    for path in data_dir.iterdir():
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_is_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            continue
        removed += 1
    return removed


class _Signals:
    """SIGTERM raises :class:`PrepInterrupted` and SIGINT ``KeyboardInterrupt``, so that
    ``finally`` blocks remove the temporary files; after :meth:`disarm` they wait.

    Python's default for SIGTERM ends the process at once, leaving temporary files
    behind. Handlers can only be set in the main thread; elsewhere nothing changes.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._armed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # already unwinding: let the cleanup finish
            return
        self.received = signum
        if self._armed:
            self._raise("removed its temporary files, nothing in the data dir changed")

    def _raise(self, outcome: str) -> None:
        assert self.received is not None
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(self.received).name
        raise PrepInterrupted(f"prep stopped by {name}; {outcome}", self.received)

    def disarm(self) -> None:
        """Hold signals back from now on: the outputs are being renamed into place."""
        self._armed = False

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.received is not None:  # arrived after disarm()
            self._raise("it had just written all of its outputs, which are complete")


class _TempFiles:
    """Outputs written under temporary names, renamed together by :meth:`commit`."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._names: list[str] = []
        self._suffix = f".tmp-{os.getpid()}@{_host()}"

    def path(self, name: str) -> Path:
        """The temporary path standing in for ``DATA_DIR/name``."""
        if name not in _OUTPUT_NAMES:
            raise ValueError(f"{name!r} is not in _OUTPUT_NAMES, so a killed run would leak it")
        if name not in self._names:
            self._names.append(name)
        return self._data_dir / f".{name}{self._suffix}"

    def open(self, name: str, mode: str = "w") -> IO:
        encoding = None if "b" in mode else "utf-8"
        return open(self.path(name), mode, encoding=encoding)

    def commit(self) -> None:
        # feats.scp goes last: once it exists, everything it points at does too.
        for name in sorted(self._names, key=lambda name: name == "feats.scp"):
            os.replace(self.path(name), self._data_dir / name)
        self._names.clear()

    def discard(self) -> None:
        for name in self._names:
            self.path(name).unlink(missing_ok=True)
        self._names.clear()


def _write_ark_entry(
    ark: IO[bytes], scp: IO[str], ark_path: Path, key: str, matrix: np.ndarray, compress: bool
) -> None:
    import kaldiio

    # The scp offset points just past "KEY " in the ark, as Kaldi writes it.
    offset = ark.tell() + len(key.encode("utf-8")) + 1
    method = _COMPRESSION_METHOD if compress else None
    kaldiio.save_ark(ark, {key: matrix}, compression_method=method)
    scp.write(f"{key} {ark_path}:{offset}\n")


def prep_data_dir(
    data_dir: str | Path,
    *,
    num_mel_bins: int = 40,
    dither: float = 1.0,
    sample_rate: int | None = None,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    seed: int = 0,
    compress: bool = False,
) -> PrepSummary:
    """Compute features, CMVN stats, speaker maps and tokens for a Kaldi data dir.

    Args:
        data_dir: Directory with ``wav.scp`` and optionally ``segments``, ``text``,
            ``utt2spk``, ``tokens.txt``.
        num_mel_bins: Feature dimension.
        dither: Gaussian noise std on the int16 scale, as Kaldi's default 1.0; it
            keeps log-mel features of digital silence (exact zeros) from sitting
            at the log floor. Seeded per utterance, so reruns give the same bytes.
        sample_rate: Expected sample rate in Hz; ``None`` accepts whatever rate the
            wavs share.
        frame_length_ms: Window length.
        frame_shift_ms: Window shift.
        seed: Seed of the dither noise.
        compress: Write Kaldi-compressed feature matrices (smaller, lossy).

    Returns:
        A :class:`PrepSummary`.

    Raises:
        DataError: A data file is missing or malformed, a wav is unreadable or
            truncated, an utterance is too short for one frame, a segment lies
            outside its recording, or a sample rate disagrees.
        UsageError: An option is out of range.
        PrepInterrupted: SIGTERM arrived (in the main thread); the data dir is as
            it was, unless the message says the outputs were complete.
    """
    _check_options(num_mel_bins, dither, frame_length_ms, frame_shift_ms)
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data dir does not exist")
    if any(char.isspace() for char in str(data_dir)):
        raise DataError(
            f"{data_dir}: path contains whitespace, which Kaldi scp files cannot hold; move it"
        )
    entries = _read_wav_scp(data_dir)
    utterances, segmented = _read_utterances(data_dir, entries)
    utt2spk = _read_utt2spk(data_dir, utterances)
    text = _read_text(data_dir)
    tokens_path = data_dir / "tokens.txt"
    if text is not None and tokens_path.is_file():
        known = TokenTable.read(tokens_path)
        for line_no, fields in text:
            unknown = sorted(token for token in set(fields[1:]) if token not in known)
            if unknown:
                raise DataError(
                    f"{data_dir / 'text'} line {line_no}: token(s) {' '.join(unknown)} not in "
                    f"{tokens_path}; add them there, or delete tokens.txt to derive it from text"
                )

    signals = _Signals()
    temp = _TempFiles(data_dir)
    with signals.installed():
        num_stale_removed = _remove_stale_temp_files(data_dir)
        try:
            summary = _write_outputs(
                data_dir,
                temp,
                utterances,
                utt2spk,
                text,
                num_mel_bins=num_mel_bins,
                dither=dither,
                sample_rate=sample_rate,
                frame_length_ms=frame_length_ms,
                frame_shift_ms=frame_shift_ms,
                seed=seed,
                compress=compress,
            )
            signals.disarm()
            temp.commit()
        finally:
            temp.discard()
    return replace(
        summary,
        num_recordings=len({u.wav.utt for u in utterances}) if segmented else None,
        num_stale_removed=num_stale_removed,
    )


class _Recordings:
    """Samples of utterances: whole wavs, or segments cut as Kaldi's extract-segments.

    Keeps the last wav read, since the segments of a recording are usually
    adjacent, and checks that all wavs share one sample rate.
    """

    def __init__(self, data_dir: Path, sample_rate: int | None) -> None:
        self._data_dir = data_dir
        self._last: tuple[_WavEntry, np.ndarray] | None = None
        self._rate_source = (sample_rate, "--sample-rate") if sample_rate else None

    @property
    def rate(self) -> int:
        """The common sample rate; known once a wav was read or ``sample_rate`` given."""
        assert self._rate_source is not None
        return self._rate_source[0]

    def samples(self, utterance: _Utterance) -> np.ndarray:
        entry = utterance.wav
        if self._last is None or self._last[0] is not entry:
            self._last = (entry, self._read(entry))
        samples = self._last[1]
        return samples if utterance.source == "wav.scp" else self._cut(samples, utterance)

    def _read(self, entry: _WavEntry) -> np.ndarray:
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

    def _cut(self, samples: np.ndarray, utterance: _Utterance) -> np.ndarray:
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


def _write_outputs(
    data_dir: Path,
    temp: _TempFiles,
    utterances: list[_Utterance],
    utt2spk: dict[str, str] | None,
    text: list[tuple[int, list[str]]] | None,
    *,
    num_mel_bins: int,
    dither: float,
    sample_rate: int | None,
    frame_length_ms: float,
    frame_shift_ms: float,
    seed: int,
    compress: bool,
) -> PrepSummary:
    wrote_utt2spk = utt2spk is None
    if utt2spk is None:
        utt2spk = {u.utt: u.utt for u in utterances}
        with temp.open("utt2spk") as out:
            out.writelines(f"{u.utt} {u.utt}\n" for u in utterances)
    spk2utt: dict[str, list[str]] = {}
    for utterance in utterances:
        spk2utt.setdefault(utt2spk[utterance.utt], []).append(utterance.utt)
    with temp.open("spk2utt") as out:
        out.writelines(f"{spk} {' '.join(utts)}\n" for spk, utts in sorted(spk2utt.items()))

    wrote_tokens = text is not None and not (data_dir / "tokens.txt").is_file()
    if wrote_tokens:
        TokenTable.from_transcripts(fields[1:] for _, fields in text).write(temp.path("tokens.txt"))

    stats: dict[str, np.ndarray] = {}
    recordings = _Recordings(data_dir, sample_rate)
    total_frames = 0
    total_samples = 0
    ark_path = data_dir / "feats.ark"
    with (
        temp.open("feats.ark", "wb") as ark,
        temp.open("feats.scp") as scp,
        temp.open("utt2num_frames") as frames_out,
        temp.open("utt2dur") as dur_out,
    ):
        for utterance in utterances:
            utt = utterance.utt
            where = f"{data_dir / utterance.source} line {utterance.line}"
            what = utterance.wav.path if utterance.source == "wav.scp" else f"segment {utt!r}"
            samples = recordings.samples(utterance)
            rate = recordings.rate
            count = num_frames(
                len(samples), rate, frame_length_ms=frame_length_ms, frame_shift_ms=frame_shift_ms
            )
            if count == 0:
                raise DataError(
                    f"{where}: {what} has {len(samples)} samples, shorter than one "
                    f"{frame_length_ms:g} ms frame at {rate} Hz; remove the utterance"
                )
            rng = np.random.default_rng([seed, zlib.crc32(utt.encode("utf-8"))])
            feats = compute_fbank(
                samples,
                rate,
                num_mel_bins=num_mel_bins,
                dither=dither,
                frame_length_ms=frame_length_ms,
                frame_shift_ms=frame_shift_ms,
                rng=rng,
            )
            if not np.all(np.isfinite(feats)):
                raise DataError(f"{where}: features of {what} are not finite; try --dither 1.0")
            _write_ark_entry(ark, scp, ark_path, utt, feats, compress)
            frames_out.write(f"{utt} {feats.shape[0]}\n")
            dur_out.write(f"{utt} {len(samples) / rate:.4f}\n")
            spk_stats = stats.setdefault(utt2spk[utt], np.zeros((2, num_mel_bins + 1)))
            feats64 = feats.astype(np.float64)
            spk_stats[0, :-1] += feats64.sum(axis=0)
            spk_stats[0, -1] += feats.shape[0]
            spk_stats[1, :-1] += np.square(feats64).sum(axis=0)
            total_frames += feats.shape[0]
            total_samples += len(samples)

    cmvn_ark_path = data_dir / "cmvn.ark"
    with temp.open("cmvn.ark", "wb") as ark, temp.open("cmvn.scp") as scp:
        for spk in sorted(stats):
            _write_ark_entry(ark, scp, cmvn_ark_path, spk, stats[spk], compress=False)

    return PrepSummary(
        data_dir=data_dir,
        num_utterances=len(utterances),
        num_speakers=len(spk2utt),
        num_frames=total_frames,
        feature_dim=num_mel_bins,
        num_seconds=total_samples / recordings.rate,  # utterances is never empty
        sample_rate=recordings.rate,
        wrote_utt2spk=wrote_utt2spk,
        wrote_tokens=wrote_tokens,
    )
