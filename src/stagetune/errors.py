"""The small exception tree users see as one-line errors.

Every error a user can cause by their own input is a :class:`StagetuneError`; the
CLI prints ``stagetune: error: <message>`` and exits with :attr:`exit_code`,
never with a traceback.
"""

from __future__ import annotations

__all__ = ["StagetuneError", "UsageError", "ConfigError", "DataError", "StorageError"]


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
