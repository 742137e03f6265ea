"""Exact trial budgets: claim a slot under a study-wide lock before sampling.

A slot is a trial that is RUNNING, WAITING (queued retry), COMPLETE or PRUNED.
A FAILed trial that is retried hands its slot to the retry, so it never
counts twice.  Workers take a study-wide lock (a PostgreSQL advisory lock, a
MySQL named lock, or a file lock beside a SQLite database), count slots, and
only then ask for a trial; so with any number of workers the finished trials
never exceed the budget, and no worker starts a trial the budget cannot use.
``optim init`` takes the same lock to create a study, so the study, its spec
and a queued base trial are all there before the first claim.
"""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import optuna
from sqlalchemy import Connection, DateTime, Engine, event, func, select, text

from stagetune.errors import StorageError
from stagetune.optim.optuna_internals import TRIAL_HEARTBEATS, TRIALS, DbState
from stagetune.optim.storage import HeldConnectionLost, read_timeout_s, sqlite_file_lock

__all__ = [
    "SLOT_STATES",
    "FINISHED_STATES",
    "budget_lock",
    "count_trials",
    "count_by_state",
    "heartbeat_ages",
    "beating_trials",
    "orphaned_trials",
    "running_heartbeats",
    "trial_state",
]

SLOT_STATES = (DbState.RUNNING, DbState.WAITING, DbState.COMPLETE, DbState.PRUNED)
FINISHED_STATES = (DbState.COMPLETE, DbState.PRUNED)

_LOCAL = threading.Lock()


def _key(study_name: str) -> str:
    return "stagetune:" + hashlib.sha1(study_name.encode()).hexdigest()[:40]


@contextmanager
def budget_lock(
    storage: optuna.storages.RDBStorage, study_name: str, timeout_s: float = 600.0, *, pinned: bool = False
) -> Iterator[Connection | None]:
    """Hold the study-wide budget lock (one holder across all workers).

    Yields the server connection that holds the lock (None for SQLite): counting
    on it (:func:`count_by_state`) takes no second connection from the pool.

    Args:
        pinned: Every statement this thread runs in the block runs on the yielded
            connection (as with ``StagetuneStorage.sessions_on``). A connection
            lost in the block (a hung server's read timeout) then raises
            :class:`~stagetune.optim.storage.HeldConnectionLost` at the next
            statement, instead of reconnecting: SQLAlchemy reconnects a lost
            connection on its next use, and optuna retries a failed trial creation
            itself, so the claim would go on without the lock (which went with
            the old connection) while another worker takes it.
    """
    engine = storage.engine
    dialect = engine.dialect.name
    key = _key(study_name)
    with _LOCAL:
        if dialect == "sqlite":
            database = engine.url.database
            if not database or database == ":memory:":
                yield
                return
            with sqlite_file_lock(Path(database)):
                yield
            return
        with engine.connect() as conn:
            if dialect == "postgresql":
                lock_id = int(key.split(":")[1][:15], 16)
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
                conn.commit()
                try:
                    with _pinned_to(engine, pinned):
                        yield conn
                finally:
                    _release(conn, "SELECT pg_advisory_unlock(:k)", {"k": lock_id})
            elif dialect in ("mysql", "mariadb"):
                deadline = time.monotonic() + timeout_s
                # Each wait well inside the read timeout, which would take it for a hung server.
                wait_s = max(1, min(10, int(read_timeout_s() / 2)))
                while True:
                    got = conn.execute(text("SELECT GET_LOCK(:k, :w)"), {"k": key, "w": wait_s}).scalar()
                    # Out of the transaction that statement began (the lock is the session's):
                    # what runs under the lock commits on its own, not at the release's rollback.
                    conn.commit()
                    if got == 1:
                        break
                    if time.monotonic() > deadline:
                        raise StorageError(f"could not take the budget lock of study {study_name!r} in {timeout_s:.0f} s")
                try:
                    with _pinned_to(engine, pinned):
                        yield conn
                finally:
                    _release(conn, "SELECT RELEASE_LOCK(:k)", {"k": key})
            else:
                raise StorageError(f"database dialect {dialect!r} is not supported; use sqlite, postgresql or mysql")


#: Per thread: the engine whose pool this thread must not take a connection from (see budget_lock's ``pinned``).
_PINNED = threading.local()
_GUARDED: set[int] = set()  # ids of the engines whose pool checkouts are watched


@contextmanager
def _pinned_to(engine: Engine, pinned: bool) -> Iterator[None]:
    """While active, a pool checkout of ``engine`` in this thread raises HeldConnectionLost."""
    if not pinned:
        yield
        return
    if id(engine) not in _GUARDED:

        def checkout(*_args: object) -> None:
            if getattr(_PINNED, "engine", None) is engine:
                raise HeldConnectionLost(
                    "lost the connection that holds the study's budget lock (the server did not answer "
                    "or cut it); the claim starts again once the database is back"
                )

        event.listen(engine, "checkout", checkout)
        _GUARDED.add(id(engine))
    _PINNED.engine = engine
    try:
        yield
    finally:
        _PINNED.engine = None


def _release(conn: Connection, statement: str, params: dict[str, object]) -> None:
    """Release a session-level lock; if that fails, close the connection, which releases it.

    A connection that went back to the pool still holding the lock would keep
    every other worker waiting (and this one would take it again, reentrantly).
    Never raises an Exception: a connection that was lost, or closed here, holds
    the lock no more (the server ends its session once it reads the close), and
    what ran under the lock stands. Raising would make a caller redo a claim that
    succeeded (its trial left running with nobody to run it) or hide the error
    that ended the block.
    """
    if conn.invalidated:
        return  # lost under the lock: a new connection would release nothing
    try:
        if conn.in_transaction():
            conn.rollback()  # a statement under the lock failed; the release must still run
        conn.execute(text(statement), params)
        conn.commit()
    except Exception:
        conn.invalidate()
    except BaseException:
        conn.invalidate()
        raise


def count_trials(storage: optuna.storages.RDBStorage, study_id: int, states: tuple[str, ...]) -> int:
    """Trials of the study in any of ``states``, counted in the database."""
    marks = ", ".join(f":s{i}" for i in range(len(states)))
    query = text(f"SELECT COUNT(*) FROM {TRIALS} WHERE study_id = :sid AND state IN ({marks})")
    params = {"sid": study_id, **{f"s{i}": s for i, s in enumerate(states)}}
    with storage.engine.connect() as conn:
        return int(conn.execute(query, params).scalar())


def _pairs(
    storage: optuna.storages.RDBStorage, conn: Connection | None, query: str, study_id: int
) -> list[tuple[object, object]]:
    """Rows of a two-column query about one study, on ``conn`` (then committed) or a pooled one.

    Committing on ``conn`` (the one :func:`budget_lock` yields) makes the next
    query see a fresh snapshot (MySQL's REPEATABLE READ would show the first one again).
    """
    if conn is not None:
        rows = [(a, b) for a, b in conn.execute(text(query), {"sid": study_id})]
        conn.commit()
        return rows
    with storage.engine.connect() as own:
        return [(a, b) for a, b in own.execute(text(query), {"sid": study_id})]


def count_by_state(
    storage: optuna.storages.RDBStorage, study_id: int, conn: Connection | None = None
) -> dict[str, int]:
    """The study's trials per state name (states without trials are absent), in one query.

    Args:
        conn: Count on this connection (the one :func:`budget_lock` yields).
    """
    query = f"SELECT state, COUNT(*) FROM {TRIALS} WHERE study_id = :sid GROUP BY state"
    return {str(state): int(n) for state, n in _pairs(storage, conn, query, study_id)}


def orphaned_trials(
    storage: optuna.storages.RDBStorage, study_id: int, conn: Connection | None = None
) -> dict[int, int]:
    """RUNNING trials of the study that have no heartbeat: trial number -> trial id.

    Only meaningful under :func:`budget_lock`, where every finished claim has
    recorded its trial's first heartbeat. ``conn``: as for :func:`count_by_state`.
    """
    query = (
        f"SELECT t.number, t.trial_id FROM {TRIALS} t LEFT JOIN {TRIAL_HEARTBEATS} h ON h.trial_id = t.trial_id "
        f"WHERE t.study_id = :sid AND t.state = '{DbState.RUNNING}' AND h.trial_id IS NULL"
    )
    return {int(number): int(trial_id) for number, trial_id in _pairs(storage, conn, query, study_id)}


def heartbeat_ages(storage: optuna.storages.RDBStorage, study_id: int) -> dict[int, float]:
    """Seconds since the last heartbeat of each RUNNING trial, by trial number (database clock)."""
    query = text(
        f"SELECT t.number AS number, h.heartbeat AS heartbeat FROM {TRIAL_HEARTBEATS} h "
        f"JOIN {TRIALS} t ON t.trial_id = h.trial_id WHERE t.study_id = :sid AND t.state = '{DbState.RUNNING}'"
    ).columns(heartbeat=DateTime)  # by name: positional columns would type `number` instead
    with storage.engine.connect() as conn:
        # PostgreSQL's now() is timezone-aware, the stored heartbeats are not (as optuna does).
        now = conn.execute(select(func.now(type_=DateTime))).scalar().replace(tzinfo=None)
        rows = conn.execute(query, {"sid": study_id}).all()
    return {int(number): (now - beat).total_seconds() for number, beat in rows}


def beating_trials(storage: optuna.storages.RDBStorage, study_id: int) -> set[int]:
    """Numbers of the study's trials that ever recorded a heartbeat (any state).

    A trial without one was cut off while it was being claimed (see :func:`orphaned_trials`).
    """
    query = (
        f"SELECT t.number, t.trial_id FROM {TRIALS} t JOIN {TRIAL_HEARTBEATS} h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :sid"
    )
    return {int(number) for number, _ in _pairs(storage, None, query, study_id)}


def running_heartbeats(
    storage: optuna.storages.RDBStorage, study_id: int, conn: Connection | None = None
) -> tuple[datetime, dict[int, tuple[int, datetime]]]:
    """The database's clock now, and each RUNNING trial's last heartbeat: trial id -> (number, beat).

    Both readings come from the database server, so workers on machines whose
    clocks differ judge staleness alike. ``conn``: as for :func:`count_by_state`.
    """
    query = text(
        f"SELECT t.trial_id AS trial_id, t.number AS number, h.heartbeat AS heartbeat FROM {TRIAL_HEARTBEATS} h "
        f"JOIN {TRIALS} t ON t.trial_id = h.trial_id WHERE t.study_id = :sid AND t.state = '{DbState.RUNNING}'"
    ).columns(heartbeat=DateTime)

    def read(c: Connection) -> tuple[datetime, dict[int, tuple[int, datetime]]]:
        now = c.execute(select(func.now(type_=DateTime))).scalar().replace(tzinfo=None)
        rows = c.execute(query, {"sid": study_id}).all()
        return now, {int(tid): (int(number), beat) for tid, number, beat in rows}

    if conn is not None:
        try:
            return read(conn)
        finally:
            conn.commit()
    with storage.engine.connect() as own:
        return read(own)


def trial_state(storage: optuna.storages.RDBStorage, trial_id: int) -> str | None:
    """The state name of one trial (None if there is no such trial), in one small query."""
    with storage.engine.connect() as conn:
        state = conn.execute(text(f"SELECT state FROM {TRIALS} WHERE trial_id = :tid"), {"tid": trial_id}).scalar()
    return None if state is None else str(state)
