"""The one module that touches optuna's private API.

stagetune needs a few things optuna keeps private: the ids behind a ``Study`` and a
``Trial``, the storage a study talks to, the ``tell`` that ``study.optimize`` uses,
its SQLAlchemy models (tables, sessions), the stored form of a trial's state, and
two ``RDBStorage`` methods it overrides (a trial's parameter writes, the stale-trial
sweep).  They are all reached through here, under public names, and every one of
them is listed in :data:`CONTRACT`; ``tests/test_optuna_contract.py`` checks that
list against the installed optuna, so an optuna release that moves one fails there,
naming it. ``tests/test_layering.py`` checks that no other module reaches in.

Raw SQL elsewhere takes its table names (:data:`STUDIES`, :data:`TRIALS`, ...) and
state values (:class:`DbState`) from here, never as literals; the columns it names
are those of :data:`SQL_COLUMNS`, which the contract test checks too.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session, _VersionManager
from optuna.study._tell import _tell_with_warning
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import select

__all__ = [
    "CONTRACT",
    "SQL_COLUMNS",
    "models",
    "create_scoped_session",
    "study_id_of",
    "storage_of",
    "trial_id_of",
    "tell_with_warning",
    "ask_new_trial",
    "trials_with_system_attrs",
    "HookedRDBStorage",
    "StudyView",
    "DbState",
    "STUDIES",
    "TRIALS",
    "TRIAL_VALUES",
    "TRIAL_PARAMS",
    "TRIAL_HEARTBEATS",
    "TRIAL_USER_ATTRS",
    "TRIAL_SYSTEM_ATTRS",
    "OPTUNA_TABLES",
]

#: Every private optuna name stagetune relies on: ``(where, name, parameters)``; ``where``
#: is a module or ``module:Class``, ``parameters`` the leading parameters of a callable
#: (None: not a callable, or an instance attribute checked on a live object).
CONTRACT: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("optuna.storages._rdb", "models", None),
    ("optuna.storages._rdb.models", "BaseModel", None),
    ("optuna.storages._rdb.models", "NOT_FOUND_MSG", None),
    ("optuna.storages._rdb.models", "StudyModel", None),
    ("optuna.storages._rdb.models", "StudyDirectionModel", None),
    ("optuna.storages._rdb.models", "StudyUserAttributeModel", None),
    ("optuna.storages._rdb.models", "StudySystemAttributeModel", None),
    ("optuna.storages._rdb.models", "TrialModel", None),
    ("optuna.storages._rdb.models", "TrialParamModel", None),
    ("optuna.storages._rdb.models", "TrialValueModel", None),
    ("optuna.storages._rdb.models", "TrialHeartbeatModel", None),
    ("optuna.storages._rdb.models", "TrialSystemAttributeModel", None),
    ("optuna.storages._rdb.models:TrialModel", "find_or_raise_by_id", ("trial_id", "session")),
    ("optuna.storages._rdb.storage", "_create_scoped_session", ("scoped_session", "ignore_integrity_error")),
    ("optuna.study._tell", "_tell_with_warning", ("study", "trial", "value_or_values", "state")),
    (
        "optuna.storages:RDBStorage",
        "_set_trial_param",
        ("self", "trial_id", "param_name", "param_value_internal", "distribution", "previous_distribution"),
    ),
    ("optuna.storages:RDBStorage", "_get_stale_trial_ids", ("self", "study_id")),
    ("optuna.storages:RDBStorage", "_version_manager", None),
    ("optuna.storages._rdb.storage", "_VersionManager", None),
    ("optuna.storages._rdb.storage:_VersionManager", "check_table_schema_compatibility", ("self",)),
    ("optuna.storages._rdb.storage:_VersionManager", "_init_alembic", ("self",)),
    ("optuna.study:Study", "_is_multi_objective", ("self",)),
    ("optuna.study:Study", "_study_id", None),
    ("optuna.study:Study", "_storage", None),
    ("optuna.study:Study", "_thread_local", None),
    ("optuna.trial:Trial", "_trial_id", None),
    ("optuna.trial:FrozenTrial", "_trial_id", None),
)

# Table names, from optuna's models.
STUDIES = models.StudyModel.__tablename__
TRIALS = models.TrialModel.__tablename__
TRIAL_VALUES = models.TrialValueModel.__tablename__
TRIAL_PARAMS = models.TrialParamModel.__tablename__
TRIAL_HEARTBEATS = models.TrialHeartbeatModel.__tablename__
TRIAL_USER_ATTRS = models.TrialUserAttributeModel.__tablename__
TRIAL_SYSTEM_ATTRS = models.TrialSystemAttributeModel.__tablename__

#: The tables of an optuna database (optuna's own models, plus alembic's revision table).
OPTUNA_TABLES = frozenset(models.BaseModel.metadata.tables) | {"alembic_version"}

#: The columns stagetune's raw SQL names, by table (the contract test checks each exists).
SQL_COLUMNS: dict[str, frozenset[str]] = {
    STUDIES: frozenset({"study_id", "study_name"}),
    TRIALS: frozenset({"trial_id", "study_id", "number", "state", "datetime_start", "datetime_complete"}),
    TRIAL_VALUES: frozenset({"trial_id", "objective", "value"}),
    TRIAL_PARAMS: frozenset({"trial_id", "param_name", "param_value", "distribution_json"}),
    TRIAL_HEARTBEATS: frozenset({"trial_id", "heartbeat"}),
    TRIAL_USER_ATTRS: frozenset({"trial_id", "key", "value_json"}),
    TRIAL_SYSTEM_ATTRS: frozenset({"trial_id", "key", "value_json"}),
}


class DbState:
    """A trial state as ``trials.state`` stores it (its :class:`~optuna.trial.TrialState` name)."""

    RUNNING = TrialState.RUNNING.name
    WAITING = TrialState.WAITING.name
    COMPLETE = TrialState.COMPLETE.name
    PRUNED = TrialState.PRUNED.name
    FAIL = TrialState.FAIL.name


#: ``with create_scoped_session(storage.scoped_session[, ignore_integrity_error]) as session``:
#: optuna's transaction (commit on exit, its errors as ``StorageInternalError``).
create_scoped_session = _create_scoped_session


def check_schema(storage: optuna.storages.RDBStorage) -> None:
    """optuna's schema check (what ``RDBStorage(skip_compatibility_check=False)`` runs).

    Raises:
        RuntimeError: The database's schema is another optuna version's.
    """
    storage._version_manager.check_table_schema_compatibility()


def study_id_of(study: optuna.Study) -> int:
    """The storage's id of ``study``."""
    return study._study_id


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage ``study`` talks to (optuna's cache in front of an ``RDBStorage``)."""
    return study._storage


def trial_id_of(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (a live ``Trial`` or a ``FrozenTrial``)."""
    return trial._trial_id


def tell_with_warning(
    study: optuna.Study,
    trial: optuna.Trial | int,
    value_or_values: float | Sequence[float] | None = None,
    state: TrialState | None = None,
) -> Any:
    """Optuna's own ``tell``, as ``study.optimize`` uses it.

    The public ``Study.tell`` reads the trial back for a deep copy that stagetune
    does not need.
    """
    return _tell_with_warning(study, trial, value_or_values, state)


def ask_new_trial(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` for a study with no WAITING trial: a new trial, without reading the queue.

    ``Study.ask`` first looks for a WAITING trial to pop, through optuna's storage
    cache, whose first read loads every trial of the study with all its parameters
    and attributes (seconds per thousand trials). When the caller knows nothing is
    waiting (counted under the budget lock, where trials are queued), that read is
    skipped; the rest is what ``ask`` does: the per-trial cache of the study's trials
    is reset, the trial is created through the storage cache (which learns it), and
    a ``Trial`` is made of it. A sampler that reads the history (TPE) still does.
    """
    study._thread_local.cached_all_trials = None  # as ask: samplers see this trial's history afresh
    trial_id = study._storage.create_new_trial(study._study_id)
    return optuna.Trial(study, trial_id)


def trials_with_system_attrs(storage: optuna.storages.RDBStorage, study_id: int) -> list[FrozenTrial]:
    """The study's FAIL trials and its trials with system attributes, in two light queries.

    Each is a ``FrozenTrial`` carrying its number, id, state and system attributes
    only (no parameters, values, times or user attributes): what telling failures
    apart (handed back, stale, failed; see ``stagetune.optim.status``) reads, for
    a fraction of optuna's full loading of every trial.
    """
    trials_t = models.TrialModel.__table__
    attrs_t = models.TrialSystemAttributeModel.__table__
    with storage.engine.connect() as conn:
        rows = conn.execute(
            select(trials_t.c.trial_id, trials_t.c.number, trials_t.c.state, attrs_t.c.key, attrs_t.c.value_json)
            .select_from(trials_t.join(attrs_t, attrs_t.c.trial_id == trials_t.c.trial_id))
            .where(trials_t.c.study_id == study_id)
        ).all()
        failed = conn.execute(
            select(trials_t.c.trial_id, trials_t.c.number).where(
                trials_t.c.study_id == study_id, trials_t.c.state == TrialState.FAIL
            )
        ).all()
    found: dict[int, tuple[int, TrialState, dict[str, Any]]] = {}
    for trial_id, number, state, key, value_json in rows:
        state = state if isinstance(state, TrialState) else TrialState[str(state)]  # the model's Enum: a TrialState
        found.setdefault(trial_id, (number, state, {}))[2][key] = json.loads(value_json)
    for trial_id, number in failed:
        found.setdefault(trial_id, (number, TrialState.FAIL, {}))
    return [
        FrozenTrial(
            number=number, state=state, value=None, values=None, datetime_start=None, datetime_complete=None,
            params={}, distributions={}, user_attrs={}, system_attrs=attrs, intermediate_values={},
            trial_id=trial_id,
        )
        for trial_id, (number, state, attrs) in sorted(found.items(), key=lambda kv: kv[1][0])
    ]


_ALEMBIC_SKIPPED = threading.Lock()


def skip_alembic_setup(self: Any) -> None:
    """``_VersionManager._init_alembic`` for a storage that neither creates nor checks its schema."""


class HookedRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose two private hooks a subclass overrides under public names.

    * :meth:`put_trial_param` is optuna's ``_set_trial_param``: every parameter a trial
      samples goes through it (optuna's storage cache calls it on this storage);
    * :meth:`stale_trial_ids` is optuna's ``_get_stale_trial_ids``, which
      ``optuna.storages.fail_stale_trials`` asks before it FAILs each trial.

    Both default to optuna's behaviour; an override calls ``super()`` for it.

    Opened with ``skip_compatibility_check`` and ``skip_table_creation`` (a command
    that only reads), the storage also skips optuna's alembic set-up (importing
    alembic and reading ``alembic_version``: about 0.4 s of a 2 s command);
    :func:`check_schema` still works on it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not (kwargs.get("skip_compatibility_check") and kwargs.get("skip_table_creation")):
            super().__init__(*args, **kwargs)
            return
        with _ALEMBIC_SKIPPED:  # optuna's constructor builds its _VersionManager, which sets alembic up
            original = _VersionManager._init_alembic
            _VersionManager._init_alembic = skip_alembic_setup  # type: ignore[method-assign]
            try:
                super().__init__(*args, **kwargs)
            finally:
                _VersionManager._init_alembic = original  # type: ignore[method-assign]

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        self.put_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)

    def put_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        """Write one parameter of a trial in its own transaction, as optuna does."""
        super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.stale_trial_ids(study_id)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        """The ids of the study's RUNNING trials whose heartbeat is older than the grace period."""
        return super()._get_stale_trial_ids(study_id)


class StudyView:
    """The read-only slice of a single-objective (minimised) Study that ``optuna.importance`` reads.

    Over trials in memory: adding 1000 trials to an in-memory optuna study costs
    seconds of copying. ``total``: the study's number of such trials, when ``trials``
    is a sample of them (None: they are all).
    """

    directions = [optuna.study.StudyDirection.MINIMIZE]
    direction = optuna.study.StudyDirection.MINIMIZE

    def __init__(self, study_name: str, trials: list[FrozenTrial], total: int | None = None) -> None:
        self.study_name = study_name
        self.trials = trials
        self.total = len(trials) if total is None else total

    def _is_multi_objective(self) -> bool:
        return False

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self.trials if states is None or t.state in states]
