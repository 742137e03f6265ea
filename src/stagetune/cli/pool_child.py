"""One worker of an ``optim run --workers N`` pool, inside its own process.

The pool (:mod:`stagetune.optim.pool`, given :func:`serve` by ``optim run``) forks a
process that calls it, or, where it does not fork, starts ``python -m stagetune.cli.pool_child`` and
writes the job to its stdin as one JSON object: ``url``, ``study_name``,
``options`` (:meth:`WorkerOptions.to_dict`), ``threads`` and ``result_fd``.

Either way the worker runs as ``optim run`` runs one: the thread budget, its
lines on stderr, its ``worker done (...)`` line, a one-line error and exit code
for a :class:`~stagetune.errors.StagetuneError` (the CLI's own handling,
:func:`stagetune.cli.run_command`), 128 + the signal when it was stopped. Its
:class:`WorkerSummary` goes back to the pool as JSON on the dedicated pipe
``result_fd``, never through its log lines; a worker that fails or dies sends none.
"""

from __future__ import annotations

import json
import sys

from stagetune.cli import run_command
from stagetune.cli._common import set_threads

from stagetune.optim.pool import send_summary
from stagetune.optim.worker import WorkerOptions, run_worker

__all__ = ["serve", "main"]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve(url: str, study_name: str, options: WorkerOptions, threads: int | None, result_fd: int) -> int:
    """Run one worker on the study as ``optim run`` would; its exit code.

    Args:
        url: The study database.
        study_name: The study.
        options: This worker's options (its own seed and device already in them).
        threads: ``--threads`` (None: 1); applies to the train objective only,
            as the benchmark objectives never import torch.
        result_fd: The write end of the pipe the summary goes to (closed here once written).
    """
    def command() -> int:
        if options.objective == "train":
            set_threads(threads or 1)
        summary = run_worker(url, study_name, options, log=_log)
        _log(summary.line())
        send_summary(result_fd, summary)
        return summary.exit_code()  # 130/143 when interrupted, as a single worker

    return run_command(command)


def main() -> int:
    """``python -m stagetune.cli.pool_child``: the job from stdin (see the module's docstring)."""
    job = json.loads(sys.stdin.read())
    return serve(
        job["url"], job["study_name"], WorkerOptions.from_dict(job["options"]), job["threads"], job["result_fd"]
    )


if __name__ == "__main__":
    sys.exit(main())
