"""What a model dir holds, and whether a run may write into it or resume it.

:func:`stagetune.training.fit` writes ``checkpoint.pt`` (every epoch, and
mid-epoch on SIGTERM/SIGINT), ``best.pt``, ``history.csv``, ``config.ini`` and,
at the end, ``model.pt``.  A checkpoint resumes only with the config (bar
``training.num_epochs``), data and owner it was written with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from stagetune.checkpoint import DATA_KEY, OWNER_KEY, data_change
from stagetune.config import Config, flatten, from_dict
from stagetune.errors import UsageError

__all__ = [
    "CHECKPOINT_NAME",
    "BEST_NAME",
    "MODEL_NAME",
    "HISTORY_NAME",
    "CONFIG_NAME",
    "MODEL_DIR_FILES",
    "check_model_dir",
    "check_resumable",
]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
MODEL_NAME = "model.pt"
HISTORY_NAME = "history.csv"
CONFIG_NAME = "config.ini"

#: What :func:`fit` writes into a model dir (temporary files start with one of these,
#: or with a dot and one of these).
MODEL_DIR_FILES = (CHECKPOINT_NAME, BEST_NAME, MODEL_NAME, HISTORY_NAME, CONFIG_NAME)
#: Files that make a directory a Kaldi data dir: one named as MODEL_DIR is a
#: forgotten MODEL_DIR argument (``train TRAIN_DIR DEV_DIR``).
_DATA_DIR_FILES = ("feats.scp", "wav.scp", "segments", "utt2spk", "spk2utt", "cmvn.scp", "utt2label")

#: Config fields that may change between runs resuming one model dir.
_RESUMABLE_CHANGES = {"training.num_epochs"}


def check_model_dir(model_dir: str | Path) -> None:
    """Refuse a model dir that :func:`fit` would write into by mistake.

    A new or empty directory, or one holding what ``fit`` writes, is fine; a
    file, a Kaldi data dir (a forgotten MODEL_DIR argument turns DEV_DIR into the
    model dir) or any other non-empty directory is a :class:`UsageError`.
    """
    path = Path(model_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UsageError(f"model dir {path} {where}; give a new directory (or one of an earlier run)")
    if existing != path:
        return
    names = sorted(p.name for p in path.iterdir())
    data_files = [name for name in names if name in _DATA_DIR_FILES]
    if data_files:
        raise UsageError(
            f"model dir {path} is a Kaldi data dir (it holds {', '.join(data_files)}); was "
            f"MODEL_DIR forgotten? train takes TRAIN_DIR [DEV_DIR] MODEL_DIR, MODEL_DIR last"
        )
    ours = [n for n in names if n.lstrip(".").startswith(MODEL_DIR_FILES)]
    if names and not ours:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(
            f"model dir {path} is not empty ({shown}) and holds no stagetune model; give a new "
            f"or empty directory"
        )


def check_resumable(
    ckpt: dict[str, Any],
    model_dir: Path,
    *,
    config: Config,
    feat_dim: int,
    tokens: list[str],
    data: dict[str, dict[str, Any]],
    owner: str | None,
    warn: Callable[[str], None],
) -> None:
    """Refuse to resume ``model_dir``'s checkpoint ``ckpt`` with another config, data or owner.

    Args:
        ckpt: The loaded ``MODEL_DIR/checkpoint.pt``.
        model_dir: Where it lies.
        config: The config of this run.
        feat_dim: This data's feature dimension.
        tokens: This data's output symbols.
        data: This data's :func:`~stagetune.checkpoint.data_identity`.
        owner: Whom this run trains for (``None``: anyone's checkpoint resumes).
        warn: Told (the bare message) when the checkpoint predates recording its data.

    Raises:
        UsageError: Naming what differs, and how to start over or resume.
    """
    ckpt_path = model_dir / CHECKPOINT_NAME
    if owner is not None and ckpt.get(OWNER_KEY) != owner:
        raise UsageError(
            f"{model_dir} holds a checkpoint trained for {ckpt.get(OWNER_KEY) or 'an unknown owner'}, "
            f"not for {owner}; use a new model directory"
        )
    changes = _config_changes(from_dict(ckpt["config"], str(ckpt_path), stored=True), config)
    if changes:
        raise UsageError(
            f"{model_dir} holds a checkpoint trained with another config ("
            + "; ".join(changes[:5])
            + "); use a new model directory, or the same config to resume"
        )
    if ckpt["feat_dim"] != feat_dim or ckpt["tokens"] != tokens:
        raise UsageError(
            f"{model_dir} holds a checkpoint trained on other data (feature dimension "
            f"{ckpt['feat_dim']}, {len(ckpt['tokens'])} output symbols; this data: "
            f"{feat_dim}, {len(tokens)}); use a new model directory, or the same "
            f"data to resume"
        )
    if ckpt.get(DATA_KEY) is None:
        written_by = ckpt.get("versions", {}).get("stagetune", "?")
        warn(
            f"checkpoint {ckpt_path} (written by stagetune {written_by}) does not record its "
            f"training data; resuming without checking that this is the same data"
        )
    else:
        change = data_change(ckpt[DATA_KEY], data, str(ckpt_path))
        if change is not None:
            raise UsageError(
                f"{change}; use a new model directory (or remove {ckpt_path}) to start over, or "
                f"the same data to resume"
            )


def _config_changes(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in _RESUMABLE_CHANGES]
