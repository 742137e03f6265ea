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
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

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


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same dir, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint written by :mod:`stagetune.training`."""
    obj = _load(path, "checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise StagetuneError(
            f"{path}: not a stagetune training checkpoint (expected format {CHECKPOINT_FORMAT}); "
            f"remove it or use another model directory"
        )
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
        self.config: Config = from_dict(obj["config"], source)
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
