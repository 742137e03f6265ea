"""The learning-rate schedule (``stagetune.schedule``) and the batch size on small corpora.

What users rely on: the warm-up counts optimizer updates; the plateau rule never
fires while a CTC model emits only blanks (the trap that kept a 31-utterance
corpus at 87% training error: nine halvings of the learning rate before the
model ever emitted a token); a short run is the exact prefix of a longer one;
tiny corpora still get enough updates per epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagetune.config import Config, DataConfig, TrainingConfig, apply_overrides
from stagetune.metrics import ErrorCounts
from stagetune.schedule import LearningRateSchedule, emits_only_blanks
from test_training import corpus, data_dir, exact_history, fit_quiet, make_config  # noqa: F401 (fixtures)

torch.set_num_threads(1)

ALL_BLANK = ErrorCounts(deletions=20, ref_length=20, utterances=4)
SOME_TOKENS = ErrorCounts(substitutions=3, deletions=5, ref_length=20, utterances=4)


def _schedule(**training: object) -> LearningRateSchedule:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return LearningRateSchedule(optimizer, TrainingConfig(**training))


def test_warmup_rises_linearly_per_update_to_the_peak() -> None:
    schedule = _schedule(learning_rate=0.01, warmup_updates=4)
    seen = [schedule.optimizer.param_groups[0]["lr"]]
    for _ in range(6):
        schedule.step()
        seen.append(schedule.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01, 0.01, 0.01])


def test_no_warmup_starts_at_the_peak() -> None:
    schedule = _schedule(learning_rate=0.01, warmup_updates=0)
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_plateau_never_fires_while_only_blanks_are_emitted() -> None:
    schedule = _schedule(learning_rate=0.01, warmup_updates=0, reduce_lr_patience=0, reduce_lr_patience_updates=0)
    for _ in range(50):
        schedule.step()
        assert not schedule.validated(1.0, ALL_BLANK)
    assert schedule.lr == pytest.approx(0.01)


def test_plateau_fires_after_patience_once_tokens_appear() -> None:
    schedule = _schedule(
        learning_rate=0.01, warmup_updates=0, reduce_lr_patience=2, reduce_lr_factor=0.5,
        reduce_lr_patience_updates=0,
    )
    assert not schedule.validated(0.4, SOME_TOKENS)  # first: the best so far
    assert not schedule.validated(0.4, SOME_TOKENS)
    assert not schedule.validated(0.5, SOME_TOKENS)
    assert schedule.validated(0.4, SOME_TOKENS)  # the third without improvement
    assert schedule.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert not schedule.validated(0.3, SOME_TOKENS)


def test_patience_also_counts_updates_since_the_best() -> None:
    """A 31-utterance epoch is 31 updates: two bad epochs must not halve the rate."""
    schedule = _schedule(
        learning_rate=0.01, warmup_updates=0, reduce_lr_patience=1, reduce_lr_patience_updates=100
    )
    assert not schedule.validated(0.5, SOME_TOKENS)
    for epoch in range(1, 4):
        for _ in range(31):
            schedule.step()
        assert not schedule.validated(0.6, SOME_TOKENS), epoch  # 31, 62, 93 updates
    for _ in range(31):
        schedule.step()
    assert schedule.validated(0.6, SOME_TOKENS)  # 124 updates since the best
    assert schedule.lr == pytest.approx(0.005)


def test_burnin_counts_updates() -> None:
    schedule = _schedule(
        learning_rate=0.01, warmup_updates=0, reduce_lr_patience=0, reduce_lr_burnin_updates=10,
        reduce_lr_patience_updates=0,
    )
    for _ in range(9):
        schedule.step()
    assert not schedule.validated(0.5, SOME_TOKENS)
    assert not schedule.validated(0.5, SOME_TOKENS)
    schedule.step()
    assert not schedule.validated(0.5, SOME_TOKENS)  # armed now: first value is the best
    assert schedule.validated(0.5, SOME_TOKENS)


def test_factor_one_disables_reductions() -> None:
    schedule = _schedule(warmup_updates=0, reduce_lr_factor=1.0, reduce_lr_patience=0, reduce_lr_patience_updates=0)
    assert not any(schedule.validated(0.5, SOME_TOKENS) for _ in range(10))


def test_state_round_trip_restores_the_learning_rate() -> None:
    schedule = _schedule(learning_rate=0.01, warmup_updates=10, reduce_lr_patience=0, reduce_lr_patience_updates=0)
    for _ in range(3):
        schedule.step()
    schedule.validated(0.5, SOME_TOKENS)
    schedule.validated(0.6, SOME_TOKENS)
    restored = _schedule(learning_rate=0.01, warmup_updates=10, reduce_lr_patience=0, reduce_lr_patience_updates=0)
    restored.load_state_dict(schedule.state_dict())
    assert restored.state_dict() == schedule.state_dict()
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr)


def test_emits_only_blanks_means_every_reference_token_deleted() -> None:
    assert emits_only_blanks(ALL_BLANK)
    assert not emits_only_blanks(SOME_TOKENS)
    assert not emits_only_blanks(ErrorCounts())


@pytest.mark.parametrize(
    "utterances, expected", [(31, 1), (16, 1), (5, 1), (256, 4), (514, 8), (1024, 16), (100_000, 16)]
)
def test_small_corpora_get_smaller_batches(utterances: int, expected: int) -> None:
    assert DataConfig().batch_size_for(utterances) == expected
    batches = -(-utterances // expected)
    assert batches >= min(64, utterances)


def test_min_batches_per_epoch_one_keeps_the_batch_size() -> None:
    config = apply_overrides(Config(), ["data.min_batches_per_epoch=1", "data.batch_size=8"])
    assert config.data.batch_size_for(3) == 3
    assert config.data.batch_size_for(300) == 8


def test_a_short_run_is_the_prefix_of_a_longer_one(tmp_path: Path, corpus) -> None:
    """Same seed: 2 epochs give the first 2 rows of 4 (what short trials rely on)."""
    settings = (
        "training.warmup_updates=7",
        "training.reduce_lr_patience=0",
        "training.reduce_lr_patience_updates=0",
    )
    fit_quiet(make_config(*settings, "training.num_epochs=2"), corpus, tmp_path / "short")
    fit_quiet(make_config(*settings, "training.num_epochs=4"), corpus, tmp_path / "long")
    assert exact_history(tmp_path / "short") == exact_history(tmp_path / "long")[:2]
