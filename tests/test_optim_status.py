"""``stagetune optim status`` (stagetune.optim.status): states, budget, best, running trials."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    assert lines[:5] == [
        "study optim",
        "metric: error",
        "trials: 1 RUNNING, 2 COMPLETE",
        "budget: 2/3 finished",
        f"best: {best.value:.6g} (trial {best.number})",
    ]
    running = re.fullmatch(r"running: trial 2 epoch 0, heartbeat (\d+) s ago", lines[5])
    assert running is not None, text.stdout
    assert int(running[1]) <= 10  # beats every second; the database's clock is read right
    assert len(lines) == 6

    data = json.loads(as_json.stdout)
    assert {k: v for k, v in data["states"].items() if v} == {"RUNNING": 1, "COMPLETE": 2}
    assert (data["finished"], data["num_trials"], data["budget_met"]) == (2, 3, False)
    assert data["best"] == {"number": best.number, "value": best.value, "params": best.params}
    (trial,) = data["running"]
    assert (trial["number"], trial["epoch"], trial["last_value"]) == (2, 0, None)
    assert data["metric"] == "error"
    assert 0 <= trial["heartbeat_age_s"] <= 10
    assert data["tuned"] == ["training.learning_rate"] and data["parent_study"] is None


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
