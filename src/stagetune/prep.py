"""Feature extraction for a Kaldi data directory (``stagetune prep DATA_DIR``).

Follows Kaldi's ``steps/make_fbank.sh`` + ``steps/compute_cmvn_stats.sh``: reads
``wav.scp`` (and ``utt2spk``, ``text`` when present) and writes, next to them:

- ``feats.ark`` / ``feats.scp``: log-mel filterbank features, float32 (T, D),
  computed with kaldi-native-fbank on int16-scale samples (Kaldi's scale).
- ``utt2num_frames`` and ``utt2dur``.
- ``cmvn.ark`` / ``cmvn.scp``: per-speaker CMVN statistics in Kaldi's format, a
  float64 matrix (2, D + 1): row 0 the feature sums with the frame count last,
  row 1 the sums of squares with 0 last.
- ``spk2utt``, and ``utt2spk`` when it was absent (each utterance its own speaker).
- ``tokens.txt`` derived from ``text`` when absent: ``<blank> 0`` then the sorted
  unique tokens ``1..N``, one ``SYMBOL ID`` a line.

Every output is written under a temporary name and renamed only after all
utterances succeeded, so a failure leaves the directory as it was.  scp files
hold absolute ark paths.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

import numpy as np

from stagetune.audio import read_wav
from stagetune.errors import DataError, UsageError
from stagetune.kaldi import TokenTable

__all__ = [
    "PrepSummary",
    "prep_data_dir",
    "compute_fbank",
    "num_frames",
    "read_wav_scp",
]

# Kaldi's CompressionMethod kAutomaticMethod, what compute-fbank-feats --compress uses.
_COMPRESSION_METHOD = 1


@dataclass(frozen=True)
class PrepSummary:
    """What :func:`prep_data_dir` wrote.

    Attributes:
        data_dir: The data directory.
        num_utterances: Utterances in ``wav.scp``.
        num_speakers: Speakers in ``spk2utt``.
        num_frames: Feature frames over all utterances.
        feature_dim: Mel bins per frame.
        num_seconds: Audio duration over all utterances.
        sample_rate: The common sample rate of the wavs, in Hz.
        wrote_utt2spk: ``utt2spk`` was absent and was written (one speaker per utterance).
        wrote_tokens: ``tokens.txt`` was absent and was derived from ``text``.
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

    def describe(self) -> str:
        """One line for the CLI."""
        line = (
            f"prepared {self.data_dir}: {self.num_utterances} utterances, "
            f"{self.num_speakers} speaker{'s' if self.num_speakers != 1 else ''}, "
            f"{self.num_seconds:.1f} s at {self.sample_rate} Hz, "
            f"{self.num_frames} frames x {self.feature_dim} mel bins"
        )
        if self.wrote_tokens:
            line += "; derived tokens.txt from text"
        if self.wrote_utt2spk:
            line += "; no utt2spk, so each utterance is its own speaker"
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


def _read_utt2spk(data_dir: Path, entries: list[_WavEntry]) -> dict[str, str] | None:
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
    for entry in entries:
        if entry.utt not in utt2spk:
            raise DataError(
                f"{path}: no speaker for utterance {entry.utt!r} (wav.scp line {entry.line}); "
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


class _TempFiles:
    """Outputs written under temporary names, renamed together by :meth:`commit`."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._names: list[str] = []

    def path(self, name: str) -> Path:
        """The temporary path standing in for ``DATA_DIR/name``."""
        if name not in self._names:
            self._names.append(name)
        return self._data_dir / f".{name}.tmp-{os.getpid()}"

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
        data_dir: Directory with ``wav.scp`` and optionally ``text``, ``utt2spk``,
            ``tokens.txt``.
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
        DataError: A data file is missing or malformed, a wav is unreadable, too
            short for one frame, or its sample rate disagrees.
        UsageError: An option is out of range.
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
    utt2spk = _read_utt2spk(data_dir, entries)
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

    temp = _TempFiles(data_dir)
    try:
        summary = _write_outputs(
            data_dir,
            temp,
            entries,
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
        temp.commit()
    finally:
        temp.discard()
    return summary


def _write_outputs(
    data_dir: Path,
    temp: _TempFiles,
    entries: list[_WavEntry],
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
    scp_name = data_dir / "wav.scp"
    wrote_utt2spk = utt2spk is None
    if utt2spk is None:
        utt2spk = {entry.utt: entry.utt for entry in entries}
        with temp.open("utt2spk") as out:
            out.writelines(f"{entry.utt} {entry.utt}\n" for entry in entries)
    spk2utt: dict[str, list[str]] = {}
    for entry in entries:
        spk2utt.setdefault(utt2spk[entry.utt], []).append(entry.utt)
    with temp.open("spk2utt") as out:
        out.writelines(f"{spk} {' '.join(utts)}\n" for spk, utts in sorted(spk2utt.items()))

    wrote_tokens = text is not None and not (data_dir / "tokens.txt").is_file()
    if wrote_tokens:
        TokenTable.from_transcripts(fields[1:] for _, fields in text).write(temp.path("tokens.txt"))

    stats: dict[str, np.ndarray] = {}
    rate_source: tuple[int, str] | None = (sample_rate, "--sample-rate") if sample_rate else None
    total_frames = 0
    total_samples = 0
    ark_path = data_dir / "feats.ark"
    with (
        temp.open("feats.ark", "wb") as ark,
        temp.open("feats.scp") as scp,
        temp.open("utt2num_frames") as frames_out,
        temp.open("utt2dur") as dur_out,
    ):
        for entry in entries:
            where = f"{scp_name} line {entry.line}"
            try:
                samples, rate = read_wav(entry.path)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            if rate_source is None:
                rate_source = (rate, f"{entry.path} ({scp_name.name} line {entry.line})")
            elif rate != rate_source[0]:
                raise DataError(
                    f"{where}: {entry.path} has sample rate {rate} Hz but {rate_source[1]} "
                    f"says {rate_source[0]} Hz; all wavs of a data dir must share one rate, "
                    f"so resample them (e.g. 'sox IN -r {rate_source[0]} OUT.wav')"
                )
            count = num_frames(
                len(samples), rate, frame_length_ms=frame_length_ms, frame_shift_ms=frame_shift_ms
            )
            if count == 0:
                raise DataError(
                    f"{where}: {entry.path} has {len(samples)} samples, shorter than one "
                    f"{frame_length_ms:g} ms frame at {rate} Hz; remove the utterance"
                )
            rng = np.random.default_rng([seed, zlib.crc32(entry.utt.encode("utf-8"))])
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
                raise DataError(
                    f"{where}: features of {entry.path} are not finite; try --dither 1.0"
                )
            _write_ark_entry(ark, scp, ark_path, entry.utt, feats, compress)
            frames_out.write(f"{entry.utt} {feats.shape[0]}\n")
            dur_out.write(f"{entry.utt} {len(samples) / rate:.4f}\n")
            spk_stats = stats.setdefault(utt2spk[entry.utt], np.zeros((2, num_mel_bins + 1)))
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

    assert rate_source is not None  # entries is never empty
    return PrepSummary(
        data_dir=data_dir,
        num_utterances=len(entries),
        num_speakers=len(spk2utt),
        num_frames=total_frames,
        feature_dim=num_mel_bins,
        num_seconds=total_samples / rate_source[0],
        sample_rate=rate_source[0],
        wrote_utt2spk=wrote_utt2spk,
        wrote_tokens=wrote_tokens,
    )
