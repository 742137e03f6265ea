"""``optim run --workers N``: a pool of local worker processes on one study.

Each worker is its own process (its own torch thread budget, or one GPU
through ``CUDA_VISIBLE_DEVICES``); its output lines are prefixed with ``[wI]``.
On Linux the workers are forked from the pool process after it has imported
what every worker needs (optuna, SQLAlchemy, the database driver and, for
training, torch), so N workers are up in milliseconds instead of N interpreter
start-ups (about 0.9 s of CPU each); elsewhere each is a fresh ``python -m
stagetune`` process. Nothing here opens a database or touches a GPU before
forking (``optim run`` checks the study first and closes its connections).
SIGTERM/SIGINT to the pool reach every worker, which checkpoint and hand their
trials back; the pool ends with a combined summary and, like a single worker,
the shell's status for the signal (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from typing import IO, Any, Callable, Sequence

__all__ = ["run_pool"]

_DONE = re.compile(r"worker done \((?P<why>.*)\): (?P<counts>.*)$")
_COUNT = re.compile(r"(\d+) ([a-z ]+)")


class _Child:
    """One worker process: its pid and the read end of its combined stdout/stderr."""

    def __init__(self, pid: int, stream: IO[str], popen: subprocess.Popen[str] | None = None) -> None:
        self.pid, self.stream, self._popen = pid, stream, popen
        self.code: int | None = None

    def signal(self, signum: int) -> None:
        if self.code is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self) -> int:
        if self._popen is not None:
            self.code = self._popen.wait()
            return self.code
        _, status = os.waitpid(self.pid, 0)  # PEP 475: retried after a signal handler ran
        self.code = os.waitstatus_to_exitcode(status)
        if self.code < 0:  # killed by a signal: the shell's convention
            self.code = 128 - self.code
        return self.code


def _spawn(args: Sequence[str], env: dict[str, str]) -> _Child:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagetune", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    return _Child(proc.pid, proc.stdout, proc)


def _fork(
    args: Sequence[str], env: dict[str, str], inherited: list[int], main: Callable[[list[str]], int]
) -> _Child:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        code = 1
        try:
            os.close(read_fd)
            for fd in inherited:  # the other workers' pipes
                os.close(fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            sys.stdout.reconfigure(line_buffering=True)
            sys.stderr.reconfigure(line_buffering=True)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.environ.update(env)  # the pool's environment plus this worker's GPU
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(write_fd)
    inherited.append(read_fd)
    return _Child(pid, os.fdopen(read_fd, "r", encoding="utf-8", errors="replace"))


def _pump(index: int, stream: IO[str], out: Callable[[str], None], finals: dict[int, str]) -> None:
    with stream:
        for raw in stream:
            line = raw.rstrip("\n")
            if _DONE.search(line):
                finals[index] = line
            out(f"[w{index}] {line}")


def can_fork() -> bool:
    """Whether workers are forked from a preloaded pool (Linux) rather than started afresh."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def run_pool(
    worker_args: Sequence[str],
    num_workers: int,
    *,
    main: Callable[[list[str]], int],
    gpus: Sequence[str] = (),
    seed: int | None = None,
    preload: Sequence[str] = (),
    fork: bool | None = None,
    out: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run ``num_workers`` copies of ``stagetune <worker_args>`` and wait for all.

    Args:
        worker_args: Arguments after ``stagetune`` for one worker (no --workers).
        num_workers: How many processes.
        main: The ``stagetune`` entry point a forked worker calls with ``worker_args``
            (a spawned one runs ``python -m stagetune``).
        gpus: GPU ids; worker ``i`` sees only ``gpus[i % len(gpus)]``.
        seed: Sampler seed of worker 0; worker ``i`` gets ``seed + i``.
        preload: Modules to import once before forking (ignored when spawning).
        fork: Fork the workers (default: where :func:`can_fork`).
        out: Where prefixed lines go.

    Returns:
        The first exit status of a worker that failed; else, when the pool was
        interrupted, 128 + the first signal it received; else 0.
    """
    fork = can_fork() if fork is None else fork
    if fork:
        for module in preload:
            try:
                importlib.import_module(module)
            except ImportError:  # the worker reports it, with its one-line advice
                pass
    children: list[_Child] = []
    inherited: list[int] = []
    for index in range(num_workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        args = list(worker_args)
        if seed is not None:
            args += ["--seed", str(seed + index)]
        children.append(_fork(args, env, inherited, main) if fork else _spawn(args, env))

    # Threads only after the last fork: a forked child must not inherit a lock held by one.
    finals: dict[int, str] = {}
    threads = [
        threading.Thread(target=_pump, args=(i, child.stream, out, finals), daemon=True)
        for i, child in enumerate(children)
    ]
    for thread in threads:
        thread.start()

    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for child in children:
            child.signal(signum)  # SIGINT or SIGTERM: either hands the trial back

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [child.wait() for child in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for thread in threads:
        thread.join(timeout=5)
    totals: dict[str, int] = {}
    for line in finals.values():
        match = _DONE.search(line)
        for number, what in _COUNT.findall(match["counts"]):
            totals[what.strip()] = totals.get(what.strip(), 0) + int(number)
    # Once the pool is interrupted, a worker that ended by a signal was interrupted too.
    interrupted = {128 + signal.SIGINT, 128 + signal.SIGTERM} if received else set()
    failed = [i for i, c in enumerate(codes) if c != 0 and c not in interrupted]
    summary = ", ".join(f"{v} {k}" for k, v in totals.items()) or "no trials"
    out(
        f"{num_workers} workers done: {summary}"
        + (f"; workers {', '.join(f'w{i} (exit {codes[i]})' for i in failed)} failed" if failed else "")
        + (f"; interrupted by {signal.Signals(received[0]).name}" if received else "")
    )
    if failed:
        return codes[failed[0]]
    return 128 + received[0] if received else 0
