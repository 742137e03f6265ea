"""How prep leaves a data dir as it was when it fails or is stopped.

Every output is written under a temporary name (``.NAME.tmp-PID@HOST``) and
renamed only after all of them are complete (:class:`TempFiles`); SIGTERM and
SIGINT unwind through ``finally`` blocks that remove them (:class:`Signals`).
Temporary files of a run that was killed (SIGKILL, power loss) are removed by the
next run once their PID is gone (:func:`remove_stale_temp_files`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from stagetune.errors import StagetuneError
from stagetune.signals import handling

__all__ = ["OUTPUT_NAMES", "PrepInterrupted", "Signals", "TempFiles", "remove_stale_temp_files"]

#: Every file prep writes; only temporary files of these names are ever cleaned up.
OUTPUT_NAMES = (
    "utt2spk",
    "spk2utt",
    "tokens.txt",
    "feats.ark",
    "feats.scp",
    "utt2num_frames",
    "utt2dur",
    "cmvn.ark",
    "cmvn.scp",
)


class PrepInterrupted(StagetuneError):
    """SIGTERM arrived and prep stopped; the message says whether it had written anything.

    Before the outputs are renamed into place, the temporary files are removed and
    the data dir is as it was. The exit code is the shell's for the signal (143).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def _host() -> str:
    """This host's name as it appears in temporary file names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


# ".feats.ark.tmp-PID@HOST"; names without "@HOST" were written by older versions, here.
_TEMP_NAME = re.compile(
    r"\.(?P<name>" + "|".join(map(re.escape, OUTPUT_NAMES)) + r")"
    r"\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?"
)


def _pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(data_dir: Path) -> int:
    """Remove temporary files of prep runs on this host whose process is gone.

    Only names prep itself writes are touched; files of live processes and of
    other hosts (a data dir on a shared filesystem) are left alone.

    Returns:
        How many files were removed.
    """
    host = _host()
    removed = 0
    for path in data_dir.iterdir():
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _pid_is_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # another run cleaned it up first
            continue
        removed += 1
    return removed


class Signals:
    """SIGTERM raises :class:`PrepInterrupted` and SIGINT ``KeyboardInterrupt``, so that
    ``finally`` blocks remove the temporary files; after :meth:`disarm` they wait.

    Python's default for SIGTERM ends the process at once, leaving temporary files
    behind. Handlers can only be set in the main thread; elsewhere nothing changes.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._armed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # already unwinding: let the cleanup finish
            return
        self.received = signum
        if self._armed:
            self._raise("removed its temporary files, nothing in the data dir changed")

    def _raise(self, outcome: str) -> None:
        assert self.received is not None
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(self.received).name
        raise PrepInterrupted(f"prep stopped by {name}; {outcome}", self.received)

    def disarm(self) -> None:
        """Hold signals back from now on: the outputs are being renamed into place."""
        self._armed = False

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        with handling(self._handle):
            yield self
        if self.received is not None:  # arrived after disarm()
            self._raise("it had just written all of its outputs, which are complete")


class TempFiles:
    """Outputs written under temporary names, renamed together by :meth:`commit`."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._names: list[str] = []
        self._suffix = f".tmp-{os.getpid()}@{_host()}"

    def path(self, name: str) -> Path:
        """The temporary path standing in for ``DATA_DIR/name``."""
        if name not in OUTPUT_NAMES:
            raise ValueError(f"{name!r} is not in OUTPUT_NAMES, so a killed run would leak it")
        if name not in self._names:
            self._names.append(name)
        return self._data_dir / f".{name}{self._suffix}"

    def open(self, name: str, mode: str = "w") -> IO:
        encoding = None if "b" in mode else "utf-8"
        return open(self.path(name), mode, encoding=encoding)

    def commit(self) -> None:
        # feats.scp goes last: once it exists, everything it points at does too.
        for name in sorted(self._names, key=lambda name: name == "feats.scp"):
            os.replace(self.path(name), self._data_dir / name)
        self._names.clear()

    def discard(self) -> None:
        for name in self._names:
            self.path(name).unlink(missing_ok=True)
        self._names.clear()

