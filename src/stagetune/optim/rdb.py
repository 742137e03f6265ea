"""stagetune's optuna ``RDBStorage``: fewer round trips and connections per trial.

Optuna writes every ``suggest_*`` in its own transaction (a commit, and on a
server a round trip, per parameter: 32 for the full search space) and every
storage call takes a pooled connection. This subclass adds three things:

* :meth:`StagetuneStorage.batched_params`: a trial's parameters are buffered
  while the objective samples its config and written in one transaction when
  sampling ends, before training starts (so other workers, the dashboard and a
  heartbeat retry see them while the trial runs);
* while a trial batches its parameters, study ids are looked up by name once
  (HyperbandPruner looks twice for every parameter); outside a batch every
  lookup asks the database, as optuna does, so a study another process deleted
  and re-created (SQLite reuses its id for the next study) is never mistaken
  for the one now holding its old id;
* :meth:`StagetuneStorage.sessions_on`: optuna's sessions in this thread run on
  a given connection, the one that holds the budget lock, so claiming a trial
  takes no second connection (with ``pool_size=1`` that was a new connection,
  on PostgreSQL a server-side fork, for every trial).

It also keeps two facts optuna does not: :meth:`StagetuneStorage.create_study_with_attrs`
creates a study together with its user attributes (``optim init``'s spec) in one
transaction, so nobody ever sees a study without its spec; and the heartbeat
sweep marks each trial it finds stale (:data:`STALE_ATTR`), so ``optim status``
tells a dead worker's trial from one handed back on SIGTERM (both are FAILed and
re-queued).

Everything else is optuna's ``RDBStorage`` unchanged; other threads (the
heartbeat) are not affected by either. It pickles as optuna's does (a spawned
process, joblib or dask gets a storage with its own engine and nothing buffered).
Optuna's private RDB API (its models, sessions and the two hooks overridden here)
is reached through :mod:`stagetune.optim.optuna_internals`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator

import optuna
from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    distribution_to_json,
    json_to_distribution,
)
from optuna.study import StudyDirection
from sqlalchemy import Connection, bindparam, select, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from stagetune.optim.optuna_internals import (
    OPTUNA_TABLES,
    TRIAL_SYSTEM_ATTRS,
    TRIAL_USER_ATTRS,
    TRIAL_VALUES,
    TRIALS,
    DbState,
    HookedRDBStorage,
    create_scoped_session,
    models,
)

__all__ = ["StagetuneStorage", "OPTUNA_TABLES", "STALE_ATTR", "CompletedValue"]

#: ``(number, value, reused, retried_of)`` of a COMPLETE trial: ``reused`` when it has the
#: user attribute ``reused_from`` (it took another trial's result), ``retried_of`` the number
#: of the failed trial it retries (optuna's ``failed_trial`` system attribute) or None.
CompletedValue = tuple[int, float, bool, "int | None"]

#: Trial system attribute set by the heartbeat sweep on a trial it finds stale; its
#: value is the trial's id, as a retry copies its original's system attributes.
STALE_ATTR = "stagetune_stale_trial_id"

# (name, internal value, distribution, whether it was checked against the stored one)
_Pending = list[tuple[str, float, BaseDistribution, bool]]


class StagetuneStorage(HookedRDBStorage):
    """``RDBStorage`` with batched parameter writes and lock-connection sessions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        # study name -> id, kept only while some trial batches its parameters
        self._ids_by_name: dict[str, int] = {}

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_pending_lock"]
        # Buffers and the id cache belong to this process's open batches.
        state["_pending"], state["_ids_by_name"] = {}, {}
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._pending_lock = threading.Lock()

    def completed_values(self, study_id: int) -> list[CompletedValue]:
        """Number, value, reuse and retry of each COMPLETE trial with a value, in one query.

        What a worker's "keep only the best model dir" step needs, without optuna's
        full loading of every trial (24.5 s the first time on a 10,000-trial study).
        """
        query = text(
            f"SELECT t.number, v.value, "
            f"(SELECT COUNT(*) FROM {TRIAL_USER_ATTRS} u WHERE u.trial_id = t.trial_id AND u.key = :reused), "
            f"(SELECT s.value_json FROM {TRIAL_SYSTEM_ATTRS} s WHERE s.trial_id = t.trial_id AND s.key = :retried) "
            f"FROM {TRIALS} t JOIN {TRIAL_VALUES} v ON v.trial_id = t.trial_id AND v.objective = 0 "
            f"WHERE t.study_id = :sid AND t.state = :complete AND v.value IS NOT NULL"
        ).bindparams(bindparam("sid"), bindparam("complete"), bindparam("reused"), bindparam("retried"))
        session = self.scoped_session()
        try:
            rows = session.execute(
                query, {"sid": study_id, "complete": DbState.COMPLETE, "reused": "reused_from", "retried": "failed_trial"}
            ).all()
        except SQLAlchemyError as exc:  # as optuna's sessions report it
            raise optuna.exceptions.StorageInternalError(f"reading from the study database failed: {exc}") from exc
        finally:
            session.close()
        return [
            (int(number), float(value), bool(reused), None if retried is None else int(json.loads(retried)))
            for number, value, reused, retried in rows
        ]

    def get_study_id_from_name(self, study_name: str) -> int:
        # Optuna's HyperbandPruner builds a bracket study, looking its id up by name,
        # twice for every suggest_* call: two queries per parameter without the cache.
        # The cache lives only while a batch is open (a trial sampling its config, a
        # moment in which the trial's own study cannot be replaced under it): a cache
        # kept longer would, after another process deleted the study and SQLite gave
        # its id to another one, send this process's writes to that other study.
        with self._pending_lock:
            study_id = self._ids_by_name.get(study_name)
        if study_id is not None:
            return study_id
        # optuna's lookup commits; a read needs none (nothing is committed while sampling)
        study_id = self._read(select(models.StudyModel.study_id).where(models.StudyModel.study_name == study_name))
        if study_id is None:
            raise KeyError(models.NOT_FOUND_MSG)
        with self._pending_lock:
            if self._pending:
                self._ids_by_name[study_name] = study_id
        return study_id

    def create_study_with_attrs(
        self,
        study_name: str,
        direction: StudyDirection,
        user_attrs: dict[str, Any],
        system_attrs: dict[str, Any] | None = None,
    ) -> int:
        """Create a study with its user (and system) attributes in one transaction; its id.

        Optuna's ``create_study`` then ``set_user_attr`` commit twice: a reader in
        between sees a study without attributes.

        Raises:
            optuna.exceptions.DuplicatedStudyError: A study of that name exists.
        """
        try:
            with create_scoped_session(self.scoped_session) as session:
                study = models.StudyModel(
                    study_name=study_name,
                    directions=[models.StudyDirectionModel(objective=0, direction=direction)],
                )
                session.add(study)
                session.add_all(
                    models.StudyUserAttributeModel(study=study, key=key, value_json=json.dumps(value))
                    for key, value in user_attrs.items()
                )
                session.add_all(
                    models.StudySystemAttributeModel(study=study, key=key, value_json=json.dumps(value))
                    for key, value in (system_attrs or {}).items()
                )
        except IntegrityError:
            raise optuna.exceptions.DuplicatedStudyError(
                f"another study named {study_name!r} already exists"
            ) from None
        return self.get_study_id_from_name(study_name)

    def stale_trial_ids(self, study_id: int) -> list[int]:
        # optuna.storages.fail_stale_trials asks this, then FAILs each trial: mark them
        # first (a FAILed trial takes no more attributes).
        stale = super().stale_trial_ids(study_id)
        for trial_id in stale:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self.set_trial_system_attr(trial_id, STALE_ATTR, trial_id)
        return stale

    def delete_study(self, study_id: int) -> None:
        with self._pending_lock:
            self._ids_by_name = {name: i for name, i in self._ids_by_name.items() if i != study_id}
        super().delete_study(study_id)

    def put_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
        previous_distribution: BaseDistribution | None,
    ) -> None:
        with self._pending_lock:
            pending = self._pending.get(trial_id)
            same = next((d for name, _, d, _ in pending or () if name == param_name), None)
        if pending is None:
            super().put_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
            return
        # Checked now, as optuna checks it: an incompatible distribution raises at the
        # suggest_* call and the parameters sampled before it stay in the batch.
        if same is not None:  # set twice: optuna keeps the first row (its insert is ignored)
            check_distribution_compatibility(same, distribution)
            return
        checked = True
        if previous_distribution is None:  # optuna's storage cache knows none yet: ask the database
            try:
                previous_distribution = self._stored_distribution_of(trial_id, param_name)
            except (SQLAlchemyError, optuna.exceptions.StorageInternalError):
                checked = False  # the database is away: the write checks it (and is retried)
        if previous_distribution is not None:
            check_distribution_compatibility(previous_distribution, distribution)
        with self._pending_lock:
            pending = self._pending.get(trial_id)
            if pending is not None:
                pending.append((param_name, param_value_internal, distribution, checked))
                return
        # the batch was closed meanwhile (by another thread): write at once
        super().put_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)

    def _read(self, query: Any) -> Any:
        """The first column of the first row of ``query`` (None if none), read without a commit."""
        session = self.scoped_session()
        try:
            return session.execute(query).scalar()
        except SQLAlchemyError as exc:  # as optuna's sessions report it
            raise optuna.exceptions.StorageInternalError(f"reading from the study database failed: {exc}") from exc
        finally:
            session.close()  # rolls back: a read leaves nothing to commit

    def _stored_distribution_of(self, trial_id: int, name: str) -> BaseDistribution | None:
        """The distribution another trial of ``trial_id``'s study stored for ``name``, if any.

        One read, no commit (the parameters of a batch are written in one transaction).
        """
        study_id = select(models.TrialModel.study_id).where(models.TrialModel.trial_id == trial_id)
        query = (
            select(models.TrialParamModel.distribution_json)
            .join(models.TrialModel)
            .where(models.TrialModel.study_id == study_id.scalar_subquery())
            .where(models.TrialParamModel.param_name == name)
            .limit(1)
        )
        stored = self._read(query)
        return None if stored is None else json_to_distribution(stored)

    @contextlib.contextmanager
    def batched_params(
        self, trial_id: int, write: Callable[[Callable[[], None]], None] = lambda flush: flush()
    ) -> Iterator[None]:
        """Buffer the trial's ``set_trial_param`` calls; write them in one transaction on exit.

        Args:
            trial_id: The trial whose parameters are buffered (others write at once).
            write: Runs the write (e.g. retrying it through an outage: a failed
                write keeps the buffer, so calling it again writes everything).

        Each parameter is checked against the study's stored distribution when it is
        set, as optuna checks it: an incompatible one raises at its ``suggest_*`` call
        and is not buffered (if the database cannot be read then, the write checks it,
        stores the others and raises). The write happens also when the block raises
        (a partly sampled trial keeps what it sampled), but then a failing write does
        not hide the first error.
        Writing again after a lost acknowledgement is harmless: optuna ignores the
        duplicate rows' integrity error.
        """
        with self._pending_lock:
            if trial_id in self._pending:
                raise RuntimeError(f"trial {trial_id} is already batching its parameters")
            self._pending[trial_id] = []
        try:
            try:
                yield
            except BaseException:
                with contextlib.suppress(Exception):
                    self._flush(trial_id)
                raise
            write(lambda: self._flush(trial_id))
        finally:
            with self._pending_lock:  # nothing stays buffered after the block
                self._pending.pop(trial_id, None)
                if not self._pending:
                    self._ids_by_name.clear()

    def _flush(self, trial_id: int) -> None:
        with self._pending_lock:
            pending = self._pending.pop(trial_id, [])
        if not pending:
            return
        incompatible: list[str] = []
        try:
            # What optuna's own parameter write does per parameter, once for
            # all: one trial lookup and one multi-row INSERT instead of a SELECT and an
            # INSERT (its autoflush) per parameter. Compatibility was checked when each
            # was set, unless the database was away then.
            with create_scoped_session(self.scoped_session, True) as session:
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
                self.check_trial_is_updatable(trial_id, trial.state)
                rows = []
                for name, value, distribution, checked in pending:
                    previous = None if checked else self._stored_distribution(session, trial.study_id, name)
                    try:
                        if previous is not None:
                            check_distribution_compatibility(previous, distribution)
                    except ValueError as exc:
                        incompatible.append(f"{name}: {exc}")
                        continue
                    rows.append(
                        models.TrialParamModel(
                            trial_id=trial_id,
                            param_name=name,
                            param_value=value,
                            distribution_json=distribution_to_json(distribution),
                        )
                    )
                session.add_all(rows)
        except BaseException:
            with self._pending_lock:  # a retry of the flush writes them again
                self._pending.setdefault(trial_id, [])[:0] = pending
            raise
        if incompatible:  # the others are written, as optuna keeps what was set before
            raise ValueError(f"trial {trial_id}: incompatible distributions not stored: {'; '.join(incompatible)}")

    @staticmethod
    def _stored_distribution(session: Session, study_id: int, name: str) -> BaseDistribution | None:
        """The distribution an earlier trial of the study stored for ``name``, if any."""
        record = (
            session.query(models.TrialParamModel)
            .join(models.TrialModel)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialParamModel.param_name == name)
            .first()
        )
        return None if record is None else json_to_distribution(record.distribution_json)

    @contextlib.contextmanager
    def sessions_on(self, conn: Connection | None) -> Iterator[None]:
        """Run this thread's optuna sessions on ``conn`` (None: the pool, as usual).

        ``conn`` must not be inside a transaction: every storage call then begins
        and commits its own transaction on it.
        """
        if conn is None:
            yield
            return
        registry = self.scoped_session.registry
        previous = registry() if registry.has() else None
        registry.set(Session(bind=conn))
        try:
            yield
        finally:
            registry().close()
            if previous is None:
                registry.clear()
            else:
                registry.set(previous)
