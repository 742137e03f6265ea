"""What a worker reads when it claims a trial: never the whole study, unless its sampler asks.

optuna's ``Study.ask`` looks for a WAITING trial to pop through its storage cache,
whose first read loads every trial of the study with all its parameters and
attributes: 52 s for a worker's first claim on a 10,000-trial study (issue #9).
The claim knows, under the budget lock, whether anything waits.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optim_helpers import LR_DOMINATED, create_study, fill_study, opened_study, write_speech_data

from stagetune.optim.worker import WorkerOptions, run_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many trials each of optuna's trial reads returned, in this process."""
    sizes: list[int] = []
    original = optuna.storages.RDBStorage._get_trials

    def counting(self: optuna.storages.RDBStorage, *args: object, **kwargs: object) -> list[optuna.trial.FrozenTrial]:
        trials = original(self, *args, **kwargs)
        sizes.append(len(trials))
        return trials

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", counting)
    return sizes


def test_a_random_sampling_worker_never_loads_the_finished_trials(tmp_path: Path, loads: list[int]) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "s", write_speech_data(tmp_path / "data"), whitelist=LR_DOMINATED, num_trials=33)
    fill_study(url, "s", spec, 30)
    loads.clear()
    summary = run_worker(url, "s", WorkerOptions(objective="quadratic", sampler="random", seed=0),
                         log=lambda _message: None)
    assert summary.counts["COMPLETE"] == 3  # the budget's last 3 slots
    assert max(loads, default=0) < 30, loads  # not the 30 finished trials


def test_a_queued_trial_is_still_claimed_first(tmp_path: Path, loads: list[int]) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "s", write_speech_data(tmp_path / "data"), whitelist=LR_DOMINATED, num_trials=12)
    fill_study(url, "s", spec, 10)
    with opened_study(url, "s") as study:
        study.enqueue_trial({"training.learning_rate": 0.0123})
    summary = run_worker(url, "s", WorkerOptions(objective="quadratic", sampler="random", seed=0),
                         log=lambda _message: None)
    assert summary.counts["COMPLETE"] == 2  # the queued trial, then one new: the budget is met exactly
    with opened_study(url, "s") as study:
        trials = study.get_trials()
    assert [t.state.name for t in trials[10:]] == ["COMPLETE", "COMPLETE"] and len(trials) == 12
    assert trials[10].params["training.learning_rate"] == 0.0123
    assert trials[11].params["training.learning_rate"] != 0.0123
