"""Reading and validating Kaldi data directories.

A data directory holds ``feats.scp`` (utterance -> ``ark:offset``; binary, text or
compressed matrices, all read through kaldiio) plus the targets of a task:

* ``ctc``: ``text`` (``UTT TOKEN ...``) and ``tokens.txt`` (``SYMBOL ID``, with
  ``<blank> 0``), or a :class:`TokenTable` passed in (e.g. the training one when
  loading a dev or test directory);
* ``frame``: ``utt2label`` (``UTT L1 ... LT``, one integer label per frame).

Optional files: ``utt2spk`` + ``cmvn.scp`` (per-speaker mean/variance
normalisation) and ``utt2num_frames`` (lengths without reading the matrices).

``feats.scp`` may also be an "scp of scp files": every line a single path to another
scp. The directory is then *partitioned* and :attr:`DataDir.parts` lists the
utterances of each part, so a loader can keep to one part at a time.

Relative paths inside scp files are resolved against the directory of that scp
file, then against the data directory; never against the working directory, so
a data directory can be moved or used from anywhere.

Every problem is a :class:`~stagetune.errors.DataError` naming the file and line.
This module does not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import kaldiio
import numpy as np

from stagetune.errors import ConfigError, DataError

__all__ = ["BLANK", "TASKS", "TokenTable", "DataDir", "load_data_dir"]

BLANK = "<blank>"
"""The CTC blank symbol; it always has id 0."""

TASKS = ("ctc", "frame")
"""Supported target kinds: token sequences (CTC) or one label per frame."""

_VAR_FLOOR = 1e-10
_MAX_OPEN_ARKS = 64  # bound the open files of the validation pass
_SLICE = re.compile(r"^(?P<body>.*?)(?P<slice>\[[0-9:,\s]*\])?$")

_Line = tuple[Path, int]


def _at(where: _Line) -> str:
    return f"{where[0]} line {where[1]}"


def _read_table(path: Path) -> Iterator[tuple[int, list[str]]]:
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


def _read_keyed(path: Path, usage: str, min_fields: int = 2) -> dict[str, tuple[int, list[str]]]:
    """Read ``KEY VALUE ...`` lines into ``key -> (line number, values)``."""
    entries: dict[str, tuple[int, list[str]]] = {}
    for lineno, fields in _read_table(path):
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


class TokenTable:
    """Bidirectional symbol <-> id map for CTC targets; ``<blank>`` is id 0.

    Args:
        symbols: Symbols in id order; ``symbols[0]`` must be ``<blank>``.
        path: File the table was read from, used in error messages.
    """

    def __init__(self, symbols: Sequence[str], *, path: Path | None = None) -> None:
        self.symbols: list[str] = list(symbols)
        self.path = path
        if not self.symbols or self.symbols[0] != BLANK:
            raise DataError(f"token id 0 must be {BLANK!r}, got {self.symbols[:1]}")
        self._ids = {sym: i for i, sym in enumerate(self.symbols)}
        if len(self._ids) != len(self.symbols):
            dup = next(s for s in self.symbols if self.symbols.count(s) > 1)
            raise DataError(f"token {dup!r} appears more than once; symbols must be unique")

    @classmethod
    def read(cls, path: str | Path) -> TokenTable:
        """Read a ``SYMBOL ID`` file whose ids are exactly ``0..N-1`` and ``<blank> 0``."""
        path = Path(path)
        by_id: dict[int, tuple[str, int]] = {}
        seen: dict[str, int] = {}
        for lineno, fields in _read_table(path):
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataError(
                    f"{path} line {lineno}: expected `SYMBOL ID` with a non-negative "
                    f"integer id, got {' '.join(fields)!r}"
                )
            sym, idx = fields[0], int(fields[1])
            if sym in seen:
                raise DataError(
                    f"{path} line {lineno}: symbol {sym!r} already defined on line {seen[sym]}"
                )
            if idx in by_id:
                raise DataError(
                    f"{path} line {lineno}: id {idx} already used by {by_id[idx][0]!r} "
                    f"on line {by_id[idx][1]}; ids must be unique"
                )
            if (idx == 0) != (sym == BLANK):
                raise DataError(
                    f"{path} line {lineno}: got `{sym} {idx}`, but the blank must be "
                    f"`{BLANK} 0` and no other symbol may use id 0"
                )
            seen[sym] = lineno
            by_id[idx] = (sym, lineno)
        if not by_id:
            raise DataError(f"{path} is empty; it needs `{BLANK} 0` and one `SYMBOL ID` per token")
        missing = sorted(set(range(len(by_id))) - set(by_id))
        if missing:
            raise DataError(
                f"{path}: ids must be contiguous 0..{len(by_id) - 1}, but id {missing[0]} is "
                f"missing (largest id {max(by_id)}); renumber the tokens"
            )
        return cls([by_id[i][0] for i in range(len(by_id))], path=path)

    @classmethod
    def from_transcripts(cls, texts: Iterable[Sequence[str]]) -> TokenTable:
        """Build a table of the sorted unique tokens of ``texts``, after ``<blank>``."""
        vocab = {tok for tokens in texts for tok in tokens}
        if BLANK in vocab:
            raise DataError(f"transcripts must not contain the reserved blank symbol {BLANK!r}")
        return cls([BLANK, *sorted(vocab)])

    def write(self, path: str | Path) -> None:
        """Write ``SYMBOL ID`` lines, readable by :meth:`read`."""
        Path(path).write_text("".join(f"{s} {i}\n" for i, s in enumerate(self.symbols)))

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Map symbols to ids; raises :class:`DataError` naming an unknown symbol."""
        try:
            return [self._ids[tok] for tok in tokens]
        except KeyError as e:
            raise DataError(f"token {e.args[0]!r} is not in {self._source()}") from None

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map ids back to symbols."""
        return [self.symbols[i] for i in ids]

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._ids

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenTable) and self.symbols == other.symbols

    def __repr__(self) -> str:
        return f"TokenTable({len(self)} symbols, path={self.path})"

    def _source(self) -> str:
        return str(self.path) if self.path is not None else "the token table"


@dataclass(eq=False)  # holds arrays; compare fields explicitly
class DataDir:
    """A loaded (and, by default, validated) Kaldi data directory.

    Feature matrices stay on disk; :meth:`load_feats` reads one on demand.

    Attributes:
        path: The data directory.
        utt_ids: Utterance ids, sorted.
        feat_dim: Feature dimension F.
        num_frames: Frames T per utterance.
        feat_paths: Resolved rxspecifier (``/abs/x.ark:offset``) per utterance.
        parts: Utterance ids per scp part; ``[utt_ids]`` when not partitioned.
        text: Transcripts (task ``ctc``), else None.
        tokens: Token table (task ``ctc``), else None.
        labels: Frame labels, int64 of shape (T,) (task ``frame``), else None.
        utt2spk: Speaker per utterance, when ``utt2spk`` exists.
        cmvn: Speaker (or utterance, without ``utt2spk``) -> (mean, std), float32 (F,).
    """

    path: Path
    utt_ids: list[str]
    feat_dim: int
    num_frames: dict[str, int]
    feat_paths: dict[str, str]
    parts: list[list[str]]
    text: dict[str, list[str]] | None = None
    tokens: TokenTable | None = None
    labels: dict[str, np.ndarray] | None = None
    utt2spk: dict[str, str] | None = None
    cmvn: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    _token_ids: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def partitioned(self) -> bool:
        """Whether ``feats.scp`` is an scp of scp files."""
        return len(self.parts) > 1

    def load_feats(self, utt_id: str, *, apply_cmvn: bool = True) -> np.ndarray:
        """Read the features of one utterance.

        Args:
            utt_id: Utterance id.
            apply_cmvn: Normalise with the speaker's mean and std when ``cmvn.scp`` exists.

        Returns:
            float32 array of shape (T, F).
        """
        feats = _load_matrix(self.feat_paths[utt_id], f"feats.scp entry of {utt_id!r}")
        feats = np.array(feats, dtype=np.float32)  # a writable copy: kaldiio may share its buffer
        if apply_cmvn and self.cmvn is not None:
            mean, std = self.cmvn[self.utt2spk[utt_id] if self.utt2spk else utt_id]
            feats -= mean
            feats /= std
        return feats

    def targets(self, utt_id: str) -> np.ndarray:
        """Token ids, int64 (U,), for ``ctc``; frame labels, int64 (T,), for ``frame``."""
        if self.labels is not None:
            return self.labels[utt_id]
        return self._token_ids[utt_id]


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


def _read_scp(
    scp: Path, data_dir: Path, where: dict[str, _Line], what: str
) -> dict[str, str]:
    """Read ``KEY RXSPECIFIER`` lines, resolving paths and checking the ark files exist."""
    bases = list(dict.fromkeys([scp.parent, data_dir]))
    cache: dict[str, Path] = {}
    exists: dict[Path, bool] = {}
    specs: dict[str, str] = {}
    for lineno, fields in _read_table(scp):
        if len(fields) < 2:
            raise DataError(
                f"{scp} line {lineno}: expected `{what} PATH:OFFSET`, got {fields[0]!r}; "
                "a scp either maps ids to matrices on every line or lists scp files on every line"
            )
        key = fields[0]
        if key in where:
            raise DataError(
                f"{scp} line {lineno}: duplicate {what.lower()} id {key!r} (first at "
                f"{_at(where[key])}); each id must appear once"
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


def _read_feats_scp(data_dir: Path) -> tuple[dict[str, str], dict[str, _Line], list[list[str]]]:
    """Read ``feats.scp``, following an scp of scp files; returns specs, lines, parts."""
    scp = data_dir / "feats.scp"
    lines = list(_read_table(scp))
    if not lines:
        raise DataError(f"{scp} is empty; run `stagetune prep {data_dir}` to compute features")
    where: dict[str, _Line] = {}
    if len(lines[0][1]) > 1:
        specs = _read_scp(scp, data_dir, where, "UTT")
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
        part_specs = _read_scp(part, data_dir, where, "UTT")
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


def _load_matrix(spec: str, where: str, fds: dict[str, IO[bytes]] | None = None) -> np.ndarray:
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


def _scan_matrices(
    specs: dict[str, str], where: dict[str, _Line], utt_ids: Iterable[str]
) -> tuple[dict[str, int], int]:
    """One pass over all matrices: frame counts, consistent dim, finite values."""
    fds: dict[str, IO[bytes]] = {}
    num_frames: dict[str, int] = {}
    first: str | None = None
    feat_dim = 0
    try:
        for utt in utt_ids:
            if len(fds) > _MAX_OPEN_ARKS:
                for fd in fds.values():
                    fd.close()
                fds.clear()
            mat = _load_matrix(specs[utt], f"{_at(where[utt])} ({utt!r})", fds)
            if first is None:
                first, feat_dim = utt, mat.shape[1]
            elif mat.shape[1] != feat_dim:
                raise DataError(
                    f"{_at(where[utt])}: utterance {utt!r} has feature dim {mat.shape[1]}, but "
                    f"{first!r} ({_at(where[first])}) has {feat_dim}; all features must have "
                    "the same dim"
                )
            if mat.shape[0] == 0:
                raise DataError(f"{_at(where[utt])}: utterance {utt!r} has 0 frames; remove it")
            finite = np.isfinite(mat)
            if not finite.all():
                bad = np.flatnonzero(~finite.all(axis=1))[:5].tolist()
                raise DataError(
                    f"{_at(where[utt])}: utterance {utt!r} has non-finite values (NaN or "
                    f"inf) in frames {bad}; recompute its features or remove it"
                )
            num_frames[utt] = mat.shape[0]
    finally:
        for fd in fds.values():
            fd.close()
    return num_frames, feat_dim


def _require_listed(
    utt_ids: Sequence[str], where: dict[str, _Line], entries: dict, path: Path, what: str
) -> None:
    """Every feature utterance has an entry in ``path``."""
    missing = [u for u in utt_ids if u not in entries]
    if missing:
        raise DataError(
            f"{_at(where[missing[0]])}: utterance {missing[0]!r} has no {what} in {path} "
            f"({len(missing)} of {len(utt_ids)} utterances lack one); add them or remove the "
            "utterances from feats.scp (Kaldi: utils/fix_data_dir.sh)"
        )


def _require_covered(
    utt_ids: Sequence[str], where: dict[str, _Line], entries: dict, path: Path, what: str
) -> None:
    """Every feature utterance has an entry in ``path`` and every entry has features."""
    _require_listed(utt_ids, where, entries, path, what)
    extra = [u for u in entries if u not in where]
    if extra:
        raise DataError(
            f"{path} line {entries[extra[0]][0]}: utterance {extra[0]!r} has a {what} but no "
            f"features in feats.scp ({len(extra)} such utterances); remove them or compute "
            "their features (Kaldi: utils/fix_data_dir.sh)"
        )


def _read_ctc_targets(
    data_dir: Path, utt_ids: list[str], where: dict[str, _Line], tokens: TokenTable | None
) -> tuple[dict[str, list[str]], TokenTable, dict[str, np.ndarray]]:
    text_path, tokens_path = data_dir / "text", data_dir / "tokens.txt"
    if not text_path.is_file():
        raise DataError(
            f"{text_path} is missing; task 'ctc' needs one `UTT TOKEN ...` line per utterance"
        )
    if tokens is None:
        if not tokens_path.is_file():
            raise DataError(
                f"{tokens_path} is missing; task 'ctc' needs `{BLANK} 0` then one `SYMBOL ID` "
                "line per token (or pass the training token table when loading dev/test data)"
            )
        tokens = TokenTable.read(tokens_path)
    entries = _read_keyed(text_path, "UTT TOKEN ...", min_fields=1)
    _require_covered(utt_ids, where, entries, text_path, "transcript")
    text, token_ids = {}, {}
    for utt, (lineno, toks) in entries.items():
        unknown = next((t for t in toks if t not in tokens), None)
        if unknown is not None:
            raise DataError(
                f"{text_path} line {lineno}: utterance {utt!r} has token {unknown!r} not in "
                f"{tokens._source()}; add it to tokens.txt or fix the transcript"
            )
        text[utt] = toks
        token_ids[utt] = np.asarray(tokens.encode(toks), dtype=np.int64)
    return text, tokens, token_ids


def _read_labels(
    data_dir: Path, utt_ids: list[str], where: dict[str, _Line]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    path = data_dir / "utt2label"
    if not path.is_file():
        raise DataError(f"{path} is missing; task 'frame' needs `UTT L1 ... LT` per utterance")
    entries = _read_keyed(path, "UTT L1 ... LT")
    _require_covered(utt_ids, where, entries, path, "label line")
    labels, lines = {}, {}
    for utt, (lineno, values) in entries.items():
        try:
            arr = np.array(values, dtype=np.int64)
        except ValueError:
            raise DataError(
                f"{path} line {lineno}: utterance {utt!r} has a non-integer label; labels "
                "must be integers >= 0"
            ) from None
        if arr.min() < 0:
            raise DataError(
                f"{path} line {lineno}: utterance {utt!r} has label {arr.min()}; labels must "
                "be >= 0 (-1 marks padding)"
            )
        labels[utt], lines[utt] = arr, lineno
    return labels, lines


def _read_cmvn(
    data_dir: Path, feat_dim: int, utt_ids: list[str], where: dict[str, _Line],
    utt2spk: dict[str, str] | None, spk_lines: dict[str, int],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    scp = data_dir / "cmvn.scp"
    cmvn_where: dict[str, _Line] = {}
    specs = _read_scp(scp, data_dir, cmvn_where, "SPEAKER")
    for utt in utt_ids:
        spk = utt2spk[utt] if utt2spk else utt
        if spk not in specs:
            at = f"{data_dir / 'utt2spk'} line {spk_lines[utt]}" if utt2spk else _at(where[utt])
            raise DataError(
                f"{at}: speaker {spk!r} of utterance {utt!r} has no stats in {scp}"
                + ("" if utt2spk else " (without utt2spk, cmvn.scp is keyed by utterance)")
                + "; recompute them (Kaldi: steps/compute_cmvn_stats.sh) or remove cmvn.scp"
            )
    cmvn = {}
    for spk, spec in specs.items():
        at = f"{_at(cmvn_where[spk])} ({spk!r})"
        stats = _load_matrix(spec, at).astype(np.float64)
        if stats.shape[0] != 2 or stats.shape[1] < 2:
            raise DataError(f"{at}: expected Kaldi CMVN stats of shape (2, D+1), got {stats.shape}")
        if stats.shape[1] - 1 != feat_dim:
            raise DataError(
                f"{at}: CMVN stats have dim {stats.shape[1] - 1} but the features have dim "
                f"{feat_dim}; recompute the stats from these features"
            )
        count = stats[0, -1]
        if not count > 0:
            raise DataError(f"{at}: CMVN stats have frame count {count}; it must be > 0")
        mean = stats[0, :-1] / count
        var = np.maximum(stats[1, :-1] / count - mean**2, _VAR_FLOOR)
        cmvn[spk] = (mean.astype(np.float32), np.sqrt(var).astype(np.float32))
    return cmvn


def _read_utt2spk(
    data_dir: Path, utt_ids: list[str], where: dict[str, _Line]
) -> tuple[dict[str, str] | None, dict[str, int]]:
    """Speaker and ``utt2spk`` line per feature utterance; extra entries are ignored."""
    path = data_dir / "utt2spk"
    if not path.is_file():
        return None, {}
    entries = _read_keyed(path, "UTT SPEAKER")
    _require_listed(utt_ids, where, entries, path, "speaker")
    return {u: entries[u][1][0] for u in utt_ids}, {u: entries[u][0] for u in utt_ids}


def _read_num_frames(
    data_dir: Path, utt_ids: list[str], where: dict[str, _Line]
) -> tuple[dict[str, int] | None, dict[str, int]]:
    """Frame count and line per utterance from ``utt2num_frames``, if present."""
    path = data_dir / "utt2num_frames"
    if not path.is_file():
        return None, {}
    entries = _read_keyed(path, "UTT NUM_FRAMES")
    _require_listed(utt_ids, where, entries, path, "frame count")
    num_frames = {}
    for utt in utt_ids:
        lineno, values = entries[utt]
        if len(values) != 1 or not values[0].isdigit():
            raise DataError(
                f"{path} line {lineno}: expected `UTT NUM_FRAMES`, got {' '.join(values)!r}"
            )
        num_frames[utt] = int(values[0])
    return num_frames, {u: entries[u][0] for u in utt_ids}


def load_data_dir(
    path: str | Path,
    *,
    task: str = "ctc",
    tokens: TokenTable | None = None,
    check: bool = True,
) -> DataDir:
    """Load a Kaldi data directory, validating it before any training starts.

    Cheap consistency checks always run: file formats, duplicate ids, ark files
    present, every utterance has targets (and no targets lack features), tokens
    known, label counts, speakers and CMVN stats.

    Args:
        path: The data directory.
        task: ``"ctc"`` (``text`` + ``tokens.txt``) or ``"frame"`` (``utt2label``).
        tokens: Token table to use instead of ``tokens.txt`` (e.g. the training one
            when loading dev/test data).
        check: Also read every feature matrix once, checking values are finite,
            dims agree and ``utt2num_frames`` is right. With ``check=False`` the
            matrices are read only when there is no ``utt2num_frames``.

    Returns:
        The loaded :class:`DataDir`.

    Raises:
        DataError: On any problem with the data, naming the file and line.
        ConfigError: If ``task`` is unknown.
    """
    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    data_dir = Path(path).absolute()
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist or is not a directory")
    if not (data_dir / "feats.scp").is_file():
        raise DataError(
            f"{data_dir / 'feats.scp'} is missing; run `stagetune prep {data_dir}` to compute "
            "features"
        )
    specs, where, parts = _read_feats_scp(data_dir)
    utt_ids = sorted(specs)

    text = labels = token_ids = None
    if task == "ctc":
        text, tokens, token_ids = _read_ctc_targets(data_dir, utt_ids, where, tokens)
    else:
        tokens = None
        labels, label_lines = _read_labels(data_dir, utt_ids, where)

    utt2spk, spk_lines = _read_utt2spk(data_dir, utt_ids, where)
    num_frames, nf_lines = _read_num_frames(data_dir, utt_ids, where)
    if check or num_frames is None:
        scanned, feat_dim = _scan_matrices(specs, where, [u for part in parts for u in part])
        for utt in utt_ids if num_frames is not None else ():
            if num_frames[utt] != scanned[utt]:
                raise DataError(
                    f"{data_dir / 'utt2num_frames'} line {nf_lines[utt]}: utterance {utt!r} "
                    f"has {num_frames[utt]} frames but its matrix ({_at(where[utt])}) has "
                    f"{scanned[utt]}; regenerate or delete utt2num_frames"
                )
        num_frames = scanned
    else:
        feat_dim = _load_matrix(specs[utt_ids[0]], _at(where[utt_ids[0]])).shape[1]

    if labels is not None:
        for utt in utt_ids:
            if len(labels[utt]) != num_frames[utt]:
                raise DataError(
                    f"{data_dir / 'utt2label'} line {label_lines[utt]}: utterance {utt!r} has "
                    f"{len(labels[utt])} labels but {num_frames[utt]} frames in feats.scp; "
                    "give exactly one label per frame"
                )

    cmvn = None
    if (data_dir / "cmvn.scp").is_file():
        cmvn = _read_cmvn(data_dir, feat_dim, utt_ids, where, utt2spk, spk_lines)

    return DataDir(
        path=data_dir, utt_ids=utt_ids, feat_dim=feat_dim, num_frames=num_frames,
        feat_paths=specs, parts=parts, text=text, tokens=tokens, labels=labels,
        utt2spk=utt2spk, cmvn=cmvn, _token_ids=token_ids or {},
    )
