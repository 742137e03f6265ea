"""The worker's light read of a study's COMPLETE trials (``StagetuneStorage.completed_values``).

A worker keeps only the best trial's model dir; to find it, it reads every COMPLETE
trial's number, value, whether it reused another trial's result and which failed
trial it retries. optuna's own ``get_trials`` loads every attribute of every trial
(24.5 s the first time on a 10,000-trial study); the one query must agree with it
on every backend.
"""

from __future__ import annotations

import optuna
import pytest

from stagetune.optim.optuna_internals import study_id_of, trial_id_of
from stagetune.optim.storage import storage_session

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _through_optuna(study: optuna.Study) -> list[tuple[int, float, bool, int | None]]:
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    return sorted(
        (t.number, t.value, "reused_from" in t.user_attrs, retried(t))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.value is not None
    )


def test_completed_values_agree_with_optunas_trials(storage_url: str) -> None:
    with storage_session(storage_url, heartbeat_interval=None) as storage:
        study = optuna.create_study(study_name="kept", storage=storage)
        other = optuna.create_study(study_name="other", storage=storage)  # never read
        other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        for i in range(6):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            if i == 1:
                trial.set_user_attr("reused_from", 0)
            if i == 3:  # a retry of trial 2, as optuna's stale-trial callback marks it
                storage.set_trial_system_attr(trial_id_of(trial), "failed_trial", 2)
            if i == 4:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif i == 5:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, 0.5 - 0.1 * i)
        study.ask()  # one left RUNNING
        light = sorted(storage.completed_values(study_id_of(study)))
        assert light == _through_optuna(study)
        assert light == [(0, 0.5, False, None), (1, pytest.approx(0.4), True, None), (2, pytest.approx(0.3), False, None),
                         (3, pytest.approx(0.2), False, 2)]
