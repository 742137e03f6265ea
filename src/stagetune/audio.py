"""Read and write 16-bit PCM mono wav files with the standard library.

Only what Kaldi-style corpora need: samples come back as ``int16`` numpy arrays
(the scale Kaldi features expect), never as floats in ``[-1, 1]``; and
:func:`write_wav_data_dir` writes a Kaldi data dir of such wavs.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from stagetune.errors import DataError

__all__ = ["read_wav", "write_wav", "to_int16", "Utterance", "write_wav_data_dir"]


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM mono wav file.

    Args:
        path: The wav file.

    Returns:
        ``(samples, sample_rate)``: a 1-D ``int16`` array and the rate in Hz.

    Raises:
        DataError: The file is missing, not a RIFF/WAVE file, not PCM, not
            16-bit, not mono, or holds fewer samples than its header says.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as reader:
            num_channels = reader.getnchannels()
            sample_width = reader.getsampwidth()
            sample_rate = reader.getframerate()
            header_frames = reader.getnframes()
            data = reader.readframes(header_frames)
    except FileNotFoundError:
        raise DataError(f"{path}: wav file does not exist") from None
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(
            f"{path}: cannot read as a PCM wav file ({exc}); convert it to 16-bit PCM mono, "
            f"e.g. 'sox IN -b 16 -c 1 -e signed-integer OUT.wav'"
        ) from None
    if sample_width != 2 or num_channels != 1:
        raise DataError(
            f"{path}: wav must be 16-bit PCM mono, got {8 * sample_width}-bit with "
            f"{num_channels} channel(s); convert it, e.g. 'sox IN -b 16 -c 1 OUT.wav'"
        )
    if len(data) != 2 * header_frames:
        # The wave module reads what is there: a cut-off copy or an aborted
        # export would otherwise pass as a shorter recording.
        held = f"{len(data) // 2}" + (" and a half" if len(data) % 2 else "")
        raise DataError(
            f"{path}: wav is truncated: its header says {header_frames} samples, the file "
            f"holds {held}; re-export it, or drop it from wav.scp"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.int16), sample_rate


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write ``int16`` samples as a 16-bit PCM mono wav file.

    Args:
        path: Where to write; parent directories must exist.
        samples: 1-D array of ``int16`` samples (see :func:`to_int16`).
        sample_rate: Rate in Hz.

    Raises:
        ValueError: ``samples`` is not a 1-D ``int16`` array.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.dtype != np.int16:
        raise ValueError(
            f"samples must be a 1-D int16 array, got {samples.ndim}-D {samples.dtype}; "
            f"convert with stagetune.audio.to_int16"
        )
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(int(sample_rate))
        writer.writeframes(samples.astype("<i2").tobytes())


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Round float samples on the int16 scale and clip them to the int16 range."""
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


class Utterance(NamedTuple):
    """One utterance of a data dir to write: id, speaker, transcript tokens, samples."""

    utt: str
    speaker: str
    tokens: Sequence[str]
    samples: np.ndarray


def write_wav_data_dir(
    data_dir: str | Path, utterances: Iterable[Utterance], sample_rate: int
) -> int:
    """Write a Kaldi data dir: ``wav/UTT.wav``, ``wav.scp``, ``text`` and ``utt2spk``.

    ``wav.scp`` holds paths relative to ``data_dir`` (so the dir can move), and
    the list files are sorted by utterance id, as Kaldi expects.

    Args:
        data_dir: Directory to write into; created if missing.
        utterances: What to write; ids must be unique and contain no whitespace.
        sample_rate: Rate of every utterance's samples, in Hz.

    Returns:
        The number of utterances written.
    """
    data_dir = Path(data_dir)
    (data_dir / "wav").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    for utterance in utterances:
        write_wav(data_dir / "wav" / f"{utterance.utt}.wav", utterance.samples, sample_rate)
        rows.append((utterance.utt, utterance.speaker, " ".join(utterance.tokens)))
    rows.sort()
    with (
        open(data_dir / "wav.scp", "w", encoding="utf-8") as wav_scp,
        open(data_dir / "text", "w", encoding="utf-8") as text,
        open(data_dir / "utt2spk", "w", encoding="utf-8") as utt2spk,
    ):
        for utt, speaker, transcript in rows:
            wav_scp.write(f"{utt} wav/{utt}.wav\n")
            text.write(f"{utt} {transcript}\n")
            utt2spk.write(f"{utt} {speaker}\n")
    return len(rows)
