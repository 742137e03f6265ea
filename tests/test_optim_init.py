"""Tests for ``stagetune optim init`` (stagetune.optim.study): create, re-check, force, chain."""

from __future__ import annotations

from pathlib import Path

import pytest
from optim_helpers import (
    LR_DOMINATED,
    assert_one_line_error,
    cli,
    cli_many,
    create_study,
    fill_study,
    opened_study,
    read_spec,
    study_names,
    write_speech_data,
)
from sqlalchemy.engine import make_url

from stagetune.config import load_config
from stagetune.optim.analysis import rank_parameters
from stagetune.optim.metrics import LEGACY_METRIC
from stagetune.optim.spec import SPEC_ATTR, StudySpec


def _expected_name(url: str) -> str:
    database = make_url(url).database
    return Path(database).stem if url.startswith("sqlite") else database


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_speech_data(tmp_path / "data")


def test_init_again_is_a_no_op_and_other_settings_are_listed(
    storage_url: str, tmp_path: Path, data: Path
) -> None:
    name = _expected_name(storage_url)  # the default study name: the database's name
    whitelist = r"training\..*"
    create_study(storage_url, name, data, overrides=["training.num_epochs=2"], num_trials=4,
                 whitelist=[whitelist])
    spec = read_spec(storage_url, name)

    def init(num_epochs: int, num_trials: int) -> list[object]:
        return ["--set", f"training.num_epochs={num_epochs}", "optim", storage_url, "init", data,
                "--num-trials", num_trials, "--whitelist", whitelist]

    again, different = cli_many([init(2, 4), init(3, 5)], tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        f"study {name} in {storage_url} already exists with these settings; nothing to do"
    )
    assert different.returncode == 2
    line = assert_one_line_error(
        different, f"study {name!r} exists with other settings",
        "training.num_epochs: 2 -> 3", "num_trials: 4 -> 5", "use a new --study-name",
    )
    assert "these invalidate its trials: training.num_epochs;" in line
    assert read_spec(storage_url, name) == spec  # neither command wrote anything
    assert study_names(storage_url) == [name]


def test_force_replaces_safe_settings_but_never_the_base_config(tmp_path: Path, data: Path) -> None:
    # Two identical studies: one for the refusals, one for --force (run at the same time).
    urls = {key: f"sqlite:///{tmp_path / key}.db" for key in ("refused", "forced")}
    for url in urls.values():
        create_study(url, "optim", data, overrides=["training.num_epochs=2"], num_trials=4,
                     whitelist=["training.learning_rate"])
    before = read_spec(urls["refused"], "optim")
    forced_uid = read_spec(urls["forced"], "optim")["study_uid"]

    def init(key: str, num_epochs: int, *more: str) -> list[object]:
        return ["--set", f"training.num_epochs={num_epochs}", "optim", "--study-name", "optim",
                urls[key], "init", data, "--whitelist", "training.learning_rate", *more]

    unforced, unsafe, other_metric, forced = cli_many(
        [
            init("refused", 2, "--num-trials", "6"),
            init("refused", 3, "--num-trials", "6", "--force"),
            init("refused", 2, "--metric", "loss", "--force"),
            init("forced", 2, "--num-trials", "6", "--force", "--mem-limit-bytes", "1000000000",
                 "--pruner", "median"),
        ],
        tmp_path,
    )
    assert unforced.returncode == 2
    assert_one_line_error(unforced, "num_trials: 4 -> 6", "add --force to replace them")
    assert unsafe.returncode == 2
    assert_one_line_error(unsafe, "these invalidate its trials: training.num_epochs")
    assert other_metric.returncode == 2  # the values of its trials are another metric's
    assert_one_line_error(other_metric, "metric: 'error' -> 'loss'", "these invalidate its trials: metric")
    assert read_spec(urls["refused"], "optim") == before

    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith("updated study optim in "), forced.stdout
    after = read_spec(urls["forced"], "optim")
    assert (after["num_trials"], after["mem_limit_bytes"], after["pruner"]) == (6, 1000000000, "median")
    assert after["base_config"] == before["base_config"] and after["tuned"] == before["tuned"]
    # still the same study: its trials' checkpoints and kept models stay its own
    assert after["study_uid"] == forced_uid and len(forced_uid) == 32


def test_bad_input_is_one_line_and_creates_no_study(tmp_path: Path, data: Path) -> None:
    cases = {
        "missing-dir": ([tmp_path / "no-such-dir"], 1, ["no-such-dir", "does not exist"]),
        "no-train-dir": ([], 2, ["init needs TRAIN_DIR"]),
        "bad-regex": ([data, "--whitelist", "model.(("], 2, ["'model.(('", "is not a regular expression"]),
        "no-match": ([data, "--blacklist", "model.recurent_size"], 2,
                     ["matches no tunable parameter; valid names:", "model.recurrent_size"]),
        "zero-trials": ([data, "--num-trials", "0"], 2, ["--num-trials must be >= 1, got 0"]),
        "bad-pruner": ([data, "--pruner", "sometimes"], 2, ["--pruner 'sometimes'", "hyperband"]),
        "bad-metric": ([data, "--metric", "wer"], 2, ["--metric 'wer'", "error, error+loss, loss"]),
        "bad-set": ([data, "--set", "training.num_epochs=zero"], 2, ["training.num_epochs", "'zero'"]),
    }
    urls = {case: f"sqlite:///{tmp_path / case}.db" for case in cases}
    results = cli_many(
        [["optim", urls[case], "init", *args] for case, (args, _, _) in cases.items()], tmp_path
    )
    for (case, (_, code, needles)), done in zip(cases.items(), results):
        assert done.returncode == code, (case, done.stderr)
        assert_one_line_error(done, *needles)
        assert done.stdout == "", case
        assert study_names(urls[case]) == [], case


def test_from_study_chains_a_stage(tmp_path: Path, data: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "stage1", data, whitelist=LR_DOMINATED, num_trials=16)
    best = fill_study(url, "stage1", spec, 16).params
    with opened_study(url, "stage1") as study:
        top = rank_parameters(study)[0][0]
    assert top == "training.learning_rate"

    done = cli(
        ["--set", "training.num_epochs=3", "optim", "--study-name", "stage2", url, "init",
         "--from-study", "stage1", "--top-k", "1", "--num-trials", "5", "--set", "data.batch_size=4"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "tuning 1 parameter (training.learning_rate)" in done.stdout
    stage2 = read_spec(url, "stage2")
    assert stage2["parent_study"] == "stage1"
    assert stage2["tuned"] == [top]
    assert stage2["train_dir"] == spec.train_dir  # the previous stage's data
    for name, value in best.items():  # the base config is stage 1's best trial
        section, key = name.split(".")
        assert stage2["base_config"][section][key] == value
    assert best["training.dropout_prob"] != load_config().training.dropout_prob
    assert stage2["base_config"]["training"]["num_epochs"] == 3  # both --set edits applied
    assert stage2["base_config"]["data"]["batch_size"] == 4

    status = cli(["optim", "--study-name", "stage2", url, "status"], tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == "study stage2 (from stage1)"


def test_a_chained_stage_inherits_the_metric_and_an_older_study_ranks_by_error(
    tmp_path: Path, data: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "by-loss", data, whitelist=LR_DOMINATED, num_trials=16, metric="loss")
    fill_study(url, "by-loss", spec, 16)
    # A study created before metrics existed: its stored spec has no "metric".
    spec = create_study(url, "older", data, whitelist=LR_DOMINATED, num_trials=16)
    fill_study(url, "older", spec, 16)
    with opened_study(url, "older") as study:
        stored = dict(study.user_attrs[SPEC_ATTR])
        del stored["metric"]
        study.set_user_attr(SPEC_ATTR, stored)
    assert StudySpec.from_json(stored, "older").metric == LEGACY_METRIC == "error"

    def chain(name: str, parent: str, *more: str) -> list[object]:
        return ["optim", "--study-name", name, url, "init", "--from-study", parent, "--top-k", "1", *more]

    results = cli_many(
        [
            chain("inherits", "by-loss"),
            chain("overrides", "by-loss", "--metric", "error+loss"),
            chain("from-older", "older"),
            ["optim", "--study-name", "older", url, "status"],
            ["optim", "--study-name", "older", url, "init", data, "--whitelist", *LR_DOMINATED,
             "--num-trials", "16"],
        ],
        tmp_path,
    )
    for done in results:
        assert done.returncode == 0, done.stderr
    assert results[0].stdout.rstrip().endswith("; metric loss")
    metrics = {name: read_spec(url, name)["metric"] for name in ("inherits", "overrides", "from-older")}
    assert metrics == {"inherits": "loss", "overrides": "error+loss", "from-older": "error"}
    assert results[3].stdout.splitlines()[1] == "metric: error"
    assert "already exists with these settings; nothing to do" in results[4].stdout
    assert "metric" not in read_spec(url, "older")  # read as error, never rewritten


def test_enqueue_base_makes_the_first_trial_the_starting_point(tmp_path: Path, data: Path) -> None:
    """A chained stage's first trial is PREV's best itself, so the stage cannot end worse."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "stage1", data, whitelist=LR_DOMINATED, num_trials=8)
    best = fill_study(url, "stage1", spec, 8).params
    init = ["optim", "--study-name", "stage2", url, "init", "--from-study", "stage1", "--top-k", "2",
            "--num-trials", "3", "--enqueue-base"]
    for _ in range(2):  # the second init is a no-op: nothing enqueued twice
        done = cli(init, tmp_path)
        assert done.returncode == 0, done.stderr
    run = cli(["optim", "--study-name", "stage2", url, "run", "--objective", "quadratic",
               "--sampler", "random", "--seed", "3"], tmp_path)
    assert run.returncode == 0, run.stderr
    with opened_study(url, "stage2") as study:
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert len(trials) == 3
    tuned = read_spec(url, "stage2")["tuned"]
    assert trials[0].params == {name: best[name] for name in tuned}
    assert all(t.params != trials[0].params for t in trials[1:])
