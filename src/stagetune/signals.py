"""SIGTERM and SIGINT handlers for the length of a ``with`` block (prep, training, plan run)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["STOP_SIGNALS", "handling"]

#: What stops a run: Slurm's preemption or ``kill`` (SIGTERM), Ctrl-C (SIGINT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def handling(handler: Callable[[int, Any], Any]) -> Iterator[dict[int, Any] | None]:
    """``handler`` handles :data:`STOP_SIGNALS` inside the block; the previous handlers after it.

    Yields the previous handlers by signal.  Handlers can only be set in the main
    thread: elsewhere nothing changes and it yields None.
    """
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield previous
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
