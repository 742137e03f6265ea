"""Checkpoints and model files: dicts with named keys, written atomically.

A training checkpoint (``checkpoint.pt``) holds everything needed to resume
bit-for-bit: model, optimizer, scheduler, scaler, epoch and batch position, RNG
states, resolved config, history and versions.  A model file (``model.pt``)
carries the weights with their config, feature dimension, token list and feature
normalisation (``"normalization"``: the resolved mode, and the training mean and
std for ``global``), so ``stagetune evaluate`` needs nothing else.

Both also record what the model was trained on (``"data"``, :func:`data_identity`:
per train and dev set, its directory, utterance count and a hash of the sorted
utterance ids) and, when the caller gives one, an opaque ``"owner"`` (an optim
study's uid), so neither a resumed run nor a study reuses a model trained for
something else.  Checkpoints written before these keys existed still load; they
read as unknown data and owner.

Training keeps the checkpoint it replaces as ``checkpoint.pt.prev`` (a hard
link, so no copy): a checkpoint that cannot be read later (truncated by a full
disk or a crash outside the atomic write) falls back to it with one warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch

from stagetune import __version__
from stagetune.config import Config, from_dict, to_dict
from stagetune.errors import StagetuneError

if TYPE_CHECKING:
    from stagetune.corpus import Corpus

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "DATA_KEY",
    "OWNER_KEY",
    "data_identity",
    "data_change",
    "versions",
    "atomic_save",
    "rng_state",
    "set_rng_state",
    "load_checkpoint",
    "previous_path",
    "save_model_file",
    "ModelFile",
    "load_model_file",
]

CHECKPOINT_FORMAT = "stagetune-checkpoint/2"  # 2: update-counted LR schedule
MODEL_FORMAT = "stagetune-model/1"
#: Key of :func:`data_identity` in checkpoints and model files (absent in older ones).
DATA_KEY = "data"
#: Key of the caller's opaque owner id (an optim study's uid; absent when none was given).
OWNER_KEY = "owner"
_HASH_CHARS = 16
_ROLES = (("train", "trained on", "utterances"), ("dev", "validated on", "dev utterances"))


def _ids_identity(directory: Path, utt_ids: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(sorted(utt_ids)).encode("utf-8")).hexdigest()
    return {"dir": str(directory), "utterances": len(utt_ids), "hash": digest[:_HASH_CHARS]}


def data_identity(corpus: Corpus) -> dict[str, dict[str, Any]]:
    """What a model is trained (``"train"``) and validated (``"dev"``) on.

    Each holds the data ``"dir"``, the number of ``"utterances"`` and a
    ``"hash"`` of their sorted ids: moving a data dir keeps its identity,
    adding, removing or renaming an utterance (or another dev split) changes it.
    """
    return {
        "train": _ids_identity(corpus.train.path, corpus.train_ids),
        "dev": _ids_identity(corpus.dev.path, corpus.dev_ids),
    }


def data_change(stored: Mapping[str, Any], current: Mapping[str, Any], source: str) -> str | None:
    """How ``current`` data differs from the ``stored`` identity of checkpoint ``source``, or None."""
    for role, verb, unit in _ROLES:
        old, new = stored[role], current[role]
        if (old["utterances"], old["hash"]) == (new["utterances"], new["hash"]):
            continue
        where = "" if old["dir"] == new["dir"] else f" of {new['dir']}"
        return (
            f"checkpoint {source} was {verb} {old['utterances']} {unit} of {old['dir']} "
            f"(hash {old['hash'][:8]}), this data has {new['utterances']}{where} (hash {new['hash'][:8]})"
        )
    return None


def versions() -> dict[str, str]:
    """Versions stored with every checkpoint and model file."""
    return {
        "stagetune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def previous_path(path: Path) -> Path:
    """Where :func:`atomic_save` with ``keep_previous`` keeps the file it replaces."""
    return path.with_name(path.name + ".prev")


def _keep_previous(path: Path) -> None:
    """Hard-link ``path`` as its previous version (or drop a stale one when there is none)."""
    previous = previous_path(path)
    if not path.exists():
        previous.unlink(missing_ok=True)  # an earlier run's: never fall back across runs
        return
    link = path.with_name(f".{previous.name}.{os.getpid()}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this filesystem: keep nothing rather than copy
        previous.unlink(missing_ok=True)
        return
    os.replace(link, previous)


def atomic_save(obj: Any, path: Path, *, keep_previous: bool = False) -> None:
    """``torch.save`` to a temporary file in the same dir, then rename over ``path``.

    With ``keep_previous`` the file replaced stays as :func:`previous_path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous:
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """Every RNG state training touches."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise StagetuneError(f"{path}: no such {what}") from None
    except Exception as exc:  # corrupt or foreign file
        raise StagetuneError(f"{path}: cannot read {what}: {exc}") from None
    return obj


def _read_checkpoint(path: Path) -> dict[str, Any]:
    obj = _load(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise StagetuneError(
            f"{path}: not a stagetune training checkpoint (expected format {CHECKPOINT_FORMAT}); "
            f"remove it or use another model directory"
        )
    return obj


def load_checkpoint(path: Path, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Read a training checkpoint written by :mod:`stagetune.training`.

    A checkpoint that exists but cannot be read (truncated, corrupt) falls back
    to the previous one training kept (:func:`previous_path`), saying so through
    ``warn``; without a readable previous one the first error is raised.
    """
    previous = previous_path(path)
    try:
        return _read_checkpoint(path)
    except StagetuneError as error:
        if not path.exists() or not previous.exists():
            raise
        reason = str(error)
        try:
            obj = _read_checkpoint(previous)
        except StagetuneError:
            raise error from None
    if warn is not None:
        epoch = obj.get("state", {}).get("epoch", "?")
        warn(f"{reason}; resuming from the previous checkpoint {previous.name} (epoch {epoch})")
    return obj


def save_model_file(
    path: Path,
    *,
    state_dict: dict[str, torch.Tensor],
    config: Config,
    feat_dim: int,
    tokens: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing model file."""
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "config": to_dict(config),
            "feat_dim": feat_dim,
            "tokens": list(tokens),
            "versions": versions(),
            **(extra or {}),
        },
        path,
    )


class ModelFile:
    """A loaded model file: config, feature dim, token symbols and weights."""

    def __init__(self, obj: dict[str, Any], source: str) -> None:
        self.config: Config = from_dict(obj["config"], source, stored=True)
        self.feat_dim: int = int(obj["feat_dim"])
        self.tokens: list[str] = list(obj["tokens"])
        self.state_dict: dict[str, torch.Tensor] = obj["state_dict"]
        self.extra = {k: v for k, v in obj.items() if k not in ("state_dict",)}


def load_model_file(path: str | Path) -> ModelFile:
    """Read a model file written by :func:`save_model_file`."""
    path = Path(path)
    obj = _load(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise StagetuneError(
            f"{path}: not a stagetune model file (expected format {MODEL_FORMAT}); "
            f"pass the model.pt that `stagetune train` wrote"
        )
    return ModelFile(obj, str(path))
