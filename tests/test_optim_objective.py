"""The ``train`` objective (stagetune.optim.objective): memory budget and reuse of identical configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from optim_helpers import cli, create_study, opened_study, write_speech_data
from optuna.trial import TrialState

from stagetune.config import load_config
from stagetune.optim.objective import FOOTPRINT_PREFIX
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study

pytestmark = pytest.mark.slow

TINY_MODEL = [
    "training.num_epochs=1",
    "model.convolutional_layers=1",
    "model.convolutional_initial_channels=4",
    "model.recurrent_layers=1",
    "model.recurrent_size=8",
]
RUN = ["run", "--ckpt-dir", "ckpt", "--keep-models", "--threads", "1", "--verbose", "--seed", "0"]


def test_memory_budget_prunes_before_any_training_step(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                 num_trials=1, mem_limit_bytes=1000)
    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "optim") as study:
        (trial,) = study.get_trials()
    with storage_session(url) as storage:
        attrs = storage.get_study_system_attrs(storage.get_study_id_from_name("optim"))
    cache = {k: v for k, v in attrs.items() if k.startswith(FOOTPRINT_PREFIX)}
    assert trial.state == TrialState.PRUNED
    mem_bytes = trial.user_attrs["mem_bytes"]
    assert isinstance(mem_bytes, int) and mem_bytes > 1000
    assert trial.user_attrs["mem_method"] in ("cpu-tracker", "meta-estimate")
    assert trial.user_attrs["prune_reason"] == (
        f"memory footprint {mem_bytes} bytes ({trial.user_attrs['mem_method']}) exceeds "
        "--mem-limit-bytes 1000"
    )
    assert "epoch" not in trial.user_attrs and not trial.intermediate_values
    assert not (tmp_path / "ckpt" / "optim" / "trial-0" / "history.csv").exists()
    assert f"trial 0 PRUNED memory footprint {mem_bytes} bytes" in done.stderr
    assert list(cache.values()) == [mem_bytes]  # one figure per architecture, for every worker

    # A limit the model fits in: the same architecture trains, its figure read from the cache.
    spec = build_spec(load_config((), TINY_MODEL), data, whitelist=["training.learning_rate"],
                      num_trials=2, mem_limit_bytes=mem_bytes)
    with storage_session(url) as storage:
        assert init_study(storage, "optim", url, spec, force=True, log=lambda _m: None).action == "updated"
    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "optim") as study:
        trial = study.trials[1]
    assert trial.state == TrialState.COMPLETE
    assert (trial.user_attrs["mem_bytes"], trial.user_attrs["mem_method"]) == (mem_bytes, "cached")
    assert (tmp_path / "ckpt" / "optim" / "trial-1" / "history.csv").exists()


def test_an_identical_config_reuses_the_result_without_training(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                 num_trials=2)
    with opened_study(url, "optim") as study:
        for _ in range(2):
            study.enqueue_trial({"training.learning_rate": 0.01})
    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "optim") as study:
        first, second = study.get_trials()
    assert first.state == second.state == TrialState.COMPLETE
    assert first.params == second.params == {"training.learning_rate": 0.01}
    assert "reused_from" not in first.user_attrs
    assert second.user_attrs["reused_from"] == 0
    assert second.value == first.value
    assert not second.intermediate_values  # no epoch was trained for it
    assert "trial 1: same config as completed trial 0; reusing its result" in done.stderr
    assert (tmp_path / "ckpt" / "optim" / "trial-0" / "history.csv").exists()
    assert not (tmp_path / "ckpt" / "optim" / "trial-1").exists()
    assert "worker done (budget of 2 trials met): 2 complete" in done.stderr
