"""``--tensorboard DIR`` of ``train`` and ``optim run``: per-epoch scalars, and a trial's parameters as hparams.

Every epoch writes ``train/loss``, ``dev/error``, ``dev/loss`` and
``train/learning_rate`` (and, for a trial, ``value``: the study's metric) at the
epoch as step.  ``optim run`` writes each trial to ``DIR/STUDY/trial-N`` (a retry
continues its original's run) with the trial's sampled parameters as hparams,
so TensorBoard's HParams tab compares trials; ``train`` writes one run to ``DIR``.
The ``tensorboard`` package is optional (``pip install 'stagetune[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["NEED", "require_tensorboard", "EpochWriter"]

#: What ``--tensorboard`` needs: (module, pip package, extra), as :mod:`stagetune.extras` takes it.
NEED = ("tensorboard", "tensorboard", "tensorboard")

#: Scalars per epoch: tag -> attribute of :class:`stagetune.training.EpochResult`.
SCALARS = {"train/loss": "train_loss", "dev/error": "dev_error", "dev/loss": "dev_loss",
           "train/learning_rate": "learning_rate"}


def require_tensorboard() -> None:
    """One line naming the extra when the package is missing (before any work)."""
    from stagetune.extras import require

    require("--tensorboard", NEED)


def _hparam(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class EpochWriter:
    """A training callback writing each epoch to one TensorBoard run directory.

    Args:
        logdir: The run's directory (created on the first epoch).
        hparams: Parameters to record as the run's hparams (None: none).
        value: ``EpochResult -> float`` written as ``value`` (a trial's metric), or None.
    """

    def __init__(self, logdir: str | Path, hparams: dict[str, Any] | None = None, value: Any = None) -> None:
        self.logdir, self.hparams, self.value = Path(logdir), hparams, value
        self._writer: Any = None

    def __call__(self, result: Any) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir))
            if self.hparams:
                from torch.utils.tensorboard.summary import hparams

                metrics = {tag: 0.0 for tag in SCALARS} | ({"value": 0.0} if self.value else {})
                for summary in hparams({k: _hparam(v) for k, v in self.hparams.items()}, metrics):
                    self._writer.file_writer.add_summary(summary)
        for tag, attr in SCALARS.items():
            self._writer.add_scalar(tag, float(getattr(result, attr)), result.epoch)
        if self.value is not None:
            self._writer.add_scalar("value", float(self.value(result)), result.epoch)
        self._writer.flush()  # a killed worker loses nothing written

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit
            pass
