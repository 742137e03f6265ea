"""Tests for stagetune.optim.storage, against real SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from alembic import command as alembic_command
from fixtures_db import TEST_DB_PASSWORD, TEST_DB_USER, ServerDatabase
from servers import free_port

from stagetune.errors import StorageError, UsageError
from stagetune.optim.storage import (
    SQLITE_BUSY_TIMEOUT_S,
    close_storage,
    default_study_name,
    is_transient_db_error,
    mask_url,
    open_storage,
    retry_transient,
    storage_session,
    warn_inline_password,
)

OPTUNA_CLI = Path(sys.executable).with_name("optuna")


def _objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -1.0, 1.0) ** 2


def _assert_one_clean_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert TEST_DB_PASSWORD not in message


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://optuna:pw123@db:5432/hpo", "postgresql://optuna:***@db:5432/hpo"),
        ("postgresql+psycopg2://u:p@ss@host/db", "postgresql+psycopg2://u:***@host/db"),
        ("mysql+pymysql://u:p%40ss%2Fx@h/db", "mysql+pymysql://u:***@h/db"),
        ("mysql+pymysql://u@h/db?charset=utf8&password=pw123",
         "mysql+pymysql://u@h/db?charset=utf8&password=***"),
        ("postgresql://u@h/db?PASSWORD=pw123&x=1", "postgresql://u@h/db?PASSWORD=***&x=1"),
        ("mysql:///db?read_default_file=~/.my.cnf", "mysql:///db?read_default_file=~/.my.cnf"),
        ("sqlite:///exp/optim.db", "sqlite:///exp/optim.db"),
        ("sqlite:////abs/a:b@c/optim.db", "sqlite:////abs/a:b@c/optim.db"),
        ("postgresql://u:pw/12?3@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h:5/db?sslrootcert=/a@b/ca", "postgresql://u@h:5/db?sslrootcert=/a@b/ca"),
        ("postgresql//u:pw123@h/db", "postgresql//u:***@h/db"),
        ("u:pw123@h", "u:***@h"),
    ],
)
def test_mask_url_hides_every_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("sqlite:///exp/optim.db", "optim"),
        ("sqlite:////abs/path/cnn-mellin.sqlite3", "cnn-mellin"),
        ("postgresql://u:pw@h:5432/timit_hpo", "timit_hpo"),
        ("mysql+pymysql:///wsj?read_default_file=~/.my.cnf", "wsj"),
    ],
)
def test_default_study_name_is_the_database_name(url: str, name: str) -> None:
    assert default_study_name(url) == name


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "postgresql://u:pw123@h"])
def test_default_study_name_asks_for_study_name_when_none(url: str) -> None:
    with pytest.raises(UsageError, match="give --study-name") as caught:
        default_study_name(url)
    assert "pw123" not in str(caught.value)


def test_warn_inline_password_names_the_alternatives() -> None:
    postgres = warn_inline_password("postgresql://u:pw123@h/db")
    assert postgres is not None and "pw123" not in postgres and "u:***@h" in postgres
    assert all(word in postgres for word in ("~/.pgpass", "PGPASSFILE", "PGPASSWORD"))
    mysql = warn_inline_password("mysql+pymysql://u@h/db?password=pw123")
    assert mysql is not None and "pw123" not in mysql
    assert "?read_default_file=~/.my.cnf" in mysql
    assert warn_inline_password("postgresql://u@h/db") is None
    assert warn_inline_password("mysql+pymysql:///db?read_default_file=/c.cnf") is None
    assert warn_inline_password("sqlite:///exp/optim.db") is None


# --- opening on all three backends ------------------------------------------------------


def test_open_storage_creates_and_reopens_a_study(storage_url: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        with storage_session(storage_url, heartbeat_interval=5, grace_period=20) as storage:
            assert (storage.heartbeat_interval, storage.grace_period) == (5, 20)
            study = optuna.create_study(storage=storage, study_name="s")
            study.optimize(_objective, n_trials=3)
    with storage_session(storage_url, create=False) as storage:
        study = optuna.load_study(study_name="s", storage=storage)
        assert len(study.trials) == 3


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_open_storage_passes_the_stale_trial_callback(tmp_path: Path) -> None:
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    url = f"sqlite:///{tmp_path}/optim.db"
    storage = open_storage(url, heartbeat_stale_trial_callback=callback)
    try:
        assert storage.get_heartbeat_stale_trial_callback() is callback
    finally:
        close_storage(storage)


def test_open_storage_rejects_non_positive_heartbeat(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="heartbeat interval must be a positive"):
        open_storage(f"sqlite:///{tmp_path}/optim.db", heartbeat_interval=0)


def test_inline_password_urls_work_but_are_warned_about(inline_password_storage_url: str) -> None:
    with storage_session(inline_password_storage_url) as storage:
        optuna.create_study(storage=storage, study_name="s")
    warning = warn_inline_password(inline_password_storage_url)
    assert warning is not None
    _assert_one_clean_line(warning)


@pytest.mark.server
def test_mysql_reads_everything_from_read_default_file(mariadb_server, make_storage_url) -> None:
    url = make_storage_url("mysql")
    database = sqlalchemy.engine.make_url(url).database
    bare_url = f"mysql+pymysql:///{database}?read_default_file={mariadb_server.option_file}"
    with storage_session(bare_url) as storage:
        optuna.create_study(storage=storage, study_name="s")
    without_file = mariadb_server.url(database, TEST_DB_USER)
    with pytest.raises(StorageError, match="authentication failed.*read_default_file") as caught:
        open_storage(without_file)
    _assert_one_clean_line(str(caught.value))


@pytest.mark.server
def test_postgresql_finds_the_password_in_pgpassfile_or_pgpassword(
    make_storage_url, postgres_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_storage_url("postgresql")
    assert os.environ["PGPASSFILE"] and warn_inline_password(url) is None
    with storage_session(url) as storage:
        optuna.create_study(storage=storage, study_name="s")
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.pgpass either
    expected = r"authentication failed.*~/\.pgpass.*PGPASSFILE.*PGPASSWORD"
    with pytest.raises(StorageError, match=expected) as caught:
        open_storage(url)
    _assert_one_clean_line(str(caught.value))
    monkeypatch.setenv("PGPASSWORD", TEST_DB_PASSWORD)
    with storage_session(url) as storage:
        assert optuna.load_study(study_name="s", storage=storage).study_name == "s"
    # The failed attempt, still held by `caught`, left no connection waiting in authentication
    # on the server (it would hold a slot, and block DROP DATABASE for authentication_timeout, 60 s).
    started = time.monotonic()
    postgres_server.drop_database(sqlalchemy.engine.make_url(url).database)
    assert time.monotonic() - started < 10 and caught.value is not None


# --- clear errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", ["postgresql+psycopg2", "mysql+pymysql"], ids=["postgresql", "mysql"]
)
def test_unreachable_server_is_one_clear_line(scheme: str) -> None:
    url = f"{scheme}://{TEST_DB_USER}:{TEST_DB_PASSWORD}@127.0.0.1:{free_port()}/hpo"
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    message = str(caught.value)
    _assert_one_clean_line(message)
    assert message == (
        f"could not connect to {mask_url(url)}: connection refused; is the server running?"
    )
    assert f"{TEST_DB_USER}:***@" in message


@pytest.mark.parametrize(
    ("url", "module", "hint"),
    [
        ("postgresql://u:pw123@127.0.0.1/db", "psycopg2", "pip install 'stagetune[postgresql]'"),
        ("mysql://u:pw123@127.0.0.1/db", "pymysql", "pip install 'stagetune[mysql]'"),
    ],
)
def test_missing_driver_says_what_to_install(
    url: str, module: str, hint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(StorageError, match=f"{module} driver .* not installed") as caught:
        open_storage(url)
    assert hint in str(caught.value) and "pw123" not in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
def test_url_without_driver_uses_the_driver_stagetune_installs(scheme: str) -> None:
    # SQLAlchemy 2.1 would pick psycopg 3 / mysqlclient, which stagetune does not install.
    driver = {"postgresql": "psycopg2", "mysql": "pymysql"}[scheme]
    port = free_port()
    with pytest.raises(StorageError) as caught:
        open_storage(f"{scheme}://u:pw123@127.0.0.1:{port}/db")
    assert str(caught.value) == (
        f"could not connect to {scheme}+{driver}://u:***@127.0.0.1:{port}/db: "
        "connection refused; is the server running?"
    )


def test_driver_stagetune_does_not_use_is_named() -> None:
    with pytest.raises(StorageError, match=r"'pg8000' .* use postgresql\+psycopg2://") as caught:
        open_storage("postgresql+pg8000://u:pw123@127.0.0.1/db")
    assert "pw123" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("oracle://u:pw123@h/db", "unsupported database 'oracle'"),
        ("mongodb://u:pw123@h/db", "unsupported database 'mongodb'"),
        ("optim.db", "cannot parse storage URL"),
    ],
)
def test_unknown_dialect_is_a_storage_error(url: str, expected: str) -> None:
    with pytest.raises(StorageError, match=expected) as caught:
        open_storage(url)
    assert "pw123" not in str(caught.value) and "sqlite:///" in str(caught.value)


def _make_old_schema(url: str) -> None:
    """Turn a current optuna database into one made by optuna 3.0 (schema v3.0.0.d)."""
    storage = open_storage(url)
    try:
        optuna.create_study(storage=storage, study_name="old").optimize(_objective, n_trials=2)
        # Only the revision goes back (a real downgrade of v3.2.0.a fails on MySQL, whose
        # foreign key needs the index): the revision is what optuna's check compares.
        config = storage._version_manager._create_alembic_config()
        alembic_command.stamp(config, "v3.0.0.d")
        with storage.engine.begin() as connection:
            connection.execute(sqlalchemy.text("UPDATE version_info SET library_version = '3.0.0'"))
    finally:
        close_storage(storage)


def test_old_schema_says_how_to_upgrade(storage_url: str) -> None:
    _make_old_schema(storage_url)
    with pytest.raises(StorageError) as caught:
        open_storage(storage_url)
    message = str(caught.value)
    _assert_one_clean_line(message)
    assert "created by optuna 3.0.0" in message
    assert f"run `optuna storage upgrade --storage {mask_url(storage_url)}`" in message
    # The advice works: after the upgrade the study is there again.
    upgrade = subprocess.run(
        [OPTUNA_CLI, "storage", "upgrade", "--storage", storage_url],
        capture_output=True, text=True, timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    with storage_session(storage_url, create=False) as storage:
        assert len(optuna.load_study(study_name="old", storage=storage).trials) == 2


def test_create_false_refuses_a_missing_sqlite_file(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no study database at .*missing.db"):
        open_storage(f"sqlite:///{tmp_path}/missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.server
def test_create_false_refuses_a_database_without_study(make_storage_url) -> None:
    url = make_storage_url("postgresql")
    with pytest.raises(StorageError, match="holds no optuna study; check the DB_URL of "):
        open_storage(url, create=False)


# --- SQLite -----------------------------------------------------------------------------


def test_sqlite_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/optim.db"
    with storage_session(url) as storage:
        with storage.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            busy_ms = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
            assert busy_ms == SQLITE_BUSY_TIMEOUT_S * 1000
    with sqlite3.connect(tmp_path / "optim.db") as connection:  # stored in the file
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("where", ["below tmp_path", "at the filesystem root"])
def test_sqlite_in_a_missing_directory_is_refused_not_created(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "exp" / "sm" if where == "below tmp_path" else Path("/") / f"st-missing-{uuid.uuid4().hex}"
    url = f"sqlite:///{directory}/optim.db"
    try:
        with pytest.raises(StorageError) as caught:
            open_storage(url)
        assert str(caught.value) == (
            f"directory {directory} does not exist; create it first (for the study database {url})"
        )
        assert not directory.exists() and not directory.parent.joinpath("exp").exists()
    finally:
        if directory.exists():  # what stagetune used to do, even at /
            shutil.rmtree(directory)


def test_sqlite_database_of_something_else_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "corpus.db"
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        for n in range(7):
            connection.execute(f"CREATE TABLE table{n} (id INTEGER PRIMARY KEY, value TEXT)")
    before = path.read_bytes(), path.stat().st_mtime_ns
    for create in (True, False):
        with pytest.raises(StorageError) as caught:
            open_storage(f"sqlite:///{path}", create=create)
        assert str(caught.value) == (
            f"{path} is an SQLite database of something else (tables table0, table1, table2, table3, "
            "table4, ..., none of them optuna's); stagetune keeps its studies in a file of their own: "
            "choose another DB_URL"
        )
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.db"]  # no -wal, -shm or .lock beside it
    # An empty file (``touch optim.db``) is a new database, not another tool's.
    (tmp_path / "optim.db").touch()
    with storage_session(f"sqlite:///{tmp_path / 'optim.db'}") as storage:
        assert storage.get_all_studies() == []


def test_sqlite_open_waits_for_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "optim.db"
    holder = sqlite3.connect(path, check_same_thread=False)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("BEGIN EXCLUSIVE")
    releaser = threading.Timer(1.0, holder.commit)
    releaser.start()
    started = time.monotonic()
    try:
        with storage_session(f"sqlite:///{path}") as storage:
            optuna.create_study(storage=storage, study_name="s")
    finally:
        releaser.join()
        holder.close()
    assert time.monotonic() - started >= 0.9


# --- transient errors -------------------------------------------------------------------


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("expected an exception")


def _query(url: str, sql: str = "SELECT 1") -> None:
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(sql)
    finally:
        engine.dispose()


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "mysql+pymysql"])
def test_connection_refused_is_transient(scheme: str) -> None:
    error = _raised(lambda: _query(f"{scheme}://u:pw123@127.0.0.1:{free_port()}/db"))
    assert isinstance(error, sqlalchemy.exc.OperationalError)
    assert is_transient_db_error(error)


def test_locked_sqlite_is_transient_other_sqlite_errors_are_not(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    holder = sqlite3.connect(path)
    holder.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.connect() as connection:
            locked = _raised(lambda: connection.exec_driver_sql("SELECT * FROM t"))
        holder.rollback()
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        with engine.connect() as connection:
            duplicate = _raised(lambda: connection.exec_driver_sql("INSERT INTO t VALUES (1)"))
            no_table = _raised(lambda: connection.exec_driver_sql("SELECT * FROM missing"))
            syntax = _raised(lambda: connection.exec_driver_sql("SELEC 1"))
    finally:
        engine.dispose()
        holder.close()
    assert "database is locked" in str(locked) and is_transient_db_error(locked)
    wrapped = optuna.exceptions.StorageInternalError("commit failed")
    wrapped.__cause__ = locked
    assert is_transient_db_error(wrapped)
    for error in (duplicate, no_table, syntax):
        assert isinstance(error, sqlalchemy.exc.DBAPIError) and not is_transient_db_error(error)
    assert not is_transient_db_error(ValueError("connection refused"))


@pytest.mark.server
def test_wrong_password_and_missing_database_are_not_transient(postgres_server) -> None:
    wrong_password = postgres_server.url("postgres", TEST_DB_USER, "wrong-password")
    assert not is_transient_db_error(_raised(lambda: _query(wrong_password)))
    missing = postgres_server.url("no_such_db", TEST_DB_USER, TEST_DB_PASSWORD)
    error = _raised(lambda: _query(missing))
    assert "does not exist" in str(error) and not is_transient_db_error(error)


def test_retry_transient_gives_up_after_max_wait_and_lets_other_errors_through() -> None:
    url = f"postgresql+psycopg2://u:{TEST_DB_PASSWORD}@127.0.0.1:{free_port()}/db"
    lines: list[str] = []
    with pytest.raises(StorageError, match="still unreachable after") as caught:
        retry_transient(lambda: _query(url), what="loading", url=url, max_wait_s=0.6,
                        log=lines.append)
    assert len(lines) == 1 and "retrying for up to 0.6 s" in lines[0]
    assert all(TEST_DB_PASSWORD not in text for text in (*lines, str(caught.value)))
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("connection refused")

    with pytest.raises(ValueError):
        retry_transient(broken, what="loading", max_wait_s=5, log=lines.append)
    assert calls == [1]


def test_retry_transient_survives_a_server_restart(server_database: ServerDatabase) -> None:
    """The server stops for ~3 s mid-search: the worker waits and carries on."""
    backend, server, url = server_database
    storage = open_storage(url)
    held = storage.engine.connect()  # a connection the outage will cut
    try:
        study = optuna.create_study(storage=storage, study_name="s")
        study.optimize(_objective, n_trials=2)
        restarter = server.stop_for(3.0)
        try:
            cut = _raised(lambda: held.exec_driver_sql("SELECT 1"))
            errors: list[BaseException] = []

            def count_trials() -> int:
                try:
                    return len(optuna.load_study(study_name="s", storage=storage).trials)
                except Exception as exc:
                    errors.append(exc)
                    raise

            lines: list[str] = []
            started = time.monotonic()
            assert retry_transient(count_trials, what="loading study s", url=url,
                                   max_wait_s=60, log=lines.append) == 2
            waited = time.monotonic() - started
        finally:
            restarter.join()
        assert server.is_running()
        assert is_transient_db_error(cut), cut
        assert errors and all(is_transient_db_error(error) for error in errors)
        assert 2.0 <= waited < 15.0
        assert len(lines) == 2, lines
        assert "unreachable" in lines[0] and "retrying for up to 60 s" in lines[0]
        assert "reachable again after" in lines[1]
        assert all(mask_url(url) in line and TEST_DB_PASSWORD not in line for line in lines)
        study.optimize(_objective, n_trials=1)  # the same storage object works on
        assert len(study.trials) == 3
    finally:
        held.close()
        close_storage(storage)


@pytest.mark.server
def test_close_storage_releases_server_connections(postgres_server, make_storage_url) -> None:
    url = make_storage_url("postgresql")
    database = sqlalchemy.engine.make_url(url).database

    def connections() -> int:
        admin = postgres_server.admin()
        try:
            with admin.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                               (database,))
                return cursor.fetchone()[0]
        finally:
            admin.close()

    storage = open_storage(url)
    optuna.create_study(storage=storage, study_name="s").optimize(_objective, n_trials=1)
    assert connections() >= 1
    close_storage(storage)
    deadline = time.monotonic() + 5
    while connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connections() == 0
