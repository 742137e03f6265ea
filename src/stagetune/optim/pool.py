"""``optim run --workers N``: a pool of local worker processes on one study.

Each worker is its own process (its own torch thread budget, or one GPU
through ``CUDA_VISIBLE_DEVICES``); its output lines are prefixed with ``[wI]``.
On Linux the workers are forked from the pool process after it has imported
what every worker needs (optuna, SQLAlchemy, the database driver and, for
training, torch), so N workers are up in milliseconds instead of N interpreter
start-ups (about 0.9 s of CPU each); elsewhere each is a fresh ``python -m
stagetune.cli.pool_child`` process, handed its options as JSON. Every worker
gets the same typed :class:`WorkerOptions` but its own seed (``seed + i``) and
GPU, runs as ``optim run`` runs one (:mod:`stagetune.cli.pool_child`), and
sends its :class:`WorkerSummary` back as data on a pipe of its own. Nothing
here opens a database or touches a GPU before forking (``optim run`` checks
the study first and closes its connections).
SIGTERM/SIGINT to the pool reach every worker, which checkpoint and hand their
trials back; the pool ends with a combined summary and, like a single worker,
the shell's status for the signal (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import IO, Any, Callable, Sequence

from stagetune.optim.worker import WorkerOptions, WorkerSummary

__all__ = ["run_pool", "PoolResult", "can_fork", "send_summary", "read_summary", "Serve"]

#: A worker's body: ``(url, study_name, options, threads, result_fd) -> exit code``; it sends
#: its summary with :func:`send_summary` (``optim run`` gives :func:`stagetune.cli.pool_child.serve`).
Serve = Callable[[str, str, WorkerOptions, "int | None", int], int]


def send_summary(result_fd: int, summary: WorkerSummary) -> None:
    """Write ``summary`` to the pool's pipe and close it."""
    data = json.dumps(summary.to_dict()).encode()
    try:
        while data:
            data = data[os.write(result_fd, data):]
    finally:
        os.close(result_fd)


def read_summary(data: bytes) -> WorkerSummary | None:
    """What :func:`send_summary` wrote; None for nothing (the worker failed or died) or a torn write."""
    try:
        return WorkerSummary.from_dict(json.loads(data.decode()))
    except (ValueError, KeyError, TypeError, IndexError):
        return None



@dataclass
class PoolResult:
    """How a pool's workers ended."""

    #: Each worker's exit status (128 + N for a worker killed by signal N).
    codes: list[int]
    #: Each worker's summary; None for one that sent none (it failed or was killed).
    summaries: list[WorkerSummary | None]
    #: The first signal the pool received (and forwarded); None if none.
    signum: int | None = None

    def counts(self) -> dict[str, int]:
        """Trials by how they ended, over every worker that sent its summary."""
        totals: dict[str, int] = {}
        for summary in self.summaries:
            for what, number in (summary.counts if summary else {}).items():
                totals[what] = totals.get(what, 0) + number
        return totals

    def failed(self) -> list[int]:
        """The workers that failed; once the pool is interrupted, one ended by that signal was not."""
        interrupted = {128 + signal.SIGINT, 128 + signal.SIGTERM} if self.signum is not None else set()
        return [i for i, code in enumerate(self.codes) if code != 0 and code not in interrupted]

    def exit_code(self) -> int:
        """The first exit status of a worker that failed; else, when the pool was
        interrupted, 128 + the first signal it received; else 0."""
        failed = self.failed()
        if failed:
            return self.codes[failed[0]]
        return 128 + self.signum if self.signum is not None else 0

    def line(self) -> str:
        """The pool's closing line: ``N workers done: ...``."""
        counts = ", ".join(f"{v} {k.lower().replace('_', ' ')}" for k, v in self.counts().items())
        failed = self.failed()
        return (
            f"{len(self.codes)} workers done: {counts or 'no trials'}"
            + (f"; workers {', '.join(f'w{i} (exit {self.codes[i]})' for i in failed)} failed" if failed else "")
            + (f"; interrupted by {signal.Signals(self.signum).name}" if self.signum is not None else "")
        )


class _Child:
    """One worker process: its pid, the read end of its combined stdout/stderr and of its result pipe."""

    def __init__(
        self, pid: int, stream: IO[str], result_fd: int, popen: subprocess.Popen[str] | None = None
    ) -> None:
        self.pid, self.stream, self.result_fd, self._popen = pid, stream, result_fd, popen
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
            if self.code < 0:
                self.code = 128 - self.code
            return self.code
        _, status = os.waitpid(self.pid, 0)  # PEP 475: retried after a signal handler ran
        self.code = os.waitstatus_to_exitcode(status)
        if self.code < 0:  # killed by a signal: the shell's convention
            self.code = 128 - self.code
        return self.code

    def summary(self) -> WorkerSummary | None:
        """What the worker sent before it exited (read once it has: it is in the pipe by then).

        Non-blocking: a process the worker started may still hold the pipe's write end.
        """
        os.set_blocking(self.result_fd, False)
        chunks: list[bytes] = []
        try:
            while chunk := os.read(self.result_fd, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        finally:
            os.close(self.result_fd)
        return read_summary(b"".join(chunks))


def _spawn(
    serve: Serve, url: str, study_name: str, options: WorkerOptions, threads: int | None, env: dict[str, str]
) -> _Child:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", serve.__module__],  # its module runs it on the job read from stdin
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env, PYTHONUNBUFFERED="1"),
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    assert proc.stdin is not None and proc.stdout is not None
    job = {"url": url, "study_name": study_name, "options": options.to_dict(), "threads": threads,
           "result_fd": write_fd}  # the same number in the child (pass_fds)
    with proc.stdin:
        proc.stdin.write(json.dumps(job))
    return _Child(proc.pid, proc.stdout, read_fd, proc)


def _fork(
    serve: Serve,
    url: str,
    study_name: str,
    options: WorkerOptions,
    threads: int | None,
    env: dict[str, str],
    inherited: list[int],
) -> _Child:
    read_fd, write_fd = os.pipe()
    result_read, result_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        code = 1
        try:
            os.close(read_fd)
            os.close(result_read)
            for fd in inherited:  # the other workers' pipes
                os.close(fd)
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            os.close(write_fd)
            # Onto the pipe: the pool's own sys.stdout/stderr may be no wrappers of fds 1 and 2.
            sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            os.environ.update(env)  # the pool's environment plus this worker's GPU
            code = serve(url, study_name, options, threads, result_write)
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
    os.close(result_write)
    inherited += [read_fd, result_read]
    return _Child(pid, os.fdopen(read_fd, "r", encoding="utf-8", errors="replace"), result_read)


def _pump(index: int, stream: IO[str], out: Callable[[str], None]) -> None:
    with stream:
        for raw in stream:
            out(f"[w{index}] {raw.rstrip(chr(10))}")


def can_fork() -> bool:
    """Whether workers are forked from a preloaded pool (Linux) rather than started afresh."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def run_pool(
    url: str,
    study_name: str,
    options: WorkerOptions,
    num_workers: int,
    *,
    serve: Serve,
    threads: int | None = None,
    gpus: Sequence[str] = (),
    preload: Sequence[str] = (),
    fork: bool | None = None,
    out: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> PoolResult:
    """Run ``num_workers`` workers on the study and wait for all; the last line ``out`` gets is
    :meth:`PoolResult.line`.

    Args:
        url: The study database (checked by the caller: nothing here opens it).
        study_name: The study.
        options: Every worker's options; worker ``i`` runs with seed ``options.seed + i``
            (None: unseeded).
        num_workers: How many processes.
        serve: Each worker's body (forked: called; spawned: ``python -m`` its module,
            which reads the job as JSON from stdin).
        threads: Torch threads per worker (``optim run --threads``; None: 1).
        gpus: GPU ids; worker ``i`` sees only ``gpus[i % len(gpus)]``.
        preload: Modules to import once before forking (ignored when spawning).
        fork: Fork the workers (default: where :func:`can_fork`).
        out: Where prefixed lines go.
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
        own = options if options.seed is None else dataclasses.replace(options, seed=options.seed + index)
        children.append(
            _fork(serve, url, study_name, own, threads, env, inherited) if fork
            else _spawn(serve, url, study_name, own, threads, env)
        )

    # Threads only after the last fork: a forked child must not inherit a lock held by one.
    pumps = [
        threading.Thread(target=_pump, args=(i, child.stream, out), daemon=True) for i, child in enumerate(children)
    ]
    for thread in pumps:
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
    for thread in pumps:
        thread.join(timeout=5)
    result = PoolResult(codes, [child.summary() for child in children], received[0] if received else None)
    out(result.line())
    return result
