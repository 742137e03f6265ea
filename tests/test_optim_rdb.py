"""stagetune's RDBStorage (stagetune.optim.rdb) on every backend: batched parameter
writes and claims on the lock connection, against real databases.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import pickle
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
import sqlalchemy
from optim_helpers import create_study, opened_study, write_speech_data
from optuna.study import StudyDirection
from sqlalchemy import event
from sqlalchemy.pool import Pool

import stagetune.optim.storage
from stagetune.optim.rdb import StagetuneStorage
from stagetune.optim.sampling import sample_config
from stagetune.optim.storage import close_storage, open_storage
from stagetune.optim.study import load_study
from stagetune.optim.worker import WorkerOptions, run_worker


@pytest.fixture
def full_study(storage_url: str, tmp_path: Path) -> Iterator[tuple[Any, optuna.Study, Any]]:
    """A study over the whole search space (no whitelist), opened as a worker opens it."""
    create_study(storage_url, "rdb", write_speech_data(tmp_path / "data"), num_trials=50)
    storage = open_storage(storage_url, heartbeat_interval=None)
    study, spec = load_study(storage, "rdb", storage_url, sampler=optuna.samplers.RandomSampler(seed=3))
    try:
        yield storage, study, spec
    finally:
        close_storage(storage)


def _count(engine: sqlalchemy.Engine) -> dict[str, Any]:
    counts: dict[str, Any] = {"commits": 0, "statements": [], "param_inserts": 0}

    def on_commit(conn: Any) -> None:
        counts["commits"] += 1

    def on_execute(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        counts["statements"].append(statement)
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_PARAMS"):
            counts["param_inserts"] += 1

    event.listen(engine, "commit", on_commit)
    event.listen(engine, "before_cursor_execute", on_execute)
    return counts


def _stored(url: str, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
    with opened_study(url, "rdb") as study:
        trial = study.get_trials(deepcopy=False)[number]
        return trial.params, trial.distributions


def test_a_trials_parameters_are_written_in_one_transaction(storage_url: str, full_study: Any) -> None:
    storage, study, spec = full_study
    counts = _count(storage.engine)
    for _ in range(2):  # the first trial of a process also looks up stored distributions
        trial = study.ask()
        before, inserts = counts["commits"], counts["param_inserts"]
        with storage.batched_params(trial._trial_id):
            sample_config(trial, spec.config(), spec.tuned)
            assert counts["param_inserts"] == inserts  # nothing written while sampling
            assert counts["commits"] == before
        assert counts["commits"] - before == 1
        assert len(trial.params) > 20, trial.params
        params, distributions = _stored(storage_url, trial.number)
        assert params == trial.params
        assert distributions == trial.distributions
        study.tell(trial, 1.0)
    # Optuna itself writes each parameter in its own transaction.
    trial = study.ask()
    before = counts["commits"]
    sample_config(trial, spec.config(), spec.tuned)
    assert counts["commits"] - before == len(trial.params)


def test_parameters_sampled_before_an_error_are_kept(storage_url: str, full_study: Any) -> None:
    storage, study, _ = full_study
    trial = study.ask()
    with pytest.raises(ValueError, match="objective broke"):
        with storage.batched_params(trial._trial_id):
            trial.suggest_float("training.learning_rate", 1e-4, 1e-1, log=True)
            trial.suggest_int("data.batch_size", 2, 32)
            raise ValueError("objective broke")
    params, _ = _stored(storage_url, trial.number)
    assert params == trial.params and set(params) == {"training.learning_rate", "data.batch_size"}
    # after the block, writes are immediate again
    trial.suggest_categorical("model.recurrent_type", ["lstm", "gru"])
    assert "model.recurrent_type" in _stored(storage_url, trial.number)[0]


def test_a_failed_write_keeps_every_parameter_for_the_retry(storage_url: str, full_study: Any) -> None:
    storage, study, spec = full_study
    trial = study.ask()
    failures = {"left": 1}

    def break_once(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TRIAL_PARAMS") and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("the connection was cut")

    attempts = []

    def write(flush: Any) -> None:  # what the worker's retry_transient does, in short
        for attempt in range(3):
            attempts.append(attempt)
            try:
                return flush()
            except Exception:
                if attempt == 2:
                    raise

    event.listen(storage.engine, "before_cursor_execute", break_once)
    with storage.batched_params(trial._trial_id, write=write):
        sample_config(trial, spec.config(), spec.tuned)
    assert attempts == [0, 1]
    params, _ = _stored(storage_url, trial.number)
    assert params == trial.params and len(params) > 20


@pytest.mark.server
@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_claims_open_no_connection_per_trial(backend: str, make_storage_url: Any, tmp_path: Path) -> None:
    """With one pooled connection per worker, the budget lock's connection also claims the trial."""
    url = make_storage_url(backend)
    create_study(url, "rdb", write_speech_data(tmp_path / "data"), num_trials=20)
    connects = []

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        connects.append(1)

    event.listen(Pool, "connect", on_connect)
    try:
        summary = run_worker(url, "rdb", WorkerOptions(sampler="random", seed=1, objective="quadratic"),
                             log=lambda _m: None)
    finally:
        event.remove(Pool, "connect", on_connect)
    assert summary.counts["COMPLETE"] == 20
    # opening, plus a second connection the first time both are needed at once; it
    # was one more per trial when the claim took a second connection from the pool
    assert len(connects) <= 3, len(connects)


def test_every_kind_of_statement_failing_once_loses_and_doubles_nothing(
    storage_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient error on the first statement of each kind (claim, lock, parameters,
    heartbeat, report, ...): the worker retries each and meets the budget exactly."""
    # ~20 kinds fail one after another; without this the backoff alone takes a minute
    monkeypatch.setattr(stagetune.optim.storage, "_RETRY_MAX_DELAY_S", 0.25)
    create_study(storage_url, "faults", write_speech_data(tmp_path / "data"), num_trials=6)
    failed: list[str] = []
    lines: list[str] = []  # the worker's log; its first line says the study is open

    def fail_first_of_each_kind(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        kind = " ".join(statement.split()[:3]).upper()
        if lines and kind not in failed:  # opening is not retried (a wrong URL fails at once)
            failed.append(kind)
            raise sqlalchemy.exc.OperationalError(statement, {}, Exception("server closed the connection unexpectedly"))

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", fail_first_of_each_kind)
    try:
        summary = run_worker(
            storage_url, "faults", WorkerOptions(sampler="random", seed=1, objective="quadratic"), log=lines.append
        )
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", fail_first_of_each_kind)
    assert summary.counts == {"COMPLETE": 6, "PRUNED": 0, "FAIL": 0, "HANDED_BACK": 0}, (summary.counts, lines)
    kinds = "\n".join(failed)
    for needed in ("INSERT INTO TRIALS", "INSERT INTO TRIAL_PARAMS", "INSERT INTO TRIAL_HEARTBEATS", "UPDATE TRIALS SET"):
        assert needed in kinds, kinds
    with opened_study(storage_url, "faults") as study:
        trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    # claims cut off after creating their trial leave FAILed trials, never a taken slot
    assert states["COMPLETE"] == 6 and set(states) <= {"COMPLETE", "FAIL"}, (states, lines)
    assert all(len(t.params) > 20 for t in trials if t.state.name == "COMPLETE")
    assert any("retrying" in line for line in lines), lines
    # a claim cut off after creating its trial: the next claim takes that trial on (no FAIL row)
    assert any("claimed but never started" in line for line in lines), lines


def test_a_study_and_its_attributes_are_created_in_one_commit(tmp_path: Path) -> None:
    """Contract with optuna's private models: readers never see a study without its spec."""
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat_interval=None)
    try:
        events: list[str] = []
        event.listen(storage.engine, "commit", lambda conn: events.append("COMMIT"))
        event.listen(storage.engine, "before_cursor_execute",
                     lambda conn, cursor, statement, *rest: events.append(statement.split("(")[0].strip()))
        storage.create_study_with_attrs("s", StudyDirection.MINIMIZE, {"spec": {"a": [1, 2]}, "n": 3})
        inserts = [e for e in events if e.startswith("INSERT")]
        assert events[: events.index("COMMIT")] == inserts, events  # every row, then one commit
        assert set(inserts) == {"INSERT INTO studies", "INSERT INTO study_directions",
                                "INSERT INTO study_user_attributes"}
        study = optuna.load_study(study_name="s", storage=storage)
        assert study.user_attrs == {"spec": {"a": [1, 2]}, "n": 3} and study.direction == StudyDirection.MINIMIZE
        with pytest.raises(optuna.exceptions.DuplicatedStudyError):
            storage.create_study_with_attrs("s", StudyDirection.MINIMIZE, {"spec": "other"})
        assert optuna.load_study(study_name="s", storage=storage).user_attrs["spec"] == {"a": [1, 2]}
    finally:
        close_storage(storage)


# --- optuna's storage contract (issue 9: findings of optuna's own storage tests) ---------


def test_the_storage_pickles_and_the_copy_works(storage_url: str) -> None:
    """A study pickles (spawned processes, joblib, dask), also while a batch is open."""
    storage = open_storage(storage_url, heartbeat_interval=None)
    try:
        study = optuna.create_study(study_name="p", storage=storage)
        trial = study.ask()
        with storage.batched_params(trial._trial_id):
            trial.suggest_float("x", 0.0, 1.0)
            copy = pickle.loads(pickle.dumps(study))  # the buffered parameter stays here
        restored = copy._storage._backend
        assert isinstance(restored, StagetuneStorage) and restored.engine is not storage.engine
        assert restored._pending == {}
        copy.optimize(functools.partial(optuna.trial.Trial.suggest_float, name="x", low=0.0, high=1.0), n_trials=2)
        other = copy.ask()
        with restored.batched_params(other._trial_id):  # batching works in the copy
            other.suggest_float("x", 0.0, 1.0)
            other.suggest_int("n", 1, 3)
        copy.tell(other, 0.5)
        close_storage(restored)
        trials = optuna.load_study(study_name="p", storage=storage).get_trials(deepcopy=False)
        assert [sorted(t.params) for t in trials] == [["x"], ["x"], ["x"], ["n", "x"]]
        assert [t.state.name for t in trials] == ["RUNNING", "COMPLETE", "COMPLETE", "COMPLETE"]
    finally:
        close_storage(storage)


def test_a_pickled_study_optimizes_in_a_spawned_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'spawn.db'}"
    storage = open_storage(url, heartbeat_interval=None)
    try:
        study = optuna.create_study(study_name="spawned", storage=storage)
        objective = functools.partial(optuna.trial.Trial.suggest_float, name="x", low=0.0, high=1.0)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(study.optimize, objective, n_trials=3).result(timeout=120)
        assert [t.state.name for t in study.get_trials(deepcopy=False)] == ["COMPLETE"] * 3
    finally:
        close_storage(storage)


def test_a_study_recreated_by_another_process_is_not_confused_with_its_old_id(tmp_path: Path) -> None:
    """SQLite gives a deleted study's id to the next study: a name -> id cache kept across
    batches sent this storage's writes to that other study."""
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    mine = open_storage(url, heartbeat_interval=None)
    other = open_storage(url, heartbeat_interval=None)  # the other process's storage
    try:
        study = optuna.create_study(study_name="s", storage=mine, pruner=optuna.pruners.HyperbandPruner())
        old_id = study._study_id
        trial = study.ask()
        counts = _count(mine.engine)
        with mine.batched_params(trial._trial_id):
            for name in "abcdef":  # HyperbandPruner looks the study up twice per parameter
                trial.suggest_float(name, 0.0, 1.0)
        lookups = [s for s in counts["statements"] if "studies.study_name =" in s]
        assert len(lookups) <= 1, lookups  # while sampling the id is looked up once
        study.tell(trial, 1.0)

        optuna.delete_study(study_name="s", storage=other)
        assert optuna.create_study(study_name="t", storage=other)._study_id == old_id  # SQLite reuses it
        optuna.create_study(study_name="s", storage=other)

        again = optuna.load_study(study_name="s", storage=mine)
        again.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=2)
        again.set_user_attr("owner", "s")
        t_study = optuna.load_study(study_name="t", storage=other)
        s_study = optuna.load_study(study_name="s", storage=other)
        assert t_study.trials == [] and t_study.user_attrs == {}
        assert len(s_study.trials) == 2 and s_study.user_attrs == {"owner": "s"}
    finally:
        close_storage(mine)
        close_storage(other)


def _sample_with_an_incompatible_parameter(storage: Any, batch: Any, *, escape: bool) -> dict[str, Any]:
    """Trial 0 stores x as a float; trial 1 samples a, x as an int (incompatible), b.

    Returns trial 1's parameters as stored. ``escape``: the ValueError leaves the
    sampling (a trial killed while sampling) instead of being caught at the suggest.
    """
    study = optuna.create_study(study_name="c", storage=storage)
    first = study.ask()
    first.suggest_float("x", 0.0, 1.0)
    study.tell(first, 1.0)
    # a fresh Study (another process) knows no distribution yet: the storage is asked
    trial = optuna.load_study(study_name="c", storage=storage).ask()
    try:
        with batch(trial._trial_id):
            trial.suggest_float("a", 0.0, 1.0)
            if escape:
                trial.suggest_int("x", 0, 10)
            with pytest.raises(ValueError, match="[Cc]annot set different distribution"):
                trial.suggest_int("x", 0, 10)
            trial.suggest_categorical("b", ["u", "v"])
    except ValueError:
        assert escape
    assert "x" not in trial.params
    stored = optuna.load_study(study_name="c", storage=storage).trials[1].params
    assert stored == trial.params
    return stored


@pytest.mark.parametrize("escape", [False, True], ids=["caught", "escapes"])
def test_an_incompatible_distribution_raises_at_its_suggest_and_keeps_the_others(
    storage_url: str, tmp_path: Path, escape: bool
) -> None:
    storage = open_storage(storage_url, heartbeat_interval=None)
    try:
        stored = _sample_with_an_incompatible_parameter(storage, storage.batched_params, escape=escape)
    finally:
        close_storage(storage)
    # what optuna's own storage keeps, parameter by parameter
    plain = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        expected = _sample_with_an_incompatible_parameter(plain, lambda _id: contextlib.nullcontext(), escape=escape)
    finally:
        plain.engine.dispose()
    assert stored.keys() == expected.keys() == ({"a"} if escape else {"a", "b"})


def test_a_parameter_set_twice_in_a_batch_keeps_the_first_as_optuna_does(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'twice.db'}", heartbeat_interval=None)
    try:
        study_id = storage.create_new_study([StudyDirection.MINIMIZE], "twice")
        trial_id = storage.create_new_trial(study_id)
        distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
        with storage.batched_params(trial_id):
            storage.set_trial_param(trial_id, "x", 0.25, distribution)
            storage.set_trial_param(trial_id, "y", 0.5, distribution)
            storage.set_trial_param(trial_id, "x", 0.75, distribution)  # ignored, as optuna ignores it
            with pytest.raises(ValueError):
                storage.set_trial_param(trial_id, "x", 1, optuna.distributions.IntDistribution(0, 3))
        assert storage.get_trial(trial_id).params == {"x": 0.25, "y": 0.5}
    finally:
        close_storage(storage)


def test_a_distribution_unchecked_while_the_database_was_away_is_checked_at_the_write(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'away.db'}", heartbeat_interval=None)
    try:
        study = optuna.create_study(study_name="away", storage=storage)
        first = study.ask()
        first.suggest_float("x", 0.0, 1.0)
        study.tell(first, 1.0)
        trial = optuna.load_study(study_name="away", storage=storage).ask()

        def cut_the_lookup(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            if "trial_params.distribution_json" in statement and "LIMIT" in statement.upper():
                raise sqlalchemy.exc.OperationalError(statement, {}, Exception("server closed the connection unexpectedly"))

        with pytest.raises(ValueError, match="incompatible distributions not stored: x"):
            with storage.batched_params(trial._trial_id):
                event.listen(storage.engine, "before_cursor_execute", cut_the_lookup)
                try:
                    trial.suggest_float("a", 0.0, 1.0)
                    trial.suggest_int("x", 0, 10)  # cannot be checked now
                    trial.suggest_float("b", 0.0, 1.0)
                finally:
                    event.remove(storage.engine, "before_cursor_execute", cut_the_lookup)
        assert set(storage.get_trial(trial._trial_id).params) == {"a", "b"}
    finally:
        close_storage(storage)
