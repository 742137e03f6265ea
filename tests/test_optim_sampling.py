"""Tests for stagetune.optim.sampling: which parameters a study tunes, and how trials sample them."""

from __future__ import annotations

import zlib
from pathlib import Path

import optuna
import pytest
from optim_helpers import cli, read_spec, write_speech_data

from stagetune.config import Config, active, field_info, flatten, iter_fields, load_config, with_values
from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.analysis import narrow_ranges
from stagetune.optim.registry import make_sampler
from stagetune.optim.sampling import (
    bounding_range,
    distribution_args,
    sample_config,
    sample_values,
    select_tunable,
    window_range,
)
from stagetune.space import Ref

TUNABLE = [i.name for i in iter_fields() if i.search_space() is not None]
RECURRENT = ("model.recurrent_size", "model.recurrent_type", "model.recurrent_bidirectional", "model.bidirectional_mode")


# --- white/blacklists ---------------------------------------------------------------------


def test_whitelist_is_a_full_match() -> None:
    chosen = select_tunable(Config(), whitelist=[r"model\.recurrent_.*", r"model\.bidirectional_mode"]).tuned
    assert chosen == ("model.recurrent_layers", *RECURRENT)
    assert select_tunable(Config(), whitelist=["training.learning_rate"]).tuned == (
        "training.learning_rate",
    )
    # Neither a suffix nor a prefix of a name is a match.
    for partial in ("learning_rate", "training.learning", r"model\.recurrent"):
        with pytest.raises(UsageError, match="matches no tunable parameter"):
            select_tunable(Config(), whitelist=[partial])


def test_blacklist_is_a_full_match_and_wins_over_the_whitelist() -> None:
    tuned = select_tunable(
        Config(), whitelist=[r"model\..*"], blacklist=[r"model\.convolutional_.*"]
    ).tuned
    assert tuned == ("model.frame_norm", "model.recurrent_layers", *RECURRENT)
    everything_but = select_tunable(Config(), blacklist=["data.batch_size"]).tuned
    # Less what never applies to a CTC study: the utt task's settings, adaptation's rho.
    never = {"model.pooling", "model.embedding_size", "training.margin", "training.margin_scale",
             "training.adapt_rho"}
    assert set(everything_but) == set(TUNABLE) - {"data.batch_size"} - never
    with pytest.raises(UsageError, match="matches no tunable parameter"):
        select_tunable(Config(), blacklist=["data.batch"])


def test_a_pattern_matching_nothing_names_the_valid_names() -> None:
    with pytest.raises(UsageError) as caught:
        select_tunable(Config(), whitelist=["model.recurent_size"])
    message = str(caught.value)
    assert "'model.recurent_size'" in message
    assert all(name in message.split() for name in TUNABLE)


def test_lists_that_leave_nothing_are_an_error() -> None:
    with pytest.raises(UsageError, match="no parameter to tune"):
        select_tunable(Config(), whitelist=["data.batch_size"], blacklist=["data.batch_size"])


def test_parameters_that_cannot_matter_are_dropped_with_a_reason() -> None:
    base = load_config((), ["model.recurrent_layers=0"])
    selection = select_tunable(base, blacklist=["model.recurrent_layers"])
    assert [name for name, _ in selection.dropped] == list(RECURRENT)
    assert all("model.recurrent_layers > 0" in why for _, why in selection.dropped)
    assert not set(RECURRENT) & set(selection.tuned)
    # While recurrent_layers is tuned, its dependants may become active: keep them.
    assert set(RECURRENT) <= set(select_tunable(base).tuned)


def test_init_prints_one_notice_per_dropped_parameter(tmp_path: Path) -> None:
    data = write_speech_data(tmp_path / "data")
    done = cli(
        ["--set", "model.recurrent_layers=0", "optim", "sqlite:///o.db", "init", data,
         "--blacklist", "model.recurrent_layers", "--num-trials", "3"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("created study o in sqlite:///o.db: tuning ")  # named after the file
    notices = done.stderr.strip().splitlines()
    assert len(notices) == len(RECURRENT), done.stderr
    for name, line in zip(RECURRENT, notices):
        assert line.startswith(f"not tuning {name}: model.recurrent_layers > 0 is false"), line
    spec = read_spec(f"sqlite:///{tmp_path / 'o.db'}", "o")
    assert not set(RECURRENT) & set(spec["tuned"])
    assert [name for name, _ in spec["dropped"]] == list(RECURRENT)
    assert "model.recurrent_layers" not in done.stdout.partition("(")[2]


# --- sampling -----------------------------------------------------------------------------


def test_conditional_parameters_are_only_sampled_when_active() -> None:
    tuned = ["model.recurrent_layers", "model.recurrent_size", "model.convolutional_layers",
             "model.convolutional_kernel_time"]
    # FixedTrial raises for any suggested name it was not given: these must not be asked for.
    off = sample_values(
        optuna.trial.FixedTrial({"model.recurrent_layers": 0, "model.convolutional_layers": 0}),
        Config(),
        tuned,
    )
    assert off == {"model.recurrent_layers": 0, "model.convolutional_layers": 0}
    on = sample_values(
        optuna.trial.FixedTrial(
            {"model.recurrent_layers": 2, "model.recurrent_size": 64,
             "model.convolutional_layers": 1, "model.convolutional_kernel_time": 5}
        ),
        Config(),
        tuned,
    )
    assert on == {"model.recurrent_layers": 2, "model.recurrent_size": 64,
                  "model.convolutional_layers": 1, "model.convolutional_kernel_time": 5}


def test_momentum_is_tuned_only_for_a_base_config_on_sgd() -> None:
    # sgd is not in the default search space (Adam and AdamW only): momentum is
    # then never asked for, unless the base config itself trains with sgd.
    tuned = ["training.optimizer", "training.momentum"]
    adam = sample_values(optuna.trial.FixedTrial({"training.optimizer": "adamw"}), Config(), tuned)
    assert adam == {"training.optimizer": "adamw"}
    sgd = with_values(Config(), {"training.optimizer": "sgd"})
    on = sample_values(optuna.trial.FixedTrial({"training.momentum": 0.5}), sgd, ["training.momentum"])
    assert on == {"training.momentum": 0.5}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize(("sampler", "num_samples"), [("random", 200), ("tpe", 40)])
def test_samples_respect_conditions_and_dependent_bounds(sampler: str, num_samples: int) -> None:
    study = optuna.create_study(sampler=make_sampler(sampler, 0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tuned = list(TUNABLE)
    seen_conv_layers = set()
    for _ in range(num_samples):
        trial = study.ask()
        config = sample_config(trial, Config(), tuned)  # validates every bound
        values = flatten(config)
        for name in tuned:
            info = field_info(name)
            assert (name in trial.params) == active(info, values), (name, trial.params)
            space = info.search_space()
            if name in trial.params and space is not None and space.choices is None:
                low, high = (b.resolve(values) if isinstance(b, Ref) else b for b in (space.low, space.high))
                assert low <= trial.params[name] <= high, (name, trial.params)
        if values["model.convolutional_layers"] > 0:
            assert 1 <= values["model.convolutional_factor_sched"] <= values["model.convolutional_layers"] + 1
            seen_conv_layers.add(values["model.convolutional_layers"])
        study.tell(trial, zlib.crc32(repr(sorted(trial.params.items())).encode()) / 2**32)
    if sampler == "random":
        assert seen_conv_layers == {1, 2, 3, 4}  # the bound was exercised at every width


# --- narrowed ranges (optim init --narrow) -------------------------------------------------


def test_a_bounding_range_keeps_the_declared_kind_and_bounds() -> None:
    rate, size, layers = (field_info(n) for n in ("training.learning_rate", "model.recurrent_size",
                                                   "model.recurrent_layers"))
    assert bounding_range(rate, [2e-3, 1e-3, 5e-3]) == [1e-3, 5e-3]
    assert bounding_range(size, [40, 100, 64]) == [40, 100]
    # One value: an integer widens to its neighbours, within the declared bounds ...
    assert bounding_range(size, [64, 64]) == [63, 65]
    assert bounding_range(size, [16]) == [16, 17] and bounding_range(layers, [4]) == [3, 4]
    # ... a continuous or categorical parameter, or one never seen, keeps its declared range.
    assert bounding_range(rate, [1e-3, 1e-3]) is None
    assert bounding_range(field_info("model.recurrent_type"), ["gru", "lstm"]) is None
    assert bounding_range(rate, []) is None


def test_a_window_around_the_base_holds_it_and_keeps_its_width_inside_the_range() -> None:
    rate, layers, dropout, decay = (field_info(n) for n in (
        "training.learning_rate", "model.recurrent_layers", "training.dropout_prob", "training.weight_decay"))
    # log [3e-4, 3e-2]: a quarter of its two decades is half a decade, centred on the value
    low, high = window_range(rate, 4e-3, 0.25)
    assert low == pytest.approx(4e-3 / 10**0.25) and high == pytest.approx(4e-3 * 10**0.25)
    # near an edge the window slides in, keeping its width: [0, 0.4] -> [0, 0.1] around 0.01
    assert window_range(dropout, 0.01, 0.25) == pytest.approx([0.0, 0.1])
    low, high = window_range(rate, 3e-2, 0.25)
    assert high == pytest.approx(3e-2) and low == pytest.approx(3e-2 / 10**0.5)
    # integers round outwards and keep a step on each side the range allows
    assert window_range(layers, 2, 0.25) == [1, 3] and window_range(layers, 0, 0.1) == [0, 1]
    # a value outside a log range (weight decay 0) is moved into it first, and the window holds that
    assert window_range(decay, 0.0, 0.25)[0] == pytest.approx(1e-6)
    assert window_range(layers, 2, 1.0) == [0, 4]
    assert window_range(field_info("model.recurrent_type"), 0, 0.25) is None


def test_narrowed_ranges_are_clipped_to_a_dependent_bound_when_sampling() -> None:
    info = field_info("model.convolutional_factor_sched")  # in [1, model.convolutional_layers + 1]
    assert isinstance(info.search_space().high, Ref)
    ranges = {info.name: [3, 4]}

    def bounds(conv_layers: int) -> tuple[int, int]:
        kind, kwargs = distribution_args(info, {"model.convolutional_layers": conv_layers}, ranges)
        assert kind == "int"
        return kwargs["low"], kwargs["high"]

    assert bounds(4) == (3, 4)
    assert bounds(2) == (3, 3)
    assert bounds(1) == (2, 2)  # wholly above the bound: the nearest value that is valid
    assert distribution_args(info, {"model.convolutional_layers": 1})[1]["high"] == 2  # no ranges


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_trials_sample_the_narrowed_ranges() -> None:
    study = optuna.create_study(sampler=make_sampler("random", 0))
    tuned = ["training.learning_rate", "model.recurrent_size", "model.recurrent_type"]
    ranges = {"training.learning_rate": [1e-3, 2e-3], "model.recurrent_size": [60, 64]}
    seen = {name: set() for name in tuned}
    for _ in range(60):
        trial = study.ask()
        values = flatten(sample_config(trial, Config(), tuned, ranges))
        for name in tuned:
            seen[name].add(values[name])
        study.tell(trial, 0.0)
    assert 1e-3 <= min(seen["training.learning_rate"]) <= max(seen["training.learning_rate"]) <= 2e-3
    assert seen["model.recurrent_size"] == {60, 61, 62, 63, 64}
    assert seen["model.recurrent_type"] == {"lstm", "gru"}  # categorical: all its choices


def test_narrow_ranges_spans_the_best_fraction_of_completed_trials() -> None:
    study = optuna.create_study()
    rate = optuna.distributions.FloatDistribution(3e-4, 3e-2, log=True)
    kind = optuna.distributions.CategoricalDistribution(["lstm", "gru"])
    for value, lr in [(0.5, 1e-3), (0.1, 4e-3), (0.9, 2e-2), (0.2, 2e-3), (0.3, 5e-4), (0.7, 1e-2)]:
        study.add_trial(optuna.trial.create_trial(
            params={"training.learning_rate": lr, "model.recurrent_type": "gru"},
            distributions={"training.learning_rate": rate, "model.recurrent_type": kind}, value=value,
        ))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    names = ["training.learning_rate", "model.recurrent_type", "training.dropout_prob"]
    # The best third: trials 1 and 3; a quarter still takes the least, 2 trials.
    for quantile in (1 / 3, 0.25):
        assert narrow_ranges(study, names, quantile) == ({"training.learning_rate": [2e-3, 4e-3]}, [1, 3])
    assert narrow_ranges(study, names, 0.5)[0] == {"training.learning_rate": [5e-4, 4e-3]}
    assert narrow_ranges(study, names, 1.0) == ({"training.learning_rate": [5e-4, 2e-2]}, [0, 1, 2, 3, 4, 5])
    # Trials that --enqueue-best queues lie inside.
    assert narrow_ranges(study, names, 0.25, at_least=3) == ({"training.learning_rate": [5e-4, 4e-3]}, [1, 3, 4])
    with pytest.raises(UsageError, match=r"--narrow must be in \(0, 1\], got 0"):
        narrow_ranges(study, names, 0)
    single = optuna.create_study()
    single.add_trial(study.trials[0])
    with pytest.raises(StagetuneError, match="1 completed trial; --narrow needs at least 2"):
        narrow_ranges(single, names, 0.5)
