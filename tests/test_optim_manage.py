"""``optim list`` and ``optim delete``: the studies of a database, and removing one with its checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from optim_helpers import (
    assert_one_line_error, cli, cli_many, create_study, opened_study, start_cli, stop_group, study_names,
    trial_states, wait_for, write_speech_data,
)

from stagetune.optim.worker import WorkerOptions, run_worker

LR = ["training.learning_rate"]


def read_board(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, Any]]:
    """A TensorBoard run's scalars (tag -> [(step, value)]) and hparams, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    hparams: dict[str, Any] = {}
    try:
        tagged = events.PluginTagToContent("hparams")
    except KeyError:  # none written
        tagged = {}
    for content in tagged.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        for name, value in data.session_start_info.hparams.items():
            hparams[name] = getattr(value, value.WhichOneof("kind"))
    return scalars, hparams


def test_list_shows_progress_and_delete_refuses_while_a_worker_holds_a_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    data = write_speech_data(tmp_path / "data")
    create_study(url, "a", data, whitelist=LR, num_trials=2, metric="loss")
    run_worker(url, "a", WorkerOptions(objective="quadratic", sampler="random", seed=0), log=lambda _m: None)
    create_study(url, "b", data, whitelist=LR, num_trials=3)
    with opened_study(url, "a") as study:
        best = study.best_trial
        optuna.create_study(study_name="plain", storage=study._storage)  # no stagetune spec
    (tmp_path / "ckpt" / "b" / "trial-0").mkdir(parents=True)
    worker = start_cli(["optim", "--study-name", "b", url, "run", "--objective", "sleep", "--sleep-seconds", "60",
                        "--heartbeat-interval", "1"], tmp_path, tmp_path / "worker.log")
    try:
        wait_for("a running trial", lambda: trial_states(url, "b")["RUNNING"] == 1, timeout=60, interval=0.25)
        listing, as_json, refused = cli_many([["optim", url, "list"], ["optim", url, "list", "--json"],
                                              ["optim", url, "delete", "b", "--ckpt-dir", "ckpt"]], tmp_path)
    finally:
        stop_group(worker)
    assert listing.returncode == as_json.returncode == 0, listing.stderr + as_json.stderr
    lines = [line.split() for line in listing.stdout.splitlines()]
    assert lines == [
        ["study", "from", "state", "trials", "best", "metric"],
        ["a", "-", "done", "2/2", f"{best.value:.6g}", "(trial", f"{best.number})", "loss"],
        ["b", "-", "running", "0/3", "-", "error"],
        ["plain", "-", "empty", "0/-", "-", "(not", "stagetune)"],
    ]
    rows = {r["study"]: r for r in json.loads(as_json.stdout)}
    assert (rows["a"]["best_value"], rows["a"]["best_trial"], rows["b"]["running"]) == (best.value, best.number, 1)
    assert_one_line_error(refused, "study 'b' has 1 running trial held by workers", "add --force")
    assert study_names(url) == ["a", "b", "plain"] and (tmp_path / "ckpt" / "b" / "trial-0").is_dir()

    forced, missing = cli_many([["optim", url, "delete", "b", "--ckpt-dir", "ckpt", "--force"],
                                ["optim", url, "delete", "nope"]], tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == f"deleted study b (1 trial) from {url}"
    assert not (tmp_path / "ckpt" / "b").exists() and (tmp_path / "ckpt").is_dir()
    assert_one_line_error(missing, "no study 'nope' to delete (studies there: a, ")  # b may be gone already
    assert sorted(study_names(url)) == ["a", "plain"]


def test_the_best_model_is_kept_and_exported_and_a_study_created_again_trains_afresh(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    data = write_speech_data(tmp_path / "data")
    tiny = ["training.num_epochs=1", "model.convolutional_layers=0", "model.recurrent_layers=1",
            "model.recurrent_size=8", "data.batch_size=4"]
    run = ["optim", url, "run", "--ckpt-dir", "ckpt", "--sampler", "random", "--seed", "0"]
    first_uid = create_study(url, "optim", data, overrides=tiny, whitelist=LR, num_trials=2, pruner="none").study_uid
    first = cli(run, tmp_path)
    assert first.returncode == 0, first.stderr
    with opened_study(url, "optim") as study:
        best = study.best_trial
    # Live progress by default: a line per epoch with its value; the trial line names the value's epoch.
    assert re.search(r"^trial 0: epoch 1/1 dev error \S+%, dev loss \S+, value \S+ \(error\)$", first.stderr, re.M)
    assert re.search(r"^trial 0 COMPLETE value \S+ \(epoch 1 of 1\) in ", first.stderr, re.M), first.stderr
    # Only the best trial's model dir is kept; it is exported ready for `evaluate`.
    assert [p.name for p in (tmp_path / "ckpt" / "optim").iterdir()] == [f"trial-{best.number}"]
    exported = cli(["optim", url, "best", "--model", "m/model.pt", "--ckpt-dir", "ckpt"], tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == "" and f"model of trial {best.number}: " in exported.stderr
    evaluated, no_model = cli_many([["evaluate", "m/model.pt", data],
                                    ["optim", url, "best", "--model", "m2.pt", "--ckpt-dir", "elsewhere"]], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert_one_line_error(no_model, f"best trial {best.number} of study 'optim' is not kept: no elsewhere/optim/trial-{best.number}/model.pt")

    deleted = cli(["optim", url, "delete", "optim", "--ckpt-dir", "ckpt"], tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert not (tmp_path / "ckpt" / "optim").exists() and study_names(url) == []
    second_uid = create_study(url, "optim", data, overrides=tiny, whitelist=LR, num_trials=1,
                              pruner="none").study_uid
    assert second_uid != first_uid
    second = cli([*run, "--keep-models", "--quiet", "--tensorboard", "tb"], tmp_path)
    assert second.returncode == 0, second.stderr
    assert ": epoch 1/1" not in second.stderr  # --quiet
    # Nothing of the old study was found (it would have been moved aside with a warning), and it trained.
    assert "another study" not in second.stderr and "warning" not in second.stderr
    assert sorted(p.name for p in (tmp_path / "ckpt" / "optim").iterdir()) == ["trial-0"]
    with opened_study(url, "optim") as study:
        (trial,) = study.get_trials()
    assert trial.state.name == "COMPLETE" and trial.user_attrs["train_s"] > 0
    # TensorBoard: the trial's epochs as scalars, its parameters as hparams, read back with tensorboard's reader.
    scalars, hparams = read_board(tmp_path / "tb" / "optim" / "trial-0")
    assert scalars["dev/error"] == [(1, pytest.approx(trial.user_attrs["dev_error"]))]
    assert scalars["value"] == [(1, pytest.approx(trial.value))]
    assert [step for step, _ in scalars["train/loss"]] == [step for step, _ in scalars["train/learning_rate"]] == [1]
    assert hparams == pytest.approx(trial.params)


def test_status_watch_shows_progress_until_the_budget_is_met(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=LR, num_trials=3)
    worker = start_cli(["optim", url, "run", "--objective", "sleep", "--sleep-seconds", "1.5"], tmp_path,
                       tmp_path / "worker.log")
    try:
        watched = cli(["optim", url, "status", "--watch", "0.5", "--json", "--check"], tmp_path, timeout=120)
        assert worker.wait(timeout=60) == 0
    finally:
        stop_group(worker)
    assert watched.returncode == 0, watched.stderr  # --check: met at the end
    rounds = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(rounds) >= 3 and rounds[-1]["budget_met"] and not rounds[0]["budget_met"]
    assert [r["finished"] for r in rounds] == sorted(r["finished"] for r in rounds) and rounds[-1]["finished"] == 3
    paced = [r["eta"] for r in rounds if r["eta"] is not None and r["eta"]["seconds"] is not None]
    assert paced and all(e["trial_s"] >= 1.5 and e["seconds"] <= 2 * 1.5 * e["left"] for e in paced), paced
