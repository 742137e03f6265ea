"""Reading results (stagetune.optim.analysis): ``optim important`` and ``optim best``."""

from __future__ import annotations

import configparser
from pathlib import Path

import optuna
import pytest
from optim_helpers import (
    LR_DOMINATED,
    assert_one_line_error,
    cli_many,
    create_study,
    fill_study,
    lr_dominated,
    opened_study,
    write_speech_data,
)
from optuna.distributions import CategoricalDistribution, IntDistribution

from stagetune.config import RECURRENT_TYPES
from stagetune.optim.metrics import METRICS
from stagetune.optim.registry import EVALUATORS
from stagetune.optim.sampling import sample_values


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_speech_data(tmp_path / "data")


@pytest.fixture
def filled(storage_url: str, data: Path) -> tuple[str, str, optuna.trial.FrozenTrial]:
    """A study whose 16 completed trials depend mostly on the learning rate."""
    spec = create_study(storage_url, "stage1", data, whitelist=LR_DOMINATED, num_trials=16)
    return storage_url, "stage1", fill_study(storage_url, "stage1", spec, 16)


def _ini_value(text: str, section: str, key: str) -> str:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    parser.read_string(text)
    return parser[section][key]


def test_important_is_reproducible_and_selects(
    filled: tuple[str, str, optuna.trial.FrozenTrial], tmp_path: Path
) -> None:
    url, name, _ = filled
    optim = ["optim", "--study-name", name, url, "important"]
    first, second, top, threshold = cli_many(
        [optim, optim, [*optim, "--top-k", "2"], [*optim, "--threshold", "0.2", "--verbose"]],
        tmp_path,
    )
    for done in (first, second, top, threshold):
        assert done.returncode == 0, done.stderr
    ranking = first.stdout.splitlines()
    assert second.stdout == first.stdout  # same study, same ranking
    assert sorted(ranking) == sorted(LR_DOMINATED) and ranking[0] == "training.learning_rate"
    assert first.stderr == ""  # only data on stdout
    assert top.stdout.splitlines() == ranking[:2]
    importances = [line.split() for line in threshold.stderr.splitlines()]
    assert [n for _, n in importances] == ranking  # --verbose: "0.9123 name" on stderr
    assert threshold.stdout.splitlines() == [n for v, n in importances if float(v) >= 0.2]
    assert 0 < len(threshold.stdout.splitlines()) < len(ranking)


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_fanova_ranking_is_reproducible_with_its_seed(
    filled: tuple[str, str, optuna.trial.FrozenTrial], tmp_path: Path
) -> None:
    url, name, _ = filled
    optim = ["optim", "--study-name", name, url, "important", "--evaluator", "fanova"]
    to_stdout, to_file = cli_many([optim, [*optim, "ranking.txt"]], tmp_path)
    assert to_stdout.returncode == to_file.returncode == 0, to_stdout.stderr + to_file.stderr
    assert to_file.stdout == ""
    assert (tmp_path / "ranking.txt").read_text() == to_stdout.stdout
    # fANOVA's forest on 16 trials is no reliable judge of which parameter matters most;
    # what users rely on is that a fixed seed gives the same answer every time.
    assert sorted(to_stdout.stdout.splitlines()) == sorted(LR_DOMINATED)


def test_best_writes_the_best_trials_config(
    filled: tuple[str, str, optuna.trial.FrozenTrial], tmp_path: Path
) -> None:
    url, name, best = filled
    optim = ["optim", "--study-name", name, url, "best"]
    to_file, to_stdout = cli_many([[*optim, "best.ini"], [*optim, "-"]], tmp_path)
    assert to_file.returncode == to_stdout.returncode == 0, to_file.stderr + to_stdout.stderr
    text = (tmp_path / "best.ini").read_text()
    assert to_file.stdout == "" and to_stdout.stdout == text  # only the config on stdout
    assert to_stdout.stderr.splitlines() == [f"best trial {best.number}: value {best.value:.6g} (metric error)"]
    for dotted, value in best.params.items():
        section, key = dotted.split(".")
        expected = str(value) if not isinstance(value, float) else repr(value)
        assert _ini_value(text, section, key) == expected


@pytest.mark.parametrize("storage_url", ["sqlite"], indirect=True)
def test_best_formats_read_back_and_take_edits(
    filled: tuple[str, str, optuna.trial.FrozenTrial], tmp_path: Path
) -> None:
    url, name, _ = filled
    optim = ["optim", "--study-name", name, url, "best"]
    results = cli_many(
        [[*optim, "best.ini"], [*optim, "best.json"], [*optim, "best.yaml"],
         [*optim, "--format", "json", "best.txt"],
         [*optim, "--set", "training.num_epochs=7", "edited.ini"]],
        tmp_path,
    )
    assert all(done.returncode == 0 for done in results), [d.stderr for d in results]
    assert (tmp_path / "best.json").read_text().lstrip().startswith("{")
    assert (tmp_path / "best.txt").read_text() == (tmp_path / "best.json").read_text()
    assert "model:\n" in (tmp_path / "best.yaml").read_text()
    reread = cli_many(
        [["--read-ini", f, "--print-ini"] for f in ("best.ini", "best.json", "best.yaml")], tmp_path
    )
    expected = (tmp_path / "best.ini").read_text()
    for done in reread:
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected
    edited = (tmp_path / "edited.ini").read_text()
    assert _ini_value(edited, "training", "num_epochs") == "7"
    assert _ini_value(expected, "training", "num_epochs") != "7"
    assert edited.replace("num_epochs = 7", "") == expected.replace(
        f"num_epochs = {_ini_value(expected, 'training', 'num_epochs')}", ""
    )


# (convolutional_layers, convolutional_factor_sched, recurrent_type, error)
_KNOWN_TRIALS = [
    (1, 1, "lstm", 0.10),  # the best trial
    (1, 2, "lstm", 0.95),
    (1, 1, "gru", 0.30),
    (2, 3, "lstm", 0.90),
    (2, 3, "gru", 0.20),
    (2, 1, "gru", 0.85),
    (2, 3, "gru", 0.25),
]


def test_best_independent_picks_each_lowest_median_value(tmp_path: Path, data: Path) -> None:
    """Medians: layers 1 (0.30) over 2 (0.55); sched 3 (0.25) over 1 (0.30) and 2 (0.95);
    gru (0.275) over lstm (0.90). Sched 3 breaks sched <= layers + 1 = 2: repaired to 2."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    tuned = ["model.convolutional_layers", "model.convolutional_factor_sched", "model.recurrent_type"]
    create_study(url, "optim", data, whitelist=tuned)
    with opened_study(url, "optim") as study:
        for layers, sched, kind, error in _KNOWN_TRIALS:
            study.add_trial(
                optuna.trial.create_trial(
                    params=dict(zip(tuned, (layers, sched, kind))),
                    distributions={
                        tuned[0]: IntDistribution(0, 4),
                        tuned[1]: IntDistribution(1, layers + 1),
                        tuned[2]: CategoricalDistribution(RECURRENT_TYPES),
                    },
                    value=error,
                )
            )
    optim = ["optim", url, "best", "-"]
    joint, independent = cli_many([optim, [*optim, "--independent"]], tmp_path)
    assert joint.returncode == independent.returncode == 0, joint.stderr + independent.stderr
    picks = {
        label: tuple(_ini_value(done.stdout, *name.split(".")) for name in tuned)
        for label, done in (("joint", joint), ("independent", independent))
    }
    assert picks == {"joint": ("1", "1", "lstm"), "independent": ("1", "2", "gru")}
    assert independent.stderr.splitlines() == [
        "each value by its lowest median value (metric error)",
        "repaired model.convolutional_factor_sched: 3 -> 2 (model.convolutional_layers + 1 = 2)",
    ]


def test_on_the_all_blank_plateau_error_plus_loss_still_ranks_and_picks_by_the_loss(
    storage_url: str, tmp_path: Path, data: Path
) -> None:
    """Every trial at 100% dev error, as short CTC trials often are: the error alone ranks
    nothing, the loss as tie-breaker ranks by the learning rate that drives it."""
    spec = create_study(storage_url, "plateau", data, whitelist=LR_DOMINATED, num_trials=16,
                        metric="error+loss")
    metric = METRICS["error+loss"]
    losses = {}
    with opened_study(storage_url, "plateau") as study:
        study.sampler = optuna.samplers.RandomSampler(seed=3)
        for _ in range(16):
            trial = study.ask()
            loss = 0.5 + lr_dominated(sample_values(trial, spec.config(), spec.tuned))
            for key, figure in (("value_epoch", 3), ("dev_error", 1.0), ("dev_loss", loss)):
                trial.set_user_attr(key, figure)
            study.tell(trial, metric.value(1.0, loss))
            losses[trial.number] = loss
    lowest = min(losses, key=losses.get)
    optim = ["optim", "--study-name", "plateau", storage_url]
    important, best = cli_many([[*optim, "important", "--top-k", "1"], [*optim, "best", "-"]], tmp_path)
    assert important.returncode == best.returncode == 0, important.stderr + best.stderr
    assert important.stdout.splitlines() == ["training.learning_rate"]
    with opened_study(storage_url, "plateau") as study:
        value, params = study.trials[lowest].value, study.trials[lowest].params
    assert value == pytest.approx(1.0 + 1e-6 * losses[lowest] / (1 + losses[lowest]), abs=1e-15)
    assert best.stderr.splitlines() == [
        f"best trial {lowest}: value {value:.6g} (metric error+loss; epoch 3: dev error 100.00%, "
        f"dev loss {losses[lowest]:.4f})"
    ]
    assert _ini_value(best.stdout, "training", "learning_rate") == repr(params["training.learning_rate"])


def test_importance_of_tied_values_is_an_error_for_every_evaluator_and_for_chaining(
    tmp_path: Path, data: Path
) -> None:
    """4 trials at 1.0 rank nothing: no evaluator's 0.5/0.5 (or fANOVA's traceback) passes on."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    spec = create_study(url, "tied", data, whitelist=LR_DOMINATED[:2], num_trials=4)
    fill_study(url, "tied", spec, 4, objective=lambda _values: 1.0)
    optim = ["optim", "--study-name", "tied", url]
    results = cli_many(
        [
            *([*optim, "important", "--evaluator", name] for name in sorted(EVALUATORS)),
            ["optim", "--study-name", "next", url, "init", "--from-study", "tied", "--top-k", "1"],
        ],
        tmp_path,
    )
    for done in results:
        assert done.returncode == 1, done.stderr
        assert done.stdout == ""
        assert_one_line_error(
            done, "all 4 complete trials of study 'tied' have the same value 1: importance is undefined"
        )
    with opened_study(url, "tied") as study:
        assert [s.study_name for s in study._storage.get_all_studies()] == ["tied"]  # no "next"


def test_important_ranks_a_seeded_sample_of_at_most_max_trials(
    filled: tuple[str, str, optuna.trial.FrozenTrial], tmp_path: Path
) -> None:
    """Ranking 10,000 trials took 20 s; a bounded sample keeps it quick, and says so."""
    url, name, _ = filled
    optim = ["optim", "--study-name", name, url, "important"]
    default, everything, sample, again, other_seed, negative = cli_many(
        [optim, [*optim, "--max-trials", "0"], [*optim, "--max-trials", "12"], [*optim, "--max-trials", "12"],
         [*optim, "--max-trials", "12", "--seed", "5"], [*optim, "--max-trials", "-1"]],
        tmp_path,
    )
    for done in (default, everything, sample, again, other_seed):
        assert done.returncode == 0, done.stderr
    assert everything.stdout == default.stdout and everything.stderr == default.stderr == ""  # 16 < 1000: all
    assert sample.stderr.splitlines() == [
        "ranked on a random sample of 12 of the 16 completed trials (seed 0; --max-trials 0 ranks all)"
    ]
    assert (again.stdout, again.stderr) == (sample.stdout, sample.stderr)  # the same seed, the same sample
    assert "(seed 5;" in other_seed.stderr
    assert sorted(sample.stdout.splitlines()) == sorted(LR_DOMINATED)
    assert_one_line_error(negative, "--max-trials must be >= 0")


def test_the_sample_is_read_back_as_optuna_has_the_trials(
    filled: tuple[str, str, optuna.trial.FrozenTrial], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagetune.optim import analysis
    from stagetune.optim.storage import storage_session

    url, name, _ = filled
    monkeypatch.setattr(analysis, "_IDS_PER_QUERY", 5)  # several IN lists
    with storage_session(url, heartbeat_interval=None) as storage:
        study = optuna.load_study(study_name=name, storage=storage)
        everything = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
        samples = [analysis.completed_in_memory(storage, study, max_trials=11, seed=seed) for seed in (0, 0, 1)]
        whole = analysis.completed_in_memory(storage, study, max_trials=16)
    first, same, other = ([t.number for t in view.trials] for view in samples)
    assert len(first) == len(set(first)) == 11 and first == sorted(first) and first == same
    assert other != first  # another seed, another sample
    assert all(view.total == 16 for view in samples) and whole.total == len(whole.trials) == 16
    for trial in samples[0].trials + whole.trials:
        full = everything[trial.number]
        assert (trial.value, trial.params, trial.distributions) == (full.value, full.params, full.distributions)
