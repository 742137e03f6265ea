"""Feature normalisation: per speaker, global, per utterance, or none.

``[data] normalization`` names one of :data:`~stagetune.config.NORMALIZATIONS`;
:func:`fit_normalizer` resolves it against the training data into a
:class:`Normalizer`, which a dataset applies to every utterance it reads:

* ``speaker``: the speaker's mean and std from the directory's own ``cmvn.scp``;
* ``global``: per-dimension mean and std over the training utterances, computed
  once (:func:`global_stats`) and carried by the normalizer, so dev, test and a
  resumed run use the training statistics;
* ``utterance``: each utterance by its own mean and std;
* ``none``: features as stored;
* ``auto``: ``speaker`` when the training dir has ``cmvn.scp``, else ``global``.

Global statistics are cached in a small file keyed by a hash of the training
utterances, their rxspecifiers and the size and modification time of their ark
files: ``DATA_DIR/.stagetune/global-stats-KEY.npz``, or under
``$XDG_CACHE_HOME/stagetune`` (default ``~/.cache/stagetune``) when the data dir is
not writable. Files are written to a unique temporary name and renamed, so any
number of workers on a shared filesystem may compute and write them at once;
a reader sees a whole file or none, and an unreadable one is recomputed.

This module does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stagetune.config import NORMALIZATIONS
from stagetune.errors import ConfigError, DataError, StagetuneError
from stagetune.kaldi import DataDir
from stagetune.kaldi_io import iter_matrices

__all__ = [
    "MODES",
    "Normalizer",
    "GlobalStats",
    "resolve_mode",
    "fit_normalizer",
    "stored_normalizer",
    "global_stats",
    "stats_cache_dirs",
    "frame_moments",
]

_CACHE_FORMAT = "stagetune-global-stats/1"
_STD_FLOOR = 1e-5  # relative to max(1, |mean|): constant dims map to 0, not to noise / 0
_OFFSET = re.compile(r"^(?P<file>.*):\d+(\[[0-9:,\s]*\])?$")


def _floored_std(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    return np.maximum(np.sqrt(np.maximum(var, 0.0)), _STD_FLOOR * np.maximum(1.0, np.abs(mean)))


def _none(norm: Normalizer, data: DataDir, utt_id: str, feats: np.ndarray) -> np.ndarray:
    return feats


def _global(norm: Normalizer, data: DataDir, utt_id: str, feats: np.ndarray) -> np.ndarray:
    feats -= norm.mean
    feats /= norm.std
    return feats


def _speaker(norm: Normalizer, data: DataDir, utt_id: str, feats: np.ndarray) -> np.ndarray:
    mean, std = data.cmvn_of(utt_id)
    feats -= mean
    feats /= std
    return feats


def _utterance(norm: Normalizer, data: DataDir, utt_id: str, feats: np.ndarray) -> np.ndarray:
    x = feats.astype(np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    std = _floored_std(mean, x.var(axis=0) if len(x) else np.ones(x.shape[1]))
    feats -= mean.astype(np.float32)
    feats /= std.astype(np.float32)
    return feats


#: Resolved mode -> ``(normalizer, data, utt_id, feats (T, F) float32) -> feats``, in place.
_APPLY: dict[str, Callable[[Normalizer, DataDir, str, np.ndarray], np.ndarray]] = {
    "none": _none,
    "global": _global,
    "speaker": _speaker,
    "utterance": _utterance,
}
#: What ``auto`` and the config choices resolve to.
MODES = tuple(sorted(_APPLY))


def _missing_cmvn(data: DataDir, chosen: str) -> DataError:
    return DataError(
        f"{data.path / 'cmvn.scp'} is missing; per-speaker normalisation ({chosen}) needs it: "
        "compute it (`stagetune prep`, or Kaldi steps/compute_cmvn_stats.sh) or set "
        "data.normalization to global, utterance or none"
    )


@dataclass(frozen=True, eq=False)  # holds arrays
class Normalizer:
    """A resolved normalisation; picklable (for DataLoader workers) and stored in model.pt.

    Attributes:
        mode: One of :data:`MODES`.
        mean: float32 (F,) training mean (``global`` only).
        std: float32 (F,) training std, floored (``global`` only).
    """

    mode: str
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mode not in _APPLY:
            raise ConfigError(f"normalization must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.mode == "global") != (self.mean is not None and self.std is not None):
            raise ValueError("mean and std are given exactly for mode 'global'")

    @property
    def feat_dim(self) -> int | None:
        """F of the stored statistics, if any."""
        return None if self.mean is None else len(self.mean)

    def check(self, data: DataDir) -> None:
        """Raise :class:`DataError` if ``data`` cannot be normalised this way."""
        if self.mode == "speaker" and data.cmvn is None:
            raise _missing_cmvn(data, "as for the training dir")
        if self.feat_dim is not None and self.feat_dim != data.feat_dim:
            raise DataError(
                f"{data.path}: features have dimension {data.feat_dim} but the global "
                f"normalisation statistics have {self.feat_dim}; use features computed like "
                "the training ones"
            )

    def __call__(self, data: DataDir, utt_id: str, feats: np.ndarray) -> np.ndarray:
        """Normalise ``feats`` (T, F) float32 of ``utt_id`` in ``data``, in place; returns it."""
        return _APPLY[self.mode](self, data, utt_id, feats)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (for checkpoints and model files)."""
        stats = {} if self.mean is None else {"mean": self.mean.tolist(), "std": self.std.tolist()}
        return {"mode": self.mode, **stats}

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any], source: str = "model file") -> Normalizer:
        """Inverse of :meth:`to_dict`."""
        try:
            mean, std = stored.get("mean"), stored.get("std")
            return cls(
                stored["mode"],
                None if mean is None else np.asarray(mean, dtype=np.float32),
                None if std is None else np.asarray(std, dtype=np.float32),
            )
        except (KeyError, TypeError, ValueError, StagetuneError) as exc:
            raise StagetuneError(f"{source}: unreadable normalization entry ({exc})") from None


def resolve_mode(mode: str, train: DataDir) -> str:
    """``auto`` -> ``speaker`` if ``train`` has ``cmvn.scp``, else ``global``; checks ``speaker``.

    Raises:
        DataError: For ``speaker`` without ``cmvn.scp``.
    """
    if mode not in NORMALIZATIONS:
        raise ConfigError(
            f"data.normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}"
        )
    if mode == "auto":
        return "speaker" if train.cmvn is not None else "global"
    if mode == "speaker" and train.cmvn is None:
        raise _missing_cmvn(train, "data.normalization = speaker")
    return mode


@dataclass(frozen=True, eq=False)
class GlobalStats:
    """Per-dimension statistics of a set of utterances.

    Attributes:
        mean: float32 (F,).
        std: float32 (F,), floored at ``1e-5 * max(1, |mean|)``.
        num_frames: Frames they were computed over.
        path: The cache file read or written (None if none could be written).
        cached: Whether they came from the cache.
    """

    mean: np.ndarray
    std: np.ndarray
    num_frames: int
    path: Path | None
    cached: bool


def stats_cache_dirs(data: DataDir) -> list[Path]:
    """Where global statistics are looked for and written, in order."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [data.path / ".stagetune", Path(base) / "stagetune"]


def _cache_key(data: DataDir, utt_ids: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{data.feat_dim}\n".encode())
    files = set()
    for utt in sorted(utt_ids):
        spec = data.feat_paths[utt]
        digest.update(f"{utt} {spec}\n".encode())
        if not (spec.startswith("|") or spec.endswith("|")):
            match = _OFFSET.match(spec)
            files.add(match["file"] if match else spec)
    for name in sorted(files):  # rewritten features change an ark's size or mtime
        try:
            st = os.stat(name)
            digest.update(f"{name} {st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name} missing\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path, key: str, feat_dim: int) -> GlobalStats | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if str(npz["key"]) != key:
                return None
            mean, std = npz["mean"].astype(np.float32), npz["std"].astype(np.float32)
            num_frames = int(npz["num_frames"])
    except Exception:  # absent, foreign or damaged (zipfile, numpy and OS errors): recompute
        return None
    if mean.shape != (feat_dim,) or std.shape != (feat_dim,):
        return None
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        return None
    return GlobalStats(mean, std, num_frames, path, cached=True)


def _write_cache(path: Path, key: str, stats: GlobalStats) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, key=np.array(key), mean=stats.mean, std=stats.std,
                     num_frames=np.array(stats.num_frames))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the data
        os.replace(tmp, path)  # atomic: concurrent writers all write the same content
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


def frame_moments(matrices: Iterable[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-column mean and variance over the rows of ``(T, dim)`` matrices, and the row count.

    Per-matrix moments are merged in float64 (one pass, numerically stable);
    with no rows the mean is 0 and the variance 0.
    """
    count = 0
    mean = np.zeros(dim)
    m2 = np.zeros(dim)  # sum of squared deviations from the mean
    for matrix in matrices:
        x = np.asarray(matrix, dtype=np.float64).reshape(-1, dim)
        n = len(x)
        if n == 0:
            continue
        utt_mean = x.mean(axis=0)
        delta = utt_mean - mean
        total = count + n
        mean += delta * (n / total)
        m2 += ((x - utt_mean) ** 2).sum(axis=0) + delta**2 * (count * n / total)
        count = total
    return mean, m2 / max(count, 1), count


def _compute(data: DataDir, utt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, floored std and frame count, merging per-utterance moments in float64."""
    wanted = set(utt_ids)
    order = [u for part in data.parts for u in part if u in wanted]  # one part at a time
    items = ((u, data.feat_paths[u], f"feats.scp entry of {u!r}") for u in order)
    mean, var, count = frame_moments((matrix for _, matrix in iter_matrices(items)), data.feat_dim)
    if count == 0:
        raise DataError(f"{data.path}: no frames to compute normalisation statistics from")
    return mean.astype(np.float32), _floored_std(mean, var).astype(np.float32), count


def global_stats(
    data: DataDir, utt_ids: Sequence[str], *, cache_dirs: Sequence[Path] | None = None
) -> GlobalStats:
    """Per-dimension mean and std over ``utt_ids`` of ``data``, cached on disk.

    Args:
        data: The training data directory.
        utt_ids: The utterances to use (the training side of a dev split).
        cache_dirs: Where to look for and write the cache, in order (default
            :func:`stats_cache_dirs`); the first writable one gets a new file.
    """
    key = _cache_key(data, utt_ids)
    dirs = stats_cache_dirs(data) if cache_dirs is None else list(cache_dirs)
    name = f"global-stats-{key[:32]}.npz"
    for directory in dirs:
        found = _read_cache(Path(directory) / name, key, data.feat_dim)
        if found is not None:
            return found
    mean, std, num_frames = _compute(data, utt_ids)
    stats = GlobalStats(mean, std, num_frames, None, cached=False)
    for directory in dirs:
        path = Path(directory) / name
        if _write_cache(path, key, stats):
            return GlobalStats(mean, std, num_frames, path, cached=False)
    return stats


def fit_normalizer(
    mode: str,
    train: DataDir,
    utt_ids: Sequence[str],
    *,
    cache_dirs: Sequence[Path] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Normalizer:
    """The normaliser ``mode`` resolves to on the training utterances ``utt_ids`` of ``train``.

    ``log`` hears one line when global statistics had to be computed.

    Raises:
        DataError: For ``speaker`` without ``cmvn.scp``.
    """
    resolved = resolve_mode(mode, train)
    if resolved != "global":
        return Normalizer(resolved)
    stats = global_stats(train, utt_ids, cache_dirs=cache_dirs)
    if not stats.cached:
        where = f"cached in {stats.path}" if stats.path else "not cached: no writable cache dir"
        log(
            f"global normalisation: statistics of {stats.num_frames} frames in {len(utt_ids)} "
            f"utterances of {train.path} ({where})"
        )
    return Normalizer("global", stats.mean, stats.std)


def stored_normalizer(
    stored: Mapping[str, Any] | None, configured: str, data: DataDir, source: str
) -> Normalizer:
    """The normaliser a model file or checkpoint (``source``) was trained with.

    Files written before normalisation was stored have none; their models applied
    ``cmvn.scp`` where present (``apply_cmvn = true``, now read as ``auto``) or
    nothing, and so does the normaliser returned for them.
    """
    if stored is not None:
        return Normalizer.from_dict(stored, source)
    if configured == "auto":
        return Normalizer("speaker" if data.cmvn is not None else "none")
    if configured == "global":
        raise StagetuneError(
            f"{source} has no normalisation statistics although it was trained with "
            "data.normalization = global; retrain it"
        )
    return Normalizer(configured)
