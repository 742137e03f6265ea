"""The small exception tree users see as one-line errors.

Every error a user can cause by their own input is a :class:`StagetuneError`; the
CLI prints ``stagetune: error: <message>`` and exits with :attr:`exit_code`,
never with a traceback.
"""

from __future__ import annotations

__all__ = [
    "StagetuneError",
    "UsageError",
    "ConfigError",
    "DataError",
    "StorageError",
    "TrainingInterrupted",
]


class StagetuneError(Exception):
    """A runtime problem the user can fix; the message says what and how."""

    exit_code = 1


class UsageError(StagetuneError):
    """Bad command-line usage (exit code 2, like argparse)."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid configuration value, section or key."""


class DataError(StagetuneError):
    """A problem in a Kaldi data directory (names the file and line)."""


class StorageError(StagetuneError):
    """A problem with the study database (URLs are always masked)."""


class TrainingInterrupted(StagetuneError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can be resumed.

    The exit code is the shell's for the signal (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class TrialLost(StagetuneError):
    """This worker's trial was declared stale and re-queued by another worker.

    The trial is no longer this worker's: it stops it without writing to its
    checkpoint dir (the retry owns that now) and without reporting it.
    """
