"""Reading and validating Kaldi data directories.

A data directory holds ``feats.scp`` (utterance -> ``ark:offset``; binary, text or
compressed matrices, all read through kaldiio) plus the targets of a task:

* ``ctc``: ``text`` (``UTT TOKEN ...``) and ``tokens.txt`` (``SYMBOL ID``, with
  ``<blank> 0``), or a :class:`TokenTable` passed in (e.g. the training one when
  loading a dev or test directory);
* ``frame``: ``utt2label`` (``UTT L1 ... LT``, one integer label per frame);
* ``utt``: ``utt2class`` (``UTT CLASS``);
* ``regress``: ``targets.scp`` (utterance -> a (T, D) float matrix, one row per
  frame) or, without it, ``utt2value`` (``UTT V1 ... VT``, one value per frame, D = 1);
* ``multi``: ``utt2label`` and the regression targets, both.

Optional files: ``utt2spk`` + ``cmvn.scp`` (per-speaker mean/variance
statistics, applied by :mod:`stagetune.normalize`) and ``utt2num_frames``
(lengths without reading the matrices).

``feats.scp`` may also be an "scp of scp files": every line a single path to another
scp. The directory is then *partitioned* and :attr:`DataDir.parts` lists the
utterances of each part, so a loader can keep to one part at a time.

Relative paths inside scp files are resolved against the directory of that scp
file, then against the data directory; never against the working directory, so
a data directory can be moved or used from anywhere.

Every problem is a :class:`~stagetune.errors.DataError` naming the file and line.
This module does not import torch.

:class:`TokenTable` and :data:`BLANK` live in :mod:`stagetune.tokens` and are
re-exported here; tables, scp files and matrices are read by
:mod:`stagetune.kaldi_io`. Neither imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stagetune.errors import ConfigError, DataError
from stagetune.plugins import target_format
from stagetune.kaldi_io import (
    Line,
    iter_matrices,
    line_of,
    load_matrix,
    read_feats_scp,
    read_keyed,
    read_scp,
    scan_matrices,
)
from stagetune.tokens import BLANK, TokenTable  # re-exported: part of __all__

__all__ = ["BLANK", "TASKS", "TokenTable", "DataDir", "load_data_dir", "regression_symbols", "regression_dim"]

TASKS = ("ctc", "frame", "utt", "regress", "multi")
"""Supported target kinds: token sequences (CTC), one label per frame or per utterance,
values per frame, or labels and values per frame (multitask)."""

_DIM_PREFIX = "dim:"


def regression_symbols(dim: int) -> list[str]:
    """Output symbols of ``dim`` regression targets: ``dim:0`` ... (a model file stores them)."""
    return [f"{_DIM_PREFIX}{i}" for i in range(dim)]


def regression_dim(symbols: Sequence[str]) -> int:
    """How many of ``symbols`` name regression dimensions (:func:`regression_symbols`)."""
    return sum(str(s).startswith(_DIM_PREFIX) for s in symbols)

_VAR_FLOOR = 1e-10


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
        labels: Frame labels, int64 of shape (T,) (task ``frame``), or the class id,
            int64 of shape (1,) (task ``utt``), else None.
        classes: Class names by id (task ``utt``), else None.
        values: Regression targets, float32 of shape (T, D) (tasks ``regress``
            and ``multi``), else None.
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
    classes: list[str] | None = None
    values: dict[str, np.ndarray] | None = None
    utt2spk: dict[str, str] | None = None
    cmvn: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    #: False when loaded without targets (features only, e.g. for ``stagetune extract``).
    has_targets: bool = True
    _token_ids: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def partitioned(self) -> bool:
        """Whether ``feats.scp`` is an scp of scp files."""
        return len(self.parts) > 1

    def load_feats(self, utt_id: str) -> np.ndarray:
        """Read the features of one utterance as stored (:mod:`stagetune.normalize` normalises).

        Returns:
            A writable float32 array of shape (T, F).
        """
        feats = load_matrix(self.feat_paths[utt_id], f"feats.scp entry of {utt_id!r}")
        return np.array(feats, dtype=np.float32)  # a writable copy: kaldiio may share its buffer

    def cmvn_of(self, utt_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The (mean, std), float32 (F,), of the speaker of ``utt_id`` from ``cmvn.scp``.

        Raises:
            DataError: If the directory has no ``cmvn.scp``.
        """
        if self.cmvn is None:
            raise DataError(f"{self.path / 'cmvn.scp'} is missing; it holds per-speaker statistics")
        return self.cmvn[self.utt2spk[utt_id] if self.utt2spk else utt_id]

    @property
    def target_dim(self) -> int:
        """Regression dimensions D (tasks ``regress`` and ``multi``), else 0."""
        if not self.values:
            return 0
        return next(iter(self.values.values())).shape[1]

    def targets(self, utt_id: str) -> np.ndarray:
        """Token ids, int64 (U,), for ``ctc``; frame labels, int64 (T,), for ``frame``;
        the class id, int64 (1,), for ``utt``; values, float32 (T, D), for ``regress``;
        float32 (T, 1 + D) for ``multi``, the frame label in column 0 and the values
        after it; empty when loaded without targets."""
        if not self.has_targets:
            return np.zeros(0, dtype=np.int64)
        if self.values is not None:
            if self.labels is None:
                return self.values[utt_id]
            label = self.labels[utt_id].astype(np.float32)[:, None]
            return np.concatenate([label, self.values[utt_id]], axis=1)
        if self.labels is not None:
            return self.labels[utt_id]
        return self._token_ids[utt_id]



def _require_listed(
    utt_ids: Sequence[str], where: dict[str, Line], entries: dict, path: Path, what: str
) -> None:
    """Every feature utterance has an entry in ``path``."""
    missing = [u for u in utt_ids if u not in entries]
    if missing:
        raise DataError(
            f"{line_of(where[missing[0]])}: utterance {missing[0]!r} has no {what} in {path} "
            f"({len(missing)} of {len(utt_ids)} utterances lack one); add them or remove the "
            "utterances from feats.scp (Kaldi: utils/fix_data_dir.sh)"
        )


def _require_covered(
    utt_ids: Sequence[str], where: dict[str, Line], entries: dict, path: Path, what: str
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
    data_dir: Path, utt_ids: list[str], where: dict[str, Line], tokens: TokenTable | None
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
    entries = read_keyed(text_path, "UTT TOKEN ...", min_fields=1)
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
    data_dir: Path, utt_ids: list[str], where: dict[str, Line]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    path = data_dir / "utt2label"
    if not path.is_file():
        raise DataError(f"{path} is missing; task 'frame' needs `UTT L1 ... LT` per utterance")
    entries = read_keyed(path, "UTT L1 ... LT")
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


def _read_classes(
    data_dir: Path, utt_ids: list[str], where: dict[str, Line], classes: Sequence[str] | None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Class id per utterance from ``utt2class``; the classes are the file's (sorted) or ``classes``."""
    path = data_dir / "utt2class"
    if not path.is_file():
        raise DataError(
            f"{path} is missing; task 'utt' needs one `UTT CLASS` line per utterance "
            "(for speaker identification: cp utt2spk utt2class)"
        )
    entries = read_keyed(path, "UTT CLASS")
    for utt, (lineno, values) in entries.items():
        if len(values) != 1:
            raise DataError(
                f"{path} line {lineno}: expected `UTT CLASS`, got {len(values)} classes for {utt!r}; "
                "give exactly one class per utterance"
            )
    _require_covered(utt_ids, where, entries, path, "class")
    if classes is None:
        classes = sorted({values[0] for _, values in entries.values()})
    ids = {name: i for i, name in enumerate(classes)}
    labels = {}
    for utt, (lineno, (name,)) in entries.items():
        if name not in ids:
            raise DataError(
                f"{path} line {lineno}: utterance {utt!r} has class {name!r}, not one of the "
                f"{len(classes)} classes the model was trained on; remove it or train on data with it"
            )
        labels[utt] = np.array([ids[name]], dtype=np.int64)
    return labels, list(classes)


def _read_values(
    data_dir: Path, utt_ids: list[str], where: dict[str, Line], num_frames: dict[str, int], task: str
) -> dict[str, np.ndarray]:
    """Regression targets, float32 (T, D) per utterance, from ``targets.scp`` or ``utt2value``."""
    scp, text = data_dir / "targets.scp", data_dir / "utt2value"
    values: dict[str, np.ndarray] = {}
    at: dict[str, str] = {}
    if scp.is_file():
        target_where: dict[str, Line] = {}
        specs = read_scp(scp, data_dir, target_where, "UTT")
        _require_covered(utt_ids, where, {u: (w[1], None) for u, w in target_where.items()}, scp, "target matrix")
        items = [(u, specs[u], f"{line_of(target_where[u])} ({u!r})") for u in utt_ids]
        for utt, mat in iter_matrices(items):
            values[utt] = np.array(mat, dtype=np.float32)
            at[utt] = f"{line_of(target_where[utt])}: utterance {utt!r} has"
    elif text.is_file():
        entries = read_keyed(text, "UTT V1 ... VT")
        _require_covered(utt_ids, where, entries, text, "value line")
        for utt, (lineno, fields) in entries.items():
            try:
                values[utt] = np.array([float(v) for v in fields], dtype=np.float32)[:, None]
            except ValueError:
                bad = next(v for v in fields if not _is_float(v))
                raise DataError(
                    f"{text} line {lineno}: utterance {utt!r} has a non-numeric value {bad!r}; "
                    "give one number per frame"
                ) from None
            at[utt] = f"{text} line {lineno}: utterance {utt!r} has"
    else:
        raise DataError(
            f"{scp} is missing; task {task!r} needs targets.scp (a T x D float matrix per "
            f"utterance) or utt2value (`UTT V1 ... VT`) in {data_dir}"
        )
    dim = None
    for utt in utt_ids:
        mat = values[utt]
        if len(mat) != num_frames[utt]:
            raise DataError(
                f"{at[utt]} {len(mat)} target frames but {num_frames[utt]} frames in feats.scp; "
                "give exactly one target row per frame"
            )
        if dim is None:
            dim, first = mat.shape[1], utt
        elif mat.shape[1] != dim:
            raise DataError(f"{at[utt]} {mat.shape[1]} target dimensions but {first!r} has {dim}")
        if not np.isfinite(mat).all():
            raise DataError(f"{at[utt]} a non-finite target value (nan or inf)")
    return values


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_cmvn(
    data_dir: Path, feat_dim: int, utt_ids: list[str], where: dict[str, Line],
    utt2spk: dict[str, str] | None, spk_lines: dict[str, int],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    scp = data_dir / "cmvn.scp"
    cmvn_where: dict[str, Line] = {}
    specs = read_scp(scp, data_dir, cmvn_where, "SPEAKER")
    for utt in utt_ids:
        spk = utt2spk[utt] if utt2spk else utt
        if spk not in specs:
            at = f"{data_dir / 'utt2spk'} line {spk_lines[utt]}" if utt2spk else line_of(where[utt])
            raise DataError(
                f"{at}: speaker {spk!r} of utterance {utt!r} has no stats in {scp}"
                + ("" if utt2spk else " (without utt2spk, cmvn.scp is keyed by utterance)")
                + "; recompute them (Kaldi: steps/compute_cmvn_stats.sh) or remove cmvn.scp"
            )
    cmvn = {}
    for spk, spec in specs.items():
        at = f"{line_of(cmvn_where[spk])} ({spk!r})"
        stats = load_matrix(spec, at).astype(np.float64)
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
    data_dir: Path, utt_ids: list[str], where: dict[str, Line]
) -> tuple[dict[str, str] | None, dict[str, int]]:
    """Speaker and ``utt2spk`` line per feature utterance; extra entries are ignored."""
    path = data_dir / "utt2spk"
    if not path.is_file():
        return None, {}
    entries = read_keyed(path, "UTT SPEAKER")
    _require_listed(utt_ids, where, entries, path, "speaker")
    return {u: entries[u][1][0] for u in utt_ids}, {u: entries[u][0] for u in utt_ids}


def _read_num_frames(
    data_dir: Path, utt_ids: list[str], where: dict[str, Line]
) -> tuple[dict[str, int] | None, dict[str, int]]:
    """Frame count and line per utterance from ``utt2num_frames``, if present."""
    path = data_dir / "utt2num_frames"
    if not path.is_file():
        return None, {}
    entries = read_keyed(path, "UTT NUM_FRAMES")
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
    classes: Sequence[str] | None = None,
    check: bool = True,
    targets: bool = True,
) -> DataDir:
    """Load a Kaldi data directory, validating it before any training starts.

    Cheap consistency checks always run: file formats, duplicate ids, ark files
    present, every utterance has targets (and no targets lack features), tokens
    known, label counts, speakers and CMVN stats.

    Args:
        path: The data directory.
        task: ``"ctc"`` (``text`` + ``tokens.txt``), ``"frame"`` (``utt2label``),
            ``"utt"`` (``utt2class``), ``"regress"`` (``targets.scp`` or ``utt2value``)
            or ``"multi"`` (``utt2label`` and the regression targets).
        tokens: Token table to use instead of ``tokens.txt`` (e.g. the training one
            when loading dev/test data).
        classes: Class names by id (task ``utt``) instead of those ``utt2class`` lists
            (the training classes, when loading dev/test data).
        targets: False reads features (and speakers, CMVN) only, no label files.
        check: Also read every feature matrix once, checking values are finite,
            dims agree and ``utt2num_frames`` is right. With ``check=False`` the
            matrices are read only when there is no ``utt2num_frames``.

    Returns:
        The loaded :class:`DataDir`.

    Raises:
        DataError: On any problem with the data, naming the file and line.
        ConfigError: If ``task`` is unknown.
    """
    task = target_format(task)  # a task plugin reads a built-in task's label files
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
    specs, where, parts = read_feats_scp(data_dir)
    utt_ids = sorted(specs)

    text = labels = token_ids = values = None
    if not targets:
        tokens = None
    elif task == "ctc":
        text, tokens, token_ids = _read_ctc_targets(data_dir, utt_ids, where, tokens)
    elif task == "utt":
        tokens = None
        labels, classes = _read_classes(data_dir, utt_ids, where, classes)
    elif task in ("frame", "multi"):
        tokens = None
        labels, label_lines = _read_labels(data_dir, utt_ids, where)
    else:
        tokens = None

    utt2spk, spk_lines = _read_utt2spk(data_dir, utt_ids, where)
    num_frames, nf_lines = _read_num_frames(data_dir, utt_ids, where)
    if check or num_frames is None:
        scanned, feat_dim = scan_matrices(specs, where, [u for part in parts for u in part])
        for utt in utt_ids if num_frames is not None else ():
            if num_frames[utt] != scanned[utt]:
                raise DataError(
                    f"{data_dir / 'utt2num_frames'} line {nf_lines[utt]}: utterance {utt!r} "
                    f"has {num_frames[utt]} frames but its matrix ({line_of(where[utt])}) has "
                    f"{scanned[utt]}; regenerate or delete utt2num_frames"
                )
        num_frames = scanned
    else:
        feat_dim = load_matrix(specs[utt_ids[0]], line_of(where[utt_ids[0]])).shape[1]

    if targets and task in ("regress", "multi"):
        values = _read_values(data_dir, utt_ids, where, num_frames, task)

    if labels is not None and task in ("frame", "multi"):
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
        classes=classes if task == "utt" and targets else None, values=values, has_targets=targets,
        utt2spk=utt2spk, cmvn=cmvn, _token_ids=token_ids or {},
    )
