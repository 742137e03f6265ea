"""Real-database fixtures: throwaway PostgreSQL/MariaDB servers and fresh storage URLs.

Usage::

    def test_study(storage_url):          # runs three times: sqlite, postgresql, mysql
        storage = open_storage(storage_url)

    def test_two(make_storage_url):       # any number of fresh databases, any backend
        url = make_storage_url("postgresql", inline_password=True)

The servers start once per session, on first use, and stop at session end (also
when a test fails or the run is terminated: hooks in ``servers.py``). Storage
URLs carry no password: PostgreSQL finds it in the file named by ``PGPASSFILE``
(set in ``os.environ`` for the session, so subprocess workers inherit it), MySQL
in the option file named by ``?read_default_file=``. Outputs can be grepped for
:data:`TEST_DB_PASSWORD` to prove it never leaks.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from servers import MariaDBServer, PostgresServer, ServerError

__all__ = ["TEST_DB_USER", "TEST_DB_PASSWORD", "BACKENDS", "SERVER_BACKENDS", "ServerDatabase"]

TEST_DB_USER = "stagetune"
TEST_DB_PASSWORD = "s3cr3t-Xq9-stagetune"
BACKENDS = ("sqlite", "postgresql", "mysql")
SERVER_BACKENDS = ("postgresql", "mysql")


_SERVER_FIXTURES = {"postgresql": "postgres_server", "mysql": "mariadb_server"}


class ServerDatabase(NamedTuple):
    """A fresh database on a running test server, for tests that stop the server."""

    backend: str
    server: PostgresServer | MariaDBServer
    url: str


def _backend_params(backends: tuple[str, ...]) -> list[object]:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.server] if name in SERVER_BACKENDS else [])
        for name in backends
    ]


def _start_or_fail(
    server_class: type[PostgresServer] | type[MariaDBServer],
) -> PostgresServer | MariaDBServer:
    """Start a server; a missing binary or failed start fails the tests that need it."""
    try:
        server = server_class()
    except ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
    except ServerError as exc:
        server.cleanup()
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server with user TEST_DB_USER, found through PGPASSFILE."""
    server = _start_or_fail(PostgresServer)
    try:
        server.create_user(TEST_DB_USER, TEST_DB_PASSWORD)
        # Password files live in the server's base dir: removed with it, even on SIGTERM.
        pgpass = server.write_pgpass(server.base_dir / "pgpass", TEST_DB_USER, TEST_DB_PASSWORD)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("PGPASSFILE", str(pgpass))
            yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """A MariaDB server with user TEST_DB_USER; ``server.option_file`` holds its password."""
    server = _start_or_fail(MariaDBServer)
    try:
        server.create_user(TEST_DB_USER, TEST_DB_PASSWORD)
        server.write_option_file(server.base_dir / "client.cnf", TEST_DB_USER, TEST_DB_PASSWORD)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def make_storage_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., str]]:
    """Factory: ``make(backend, *, inline_password=False) -> URL`` of a fresh, empty database.

    ``backend`` is one of :data:`BACKENDS`. Server databases are dropped after the
    test. With ``inline_password`` the password is written into the URL (to test
    masking); otherwise PGPASSFILE / ``?read_default_file=`` supply it.
    """
    drops: list[Callable[[], None]] = []

    def make(backend: str, *, inline_password: bool = False) -> str:
        name = f"st_{uuid.uuid4().hex[:12]}"
        password = TEST_DB_PASSWORD if inline_password else None
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        if backend == "postgresql":
            server = request.getfixturevalue("postgres_server")
            server.create_database(name, TEST_DB_USER)
            drops.append(lambda: server.drop_database(name))
            return server.url(name, TEST_DB_USER, password)
        if backend == "mysql":
            server = request.getfixturevalue("mariadb_server")
            server.create_database(name, TEST_DB_USER)
            drops.append(lambda: server.drop_database(name))
            if inline_password:
                return server.url(name, TEST_DB_USER, password)
            return server.url(name, TEST_DB_USER, query=f"read_default_file={server.option_file}")
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    yield make
    for drop in reversed(drops):
        drop()


@pytest.fixture(params=_backend_params(BACKENDS))
def storage_url(request: pytest.FixtureRequest, make_storage_url: Callable[..., str]) -> str:
    """A fresh, empty database URL without an inline password; ids sqlite/postgresql/mysql."""
    return make_storage_url(request.param)


@pytest.fixture(params=_backend_params(SERVER_BACKENDS))
def inline_password_storage_url(
    request: pytest.FixtureRequest, make_storage_url: Callable[..., str]
) -> str:
    """A fresh server database URL with TEST_DB_PASSWORD inline; ids postgresql/mysql."""
    return make_storage_url(request.param, inline_password=True)


@pytest.fixture(params=_backend_params(SERVER_BACKENDS))
def server_database(
    request: pytest.FixtureRequest, make_storage_url: Callable[..., str]
) -> ServerDatabase:
    """A fresh server database plus its server (to stop/restart); ids postgresql/mysql."""
    return ServerDatabase(
        request.param,
        request.getfixturevalue(_SERVER_FIXTURES[request.param]),
        make_storage_url(request.param),
    )
