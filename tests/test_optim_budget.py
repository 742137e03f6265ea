"""Exact trial budgets (stagetune.optim.budget) with many workers on one study, on every backend.

Optuna's own ``MaxTrialsCallback`` overshoots with concurrent workers (4 workers x
200 trials gave 203 complete trials); stagetune's budget lock must give exactly
``--num-trials`` finished trials and let no worker start a trial beyond them.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
from optim_helpers import cli, cli_many, create_study, trial_states, write_speech_data

from stagetune.optim.worker import WorkerOptions, run_worker

FAST = ["--objective", "quadratic"]


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


def _run_repetitions(studies: list[tuple[str, str]], num_workers: int) -> dict[int, Counter[str]]:
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


def _check_exact(url: str, name: str, budget: int, worker_counts: Counter[str]) -> None:
    states = trial_states(url, name)
    # Exactly the budget finished, and no worker started a trial the budget could not use.
    assert states["COMPLETE"] + states["PRUNED"] == budget, (name, states)
    assert sum(states.values()) == budget, (name, states)
    assert worker_counts["COMPLETE"] + worker_counts["PRUNED"] == budget, (name, worker_counts)
    assert worker_counts["FAIL"] == worker_counts["HANDED_BACK"] == 0


def _spec_args(tmp_path: Path) -> dict[str, Any]:
    # One tuned parameter: each suggestion is a database commit, and the budget's
    # correctness does not depend on how many there are.
    return {
        "data_dir": write_speech_data(tmp_path / "data"),
        "overrides": ["training.num_epochs=2"],
        "whitelist": ["training.learning_rate"],
    }


@pytest.mark.slow
def test_eight_workers_sqlite_exact_budget_in_20_of_20_runs(tmp_path: Path) -> None:
    budget, num_workers, repetitions = 40, 8, 20
    spec_args = _spec_args(tmp_path)
    studies = []
    for repetition in range(repetitions):
        url = f"sqlite:///{tmp_path / f'run{repetition:02d}.db'}"
        create_study(url, "budget", num_trials=budget, **spec_args)
        studies.append((url, "budget"))
    counts = _run_repetitions(studies, num_workers)
    for repetition, (url, name) in enumerate(studies):
        _check_exact(url, name, budget, counts[repetition])


@pytest.mark.slow
def test_eight_cli_workers_sqlite_exact_budget(tmp_path: Path) -> None:
    budget = 40
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", num_trials=budget, **_spec_args(tmp_path))
    before = cli(["optim", url, "status", "--check"], tmp_path)
    assert before.returncode == 1, before.stderr
    assert f"budget: 0/{budget} finished" in before.stdout
    workers = cli_many([["optim", url, "run", *FAST, "--seed", seed] for seed in range(8)], tmp_path)
    counts: Counter[str] = Counter()
    for done in workers:
        assert done.returncode == 0, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("worker done ("), done.stderr
        # "worker done (...): 5 complete, 0 pruned, 0 fail, 0 handed back"
        for part in last.rpartition("): ")[2].split(", "):
            number, _, state = part.partition(" ")
            counts[state.upper().replace(" ", "_")] += int(number)
    _check_exact(url, "optim", budget, counts)
    after = cli(["optim", url, "status", "--check"], tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"budget: {budget}/{budget} finished (met)" in after.stdout


@pytest.mark.server
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_four_workers_exact_budget_on_servers(
    backend: str, make_storage_url: Callable[..., str], tmp_path: Path
) -> None:
    budget, num_workers, repetitions = 12, 4, 2
    spec_args = _spec_args(tmp_path)
    studies = []
    for repetition in range(repetitions):
        url = make_storage_url(backend)
        create_study(url, f"budget{repetition}", num_trials=budget, **spec_args)
        studies.append((url, f"budget{repetition}"))
    url, name = studies[0]
    assert cli(["optim", "--study-name", name, url, "status", "--check"], tmp_path).returncode == 1
    counts = _run_repetitions(studies, num_workers)
    for repetition, (url, name) in enumerate(studies):
        _check_exact(url, name, budget, counts[repetition])
    url, name = studies[0]
    assert cli(["optim", "--study-name", name, url, "status", "--check"], tmp_path).returncode == 0
