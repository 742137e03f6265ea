"""The ``train`` objective (stagetune.optim.objective): memory budget, reuse of identical
configs, the study's metric as trial value, pruning of configs CTC cannot train, and
trial dirs a deleted study of the same name left behind."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
import torch
from optim_helpers import TINY_MODEL, cli, cli_many, create_study, opened_study, read_spec, write_speech_data
from optuna.trial import TrialState

from stagetune.checkpoint import load_checkpoint
from stagetune.config import load_config
from stagetune.corpus import load_corpus
from stagetune.feasibility import find_shortfall
from stagetune.optim.objective import FOOTPRINT_PREFIX
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study
from stagetune.optim.worker import WorkerOptions, run_worker

pytestmark = pytest.mark.slow

RUN = ["run", "--ckpt-dir", "ckpt", "--keep-models", "--threads", "1", "--verbose", "--seed", "0"]


def read_history(model_dir: Path) -> list[dict[str, str]]:
    with (model_dir / "history.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


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
    for key in ("value_epoch", "dev_error", "dev_loss"):  # the figures behind the value too
        assert second.user_attrs[key] == first.user_attrs[key]
    assert not second.intermediate_values  # no epoch was trained for it
    assert "trial 1: same config as completed trial 0; reusing its result" in done.stderr
    assert (tmp_path / "ckpt" / "optim" / "trial-0" / "history.csv").exists()
    assert not (tmp_path / "ckpt" / "optim" / "trial-1").exists()
    assert "worker done (budget of 2 trials met): 2 complete" in done.stderr


def test_the_loss_metric_is_stored_and_is_the_trial_value(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    settings = [arg for s in [*TINY_MODEL, "training.num_epochs=3"] for arg in ("--set", s)]
    done = cli([*settings, "optim", url, "init", data, "--whitelist", r"training\.learning_rate",
                "--num-trials", "1", "--pruner", "none", "--metric", "loss"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("; 1 trials; metric loss")
    assert read_spec(url, "optim")["metric"] == "loss"
    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "objective train (metric loss)" in done.stderr
    with opened_study(url, "optim") as study:
        (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    history = read_history(tmp_path / "ckpt" / "optim" / "trial-0")
    dev_losses = {int(row["epoch"]): float(row["dev_loss"]) for row in history}
    # Each epoch reports its dev loss per token to the pruner; the value is the lowest.
    assert trial.intermediate_values.keys() == dev_losses.keys() == {1, 2, 3}
    for epoch, reported in trial.intermediate_values.items():
        assert reported == pytest.approx(dev_losses[epoch], rel=1e-5)
    epoch = min(trial.intermediate_values, key=trial.intermediate_values.get)
    assert trial.value == trial.intermediate_values[epoch] == trial.user_attrs["dev_loss"]
    assert trial.user_attrs["value_epoch"] == epoch
    assert trial.user_attrs["dev_error"] == pytest.approx(float(history[epoch - 1]["dev_error"]), rel=1e-5)

    status, best = cli_many([["optim", url, "status"], ["optim", url, "best", "-"]], tmp_path)
    assert status.returncode == best.returncode == 0, status.stderr + best.stderr
    assert status.stdout.splitlines()[1] == "metric: loss"
    assert best.stderr.splitlines() == [
        f"best trial 0: value {trial.value:.6g} (metric loss; epoch {epoch}: dev error "
        f"{trial.user_attrs['dev_error']:.2%}, dev loss {trial.value:.4f})"
    ]


def test_a_stride_too_large_for_ctc_prunes_the_trial_before_measuring_or_training(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    # Two conv layers striding time by 3: a total stride of 9, too much for some utterances.
    overrides = [*TINY_MODEL, "model.convolutional_layers=2", "model.convolutional_time_factor=3"]
    spec = create_study(url, "optim", data, overrides=overrides, whitelist=["training.learning_rate"],
                        num_trials=1, mem_limit_bytes=10**12)
    shortfall = find_shortfall(spec.config(), load_corpus(data, dev_proportion=0.1))
    assert shortfall is not None and shortfall.time_stride == 9
    done = cli(["optim", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "optim") as study:
        (trial,) = study.get_trials()
    assert trial.state == TrialState.PRUNED  # not FAIL: the configuration is what is wrong
    assert trial.user_attrs["prune_reason"] == shortfall.message()
    assert trial.user_attrs["prune_reason"].startswith("a total time stride of 9 leaves ")
    assert trial.user_attrs["short_utterances"] == shortfall.affected
    assert sum(shortfall.affected.values()) > 0
    assert "mem_bytes" not in trial.user_attrs  # pruned before the memory measurement
    assert "epoch" not in trial.user_attrs and not trial.intermediate_values
    assert not (tmp_path / "ckpt" / "optim" / "trial-0").exists()
    assert f"trial 0 PRUNED {shortfall.message()}" in done.stderr


def test_a_study_created_again_under_its_name_never_reuses_the_old_ones_models(tmp_path: Path) -> None:
    """Delete a study whose models were kept, create it again on other data: trial 0 trains."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    trial_dir = tmp_path / "ckpt" / "re" / "trial-0"

    def create(data: Path) -> str:
        spec = create_study(url, "re", data, overrides=TINY_MODEL, whitelist=["training.learning_rate"],
                            num_trials=1)
        with opened_study(url, "re") as study:
            study.enqueue_trial({"training.learning_rate": 0.01})  # the same config both times
        return spec.study_uid

    old_uid = create(write_speech_data(tmp_path / "old"))
    torch.set_num_threads(1)
    options = WorkerOptions(ckpt_dir=tmp_path / "ckpt", keep_models=True, seed=0)
    assert run_worker(url, "re", options, log=lambda _message: None).counts["COMPLETE"] == 1
    optuna.delete_study(study_name="re", storage=url)
    new_uid = create(write_speech_data(tmp_path / "new", 20))
    assert old_uid != new_uid

    done = cli(["optim", "--study-name", "re", url, *RUN], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "re") as study:
        (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.intermediate_values.keys() == {1}  # trained, not the old study's result
    aside = trial_dir.with_name(f"trial-0.other-study-{old_uid[:8]}")
    assert (
        f"stagetune: warning: trial 0: ckpt/re/trial-0 held a checkpoint of another study (uid {old_uid}, "
        f"this study's is {new_uid}); moved it to {aside.name} and training anew"
    ) in done.stderr.splitlines()
    old, new = load_checkpoint(aside / "checkpoint.pt"), load_checkpoint(trial_dir / "checkpoint.pt")
    assert (old["owner"], new["owner"]) == (old_uid, new_uid)
    assert (old["data"]["train"]["dir"], new["data"]["train"]["dir"]) == (
        str(tmp_path / "old"), str(tmp_path / "new")
    )
