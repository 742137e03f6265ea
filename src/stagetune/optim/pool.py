"""``optim run --workers N``: a pool of local worker processes on one study.

Each worker is a separate ``stagetune optim ... run`` process (its own torch
thread budget, or one GPU through ``CUDA_VISIBLE_DEVICES``); its output lines
are prefixed with ``[wI]``.  SIGTERM/SIGINT to the pool reach every worker,
which checkpoint and hand their trials back; the pool ends with a combined
summary.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence

__all__ = ["run_pool"]

_DONE = re.compile(r"worker done \((?P<why>.*)\): (?P<counts>.*)$")
_COUNT = re.compile(r"(\d+) ([a-z ]+)")


def _pump(index: int, stream: Any, out: Callable[[str], None], finals: dict[int, str]) -> None:
    for raw in stream:
        line = raw.rstrip("\n")
        if _DONE.search(line):
            finals[index] = line
        out(f"[w{index}] {line}")


def run_pool(
    worker_args: Sequence[str],
    num_workers: int,
    *,
    gpus: Sequence[str] = (),
    seed: int | None = None,
    out: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run ``num_workers`` copies of ``stagetune <worker_args>`` and wait for all.

    Args:
        worker_args: Arguments after ``stagetune`` for one worker (no --workers).
        num_workers: How many processes.
        gpus: GPU ids; worker ``i`` sees only ``gpus[i % len(gpus)]``.
        seed: Sampler seed of worker 0; worker ``i`` gets ``seed + i``.
        out: Where prefixed lines go.

    Returns:
        0 when every worker exited 0, else the first non-zero exit status.
    """
    procs: list[subprocess.Popen[str]] = []
    threads: list[threading.Thread] = []
    finals: dict[int, str] = {}
    for index in range(num_workers):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        args = list(worker_args)
        if seed is not None:
            args += ["--seed", str(seed + index)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "stagetune", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        procs.append(proc)
        thread = threading.Thread(target=_pump, args=(index, proc.stdout, out, finals), daemon=True)
        thread.start()
        threads.append(thread)

    def forward(signum: int, frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
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
    failed = [i for i, c in enumerate(codes) if c != 0]
    summary = ", ".join(f"{v} {k}" for k, v in totals.items()) or "no trials"
    out(
        f"{num_workers} workers done: {summary}"
        + (f"; workers {', '.join(f'w{i} (exit {codes[i]})' for i in failed)} failed" if failed else "")
    )
    return codes[failed[0]] if failed else 0
