"""The study database: open it safely, never show its password, ride out outages.

Many worker processes share one study in SQL: SQLite for one machine, PostgreSQL or
MySQL/MariaDB for a cluster. :func:`open_storage` gives each backend engine settings
that suit that use, and turns every failure a user can fix (server down, driver
missing, schema from an older optuna, ...) into a one-line
:class:`~stagetune.errors.StorageError` whose URL has its password masked.

Every message, log line or exception here that names a URL passes it through
:func:`mask_url`. Failures that go away by themselves (server restarting, SQLite
file locked) are classified in one place, :func:`is_transient_db_error`, and
:func:`retry_transient` waits them out with backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import re
import select
import sqlite3
import time
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from stagetune.errors import StagetuneError, StorageError, UsageError
from stagetune.optim.optuna_internals import check_schema
from stagetune.optim.rdb import OPTUNA_TABLES, StagetuneStorage

__all__ = [
    "SQLITE_BUSY_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "mask_url",
    "default_study_name",
    "warn_inline_password",
    "open_storage",
    "close_storage",
    "storage_session",
    "sqlite_file_lock",
    "is_transient_db_error",
    "retry_transient",
    "retry_window_s",
    "read_timeout_s",
    "RETRY_WINDOW_ENV",
    "READ_TIMEOUT_ENV",
    "driver_modules",
    "HeldConnectionLost",
]

_logger = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_S = 30
"""How long an SQLite connection waits for another process's write lock."""

CONNECT_TIMEOUT_S = 10
"""How long a PostgreSQL/MySQL connection attempt may take before it fails."""

RETRY_WINDOW_ENV = "STAGETUNE_DB_RETRY_S"
"""Environment variable: seconds a command waits for an unreachable database (default 120).

A worker never gives up on it (a trial in flight is never lost to an outage); it logs
one line when the wait starts, one each window while it lasts, and one when it ends."""
READ_TIMEOUT_ENV = "STAGETUNE_DB_TIMEOUT_S"
"""Environment variable: seconds a PostgreSQL/MySQL server may take to answer (default 60).

A server that hangs (neither answers nor refuses) is then treated as one that is down."""
_DEFAULT_RETRY_WINDOW_S = 120.0
_DEFAULT_READ_TIMEOUT_S = 60.0
# TCP keepalives (libpq): a dead peer or a cut network is noticed in about 60 s, not hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

_SQLITE_OPEN_MAX_WAIT_S = 60.0
# Opening a new server database, processes that collide creating the tables try again:
# each try finds more of them made (MySQL commits every CREATE on its own).
_SCHEMA_RACE_TRIES = 8
_RETRY_FIRST_DELAY_S = 0.25
_RETRY_MAX_DELAY_S = 5.0

# backend -> (the driver stagetune uses, the pip extra that installs it). A server URL
# without "+driver" gets this driver: SQLAlchemy's own defaults (2.1: psycopg 3 for
# postgresql://, mysqlclient for mysql://) are not what stagetune installs.
_BACKENDS: dict[str, tuple[str, str]] = {
    "sqlite": ("pysqlite", ""),
    "postgresql": ("psycopg2", "stagetune[postgresql]"),
    "mysql": ("pymysql", "stagetune[mysql]"),
    "mariadb": ("pymysql", "stagetune[mysql]"),
}
_URL_EXAMPLES = "sqlite:///exp/optim.db, postgresql://USER@HOST/DB or mysql://USER@HOST/DB"

# Server pools stay small: every worker process has its own pool, and a study with
# 100 workers must not exhaust max_connections. Optuna's heartbeat thread takes a
# second connection, hence the overflow.
_SERVER_ENGINE_KWARGS: dict[str, Any] = {
    "pool_size": 1,  # idle connections kept per worker: 32 workers fit max_connections=50
    "max_overflow": 4,
    "pool_timeout": 60,
    "pool_pre_ping": True,  # a restarted server leaves dead connections in the pool
    "pool_recycle": 1800,  # below MySQL's wait_timeout and most firewalls' idle cut-off
}

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<rest>.*)$", re.DOTALL)
_BARE_USERINFO = re.compile(r"(?P<user>[^\s:/@]+):[^\s]*@")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&;](?:password|passwd|pwd)=)(?P<value>[^&;#]*)", re.I)

_SCHEMA_RACE = "another process was creating the tables at the same time"

# One table for both questions asked about a database error: is it transient, and
# what short reason does the user read? (pattern, reason, transient)
_DB_ERROR_KINDS: tuple[tuple[re.Pattern[str], str, bool], ...] = tuple(
    (re.compile(pattern, re.I), reason, transient)
    for pattern, reason, transient in (
        (r"connection refused", "connection refused; is the server running?", True),
        (r"timeout expired|timed out", "connection timed out; is the host reachable?", True),
        (r"server closed the connection", "the server closed the connection", True),
        (r"terminating connection due to administrator", "the server is shutting down", True),
        (r"database system is (shutting down|starting up|in recovery)",
         "the server is restarting", True),
        (r"lost connection to (mysql|mariadb) server|lost the connection that holds",
         "lost connection to the server", True),
        (r"(mysql|mariadb) server has gone away", "the server has gone away", True),
        (r"can't connect to (mysql|mariadb) server", "cannot reach the server", True),
        (r"connection already closed|no connection to the server",
         "the connection is closed", True),
        (r"could not receive data from server|connection reset by peer|broken pipe",
         "the connection was cut", True),
        (r"database (table )?is locked", "database is locked by another process", True),
        (r"too many clients|too many connections|remaining connection slots are reserved",
         "the server has no free connection slot", True),
        (r"deadlock detected|deadlock found", "a deadlock between workers", True),
        (r"could not translate host name|name or service not known|unknown (mysql )?server host",
         "unknown host name", False),
        (r"password authentication failed|no password supplied|access denied for user",
         "authentication failed", False),
        (r'database ".*" does not exist|unknown database', "the database does not exist", False),
        # Two processes creating optuna's tables at once: one sees the other's table
        # (or its row in a catalogue or in alembic_version) appear under its feet.
        (r"already exists|duplicate key value violates|duplicate entry|unique constraint failed",
         _SCHEMA_RACE, False),
    )
)
# Opening waits these out (many workers starting at once); a server that refuses
# connections outright is reported at once, since that is usually a wrong URL.
_OPEN_RETRY_REASONS = frozenset(
    {
        "database is locked by another process",
        "the server has no free connection slot",
        "the server is restarting",
    }
)
_DRIVER_MODULES = ("psycopg2", "pymysql", "MySQLdb", "sqlite3", "_sqlite3")


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``.

    Works on the text as given (so users recognise their URL), also for strings that
    do not parse: a password in the user-info part (even with an unescaped ``@``,
    which SQLAlchemy would split in the wrong place) and ``password=`` query
    parameters are masked.

    Args:
        url: A storage URL, possibly malformed.

    Returns:
        The URL with passwords masked, e.g. ``postgresql://optuna:***@host/db``.
    """
    match = _SCHEME.match(url)
    if match is None:  # not URL-shaped: mask anything that looks like user:password@
        return _QUERY_PASSWORD.sub(r"\g<key>***", _BARE_USERINFO.sub(r"\g<user>:***@", url))
    rest = match["rest"]
    span = _password_span(rest)
    if span is not None:
        rest = f"{rest[:span[0]]}***{rest[span[1]:]}"
    return _QUERY_PASSWORD.sub(r"\g<key>***", f"{match['scheme']}://{rest}")


def _password_span(rest: str) -> tuple[int, int] | None:
    """Where the user-info password lies in the part of a URL after ``://``."""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" in authority:  # the last '@' ends the user info: passwords may hold an '@'
        userinfo = authority.rpartition("@")[0]
        colon = userinfo.find(":")
        return (colon + 1, len(userinfo)) if colon >= 0 else None
    # An unescaped '/', '?' or '#' in the password cut the authority short.
    colon = authority.find(":")
    if colon >= 0 and not authority[colon + 1 :].isdigit() and "@" in rest[colon:]:
        return colon + 1, rest.index("@", colon)
    return None


def _inline_passwords(url: str) -> list[str]:
    """Passwords written into ``url`` itself, raw and percent-decoded."""
    found: list[str] = []
    match = _SCHEME.match(url)
    span = _password_span(match["rest"]) if match is not None else None
    if span is not None and span[1] > span[0]:
        found.append(match["rest"][span[0] : span[1]])
    found.extend(m["value"] for m in _QUERY_PASSWORD.finditer(url) if m["value"])
    return sorted({form for p in found for form in (p, unquote(p))}, key=len, reverse=True)


def _scrub(text: str, url: str) -> str:
    """Mask ``url``'s passwords wherever they appear in ``text`` (a driver message)."""
    for password in _inline_passwords(url):
        if len(password) >= 3:
            text = text.replace(password, "***")
    return text


def _with_default_driver(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in _BACKENDS and scheme.lower() != "sqlite":
        return f"{scheme}+{_BACKENDS[scheme.lower()][0]}://{rest}"
    return url


def driver_modules(url: str) -> list[str]:
    """The DB-API module(s) ``url`` will use, for importing ahead (none if unknown)."""
    scheme = _with_default_driver(url).partition("://")[0].lower()
    backend, _, driver = scheme.partition("+")
    if backend == "sqlite":
        return ["sqlite3", "sqlalchemy.dialects.sqlite.pysqlite"]
    module = driver or _BACKENDS.get(backend, ("", ""))[0]
    if module not in _DRIVER_MODULES:
        return []
    return [module, f"sqlalchemy.dialects.{'mysql' if backend == 'mariadb' else backend}.{module}"]


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise StorageError(
            f"cannot parse storage URL {mask_url(url)!r}; expected e.g. {_URL_EXAMPLES}"
        ) from exc
    backend = parsed.get_backend_name()
    if backend not in _BACKENDS:
        raise StorageError(
            f"unsupported database {backend!r} in storage URL {mask_url(url)}: stagetune "
            f"supports sqlite, postgresql and mysql/mariadb, e.g. {_URL_EXAMPLES}"
        )
    return parsed


def default_study_name(url: str) -> str:
    """Derive the study name from the storage URL, as cnn-mellin did.

    SQLite: the file stem (``sqlite:///exp/optim.db`` -> ``optim``); PostgreSQL and
    MySQL: the database name.

    Raises:
        UsageError: The URL names no database (e.g. in-memory SQLite).
    """
    parsed = _parse(url)
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite":
        database = "" if database in ("", ":memory:") else Path(database).stem
    if not database:
        raise UsageError(
            f"cannot derive a study name from storage URL {mask_url(url)} "
            "(it names no database); give --study-name"
        )
    return database


def warn_inline_password(url: str) -> str | None:
    """Return a one-line warning if ``url`` contains a password, else ``None``.

    The CLI prints it: command lines are visible to every user in the process list.
    """
    if not _inline_passwords(url):
        return None
    scheme = url.partition(":")[0].lower()
    if scheme.startswith("postgres"):
        instead = "put it in ~/.pgpass (or the file named by PGPASSFILE) or in PGPASSWORD"
    elif scheme.startswith(("mysql", "mariadb")):
        instead = (
            "put it in a [client] option file (mode 600) and add "
            "?read_default_file=~/.my.cnf to the URL"
        )
    else:
        instead = "remove it from the URL"
    return (
        f"the storage URL {mask_url(url)} contains a password, which other users can "
        f"read in the process list; {instead}"
    )


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name`` (else ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def retry_window_s() -> float:
    """Seconds to wait for an unreachable database (:data:`RETRY_WINDOW_ENV`, default 120)."""
    return _env_seconds(RETRY_WINDOW_ENV, _DEFAULT_RETRY_WINDOW_S)


def read_timeout_s() -> float:
    """Seconds a server may take to answer (:data:`READ_TIMEOUT_ENV`, default 60)."""
    return _env_seconds(READ_TIMEOUT_ENV, _DEFAULT_READ_TIMEOUT_S)


def _psycopg2_wait(conn: Any) -> None:
    """psycopg2's wait callback: libpq's polling with a deadline, for connecting and every query.

    libpq has no read timeout (keepalives do not help: a hung server's kernel still
    answers them), so a server that stops answering would block a worker for good;
    this raises an OperationalError instead, which SQLAlchemy takes for a lost
    connection and :func:`retry_transient` waits out.
    """
    import psycopg2
    from psycopg2.extensions import POLL_OK, POLL_READ, POLL_WRITE, STATUS_SETUP

    connecting = conn.status == STATUS_SETUP
    timeout = min(CONNECT_TIMEOUT_S, _READ_TIMEOUT[0]) if connecting else _READ_TIMEOUT[0]
    if _APPLICATION_MARK not in (conn.dsn or ""):
        timeout = float("inf")  # not a connection of ours (the callback is process-wide)
    deadline = time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == POLL_OK:
            return
        if state not in (POLL_READ, POLL_WRITE):
            raise psycopg2.OperationalError(f"bad state from poll: {state}")
        fd = conn.fileno()
        left = deadline - time.monotonic()
        wait = None if left == float("inf") else left
        ready = select.select([fd], [], [], wait) if state == POLL_READ and left > 0 else (
            select.select([], [fd], [], wait) if left > 0 else ([], [], [])
        )
        if not any(ready):  # psycopg2 then closes the connection (never close it here: it deadlocks)
            doing = "connecting" if connecting else "waiting for an answer"
            raise psycopg2.OperationalError(f"timed out {doing}: the server did not answer in {timeout:g} s")


_READ_TIMEOUT = [_DEFAULT_READ_TIMEOUT_S]
# How the wait callback knows stagetune's connections (also shown in pg_stat_activity).
_APPLICATION_NAME = "stagetune"
_APPLICATION_MARK = f"application_name={_APPLICATION_NAME}"


def _engine_kwargs(parsed: URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "sqlite":
        # sqlite3's `timeout` is SQLite's busy timeout, applied to every connection.
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    kwargs = dict(_SERVER_ENGINE_KWARGS)
    read_timeout = read_timeout_s()
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = max(1, int(min(CONNECT_TIMEOUT_S, read_timeout)))
    if parsed.get_driver_name() == "psycopg2":
        import psycopg2.extensions

        # A hung server: every wait of the driver has a deadline (see _psycopg2_wait).
        _READ_TIMEOUT[0] = read_timeout
        psycopg2.extensions.set_wait_callback(_psycopg2_wait)
        connect_args.update({k: v for k, v in _KEEPALIVES.items() if k not in parsed.query})
        if "application_name" not in parsed.query:
            connect_args["application_name"] = _APPLICATION_NAME
    elif parsed.get_driver_name() == "pymysql":
        # PyMySQL's socket timeouts; it turns TCP keepalives on by itself.
        connect_args.update({"read_timeout": read_timeout, "write_timeout": read_timeout})
    kwargs["connect_args"] = connect_args
    return kwargs


def _sqlite_path(parsed: URL) -> Path | None:
    """The file of an SQLite URL; None for an in-memory database."""
    database = parsed.database
    return None if not database or database == ":memory:" else Path(database)


@contextlib.contextmanager
def sqlite_file_lock(database: Path) -> Iterator[None]:
    """Hold an exclusive lock, across processes, on the file ``DATABASE.lock`` beside ``database``.

    Not reentrant: a process must not take it twice at once.
    """
    lock_path = database.with_name(database.name + ".lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_sqlite(path: Path, url: str, *, create: bool) -> bool:
    """Refuse a missing file (unless ``create``), a missing directory, and a foreign database.

    The directory must exist: a mistyped path is refused rather than created. An
    existing database of something else (tables, none of them optuna's) is refused
    before anything is written to it.

    Returns:
        Whether the file holds all of optuna's tables already.
    """
    if not path.exists():
        if not create:
            raise StorageError(
                f"no study database at {path} ({mask_url(url)}); check the DB_URL of "
                f"`stagetune optim DB_URL ...`, or create a study there with `optim DB_URL init`"
            )
        if not path.parent.is_dir():
            raise StorageError(
                f"directory {path.parent} does not exist; create it first "
                f"(for the study database {mask_url(url)})"
            )
        return False
    tables = _sqlite_tables(path)
    if tables and OPTUNA_TABLES.isdisjoint(tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(
            f"{path} is an SQLite database of something else (tables {shown}, none of them "
            f"optuna's); stagetune keeps its studies in a file of their own: choose another DB_URL"
        )
    return OPTUNA_TABLES.issubset(tables)


def _sqlite_tables(path: Path) -> list[str]:
    """The tables of the SQLite file at ``path``, read without writing anything.

    A file that cannot be read this way gives none: the usual open reports it.
    """
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            rows = connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
        finally:
            connection.close()
    except sqlite3.Error:
        return []
    return sorted(str(name) for (name,) in rows)


def _use_wal(path: Path) -> None:
    """Switch the SQLite file to WAL journal mode.

    WAL lets readers run beside the one writer, which many workers sharing a file
    need (~1.7x faster here). The mode is stored in the file, so setting it once
    with a plain sqlite3 connection covers every later connection, including those
    of optuna's engine and of unpickled storages in other processes.
    """
    connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        connection.close()
    if str(mode).lower() != "wal":
        _logger.warning("SQLite refused WAL mode for %s (got %s); workers will wait longer",
                        path, mode)


def _describe_db_error(exc: BaseException) -> tuple[str, bool] | None:
    """The short reason and transience of a database error, or None if unknown."""
    for error in _exception_chain(exc):
        if not _is_db_error(error):
            continue
        text = str(error)
        for pattern, reason, transient in _DB_ERROR_KINDS:
            if pattern.search(text):
                return reason, transient
        if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
            return "the connection was lost", True
    return None


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.extend([getattr(error, "orig", None), error.__cause__, error.__context__])


class HeldConnectionLost(Exception):
    """A connection that had to stay the same (it holds a session lock) was lost.

    Raised instead of reconnecting: a statement on a new connection would run
    without the lock. A transient database error (:func:`retry_transient` retries
    the whole locked operation, which takes the lock again).
    """


def _is_db_error(error: BaseException) -> bool:
    if isinstance(error, (sqlalchemy.exc.DBAPIError, sqlite3.Error, HeldConnectionLost)):
        return True
    return type(error).__module__.partition(".")[0] in _DRIVER_MODULES


class _QuietResetFailure(logging.Filter):
    """Drop SQLAlchemy's traceback for a connection that could not be reset on its way
    back to the pool because the server is away or hung: the pool discards it, and the
    next database call waits for the server (and says so in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and record.getMessage().startswith("Exception during reset")
                    and is_transient_db_error(error))


# The logger of the pool class open_storage's server engines use (SQLAlchemy's instance logger).
logging.getLogger("sqlalchemy.pool.impl.QueuePool").addFilter(_QuietResetFailure())


def is_transient_db_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database failure that waiting can cure.

    True for a server that is down, restarting or dropped the connection, and for
    a locked SQLite file, also when wrapped (e.g. in optuna's
    ``StorageInternalError``). False for everything else, including wrong
    passwords, missing databases, SQL errors and non-database exceptions.
    """
    described = _describe_db_error(exc)
    return described is not None and described[1]


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    url: str | None = None,
    max_wait_s: float | None = 120.0,
    log: Callable[[str], None] | None = None,
    only: Collection[str] | None = None,
    give_up: Callable[[], str | None] | None = None,
) -> T:
    """Call ``fn()``, retrying with backoff while the database is transiently away.

    Logs one line when it starts waiting and one when the database is back; other
    exceptions propagate at once.

    Args:
        fn: The database operation; it must be safe to repeat.
        what: What is being done, for the log lines (e.g. ``"reporting trial 12"``).
        url: The storage URL, shown masked in the log lines.
        max_wait_s: Give up after waiting this long; None: wait as long as it takes,
            with one more line each :func:`retry_window_s` that the database stays away.
        log: Where the log lines go (default: this module's logger, WARNING).
        only: Retry only these reasons (from :data:`_DB_ERROR_KINDS`); default all
            transient ones.
        give_up: Asked before each pause; a reason (e.g. "SIGTERM received") ends the wait.

    Returns:
        What ``fn`` returns.

    Raises:
        StorageError: The database stayed away for ``max_wait_s`` seconds, or
            ``give_up`` gave a reason.
    """
    emit = log if log is not None else _logger.warning
    where = ""  # masked only once needed: this wraps every database call of a trial
    started: float | None = None
    delay = _RETRY_FIRST_DELAY_S
    while True:
        try:
            result = fn()
        except Exception as exc:
            described = _describe_db_error(exc)
            if described is None or not described[1] or (only is not None and described[0] not in only):
                raise
            reason = described[0].partition(";")[0]
            now = time.monotonic()
            if started is None:
                started = now
                where = f"database {mask_url(url)}" if url else "database"
                if max_wait_s is None:
                    window = retry_window_s()
                    remind_at = now + window
                    emit(f"{what}: {where} unreachable ({reason}); retrying until it is back")
                else:
                    emit(f"{what}: {where} unreachable ({reason}); retrying for up to {max_wait_s:g} s")
            waited = now - started
            if max_wait_s is not None and waited >= max_wait_s:
                raise StorageError(
                    f"{what}: {where} still unreachable after {waited:.0f} s ({reason})"
                ) from exc
            stopped = give_up() if give_up is not None else None
            if stopped:
                raise StorageError(
                    f"{what}: {where} unreachable for {waited:.0f} s ({reason}); stopped waiting: {stopped}"
                ) from exc
            if max_wait_s is None and now >= remind_at:
                emit(f"{what}: {where} still unreachable after {waited:.0f} s ({reason}); still retrying")
                remind_at = now + window
            pause = delay if max_wait_s is None else min(delay, max_wait_s - waited)
            time.sleep(pause)
            delay = min(2 * delay, _RETRY_MAX_DELAY_S)
            continue
        if started is not None:
            emit(f"{what}: {where} reachable again after {time.monotonic() - started:.1f} s")
        return result


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    heartbeat_stale_trial_callback: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
    | None = None,
    create: bool = True,
    read_only: bool = False,
) -> StagetuneStorage:
    """Open the study database at ``url`` with engine settings suited to many workers.

    SQLite gets WAL journal mode, a busy timeout and retries while the file is
    locked; PostgreSQL/MySQL get a small pool that checks connections before use
    and recycles them, and a connect timeout. A URL without a driver gets the one
    stagetune's extras install (``postgresql://`` -> psycopg2, ``mysql://`` ->
    PyMySQL). Passwords can stay out of the URL:
    libpq reads ``~/.pgpass``, ``PGPASSFILE`` and ``PGPASSWORD``; PyMySQL reads
    ``?read_default_file=PATH``. Release connections with :func:`close_storage`
    or use :func:`storage_session`.

    Args:
        url: SQLAlchemy URL of the database.
        heartbeat_interval: Seconds between a running trial's heartbeats (None: off).
        grace_period: Seconds without heartbeat before a trial counts as stale
            (None: optuna's default, twice the interval).
        heartbeat_stale_trial_callback: Called for each stale trial, e.g.
            ``optuna.storages.RetryHeartbeatStaleTrialCallback``.
        create: Create the SQLite file and the tables if missing; with False a
            missing database is an error.
        read_only: For commands that only read (``status``, ``important``,
            ``best``): skip optuna's schema check when opening (about 0.4 s: alembic);
            :func:`storage_session` runs it only if a read then fails, for its
            clear message.

    Raises:
        StorageError: The database cannot be opened (one line, URL masked).
        UsageError: A non-positive heartbeat interval or grace period.
    """
    for name, value in (("heartbeat interval", heartbeat_interval), ("grace period", grace_period)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be a positive number of seconds, got {value}")
    url = _with_default_driver(url)
    parsed = _parse(url)
    sqlite_path = _sqlite_path(parsed) if parsed.get_backend_name() == "sqlite" else None

    def construct() -> StagetuneStorage:
        if sqlite_path is None:
            return build()
        if _check_sqlite(sqlite_path, url, create=create) or not create:  # no tables to create
            _use_wal(sqlite_path)
            return build()
        # Processes creating the tables of one file take turns; on a server they retry.
        with sqlite_file_lock(sqlite_path):
            _use_wal(sqlite_path)
            return build()

    def build() -> StagetuneStorage:
        # Creating the tables checks, then creates: processes opening a new database
        # together collide; once one has made a table, the others find it.
        for attempt in range(1, _SCHEMA_RACE_TRIES + 1):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return StagetuneStorage(
                        url,
                        engine_kwargs=_engine_kwargs(parsed),
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
                        skip_table_creation=not create,
                        skip_compatibility_check=read_only and not create,
                    )
            except Exception as exc:
                described = _describe_db_error(exc)
                if not create or attempt == _SCHEMA_RACE_TRIES or described is None or described[0] != _SCHEMA_RACE:
                    raise
                time.sleep(random.uniform(0.02, 0.1) * attempt)  # out of step with the others
        raise AssertionError("unreachable")

    try:
        # Many workers start at once: a locked SQLite file, a server momentarily out
        # of connection slots or restarting are waited out, not reported.
        return retry_transient(
            construct,
            what="opening the study database",
            url=url,
            max_wait_s=_SQLITE_OPEN_MAX_WAIT_S,
            only=_OPEN_RETRY_REASONS,
        )
    except (ImportError, RuntimeError, OSError, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error,
            optuna.exceptions.StorageInternalError) as exc:
        error = _open_error(exc, url, parsed, create=create)
        # The failed attempt's frames hold its half-open connection (libpq's, in the middle of
        # authentication): while anything keeps this exception, the server would keep that
        # backend waiting for a password for its authentication_timeout (60 s), holding a slot
        # and blocking a DROP DATABASE. Their locals go now; the chain of messages stays.
        for failure in _exception_chain(exc):
            traceback.clear_frames(failure.__traceback__)
        raise error from exc


def _open_error(exc: BaseException, url: str, parsed: URL, *, create: bool) -> StorageError:
    """Translate a failure of :func:`open_storage` into a one-line message."""
    masked = mask_url(url)
    backend = parsed.get_backend_name()
    text = _scrub(" | ".join(str(error) for error in _exception_chain(exc)), url)
    if isinstance(exc, (ImportError, sqlalchemy.exc.NoSuchModuleError)):
        driver = parsed.get_driver_name()
        module, extra = _BACKENDS[backend]
        if driver == module:
            return StorageError(
                f"the {driver} driver for {masked} is not installed: pip install '{extra}'"
            )
        return StorageError(
            f"the database driver {driver!r} for {masked} is not available; use "
            f"{backend}+{module}://... and pip install '{extra}'"
        )
    if isinstance(exc, RuntimeError) and "optuna storage upgrade" in text:
        created_by = re.search(r"set up by optuna ([^)\s]+)", text)
        by = f" by optuna {created_by[1]}" if created_by else ""
        return StorageError(
            f"the study database {masked} was created{by} with an older table schema than "
            f"optuna {optuna.__version__} uses; back it up, then run "
            f"`optuna storage upgrade --storage {masked}`"
        )
    if isinstance(exc, RuntimeError) and "pip install -U optuna" in text:
        return StorageError(
            f"the study database {masked} has a newer table schema than optuna "
            f"{optuna.__version__} knows; upgrade optuna: pip install -U optuna"
        )
    if not create and re.search(r"no such table|does not exist|doesn't exist", text, re.I) and (
        "version_info" in text or "studies" in text
    ):
        return StorageError(
            f"{masked} holds no optuna study; check the DB_URL of `stagetune optim DB_URL ...`"
        )
    described = _describe_db_error(exc)
    if described is not None:
        reason = described[0]
        if reason == "authentication failed":
            user = f"'{parsed.username}'" if parsed.username else "(from the option file)"
            source = (
                "libpq reads it from ~/.pgpass, the file named by PGPASSFILE, or PGPASSWORD"
                if backend == "postgresql"
                else "PyMySQL reads it from the option file named by ?read_default_file="
            )
            reason = f"authentication failed for user {user}; check its password ({source})"
        elif reason == "the database does not exist":
            reason = f"database {parsed.database!r} does not exist; create it first"
        elif reason == _SCHEMA_RACE:
            return StorageError(f"could not create the tables of {masked}: {reason}; run the command again")
        return StorageError(f"could not connect to {masked}: {reason}")
    # A DBAPIError's own text adds the SQL and a link; the driver's first line says it all.
    # Optuna's StorageInternalError hides the driver's error behind a generic text.
    if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ is not None:
        exc = exc.__cause__
    driver_text = _scrub(str(getattr(exc, "orig", None) or exc), url).strip()
    first_line = driver_text.splitlines()[0] if driver_text else type(exc).__name__
    return StorageError(f"could not open the study database {masked}: {first_line}")


def close_storage(storage: optuna.storages.RDBStorage) -> None:
    """Release this process's connections to the study database."""
    storage.remove_session()
    storage.engine.dispose()


@contextlib.contextmanager
def storage_session(url: str, **kwargs: Any) -> Iterator[StagetuneStorage]:
    """Open the storage (see :func:`open_storage`), and close it on exit.

    With ``read_only``, a failure inside the block first runs optuna's schema check:
    a database of another optuna schema gets its one-line advice, not a SQL error.
    """
    storage = open_storage(url, **kwargs)
    try:
        yield storage
    except Exception as exc:
        if kwargs.get("read_only") and not isinstance(exc, StagetuneError):
            try:
                check_schema(storage)
            except RuntimeError as old:
                raise _open_error(old, url, _parse(_with_default_driver(url)), create=False) from exc
            except Exception:  # the check itself failed: the first error tells more
                pass
        raise
    finally:
        close_storage(storage)
