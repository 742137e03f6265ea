"""Tests for ``stagetune optim init`` (stagetune.optim.study): create, re-check, force, chain."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sqlite3
from pathlib import Path

import optuna
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
    trial_states,
    write_speech_data,
)
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from stagetune import __version__
from stagetune.cli import main
from stagetune.config import load_config, to_dict
from stagetune.errors import StagetuneError
from stagetune.optim.analysis import rank_parameters
from stagetune.optim.metrics import LEGACY_METRIC
from stagetune.optim.sampling import select_tunable
from stagetune.optim.spec import SPEC_ATTR, StudySpec, spec_differences, store_spec_json, stored_spec_json
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study


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
        "db-dir-missing": ([data], 1, [f"directory {tmp_path / 'exp'} does not exist; create it first"]),
        "foreign-db": ([data], 1, [f"{tmp_path / 'corpus.db'} is an SQLite database of something else "
                                   "(tables utterances, none of them optuna's)"]),
    }
    urls = {case: f"sqlite:///{tmp_path / case}.db" for case in cases}
    urls["db-dir-missing"] = f"sqlite:///{tmp_path / 'exp' / 'optim.db'}"  # a typo, or not made yet
    urls["foreign-db"] = f"sqlite:///{tmp_path / 'corpus.db'}"  # another tool's database
    with contextlib.closing(sqlite3.connect(tmp_path / "corpus.db")) as connection, connection:
        connection.execute("CREATE TABLE utterances (id TEXT PRIMARY KEY, transcript TEXT)")
        connection.execute("INSERT INTO utterances VALUES ('a1', 'one two')")
    foreign = (tmp_path / "corpus.db").read_bytes(), (tmp_path / "corpus.db").stat().st_mtime_ns
    results = cli_many(
        [["optim", urls[case], "init", *args] for case, (args, _, _) in cases.items()], tmp_path
    )
    for (case, (_, code, needles)), done in zip(cases.items(), results):
        assert done.returncode == code, (case, done.stderr)
        assert_one_line_error(done, *needles)
        assert done.stdout == "", case
        if case != "foreign-db":
            assert study_names(urls[case]) == [], case
    assert not (tmp_path / "exp").exists()
    # Not a byte written to the other tool's database, and nothing beside it (-wal, -shm, .lock).
    assert ((tmp_path / "corpus.db").read_bytes(), (tmp_path / "corpus.db").stat().st_mtime_ns) == foreign
    assert not list(tmp_path.glob("corpus.db?*"))


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
        stored = dict(stored_spec_json(study._storage, study._study_id))
        del stored["metric"]
        store_spec_json(study._storage, study._study_id, stored)
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


def test_the_default_config_queued_over_the_full_default_space_trains(tmp_path: Path) -> None:
    """Its weight decay (0) lies outside the log space [1e-6, 1e-2]: queued as 1e-6, said so, the trial runs.

    Before, optuna refused the queued 0 at the trial's first suggest and the base trial
    FAILed in 0.1 s ("`0.0` is invalid value for the case log=True"): a plan's sm stage
    over the default space (enqueue_base is a stage's default) lost its starting point.
    """
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    data = write_speech_data(tmp_path / "long", min_frames=40, max_frames=60)  # long enough for stride 4
    widths = ["model.convolutional_initial_channels", "model.recurrent_size"]
    done = cli(["--set", "training.num_epochs=1", "--set", f"{widths[0]}=4", "--set", f"{widths[1]}=8",
                "optim", "--study-name", "full", url, "init", data, "--blacklist", r"training\.num_epochs",
                r"training\.early_stopping_.*", r"training\.adapt_rho", *(re.escape(w) for w in widths),
                "--num-trials", "1", "--enqueue-base"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("queued the base config with training.weight_decay 0 -> 1e-06 (outside [1e-06, 0.01] log)"
            in done.stderr), done.stderr
    run = cli(["optim", "--study-name", "full", url, "run", "--threads", "1"], tmp_path)
    assert run.returncode == 0, run.stderr
    with opened_study(url, "full") as study:
        (trial,) = study.get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE, trial.user_attrs
    assert trial.params["training.weight_decay"] == 1e-6
    assert trial.params["training.learning_rate"] == 4e-3  # the rest is the default config itself


def test_a_study_of_another_minor_release_is_refused_a_newer_patch_level_joins(tmp_path: Path, data: Path) -> None:
    major, minor, patch = (int(n) for n in re.findall(r"\d+", __version__)[:3])
    created_by = {"minor": f"stagetune {major}.{minor + 1}.0", "patch": f"stagetune {major}.{minor}.{patch + 1}"}
    urls = {kind: f"sqlite:///{tmp_path / kind}.db" for kind in created_by}
    for kind, url in urls.items():  # as if that stagetune had run `optim init`
        spec = create_study(url, "optim", data, whitelist=[r"training\.learning_rate"], num_trials=1)
        with opened_study(url, "optim") as study:
            store_spec_json(study._storage, study._study_id, {**spec.to_json(), "created_by": created_by[kind]})

    def run(url: str) -> list[object]:
        return ["optim", "--study-name", "optim", url, "run", "--objective", "quadratic"]

    refused, joined = cli_many([run(urls["minor"]), run(urls["patch"])], tmp_path)
    assert refused.returncode == 1
    assert_one_line_error(
        refused, f"study 'optim' was created by stagetune {major}.{minor + 1}.0, this is stagetune {__version__}",
        f"use stagetune {major}.{minor + 1}.x for it, or start a new --study-name",
    )
    assert trial_states(urls["minor"], "optim") == {}  # it ran nothing
    assert joined.returncode == 0, joined.stderr
    assert trial_states(urls["patch"], "optim") == {"COMPLETE": 1}
    # `optim init` again from this release says the same.
    with storage_session(urls["minor"]) as storage, pytest.raises(StagetuneError, match="was created by"):
        init_study(storage, "optim", urls["minor"], spec, log=lambda _message: None)


# --- derived studies: inherited settings, own selection, narrowed ranges, queued trials --------


#: What the parent study of the derivation tests stores beyond ``create_study``'s defaults.
_PARENT_SETTINGS = {"pruner": "median", "mem_limit_bytes": 10**9, "metric": "loss", "sampler": "random",
                    "num_data_workers": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with study ``stage1``: 16 complete trials of LR_DOMINATED, non-default settings."""
    tmp = tmp_path_factory.mktemp("parent")
    url = f"sqlite:///{tmp / 'optim.db'}"
    spec = create_study(url, "stage1", write_speech_data(tmp / "data"), whitelist=LR_DOMINATED, num_trials=16,
                        pruner="median", mem_limit_bytes=10**9, metric="loss")
    with opened_study(url, "stage1") as study:  # as `init --sampler random --num-data-workers 2 --device cpu`
        store_spec_json(study._storage, study._study_id, {**spec.to_json(), **_PARENT_SETTINGS})
    fill_study(url, "stage1", spec, 16)
    return url


def _main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``stagetune ARGV`` in this process (a derived init needs no subprocess's fresh imports)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _ranked_trials(url: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    with opened_study(url, study_name) as study:
        return sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: (t.value, t.number))


def test_a_derived_study_inherits_its_parents_settings_unless_given(
    parent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    derive = ["optim", "--study-name", "inherits", parent, "init", "--from-study", "stage1", "--top-k", "1"]
    code, _, err = _main(capsys, *derive)
    assert code == 0, err
    inherited = read_spec(parent, "inherits")
    assert {key: inherited[key] for key in _PARENT_SETTINGS} == _PARENT_SETTINGS
    code, _, err = _main(
        capsys, "optim", "--study-name", "own", parent, "init", "--from-study", "stage1", "--top-k", "1",
        "--pruner", "none", "--mem-limit-bytes", 5, "--metric", "error", "--sampler", "qmc",
        "--num-data-workers", 0, "--device", "cuda",
    )
    assert code == 0, err
    own = read_spec(parent, "own")
    assert {key: own[key] for key in _PARENT_SETTINGS} == {
        "pruner": "none", "mem_limit_bytes": 5, "metric": "error", "sampler": "qmc", "num_data_workers": 0,
        "device": "cuda",
    }

    # The sampler is the study's: a bare `run` uses it, `run --sampler` overrides it.
    run = ["optim", "--study-name", "inherits", parent, "run", "--objective", "quadratic", "--n-trials", 1]
    for more, sampler in (([], "random"), (["--sampler", "tpe"], "tpe")):
        code, _, err = _main(capsys, *run, *more)
        assert code == 0, err
        assert f", sampler {sampler}" in err.splitlines()[0], err
    # It is safe to replace, as the pruner is.
    code, _, err = _main(capsys, *derive, "--sampler", "gp")
    assert code == 2
    assert "sampler: 'random' -> 'gp'" in err and "add --force to replace them" in err, err
    code, out, err = _main(capsys, *derive, "--sampler", "gp", "--force")
    assert code == 0 and out.startswith("updated study inherits"), err
    assert read_spec(parent, "inherits")["sampler"] == "gp"


def test_a_spec_without_a_sampler_samples_with_tpe(data: Path) -> None:
    spec = build_spec(load_config(), data, whitelist=["training.learning_rate"])
    assert spec.sampler is None and spec.sampler_name() == "tpe"
    stored = {k: v for k, v in spec.to_json().items() if k not in ("sampler", "ranges", "narrowed_from")}
    older = StudySpec.from_json(stored, "older")  # a spec stored before samplers were
    assert spec_differences(older, dataclasses.replace(spec, sampler="tpe")) == []
    assert spec_differences(older, dataclasses.replace(spec, sampler="random")) == [("sampler", "tpe", "random")]


def test_a_derived_study_tunes_its_own_lists_over_config_files(
    parent: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cnn-mellin's train-sm stage: base config from PREV's best, tune training.* but a blacklist."""
    best = _ranked_trials(parent, "stage1")[0].params
    ini = tmp_path / "over.ini"
    ini.write_text("[data]\nbatch_size = 4\n[training]\ndropout_prob = 0.25\n")
    own = ["--whitelist", r"training\..*", "--blacklist", "training.num_epochs", r"training\.early_stopping_.*"]
    code, _, err = _main(capsys, "--read-ini", ini, "optim", "--study-name", "lists", parent, "init",
                         "--from-study", "stage1", *own)
    assert code == 0, err
    spec = read_spec(parent, "lists")
    base = load_config((), [f"training.learning_rate={best['training.learning_rate']}",
                            f"model.recurrent_type={best['model.recurrent_type']}",
                            "training.dropout_prob=0.25", "data.batch_size=4"])
    assert spec["tuned"] == list(select_tunable(base, own[1:2], own[3:]).tuned)
    assert "training.learning_rate" in spec["tuned"] and "training.num_epochs" not in spec["tuned"]
    assert spec["base_config"] == to_dict(base)  # PREV's best, then the file over it

    # With --top-k the blacklist takes names out of PREV's ranking.
    with opened_study(parent, "stage1") as study:
        ranking = [name for name, _ in rank_parameters(study)]
    assert ranking[0] == "training.learning_rate"
    code, _, err = _main(capsys, "optim", "--study-name", "ranked", parent, "init", "--from-study", "stage1",
                         "--top-k", 1, "--blacklist", "training.learning_rate")
    assert code == 0, err
    assert read_spec(parent, "ranked")["tuned"] == [ranking[1]]
    code, _, err = _main(capsys, "optim", "--study-name", "both", parent, "init", "--from-study", "stage1",
                         "--top-k", 1, "--whitelist", "training.learning_rate")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("stagetune: error: --whitelist names what to tune"), err
    assert "both" not in study_names(parent)


def test_narrow_takes_the_ranges_of_the_parents_best_trials(
    parent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    top = _ranked_trials(parent, "stage1")[:4]  # the best quarter of 16
    code, _, err = _main(capsys, "optim", "--study-name", "narrow", parent, "init", "--from-study", "stage1",
                         "--whitelist", *LR_DOMINATED, "--narrow", 0.25)
    assert code == 0, err
    spec = read_spec(parent, "narrow")
    numeric = ("training.learning_rate", "training.dropout_prob")
    expected = {n: [min(t.params[n] for t in top), max(t.params[n] for t in top)] for n in numeric}
    assert spec["ranges"] == expected  # model.recurrent_type is categorical: not narrowed
    assert spec["narrowed_from"] == {"study": "stage1", "quantile": 0.25,
                                     "trials": sorted(t.number for t in top)}
    assert err.count("narrowed ") == 2, err
    code, _, err = _main(capsys, "optim", "--study-name", "narrow", parent, "run", "--objective", "quadratic",
                         "--n-trials", 6, "--seed", 1)
    assert code == 0, err
    with opened_study(parent, "narrow") as study:
        trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 6
    for name, (low, high) in expected.items():
        assert all(low <= t.params[name] <= high for t in trials), name


def test_around_base_cuts_each_numeric_range_to_a_window_around_the_base(
    parent: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_speech_data(tmp_path / "data")
    url = f"sqlite:///{tmp_path / 'local.db'}"
    code, _, err = _main(capsys, "--set", "training.learning_rate=0.004", "optim", "--study-name", "local", url,
                         "init", data, "--whitelist", *LR_DOMINATED, "--around-base", 0.5, "--enqueue-base")
    assert code == 0, err
    spec = read_spec(url, "local")
    # learning rate: log range [3e-4, 3e-2], half of its two decades centred on 0.004;
    # dropout: [0, 0.4], a window of 0.2 around 0.1 slid to start at 0; the categorical stays whole
    low, high = spec["ranges"]["training.learning_rate"]
    assert low == pytest.approx(0.004 / 10**0.5) and high == pytest.approx(0.004 * 10**0.5)
    assert spec["ranges"]["training.dropout_prob"] == pytest.approx([0.0, 0.2])
    assert set(spec["ranges"]) == {"training.learning_rate", "training.dropout_prob"}
    assert spec["narrowed_from"] == {"around_base": 0.5}
    assert "narrowed training.learning_rate to [0.00126491, 0.0126491] around its base value 0.004" in err
    code, _, err = _main(capsys, "optim", "--study-name", "local", url, "run", "--objective", "quadratic",
                         "--n-trials", 6, "--seed", 1)
    assert code == 0, err
    with opened_study(url, "local") as study:
        trials = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert len(trials) == 6 and trials[0].params["training.learning_rate"] == 0.004  # the base, queued first
    for name, (low, high) in spec["ranges"].items():
        assert all(low <= t.params[name] <= high for t in trials), name

    # After --narrow, the window keeps only what it overlaps of the narrowed box, and holds the base (PREV's best).
    best = _ranked_trials(parent, "stage1")[0].params
    code, _, err = _main(capsys, "optim", "--study-name", "both-cuts", parent, "init", "--from-study", "stage1",
                         "--whitelist", *LR_DOMINATED, "--narrow", 0.5, "--around-base", 0.1)
    assert code == 0, err
    cut = read_spec(parent, "both-cuts")["ranges"]
    code, _, err = _main(capsys, "optim", "--study-name", "narrow-only", parent, "init", "--from-study", "stage1",
                         "--whitelist", *LR_DOMINATED, "--narrow", 0.5)
    assert code == 0, err
    box = read_spec(parent, "narrow-only")["ranges"]
    assert set(cut) == set(box)
    for name, (low, high) in cut.items():
        assert box[name][0] <= low <= best[name] <= high <= box[name][1], name
    assert cut != box

    for bad in ("0", "1.5", "-0.2"):
        code, _, err = _main(capsys, "optim", "--study-name", "refused", url, "init", data, "--around-base", bad)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"stagetune: error: --around-base must be in (0, 1], got {float(bad):g}"), err
    assert "refused" not in study_names(url)


def test_enqueue_best_queues_the_parents_best_trials_once(
    parent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    best = _ranked_trials(parent, "stage1")[:3]
    code, _, err = _main(capsys, "optim", "--study-name", "queued", parent, "init", "--from-study", "stage1",
                         "--top-k", 2, "--enqueue-base", "--enqueue-best", 3)
    assert code == 0, err
    tuned = read_spec(parent, "queued")["tuned"]
    with opened_study(parent, "queued") as study:
        queued = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert {t.state for t in queued} == {TrialState.WAITING}
    # The base config is PREV's best trial: queued once, first.
    assert [t.system_attrs["fixed_params"] for t in queued] == [
        {name: t.params[name] for name in tuned} for t in best
    ]
    code, _, err = _main(capsys, "optim", "--study-name", "not-derived", parent, "init", "/nowhere",
                         "--enqueue-best", 3)
    assert code == 2 and "--enqueue-best of init go with --from-study; got --enqueue-best without" in err, err


def test_the_spec_is_a_system_attribute_and_an_older_studys_user_attribute_is_still_read(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "new", write_speech_data(tmp_path / "data"), whitelist=[r"training\.learning_rate"],
                        num_trials=2)
    with opened_study(url, "new") as study:
        # `optuna studies` and optuna-dashboard print user attributes: the short ones only
        assert SPEC_ATTR not in study.user_attrs and study.user_attrs["budget"] == 2
        assert study._storage.get_study_system_attrs(study._study_id)[SPEC_ATTR] == spec.to_json()
        # a study created before: the spec in a user attribute only
        old = optuna.create_study(study_name="old", storage=study._storage)
        old.set_user_attr(SPEC_ATTR, spec.to_json())
    listed = cli(["optim", "--study-name", "old", url, "status", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["num_trials"] == 2
    done = cli(["optim", "--study-name", "old", url, "run", "--objective", "quadratic"], tmp_path)
    assert done.returncode == 0, done.stderr
    with opened_study(url, "old") as study:
        assert len(study.trials) == 2 and SPEC_ATTR not in study._storage.get_study_system_attrs(study._study_id)
