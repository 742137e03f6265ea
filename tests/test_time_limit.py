"""The time limit per trial (``optim init --time-limit``, stagetune.optim.duration): the
projection's batches are the sampler's, a tiny limit prunes every trial before it trains,
a generous one lets it train with its projection stored, and bad limits are usage errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from optim_helpers import TINY_MODEL, assert_one_line_error, cli_many, opened_study, read_spec, write_speech_data
from optuna.trial import TrialState

from stagetune.config import Config, with_values
from stagetune.dataset import BucketBatchSampler
from stagetune.optim import duration
from stagetune.optim.duration import DEV_SHARE, batch_units, format_seconds, project_training
from stagetune.optim.objective import PROJECTED_ATTR, STEP_SECONDS_ATTR, TIME_LIMIT_ATTR, _check_time
from stagetune.optim.spec import StudySpec
from stagetune.optim.storage import storage_session
from stagetune.optim.study import init_study
from stagetune.optim.worker import WorkerOptions, run_worker



def test_the_projection_counts_the_samplers_batches_by_padded_frames() -> None:
    parts = [[5, 30, 7, 20, 10], [12, 3, 40]]
    for drop_last in (False, True):
        sampler = BucketBatchSampler(
            [n for part in parts for n in part], 2, drop_last=drop_last, parts=[range(5), range(5, 8)]
        )
        batches, _ = batch_units(parts, 2, 80, drop_last=drop_last)
        assert batches == len(sampler)
    # Sorted per part and cut in twos: (5 7) (10 20) (30), (3 12) (40): padded 14+40+30, 24+40.
    assert batch_units(parts, 2, 80) == (5, (14 + 40 + 30 + 24 + 40) / 80)

    config = with_values(Config(), {"data.batch_size": 2, "data.min_batches_per_epoch": 1,
                                    "training.num_epochs": 3})
    projection = project_training(0.5, config, train_parts=parts, dev_lengths=[40, 40, 40],
                                  max_frames=40)
    units = (14 + 40 + 30 + 24 + 40) / 80 + DEV_SHARE * (80 + 40) / 80
    assert (projection.train_batches, projection.dev_batches, projection.num_epochs) == (5, 2, 3)
    assert projection.epoch_units == pytest.approx(units)
    assert projection.seconds == pytest.approx(0.5 * units * 3)
    assert (format_seconds(1520.4), format_seconds(12.345), format_seconds(0.0012345)) == (
        "1520", "12.3", "0.00123"
    )


class _Trial:
    def __init__(self, attrs: dict[str, Any]) -> None:
        self.number, self.user_attrs = 7, dict(attrs)

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def test_a_retry_keeps_the_projection_its_first_attempt_passed(monkeypatch) -> None:
    def never(*_args: Any, **_kwargs: Any) -> float:
        raise AssertionError("a retry must not time its step again")

    monkeypatch.setattr(duration, "time_step", never)
    for limit, pruned in ((100.0, False), (10.0, True)):  # a lowered limit still applies
        ctx = SimpleNamespace(spec=SimpleNamespace(time_limit_s=limit), step_seconds={},
                              log=lambda _m: None)
        trial = _Trial({PROJECTED_ATTR: 50.0})
        if pruned:
            with pytest.raises(optuna.TrialPruned, match=r"^projected 50 s of training exceeds "
                               r"--time-limit 10 s \(projected by an earlier attempt"):
                _check_time(ctx, trial, Config(), 30, "cpu", {}, "key", None)
            assert trial.user_attrs[TIME_LIMIT_ATTR] == 10.0
        else:
            _check_time(ctx, trial, Config(), 30, "cpu", {}, "key", None)
            assert TIME_LIMIT_ATTR not in trial.user_attrs


@pytest.mark.slow
def test_a_tiny_limit_prunes_before_training_and_a_generous_one_trains(tmp_path: Path, monkeypatch) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    settings = [arg for s in TINY_MODEL for arg in ("--set", s)]
    init = [*settings, "optim", url, "init", data, "--whitelist", r"training\.learning_rate",
            "--num-trials", "2"]
    created, zero, negative = cli_many(
        [[*init, "--time-limit", "0.001"], [*init, "--time-limit", "0"], [*init, "--time-limit", "-5"]],
        tmp_path,
    )
    assert created.returncode == 0, created.stderr
    for done, text in ((zero, "0"), (negative, "-5")):
        assert done.returncode == 2
        assert_one_line_error(done, "--time-limit", f"expected a finite number > 0, got {text}")
    assert read_spec(url, "optim")["time_limit_s"] == 0.001

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines: list[str] = []
        options = WorkerOptions(ckpt_dir=tmp_path / "ckpt", keep_models=True, seed=0, verbose=True)
        summary = run_worker(url, "optim", options, log=lines.append)
        assert summary.counts["PRUNED"] == 2, lines
        with opened_study(url, "optim") as study:
            trials = study.get_trials()
        for trial in trials:
            attrs = trial.user_attrs
            assert trial.state == TrialState.PRUNED
            assert attrs[PROJECTED_ATTR] > 0.001 and attrs[TIME_LIMIT_ATTR] == 0.001
            assert attrs["prune_reason"].startswith(
                f"projected {format_seconds(attrs[PROJECTED_ATTR])} s of training exceeds "
                "--time-limit 0.001 s ("
            )
            assert "s per step of the largest batch; " in attrs["prune_reason"]
            assert not trial.intermediate_values and "epoch" not in attrs
            assert any(line.startswith(f"trial {trial.number} PRUNED projected ") for line in lines)
        # Same architecture: timed once by this worker, the second trial reads its figure.
        assert trials[0].user_attrs[STEP_SECONDS_ATTR] == trials[1].user_attrs[STEP_SECONDS_ATTR] > 0
        assert not (tmp_path / "ckpt" / "optim").exists()  # no model dir, no checkpoint

        # A generous limit, with the memory check on: its measured step is the warm-up
        # of the timed ones, so no separate timing runs.
        spec = StudySpec.from_json(read_spec(url, "optim"), "optim")
        spec.time_limit_s, spec.mem_limit_bytes, spec.num_trials = 10_000.0, 10**12, 3
        with storage_session(url) as storage:
            assert init_study(storage, "optim", url, spec, force=True, log=lambda _m: None).action == "updated"

        def never(*_args: Any, **_kwargs: Any) -> float:
            raise AssertionError("the memory measurement's step should have been timed")

        monkeypatch.setattr(duration, "time_step", never)
        summary = run_worker(url, "optim", options, log=lines.append)
        assert summary.counts["COMPLETE"] == 1, lines
    finally:
        torch.set_num_threads(previous)
    with opened_study(url, "optim") as study:
        trial = study.trials[2]
    attrs = trial.user_attrs
    assert trial.state == TrialState.COMPLETE
    assert 0 < attrs[PROJECTED_ATTR] < 10_000 and attrs[STEP_SECONDS_ATTR] > 0
    assert attrs["mem_method"] == "cpu-tracker" and attrs["train_s"] > 0
    assert TIME_LIMIT_ATTR not in attrs and "prune_reason" not in attrs
    assert (tmp_path / "ckpt" / "optim" / "trial-2" / "checkpoint.pt").exists()
    assert f"trial 2: projected training time {format_seconds(attrs[PROJECTED_ATTR])} s (" in "\n".join(lines)
