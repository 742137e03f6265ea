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

import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import numpy as np

from stagetune.errors import DataError, UsageError
from stagetune.fbank import MIN_MEL_BINS, compute_fbank, num_frames
from stagetune.kaldi import TokenTable
from stagetune.recordings import (
    Recordings,
    Utterance,
    kaldi_lines,
    read_utterances,
    read_wav_entries,
    read_wav_scp,
)
from stagetune.tempfiles import PrepInterrupted, Signals, TempFiles, remove_stale_temp_files

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


def _read_utt2spk(data_dir: Path, utterances: list[Utterance]) -> dict[str, str] | None:
    path = data_dir / "utt2spk"
    if not path.is_file():
        return None
    utt2spk: dict[str, str] = {}
    for line_no, fields in kaldi_lines(path):
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
    return list(kaldi_lines(path))


def _check_options(
    num_mel_bins: int, dither: float, frame_length_ms: float, frame_shift_ms: float
) -> None:
    if num_mel_bins < MIN_MEL_BINS:
        raise UsageError(f"num_mel_bins must be >= {MIN_MEL_BINS}, got {num_mel_bins}")
    if not dither >= 0.0:
        raise UsageError(f"dither must be >= 0 (Kaldi uses 1.0, 0 turns it off), got {dither}")
    if not 0.0 < frame_shift_ms <= frame_length_ms:
        raise UsageError(
            f"frame shift must be in (0, frame length]; got shift {frame_shift_ms} ms, "
            f"length {frame_length_ms} ms"
        )


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
    entries = read_wav_entries(data_dir)
    utterances, segmented = read_utterances(data_dir, entries)
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

    signals = Signals()
    temp = TempFiles(data_dir)
    with signals.installed():
        num_stale_removed = remove_stale_temp_files(data_dir)
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


def _write_outputs(
    data_dir: Path,
    temp: TempFiles,
    utterances: list[Utterance],
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
    recordings = Recordings(data_dir, sample_rate)
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
