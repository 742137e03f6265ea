"""Exact trial budgets (stagetune.optim.budget) with many workers on one study, on every backend.

Optuna's own ``MaxTrialsCallback`` overshoots with concurrent workers (4 workers x
200 trials gave 203 complete trials); stagetune's budget lock must give exactly
``--num-trials`` finished trials and let no worker start a trial beyond them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from optim_helpers import (
    budget_spec_args,
    check_exact,
    cli,
    cli_many,
    create_study,
    run_repetitions,
)


FAST = ["--objective", "quadratic"]


@pytest.mark.slow
def test_eight_workers_sqlite_exact_budget_in_20_of_20_runs(tmp_path: Path) -> None:
    budget, num_workers, repetitions = 40, 8, 20
    spec_args = budget_spec_args(tmp_path)
    studies = []
    for repetition in range(repetitions):
        url = f"sqlite:///{tmp_path / f'run{repetition:02d}.db'}"
        create_study(url, "budget", num_trials=budget, **spec_args)
        studies.append((url, "budget"))
    counts = run_repetitions(studies, num_workers)
    for repetition, (url, name) in enumerate(studies):
        check_exact(url, name, budget, counts[repetition])


@pytest.mark.slow
def test_eight_cli_workers_sqlite_exact_budget(tmp_path: Path) -> None:
    budget = 40
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", num_trials=budget, **budget_spec_args(tmp_path))
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
    check_exact(url, "optim", budget, counts)
    after = cli(["optim", url, "status", "--check"], tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr
    assert f"budget: {budget}/{budget} finished (met)" in after.stdout


@pytest.mark.server
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_four_workers_exact_budget_on_servers(
    backend: str, make_storage_url: Callable[..., str], tmp_path: Path
) -> None:
    budget, num_workers, repetitions = 12, 4, 2
    spec_args = budget_spec_args(tmp_path)
    studies = []
    for repetition in range(repetitions):
        url = make_storage_url(backend)
        create_study(url, f"budget{repetition}", num_trials=budget, **spec_args)
        studies.append((url, f"budget{repetition}"))
    url, name = studies[0]
    assert cli(["optim", "--study-name", name, url, "status", "--check"], tmp_path).returncode == 1
    counts = run_repetitions(studies, num_workers)
    for repetition, (url, name) in enumerate(studies):
        check_exact(url, name, budget, counts[repetition])
    url, name = studies[0]
    assert cli(["optim", "--study-name", name, url, "status", "--check"], tmp_path).returncode == 0
