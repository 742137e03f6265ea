"""Low-level reading of Kaldi text tables, scp files and matrices.

* :func:`read_table` / :func:`read_keyed`: UTF-8 ``KEY VALUE ...`` tables
  (``text``, ``utt2spk``, ``tokens.txt``, ...), line by line.
* :func:`read_scp` / :func:`read_feats_scp`: ``KEY RXSPECIFIER`` files, with
  relative ark paths resolved against the scp's directory, then the data
  directory (never the working directory), and ``feats.scp`` as an scp of scp files.
* :func:`load_matrix` / :func:`scan_matrices`: binary, text or compressed
  matrices through kaldiio (text matrices with a faster float32 parser), one at a
  time or in one validating pass.

:mod:`stagetune.kaldi` builds a data directory from these and
:mod:`stagetune.tokens` reads ``tokens.txt`` with :func:`read_table`; users
import those two modules, not this one. Every problem is a :class:`~stagetune.errors.DataError` naming
the file and line. This module does not import torch (nor stagetune.kaldi).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

import kaldiio
import numpy as np

from stagetune.errors import DataError

__all__ = [
    "Line",
    "line_of",
    "read_table",
    "read_keyed",
    "read_scp",
    "read_feats_scp",
    "load_matrix",
    "iter_matrices",
    "scan_matrices",
]

_MAX_OPEN_ARKS = 64  # bound the open files of a pass over many matrices
_SLICE = re.compile(r"^(?P<body>.*?)(?P<slice>\[[0-9:,\s]*\])?$")

Line = tuple[Path, int]  # (file, line number) of an entry, for error messages


def line_of(where: Line) -> str:
    """Format a :data:`Line` as ``FILE line N``."""
    return f"{where[0]} line {where[1]}"


def read_table(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, whitespace-split fields)`` for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise DataError(
                    f"{path} line {lineno}: not valid UTF-8; Kaldi text files must be UTF-8"
                ) from None
            if fields:
                yield lineno, fields


def read_keyed(path: Path, usage: str, min_fields: int = 2) -> dict[str, tuple[int, list[str]]]:
    """Read ``KEY VALUE ...`` lines into ``key -> (line number, values)``."""
    entries: dict[str, tuple[int, list[str]]] = {}
    for lineno, fields in read_table(path):
        if len(fields) < min_fields:
            raise DataError(
                f"{path} line {lineno}: expected `{usage}`, got {' '.join(fields)!r}; "
                "fix or remove the line"
            )
        key = fields[0]
        if key in entries:
            raise DataError(
                f"{path} line {lineno}: duplicate id {key!r} (first on line "
                f"{entries[key][0]}); each id must appear once"
            )
        entries[key] = (lineno, fields[1:])
    return entries


def _split_spec(spec: str) -> tuple[str, int | None, str]:
    """Split ``file:offset[slices]`` into its parts; pipes come back whole."""
    if spec.startswith("|") or spec.endswith("|"):
        return spec, None, ""
    match = _SLICE.match(spec)
    body, slc = match["body"], match["slice"] or ""
    head, sep, tail = body.rpartition(":")
    if sep and tail.isdigit():
        return head, int(tail), slc
    return body, None, slc


def _resolve(spec: str, bases: Sequence[Path], cache: dict[str, Path]) -> tuple[str, Path | None]:
    """Make the file of an rxspecifier absolute; returns ``(spec, file or None for pipes)``."""
    if spec.startswith("|") or spec.endswith("|"):
        return spec, None
    name, offset, slc = _split_spec(spec)
    if name not in cache:
        file = Path(name)
        if not file.is_absolute():
            tried = [base / file for base in bases]
            file = next((p for p in tried if p.exists()), tried[0])
        cache[name] = file
    return f"{cache[name]}{'' if offset is None else f':{offset}'}{slc}", cache[name]


def read_scp(
    scp: Path, data_dir: Path, where: dict[str, Line], what: str
) -> dict[str, str]:
    """Read ``KEY RXSPECIFIER`` lines, resolving paths and checking the ark files exist."""
    bases = list(dict.fromkeys([scp.parent, data_dir]))
    cache: dict[str, Path] = {}
    exists: dict[Path, bool] = {}
    specs: dict[str, str] = {}
    for lineno, fields in read_table(scp):
        if len(fields) < 2:
            raise DataError(
                f"{scp} line {lineno}: expected `{what} PATH:OFFSET`, got {fields[0]!r}; "
                "a scp either maps ids to matrices on every line or lists scp files on every line"
            )
        key = fields[0]
        if key in where:
            raise DataError(
                f"{scp} line {lineno}: duplicate {what.lower()} id {key!r} (first at "
                f"{line_of(where[key])}); each id must appear once"
            )
        spec, file = _resolve(" ".join(fields[1:]), bases, cache)
        if file is not None and file not in exists:
            exists[file] = file.is_file()
        if file is not None and not exists[file]:
            raise DataError(
                f"{scp} line {lineno}: ark file {file} of {key!r} does not exist (relative "
                f"paths are resolved against {', '.join(map(str, bases))}); fix the path "
                "or recompute the features"
            )
        where[key] = (scp, lineno)
        specs[key] = spec
    return specs


def read_feats_scp(data_dir: Path) -> tuple[dict[str, str], dict[str, Line], list[list[str]]]:
    """Read ``feats.scp``, following an scp of scp files; returns specs, lines, parts."""
    scp = data_dir / "feats.scp"
    lines = list(read_table(scp))
    if not lines:
        raise DataError(f"{scp} is empty; run `stagetune prep {data_dir}` to compute features")
    where: dict[str, Line] = {}
    if len(lines[0][1]) > 1:
        specs = read_scp(scp, data_dir, where, "UTT")
        return specs, where, [sorted(specs)]
    specs, parts = {}, []
    for lineno, fields in lines:
        if len(fields) != 1:
            raise DataError(
                f"{scp} line {lineno}: expected one scp path per line as on line "
                f"{lines[0][0]} (an scp of scp files), got {' '.join(fields)!r}"
            )
        part = Path(fields[0]) if Path(fields[0]).is_absolute() else data_dir / fields[0]
        if not part.is_file():
            raise DataError(f"{scp} line {lineno}: part file {part} does not exist")
        part_specs = read_scp(part, data_dir, where, "UTT")
        if not part_specs:
            raise DataError(f"{scp} line {lineno}: part file {part} is empty; remove the line")
        specs.update(part_specs)
        parts.append(sorted(part_specs))
    return specs, where, parts


def _read_text_matrix(fd: IO[bytes]) -> np.ndarray:
    """Parse a text (``ark,t``) matrix ``[ rows ]`` from the current position.

    kaldiio reads these a byte at a time and guesses int32 when the first value
    has no ``.``; this reads blocks and always parses float32.
    """
    chunks, size = [], 1 << 12
    while True:
        chunk = fd.read(size)
        if not chunk:
            raise ValueError("no closing ']' before the end of the file")
        end = chunk.find(b"]")
        chunks.append(chunk if end < 0 else chunk[:end])
        if end >= 0:
            break
        size = min(size * 2, 1 << 22)
    body = b"".join(chunks).decode("ascii")
    start = body.find("[")
    if start < 0 or body[:start].strip():
        raise ValueError("expected '[' at the offset")
    head, _, rest = body[start + 1 :].partition("\n")
    if head.strip():  # `[ v1 v2 ... ]` on one line is a Kaldi vector
        return np.array(head.split(), dtype=np.float32)
    rows = [line for line in rest.split("\n") if line.strip()]
    values = np.array(" ".join(rows).split(), dtype=np.float32)
    if rows and values.size % len(rows):
        raise ValueError("matrix rows have different lengths")
    return values.reshape(len(rows), -1 if rows else 0)


def _read_spec(spec: str, fds: dict[str, IO[bytes]]) -> np.ndarray:
    name, offset, slc = _split_spec(spec)
    if offset is None or slc:  # pipes, whole files, slices: kaldiio handles them
        return kaldiio.load_mat(spec, fd_dict=fds)
    if name not in fds:
        fds[name] = open(name, "rb")
    fd = fds[name]
    fd.seek(offset)
    if fd.read(2) != b"\0B":
        fd.seek(offset)
        return _read_text_matrix(fd)
    return kaldiio.load_mat(spec, fd_dict=fds)


def load_matrix(spec: str, where: str, fds: dict[str, IO[bytes]] | None = None) -> np.ndarray:
    """Read the matrix at ``spec``; ``fds`` keeps files open across calls."""
    own = {} if fds is None else fds
    try:
        mat = _read_spec(spec, own)
    except Exception as e:  # kaldiio raises many kinds on corrupt input
        raise DataError(
            f"{where}: cannot read a matrix from {spec} ({type(e).__name__}: {e}); the ark "
            "may be truncated or the offset wrong; recompute the features"
        ) from None
    finally:
        if fds is None:
            for fd in own.values():
                fd.close()
    if not isinstance(mat, np.ndarray) or mat.ndim != 2:
        shape = getattr(mat, "shape", type(mat).__name__)
        raise DataError(f"{where}: expected a (frames, dim) matrix at {spec}, got shape {shape}")
    return mat


def iter_matrices(items: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, matrix)`` for each ``(key, rxspecifier, where)``, reusing open ark files.

    At most about ``_MAX_OPEN_ARKS`` files stay open; all are closed when the
    iteration ends or is abandoned.  ``where`` names the entry in errors.
    """
    fds: dict[str, IO[bytes]] = {}
    try:
        for key, spec, where in items:
            if len(fds) > _MAX_OPEN_ARKS:
                for fd in fds.values():
                    fd.close()
                fds.clear()
            yield key, load_matrix(spec, where, fds)
    finally:
        for fd in fds.values():
            fd.close()


def scan_matrices(
    specs: dict[str, str], where: dict[str, Line], utt_ids: Iterable[str]
) -> tuple[dict[str, int], int]:
    """One pass over all matrices: frame counts, consistent dim, finite values."""
    num_frames: dict[str, int] = {}
    first: str | None = None
    feat_dim = 0
    items = ((utt, specs[utt], f"{line_of(where[utt])} ({utt!r})") for utt in utt_ids)
    for utt, mat in iter_matrices(items):
        if first is None:
            first, feat_dim = utt, mat.shape[1]
        elif mat.shape[1] != feat_dim:
            raise DataError(
                f"{line_of(where[utt])}: utterance {utt!r} has feature dim {mat.shape[1]}, but "
                f"{first!r} ({line_of(where[first])}) has {feat_dim}; all features must have "
                "the same dim"
            )
        if mat.shape[0] == 0:
            raise DataError(f"{line_of(where[utt])}: utterance {utt!r} has 0 frames; remove it")
        finite = np.isfinite(mat)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1))[:5].tolist()
            raise DataError(
                f"{line_of(where[utt])}: utterance {utt!r} has non-finite values (NaN or "
                f"inf) in frames {bad}; recompute its features or remove it"
            )
        num_frames[utt] = mat.shape[0]
    return num_frames, feat_dim
