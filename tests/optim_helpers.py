"""Shared helpers of the ``optim`` tests: the real CLI in a subprocess, spec'd studies.

User-facing behaviour is checked through ``python -m stagetune`` in a subprocess
(:func:`cli`, :func:`cli_many`, :func:`start_cli`); studies that a test only needs
as a starting point are created in-process with the same library calls
``optim init`` makes (:func:`create_study`), which saves a torch import per test.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pytest
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir

from stagetune.config import load_config
from stagetune.optim.metrics import DEFAULT_METRIC
from stagetune.optim.sampling import sample_values
from stagetune.optim.spec import stored_spec_json
from stagetune.optim.spec import StudySpec
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study
from stagetune.optim.worker import WorkerOptions, run_worker

__all__ = [
    "run_repetitions",
    "check_exact",
    "budget_spec_args",
    "STAGETUNE",
    "cli",
    "cli_many",
    "start_cli",
    "stop_group",
    "assert_one_line_error",
    "write_speech_data",
    "create_study",
    "opened_study",
    "trial_states",
    "read_spec",
    "study_names",
    "wait_for",
    "LR_DOMINATED",
    "lr_dominated",
    "fill_study",
]

STAGETUNE = (sys.executable, "-m", "stagetune")
_TIMEOUT_S = 300


#: The smallest conv + recurrent model the optim tests train (``--set`` settings).
TINY_MODEL = [
    "training.num_epochs=1",
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=8",
]

def _command(args: Sequence[Any]) -> list[str]:
    return [*STAGETUNE, *(str(a) for a in args)]


def cli(args: Sequence[Any], cwd: Path, *, timeout: float = _TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``stagetune ARGS`` in ``cwd`` and capture its output."""
    return subprocess.run(
        _command(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def cli_many(
    commands: Sequence[Sequence[Any]], cwd: Path, *, timeout: float = _TIMEOUT_S
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent ``stagetune`` commands at the same time (each pays the imports)."""
    procs = [
        subprocess.Popen(_command(c), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    done = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(_command(command), proc.returncode, out, err))
    return done


def start_cli(args: Sequence[Any], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``stagetune ARGS`` in the background in its own process group.

    stdout and stderr go to ``log`` (a pipe nobody reads could fill and block it).
    """
    with log.open("wb") as handle:
        return subprocess.Popen(
            _command(args), cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a :func:`start_cli` process and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with one ``stagetune: error:`` line holding every needle."""
    assert done.returncode != 0, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("stagetune: error: "), done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_speech_data(
    path: Path, num_utts: int = 12, *, min_frames: int = 5, max_frames: int = 30
) -> Path:
    """A real Kaldi CTC data dir (feats.scp/ark, text, tokens.txt, utt2spk, cmvn.scp)."""
    feats, utt2spk = random_feats(num_utts, min_frames=min_frames, max_frames=max_frames)
    rng = np.random.default_rng(1)
    text = {
        utt: [TINY_TOKENS[j] for j in rng.integers(0, len(TINY_TOKENS), size=rng.integers(1, 5))]
        for utt in feats
    }
    return write_data_dir(path, feats, text, tokens=TINY_TOKENS, utt2spk=utt2spk, cmvn=True)


def create_study(
    url: str,
    study_name: str,
    data_dir: Path,
    *,
    overrides: Sequence[str] = (),
    whitelist: Sequence[str] = (),
    blacklist: Sequence[str] = (),
    num_trials: int | None = None,
    pruner: str = "hyperband",
    mem_limit_bytes: int | None = None,
    metric: str = DEFAULT_METRIC,
) -> StudySpec:
    """What ``stagetune --set ... optim URL --study-name NAME init DATA ...`` creates."""
    spec = build_spec(
        load_config((), overrides),
        data_dir,
        whitelist=whitelist,
        blacklist=blacklist,
        num_trials=num_trials,
        pruner=pruner,
        mem_limit_bytes=mem_limit_bytes,
        metric=metric,
    )
    with storage_session(url) as storage:
        result = init_study(storage, study_name, url, spec, log=lambda _message: None)
    assert result.action == "created"
    return spec


@contextmanager
def opened_study(url: str, study_name: str) -> Iterator[optuna.Study]:
    """The study as plain optuna sees it; the connections close on exit."""
    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        yield optuna.load_study(study_name=study_name, storage=storage)


def trial_states(url: str, study_name: str) -> Counter[str]:
    """How many trials of the study are in each state."""
    with opened_study(url, study_name) as study:
        return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def read_spec(url: str, study_name: str) -> dict[str, Any]:
    """The stored spec, as JSON data."""
    with opened_study(url, study_name) as study:
        return dict(stored_spec_json(study._storage, study._study_id))


def study_names(url: str) -> list[str]:
    """The studies in the database (none when the SQLite file does not exist)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        return []
    with storage_session(url, heartbeat_interval=None, create=False) as storage:
        return [s.study_name for s in storage.get_all_studies()]


def wait_for(what: str, predicate: Any, *, timeout: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


#: Tuned names of :func:`lr_dominated` studies.
LR_DOMINATED = ("training.learning_rate", "training.dropout_prob", "model.recurrent_type")


def lr_dominated(values: dict[str, Any]) -> float:
    """An error dominated by the learning rate; the other two parameters barely matter."""
    rate = math.log10(float(values["training.learning_rate"]))
    kind = {"lstm": 0.0, "gru": 0.01, "rnn": 0.02}[str(values["model.recurrent_type"])]
    return (rate + 2.5) ** 2 + 0.05 * float(values["training.dropout_prob"]) + kind


def fill_study(
    url: str,
    study_name: str,
    spec: StudySpec,
    num_trials: int,
    objective: Callable[[dict[str, Any]], float] = lr_dominated,
    *,
    seed: int = 3,
) -> optuna.trial.FrozenTrial:
    """Ask/tell ``num_trials`` trials sampled as workers sample them; the best trial."""
    with opened_study(url, study_name) as study:
        study.sampler = optuna.samplers.RandomSampler(seed=seed)
        for _ in range(num_trials):
            trial = study.ask()
            study.tell(trial, objective(sample_values(trial, spec.config(), spec.tuned)))
        return study.best_trial


# Many forked workers on many studies (exact-budget tests).


def _worker_loop(
    studies: list[tuple[str, str]], barrier: Any, results: Any, worker_index: int
) -> None:
    """One forked worker: join every repetition at the same moment as the others."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's server-stopping hook
    for repetition, (url, name) in enumerate(studies):
        try:
            barrier.wait(timeout=120)
            # The random sampler keeps the test fast; the budget lock does not depend on it
            # (the CLI test below runs the default TPE sampler).
            options = WorkerOptions(
                objective="quadratic", sampler="random", seed=worker_index * 1000 + repetition
            )
            summary = run_worker(url, name, options, log=lambda _message: None)
        except BaseException as exc:  # report it: the parent would otherwise wait in vain
            results.put((repetition, worker_index, f"{type(exc).__name__}: {exc}"))
            return
        results.put((repetition, worker_index, dict(summary.counts)))


def run_repetitions(studies: list[tuple[str, str]], num_workers: int) -> dict[int, Counter[str]]:
    """Run ``num_workers`` forked workers on each study in turn; their counts per study."""
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(num_workers)
    results = context.Queue()
    procs = [
        context.Process(target=_worker_loop, args=(studies, barrier, results, i), daemon=True)
        for i in range(num_workers)
    ]
    for proc in procs:
        proc.start()
    counts: dict[int, Counter[str]] = {r: Counter() for r in range(len(studies))}
    for _ in range(num_workers * len(studies)):
        repetition, worker_index, worker_counts = results.get(timeout=300)
        if isinstance(worker_counts, str):
            barrier.abort()
            pytest.fail(f"worker {worker_index} failed in repetition {repetition}: {worker_counts}")
        counts[repetition].update(worker_counts)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return counts


def check_exact(url: str, name: str, budget: int, worker_counts: Counter[str]) -> None:
    states = trial_states(url, name)
    # Exactly the budget finished, and no worker started a trial the budget could not use.
    assert states["COMPLETE"] + states["PRUNED"] == budget, (name, states)
    assert sum(states.values()) == budget, (name, states)
    assert worker_counts["COMPLETE"] + worker_counts["PRUNED"] == budget, (name, worker_counts)
    assert worker_counts["FAIL"] == worker_counts["HANDED_BACK"] == 0


def budget_spec_args(tmp_path: Path) -> dict[str, Any]:
    # One tuned parameter: each suggestion is a database commit, and the budget's
    # correctness does not depend on how many there are.
    return {
        "data_dir": write_speech_data(tmp_path / "data"),
        "overrides": ["training.num_epochs=2"],
        "whitelist": ["training.learning_rate"],
    }
