"""Tiny real Kaldi data directories for tests (a pytest plugin).

Everything is written with kaldiio exactly as Kaldi tools would write it: ark +
scp (binary, text ``ark,t`` or compressed ``CM`` matrices), ``text``,
``tokens.txt``, ``utt2spk``, per-speaker ``cmvn.scp`` stats, ``utt2label`` and
``utt2num_frames``. Reuse it in other test modules with::

    from fixtures_data import random_feats, write_data_dir
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import kaldiio
import numpy as np
import pytest

__all__ = [
    "FORMS",
    "TINY_TOKENS",
    "random_feats",
    "write_data_dir",
    "tiny_data_dir",
    "tiny_frame_data_dir",
]

FORMS = ("binary", "text", "compressed")
TINY_TOKENS = ("A", "B", "C", "D", "E")
_SPEECH_FEATURE_COMPRESSION = 2  # Kaldi's kSpeechFeature, what `copy-feats --compress` uses


def random_feats(
    num_utts: int = 12,
    feat_dim: int = 8,
    *,
    min_frames: int = 5,
    max_frames: int = 30,
    num_speakers: int = 3,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Random float32 features (T, F) with a different mean and scale per speaker.

    Returns:
        ``(feats, utt2spk)``; utterance ids are ``spk{k}-u{i:02d}``.
    """
    rng = np.random.default_rng(seed)
    feats, utt2spk = {}, {}
    for i in range(num_utts):
        spk = f"spk{i % num_speakers}"
        utt = f"{spk}-u{i:02d}"
        frames = int(rng.integers(min_frames, max_frames + 1))
        k = i % num_speakers
        feats[utt] = rng.normal(2.0 + 3.0 * k, 0.5 + k, size=(frames, feat_dim)).astype(np.float32)
        utt2spk[utt] = spk
    return feats, utt2spk


def _write_ark(
    directory: Path, name: str, mats: Mapping[str, np.ndarray], *, form: str, relative: bool
) -> list[str]:
    """Write ``name.ark`` and return its scp lines (``key path:offset``)."""
    ark = directory / f"{name}.ark"
    scp = directory / f".{name}.tmp.scp"
    kaldiio.save_ark(
        str(ark),
        dict(mats),
        scp=str(scp),
        text=form == "text",
        compression_method=_SPEECH_FEATURE_COMPRESSION if form == "compressed" else None,
    )
    lines = scp.read_text().splitlines()
    scp.unlink()
    if relative:
        lines = [line.replace(f" {ark}:", f" {ark.name}:") for line in lines]
    return lines


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def write_data_dir(
    path: str | Path,
    feats: Mapping[str, np.ndarray],
    text: Mapping[str, Sequence[str]] | None = None,
    *,
    tokens: Sequence[str] | None = None,
    utt2spk: Mapping[str, str] | None = None,
    utt2label: Mapping[str, Sequence[int]] | None = None,
    form: str = "binary",
    relative: bool = False,
    cmvn: bool = False,
    num_frames: bool = False,
    parts: int = 1,
) -> Path:
    """Write a real Kaldi data directory.

    Args:
        path: Directory to create (parents too).
        feats: Utterance -> (T, F) matrix, written in this order.
        text: Utterance -> tokens; writes ``text`` and ``tokens.txt``.
        tokens: Non-blank symbols for ``tokens.txt`` in id order 1..N; default the
            sorted tokens of ``text``.
        utt2spk: Utterance -> speaker.
        utt2label: Utterance -> one integer per frame.
        form: ``"binary"``, ``"text"`` (``ark,t``) or ``"compressed"``.
        relative: Write ark (and part scp) paths relative to the directory.
        cmvn: Write per-speaker Kaldi stats (per utterance without ``utt2spk``).
        num_frames: Write ``utt2num_frames``.
        parts: Split ``feats.scp`` into this many part scps (an scp of scp files).

    Returns:
        The directory, as an absolute path.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    directory = Path(path).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    scp_lines = _write_ark(directory, "feats", feats, form=form, relative=relative)
    if parts == 1:
        _write_lines(directory / "feats.scp", scp_lines)
    else:
        chunks = np.array_split(np.arange(len(scp_lines)), parts)
        names = []
        for k, chunk in enumerate(chunks, 1):
            _write_lines(directory / f"feats.{k}.scp", [scp_lines[i] for i in chunk])
            names.append(f"feats.{k}.scp" if relative else str(directory / f"feats.{k}.scp"))
        _write_lines(directory / "feats.scp", names)
    if text is not None:
        _write_lines(directory / "text", [" ".join([utt, *toks]) for utt, toks in text.items()])
        if tokens is None:
            tokens = sorted({tok for toks in text.values() for tok in toks})
        _write_lines(
            directory / "tokens.txt", ["<blank> 0", *(f"{s} {i}" for i, s in enumerate(tokens, 1))]
        )
    if utt2spk is not None:
        _write_lines(directory / "utt2spk", [f"{u} {s}" for u, s in utt2spk.items()])
    if utt2label is not None:
        _write_lines(
            directory / "utt2label",
            [" ".join([u, *map(str, labels)]) for u, labels in utt2label.items()],
        )
    if num_frames:
        _write_lines(directory / "utt2num_frames", [f"{u} {len(m)}" for u, m in feats.items()])
    if cmvn:
        by_speaker: dict[str, list[np.ndarray]] = {}
        for utt, mat in feats.items():
            by_speaker.setdefault(utt2spk[utt] if utt2spk else utt, []).append(mat)
        stats = {}
        for spk, mats in by_speaker.items():
            frames = np.concatenate(mats).astype(np.float64)
            s = np.zeros((2, frames.shape[1] + 1))
            s[0, :-1], s[0, -1] = frames.sum(axis=0), len(frames)
            s[1, :-1] = (frames**2).sum(axis=0)
            stats[spk] = s
        lines = _write_ark(directory, "cmvn", stats, form="binary", relative=relative)
        _write_lines(directory / "cmvn.scp", lines)
    return directory


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """12 utterances, 3 speakers, dim 8, tokens A..E, ``utt2spk`` + ``cmvn.scp`` (CTC)."""
    feats, utt2spk = random_feats()
    rng = np.random.default_rng(1)
    text = {
        utt: [TINY_TOKENS[j] for j in rng.integers(0, 5, size=rng.integers(1, 5))]
        for utt in feats
    }
    return write_data_dir(
        tmp_path / "tiny", feats, text, tokens=TINY_TOKENS, utt2spk=utt2spk, cmvn=True
    )


@pytest.fixture
def tiny_frame_data_dir(tmp_path: Path) -> Path:
    """Like :func:`tiny_data_dir` but for the ``frame`` task: ``utt2label``, 4 classes."""
    feats, utt2spk = random_feats()
    rng = np.random.default_rng(2)
    labels = {utt: rng.integers(0, 4, size=len(mat)).tolist() for utt, mat in feats.items()}
    return write_data_dir(
        tmp_path / "tiny_frame", feats, utt2spk=utt2spk, utt2label=labels, cmvn=True
    )
