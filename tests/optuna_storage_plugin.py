"""pytest plugin: run optuna's own storage tests against the storage stagetune opens.

Loaded with ``-p optuna_storage_plugin`` by ``test_optuna_storage_suite.py`` into a
pytest subprocess that collects ``tests/storages_tests`` of the optuna sdist. It
replaces optuna's storage factory (``optuna.testing.storages.StorageSupplier``)
and its mode lists before the test modules import them:

* ``sqlite`` / ``cached_sqlite``: :func:`stagetune.optim.storage.open_storage` on
  a fresh file (a :class:`StagetuneStorage`; "cached" wraps it in optuna's
  ``_CachedStorage``, as every ``optuna.load_study`` does);
* ``cached_postgresql``, ``cached_mysql``: the same on a database of the test
  servers (one per run, dropped at its end), given by the environment variable
  :data:`ENV` (JSON, written by the outer test);
* ``lockconn_postgresql``, ``lockconn_mysql``: the plain storage with the test
  thread's sessions on one connection (:meth:`StagetuneStorage.sessions_on`), as a
  worker claims its trial on the connection that holds the budget lock.

``test_with_server.py`` (optuna's tests that need a server URL) runs once per
server. Every test starts on an empty database: a new SQLite file, or on a
server this run's database with optuna's tables emptied. Modes optuna has that
are not stagetune's storage (in-memory, journal, gRPC) are dropped.

No password passes through here: PostgreSQL finds it in ``PGPASSFILE``, MariaDB
in the option file named in the URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import types
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

ENV = "STAGETUNE_OPTUNA_SUITE"

_CONFIG: dict[str, Any] = json.loads(os.environ.get(ENV, "{}"))
#: backend -> {"base_dir", "port", "user", "option_file"} of a running test server
SERVERS: dict[str, dict[str, Any]] = _CONFIG.get("servers", {})
BACKENDS = ["sqlite", *SERVERS]

if "fakeredis" not in sys.modules:
    # optuna.testing.storages imports fakeredis for its journal_redis mode, which is
    # not stagetune's storage and is not run here: a stand-in saves a dependency.
    try:
        import fakeredis  # noqa: F401
    except ImportError:
        stub = types.ModuleType("fakeredis")

        def _no_redis(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("fakeredis is not installed (journal_redis is not stagetune's storage)")

        stub.FakeStrictRedis = _no_redis  # type: ignore[attr-defined]
        sys.modules["fakeredis"] = stub

import optuna  # noqa: E402
import optuna.testing.storages as optuna_storages  # noqa: E402
import sqlalchemy  # noqa: E402
from optuna.storages._rdb import models  # noqa: E402
from servers import MariaDBServer, PostgresServer  # noqa: E402

from stagetune.optim.storage import close_storage, open_storage  # noqa: E402

_SERVER_CLASSES = {"postgresql": PostgresServer, "mysql": MariaDBServer}
_servers: dict[str, PostgresServer | MariaDBServer] = {}


def _server(backend: str) -> PostgresServer | MariaDBServer:
    """The outer session's running server, administered over its socket (never started here)."""
    if backend not in _servers:
        info = SERVERS[backend]
        _servers[backend] = _SERVER_CLASSES[backend](base_dir=info["base_dir"], port=info["port"])
    return _servers[backend]


def fresh_url(backend: str) -> tuple[str, Any]:
    """An empty database of ``backend`` and a callable that removes it (if it is a file)."""
    if backend == "sqlite":
        fd, path = tempfile.mkstemp(suffix=".db")  # under the TMPDIR the outer test gives
        os.close(fd)

        def remove() -> None:
            for suffix in ("", "-wal", "-shm", ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path + suffix)

        return f"sqlite:///{path}", remove
    return _server_database(backend), lambda: None


_databases: dict[str, tuple[str, Any]] = {}


def _server_database(backend: str) -> str:
    """The URL of this run's database on ``backend``'s server, emptied for the next test.

    One database per server, its optuna tables emptied before each test: creating
    (and dropping) a database with optuna's tables per test took about a second.
    """
    if backend not in _databases:
        server, info = _server(backend), SERVERS[backend]
        name = f"stoptuna_{uuid.uuid4().hex[:12]}"
        server.create_database(name, info["user"])
        query = f"read_default_file={info['option_file']}" if backend == "mysql" else ""
        url = server.url(name, info["user"], query=query)
        _databases[backend] = (url, sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool))
        return url
    url, engine = _databases[backend]
    tables = [t for t in reversed(models.BaseModel.metadata.sorted_tables) if t.name != "version_info"]
    with engine.begin() as conn:
        for table in tables:
            conn.execute(table.delete())
    return url


def pytest_sessionfinish(session: pytest.Session) -> None:
    for backend, (url, engine) in _databases.items():
        engine.dispose()
        _server(backend).drop_database(str(sqlalchemy.engine.make_url(url).database))


def _open(url: str, **kwargs: Any) -> Any:
    """The storage as stagetune opens it (optuna's heartbeat default: off)."""
    kwargs.setdefault("heartbeat_interval", None)
    return open_storage(url, **kwargs)


class StagetuneStorageSupplier(optuna_storages.StorageSupplier):
    """optuna's storage factory, handing out stagetune's storage for every RDB mode."""

    def __enter__(self) -> Any:
        mode = self.storage_specifier
        kind, _, backend = mode.rpartition("_")
        if backend not in BACKENDS:
            return super().__enter__()
        url, self._stagetune_remove = fresh_url(backend)
        try:
            rdb = _open(url, **self.extra_args)
        except BaseException:
            self._stagetune_remove()
            raise
        self._stagetune_sessions = contextlib.ExitStack()
        if kind == "lockconn":
            conn = self._stagetune_sessions.enter_context(rdb.engine.connect())
            self._stagetune_sessions.enter_context(rdb.sessions_on(conn))
        self.storage = optuna.storages._CachedStorage(rdb) if kind == "cached" else rdb
        return self.storage

    def __exit__(self, *exc: Any) -> None:
        try:
            sessions = getattr(self, "_stagetune_sessions", None)
            if sessions is not None:
                sessions.close()
            super().__exit__(*exc)
        finally:
            remove = getattr(self, "_stagetune_remove", None)
            if remove is not None:
                remove()


def _modes(backends: list[str]) -> list[str]:
    """optuna's two RDB modes for SQLite; on a server the cached one and the claim's."""
    return [mode for backend in backends
            for mode in ((backend, f"cached_{backend}") if backend == "sqlite"
                         else (f"cached_{backend}", f"lockconn_{backend}"))]


# Before any test module imports them (they bind the names at import).
optuna_storages.StorageSupplier = StagetuneStorageSupplier  # type: ignore[misc]
optuna_storages.STORAGE_MODES[:] = _modes(BACKENDS)
# The heartbeat tests wait for heartbeats to go stale (about 40 s a mode): on a server
# only in the cached mode, the one a worker's heartbeat thread uses.
optuna_storages.STORAGE_MODES_HEARTBEAT[:] = [
    mode for mode in _modes(BACKENDS) if not mode.startswith("lockconn_")
]

_WITH_SERVER = "test_with_server"
_BACKEND_ARG = "stagetune_backend"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # optuna runs test_with_server.py against the one server of TEST_DB_URL: here,
    # once per server.
    if metafunc.module.__name__.rpartition(".")[2] == _WITH_SERVER:
        metafunc.fixturenames.append(_BACKEND_ARG)
        metafunc.parametrize(_BACKEND_ARG, list(SERVERS))


@pytest.fixture(autouse=True)
def _stagetune_with_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Point test_with_server.py's ``get_storage`` at a fresh database of the backend."""
    module = request.module
    if module.__name__.rpartition(".")[2] != _WITH_SERVER:
        yield
        return
    url, remove = fresh_url(request.node.callspec.params[_BACKEND_ARG])

    @contextlib.contextmanager
    def get_storage() -> Iterator[Any]:
        storage = _open(url)
        try:
            yield storage
        finally:
            close_storage(storage)

    original = module.get_storage
    module.get_storage = get_storage  # forked ProcessPoolExecutor workers inherit it
    try:
        yield
    finally:
        module.get_storage = original
        remove()
