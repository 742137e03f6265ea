"""``stagetune optim status`` (stagetune.optim.status): states, budget, best, running trials."""

from __future__ import annotations

import datetime
import json
import re
import signal
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optim_helpers import (
    cli_many,
    create_study,
    opened_study,
    start_cli,
    stop_group,
    trial_states,
    wait_for,
    write_speech_data,
)

from optuna.trial import TrialState

from stagetune.optim.storage import storage_session
from stagetune.optim.worker import WorkerOptions, run_worker


def test_status_shows_states_budget_best_and_running_trials(storage_url: str, tmp_path: Path) -> None:
    create_study(storage_url, "optim", write_speech_data(tmp_path / "data"),
                 whitelist=["training.learning_rate"], num_trials=3)
    run_worker(storage_url, "optim", WorkerOptions(objective="quadratic", sampler="random", seed=0,
                                                   n_trials=2), log=lambda _message: None)
    with opened_study(storage_url, "optim") as study:
        best = study.best_trial
    # A worker that stays busy with trial 2 (a sleep objective ignores SIGTERM while it sleeps).
    worker = start_cli(
        ["optim", "--study-name", "optim", storage_url, "run", "--objective", "sleep",
         "--sleep-seconds", "60", "--heartbeat-interval", "1"],
        tmp_path,
        tmp_path / "worker.log",
    )
    try:
        wait_for("a running trial", lambda: trial_states(storage_url, "optim")["RUNNING"] == 1,
                 timeout=60, interval=0.25)
        status = ["optim", "--study-name", "optim", storage_url, "status"]
        text, as_json, check = cli_many([status, [*status, "--json"], [*status, "--check"]], tmp_path)
    finally:
        stop_group(worker)

    assert text.returncode == as_json.returncode == 0, text.stderr + as_json.stderr
    assert check.returncode == 1  # the budget is not met yet
    lines = text.stdout.splitlines()
    assert lines[:4] == [
        "study optim",
        "metric: error",
        "trials: 1 RUNNING, 2 COMPLETE",
        "budget: 2/3 finished",
    ]
    # Trials of the quadratic objective take no time: the running one is overdue.
    assert lines[4] == "time left: about 0 s (1 to finish, 1 running, 0 s per trial)", text.stdout
    assert lines[5] == f"best: {best.value:.6g} (trial {best.number})"
    running = re.fullmatch(r"running: trial 2 epoch 0, heartbeat (\d+) s ago", lines[6])
    assert running is not None, text.stdout
    assert int(running[1]) <= 10  # beats every second; the database's clock is read right
    assert len(lines) == 7

    data = json.loads(as_json.stdout)
    assert {k: v for k, v in data["states"].items() if v} == {"RUNNING": 1, "COMPLETE": 2}
    assert (data["finished"], data["num_trials"], data["budget_met"]) == (2, 3, False)
    assert data["best"] == {"number": best.number, "value": best.value, "params": best.params}
    (trial,) = data["running"]
    assert (trial["number"], trial["epoch"], trial["last_value"]) == (2, 0, None)
    assert data["metric"] == "error"
    assert 0 <= trial["heartbeat_age_s"] <= 10
    assert data["tuned"] == ["training.learning_rate"] and data["parent_study"] is None
    assert (data["eta"]["left"], data["eta"]["running"], data["eta"]["seconds"]) == (1, 1, 0.0)


def test_running_trials_show_their_last_value_under_the_metrics_name() -> None:
    from stagetune.optim.status import format_status

    status = {
        "study": "lg", "parent_study": "sm", "metric": "loss", "states": {"RUNNING": 1},
        "finished": 0, "num_trials": None, "budget_met": False, "best": None, "tuned": [],
        "running": [{"number": 4, "epoch": 2, "last_value": 1.23456, "heartbeat_age_s": 3.0}],
    }
    assert format_status(status).splitlines() == [
        "study lg (from sm)",
        "metric: loss",
        "trials: 1 RUNNING",
        "budget: 0/unlimited finished",
        "best: none yet",
        "running: trial 4 epoch 2, dev loss 1.235, heartbeat 3 s ago",
    ]


def test_handed_back_stale_and_failed_trials_are_told_apart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=["training.learning_rate"])
    # Trial 0: its worker gets SIGTERM, checkpoints and hands it back (retry: trial 1).
    worker = start_cli(["optim", "--study-name", "optim", url, "run", "--objective", "sleep",
                        "--sleep-seconds", "60"], tmp_path, tmp_path / "worker.log")
    try:
        wait_for("a running trial", lambda: trial_states(url, "optim")["RUNNING"] == 1, interval=0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 143  # 128 + SIGTERM
        assert "1 handed back" in (tmp_path / "worker.log").read_text()
    finally:
        stop_group(worker)
    # Trial 2: its worker died an hour ago; the next worker's sweep fails it and queues a
    # retry (trial 4). Trial 3: failed by itself, an error in training.
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    with storage_session(url, heartbeat_interval=1, heartbeat_stale_trial_callback=retry) as storage:
        study = optuna.load_study(study_name="optim", storage=storage)
        dead, failed = (storage.create_new_trial(study._study_id) for _ in range(2))
        storage.record_heartbeat(dead)
        with storage.engine.begin() as connection:
            connection.execute(sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t WHERE trial_id = :id"),
                               {"t": datetime.datetime(2000, 1, 1), "id": dead})
        storage.set_trial_state_values(failed, TrialState.FAIL)
        optuna.storages.fail_stale_trials(study)

    status = ["optim", "--study-name", "optim", url, "status"]
    text, as_json = cli_many([status, [*status, "--json"]], tmp_path)
    assert text.returncode == as_json.returncode == 0, text.stderr + as_json.stderr
    assert text.stdout.splitlines()[2] == "trials: 1 handed back, 1 stale, 1 FAIL, 2 WAITING"
    data = json.loads(as_json.stdout)
    assert {k: v for k, v in data["states"].items() if v} == {"FAIL": 3, "WAITING": 2}  # as optuna has them
    assert data["fail_kinds"] == {"handed_back": 1, "stale": 1, "failed": 1}


def test_a_trial_cut_off_while_claimed_counts_as_stale() -> None:
    """Re-queued without ever beating: its claim was cut off (the worker died), not handed back."""
    from stagetune.optim.status import fail_kinds

    def trial(number: int, state: TrialState, history: list[int]) -> optuna.trial.FrozenTrial:
        frozen = optuna.trial.create_trial(state=state, value=None if state != TrialState.COMPLETE else 1.0,
                                           system_attrs={"retry_history": history} if history else None)
        frozen.number, frozen._trial_id = number, number + 100
        return frozen

    trials = [trial(0, TrialState.FAIL, []), trial(1, TrialState.FAIL, []),
              trial(2, TrialState.COMPLETE, [0]), trial(3, TrialState.WAITING, [1])]
    assert fail_kinds(trials, beating={0, 2}) == {0: "handed_back", 1: "stale"}
    assert fail_kinds(trials[:2]) == {0: "failed", 1: "failed"}  # never re-queued


def test_the_time_left_is_paced_by_the_latest_trials_and_shared_by_the_running_ones() -> None:
    from stagetune.optim.status import estimate_finish, format_status

    t0 = datetime.datetime(2026, 1, 1)

    def trial(state: TrialState, start: float, end: float | None) -> optuna.trial.FrozenTrial:
        frozen = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None)
        frozen.datetime_start = t0 + datetime.timedelta(seconds=start)
        frozen.datetime_complete = None if end is None else t0 + datetime.timedelta(seconds=end)
        return frozen

    done = [trial(TrialState.COMPLETE, 0, 100), trial(TrialState.PRUNED, 0, 60), trial(TrialState.COMPLETE, 100, 180)]
    running = [trial(TrialState.RUNNING, 180, None), trial(TrialState.RUNNING, 200, None)]
    now = t0 + datetime.timedelta(seconds=230)
    # 80 s per trial; 7 left: the two running need 30 and 50 s more, 5 more trials 400 s, on 2 workers.
    eta = estimate_finish(done + running, 10, now)
    assert eta == {"seconds": 240.0, "left": 7, "running": 2, "trial_s": 80.0}
    assert estimate_finish(done, 10, now)["seconds"] is None  # nothing runs: no estimate
    assert estimate_finish(done, 3, now) is None and estimate_finish(done, None, now) is None
    status = {"study": "s", "parent_study": None, "metric": "error", "states": {"COMPLETE": 2}, "finished": 3,
              "num_trials": 10, "budget_met": False, "best": None, "running": [], "eta": eta}
    assert format_status(status).splitlines()[4] == "time left: about 4 min (7 to finish, 2 running, 80 s per trial)"


@pytest.mark.parametrize("storage_url", ["sqlite", "postgresql"], indirect=True)
def test_status_reads_only_what_it_shows_and_agrees_with_optunas_full_reading(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a study of thousands of trials, loading every one (as optuna does) took 46 s: status must not."""
    from stagetune.optim.status import estimate_finish, format_status, study_status
    from stagetune.optim.study import load_study

    create_study(storage_url, "light", write_speech_data(tmp_path / "data"),
                 whitelist=["training.learning_rate"], num_trials=20)
    lr = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
    t0 = datetime.datetime.now() - datetime.timedelta(hours=1)

    def finished(state: TrialState, value: float | None, start: float, seconds: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.FrozenTrial(
            number=-1, state=state, value=value, values=None, trial_id=-1,
            datetime_start=t0 + datetime.timedelta(seconds=start),
            datetime_complete=t0 + datetime.timedelta(seconds=start + seconds),
            params={"training.learning_rate": 0.01 + start / 1e4}, distributions={"training.learning_rate": lr},
            user_attrs={}, system_attrs={}, intermediate_values={} if value is not None else {0: 2.0},
        )

    with storage_session(storage_url, heartbeat_interval=None) as storage:
        study, _ = load_study(storage, "light", storage_url)
        # Trials 1 and 3 tie for the best value: status names the first, as it always did.
        for state, value, start, seconds in [(TrialState.COMPLETE, 0.9, 0, 30), (TrialState.COMPLETE, 0.5, 40, 50),
                                             (TrialState.PRUNED, None, 100, 10), (TrialState.COMPLETE, 0.5, 120, 70),
                                             (TrialState.COMPLETE, 0.7, 200, 40)]:
            study.add_trial(finished(state, value, start, seconds))
        failed = storage.create_new_trial(study._study_id)
        storage.set_trial_state_values(failed, TrialState.FAIL)
        running = study.ask()
        running.report(0.8, 0)
        running.report(0.6, 3)
        running.set_user_attr("epoch", 4)
        storage.record_heartbeat(running._trial_id)

        def no_full_read(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("status loaded every trial")

        with monkeypatch.context() as patched:
            patched.setattr(optuna.storages.RDBStorage, "_get_trials", no_full_read)
            patched.setattr(optuna.storages.RDBStorage, "get_all_trials", no_full_read)
            study, spec = load_study(storage, "light", storage_url, same_release=False)
            status = study_status(study, spec, storage)
        everything = study.get_trials(deepcopy=False)

    assert {k: v for k, v in status["states"].items() if v} == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1, "RUNNING": 1}
    assert status["fail_kinds"] == {"handed_back": 0, "stale": 0, "failed": 1}
    assert (status["finished"], status["num_trials"], status["budget_met"]) == (5, 20, False)
    tied = everything[1]
    assert status["best"] == {"number": 1, "value": 0.5, "params": tied.params}
    (shown,) = status["running"]
    assert (shown["number"], shown["epoch"], shown["last_value"]) == (running.number, 4, 0.6)
    assert 0 <= shown["heartbeat_age_s"] <= 30
    full = estimate_finish(everything, 20)
    assert full is not None and status["eta"] is not None
    # The pace of the latest finished trials: (50 + 10 + 70 + 40 + 30) / 5 s; 15 left, 1 running.
    assert (status["eta"]["left"], status["eta"]["running"], status["eta"]["trial_s"]) == (15, 1, 40.0)
    pace = ("left", "running", "trial_s")
    assert {k: full[k] for k in pace} == {k: status["eta"][k] for k in pace}  # as from every trial
    assert "best: 0.5 (trial 1)" in format_status(status).splitlines()
