"""Preempted workers (stagetune.optim.worker): kill -9 and SIGTERM mid-trial, real training.

A worker killed during epoch k leaves a RUNNING trial whose heartbeat stops; the
next worker fails it and runs the retry (same parameters), which resumes from the
original trial's checkpoint at epoch k. SIGTERM instead checkpoints, hands the
trial back at once and ends the worker with status 0.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import time
from pathlib import Path

import optuna
import pytest
from optim_helpers import (
    cli,
    create_study,
    opened_study,
    start_cli,
    stop_group,
    wait_for,
    write_speech_data,
)
from optuna.trial import TrialState

from stagetune.optim.objective import OBJECTIVES
from stagetune.optim.worker import WorkerOptions, run_worker

pytestmark = pytest.mark.slow

NUM_EPOCHS = 4
# Small model, batches of 2 utterances: epochs of about a second, long enough to land in.
TINY_MODEL = [
    f"training.num_epochs={NUM_EPOCHS}",
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=8",
    "data.batch_size=2",
]


@pytest.fixture
def study_url(tmp_path: Path) -> str:
    data = write_speech_data(tmp_path / "data", 120, min_frames=20, max_frames=60)
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                 num_trials=1, pruner="none")
    return url


def _run_args(url: str) -> list[object]:
    return ["optim", url, "run", "--heartbeat-interval", "1", "--grace-period", "3",
            "--ckpt-dir", "ckpt", "--keep-models", "--threads", "1", "--verbose", "--seed", "0"]


def _running_epoch(url: str) -> int:
    with opened_study(url, "optim") as study:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return int(running[0].user_attrs.get("epoch", 0)) if running else 0


def _history(trial_dir: Path) -> list[dict[str, str]]:
    with (trial_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def _check_resumed(url: str, tmp_path: Path, before: list[dict[str, str]]) -> list[optuna.trial.FrozenTrial]:
    """The retry finished the budget, continuing trial 0's model where it stopped."""
    with opened_study(url, "optim") as study:
        trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    original, retry = trials
    assert retry.system_attrs["failed_trial"] == 0
    assert retry.params == original.params
    assert sorted(retry.intermediate_values) == list(range(1, NUM_EPOCHS + 1))
    after = _history(tmp_path / "ckpt" / "optim" / "trial-0")
    assert [int(row["epoch"]) for row in after] == list(range(1, NUM_EPOCHS + 1))
    # The epochs before the interruption were not trained again: their rows, timings
    # included, are the ones written before it.
    assert after[: len(before)] == before
    # The value covers every epoch, those of the interrupted attempt too.
    assert retry.value == min(retry.intermediate_values.values())
    assert retry.intermediate_values[retry.user_attrs["value_epoch"]] == retry.value
    assert retry.value == pytest.approx(min(float(row["dev_error"]) for row in after), rel=1e-5)
    assert sorted(os.listdir(tmp_path / "ckpt" / "optim")) == ["trial-0"]
    return trials


def test_kill_9_mid_trial_resumes_at_the_interrupted_epoch(study_url: str, tmp_path: Path) -> None:
    first = start_cli(_run_args(study_url), tmp_path, tmp_path / "first.log")
    try:
        wait_for("epoch 1 to be reported", lambda: _running_epoch(study_url) >= 1, timeout=120)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop_group(first)
    before = _history(tmp_path / "ckpt" / "optim" / "trial-0")
    assert 1 <= len(before) < NUM_EPOCHS, before  # killed in epoch len(before) + 1
    epoch = _running_epoch(study_url)

    # The dead worker's trial still looks RUNNING; status shows its last epoch and heartbeat.
    status = cli(["optim", study_url, "status"], tmp_path)
    assert status.returncode == 0, status.stderr
    running = re.search(rf"^running: trial 0 epoch {epoch}, dev error \S+, heartbeat (\d+) s ago$",
                        status.stdout, re.M)
    assert running is not None, status.stdout
    assert int(running[1]) < 60  # the age of the last beat, however the database keeps time

    second = cli(_run_args(study_url), tmp_path, timeout=180)
    assert second.returncode == 0, second.stderr
    assert f"trial 1: epoch {len(before) + 1}/{NUM_EPOCHS}" in second.stderr, second.stderr
    assert f"trial 1: epoch {len(before)}/" not in second.stderr  # nothing trained twice
    assert "worker done (budget of 1 trials met): 1 complete" in second.stderr
    _check_resumed(study_url, tmp_path, before)


def test_sigterm_hands_the_trial_back_within_10_s(study_url: str, tmp_path: Path) -> None:
    log = tmp_path / "first.log"
    first = start_cli(_run_args(study_url), tmp_path, log)
    try:
        wait_for("epoch 1 to be reported", lambda: _running_epoch(study_url) >= 1, timeout=120)
        sent = time.monotonic()
        os.killpg(first.pid, signal.SIGTERM)  # as Slurm's scancel does
        code = first.wait(timeout=30)
        assert time.monotonic() - sent <= 10
    finally:
        stop_group(first)
    output = log.read_text()
    assert code == 143, output  # 128 + SIGTERM: `run && next` stops
    assert "trial 0 handed back for retry" in output
    assert "worker done (SIGTERM received)" in output
    with opened_study(study_url, "optim") as study:
        trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params
    assert trials[1].system_attrs["failed_trial"] == 0
    before = _history(tmp_path / "ckpt" / "optim" / "trial-0")
    assert (tmp_path / "ckpt" / "optim" / "trial-0" / "checkpoint.pt").exists()

    second = cli(_run_args(study_url), tmp_path, timeout=180)
    assert second.returncode == 0, second.stderr
    assert f"trial 1: epoch {len(before)}/" not in second.stderr  # nothing trained twice
    assert "worker done (budget of 1 trials met): 1 complete" in second.stderr
    _check_resumed(study_url, tmp_path, before)


def test_sigterm_before_training_starts_hands_the_trial_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                 num_trials=1, pruner="none")

    train = OBJECTIVES["train"]

    def sigterm_during_memory_check(ctx: object, trial: optuna.Trial) -> float:
        os.kill(os.getpid(), signal.SIGTERM)  # as if it came while the footprint was measured
        return train(ctx, trial)

    monkeypatch.setitem(OBJECTIVES, "train", sigterm_during_memory_check)
    options = WorkerOptions(objective="train", ckpt_dir=tmp_path / "ckpt", keep_models=True,
                            heartbeat_interval=1, seed=0)
    summary = run_worker(url, "optim", options, log=lambda _message: None)
    assert summary.stop_reason == "SIGTERM received"
    with opened_study(url, "optim") as study:
        states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # handed back, not trained to the end
    assert not (tmp_path / "ckpt" / "optim" / "trial-0" / "history.csv").exists()


def test_worker_pool_prefixes_output_and_hands_every_trial_back_on_sigterm(tmp_path: Path) -> None:
    """`optim run --workers 2`: SIGTERM to the pool process alone reaches both workers."""
    data = write_speech_data(tmp_path / "data", 120, min_frames=20, max_frames=60)
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                 num_trials=4, pruner="none")
    log = tmp_path / "pool.log"
    pool = start_cli([*_run_args(url), "--workers", "2"], tmp_path, log)
    try:
        def both_training() -> bool:
            with opened_study(url, "optim") as study:
                running = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
            return len(running) == 2 and all(t.user_attrs.get("epoch", 0) >= 1 for t in running)

        wait_for("two trials in training", both_training, timeout=180)
        sent = time.monotonic()
        pool.send_signal(signal.SIGTERM)  # the pool process only, not its group
        code = pool.wait(timeout=30)
        assert time.monotonic() - sent <= 10
    finally:
        stop_group(pool)
    output = log.read_text()
    assert code == 143, output
    for worker in ("[w0]", "[w1]"):
        assert any(line.startswith(worker) and "handed back for retry" in line for line in output.splitlines()), output
    assert "2 workers done:" in output and "2 handed back" in output, output
    with opened_study(url, "optim") as study:
        states = sorted(t.state.name for t in study.get_trials())
    assert states == ["FAIL", "FAIL", "WAITING", "WAITING"], states
