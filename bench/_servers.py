"""Throwaway databases for the benches: SQLite files and real PostgreSQL/MariaDB servers.

The servers are the test suite's (``tests/servers.py``): started on a free
loopback port in a temporary base directory, stopped by PID and removed when
the :func:`databases` context ends (also on Ctrl-C or SIGTERM: hooks in
``servers.py``). URLs carry no password: PostgreSQL reads it from the file
named by ``PGPASSFILE`` (set in ``os.environ``, so worker subprocesses inherit
it), MariaDB from the option file named by ``?read_default_file=``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import MariaDBServer, PostgresServer, ServerError  # noqa: E402

__all__ = ["BACKENDS", "ServerError", "databases", "parse_backends"]

BACKENDS = ("sqlite", "postgresql", "mysql")
_USER = "stagetune_bench"


def parse_backends(text: str) -> list[str]:
    """``"all"`` or a comma-separated subset of :data:`BACKENDS`, in that order."""
    wanted = BACKENDS if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown or not wanted:
        raise SystemExit(f"backends must be 'all' or a comma-separated subset of {', '.join(BACKENDS)}, "
                         f"got {text!r}")
    return [b for b in BACKENDS if b in wanted]


@contextlib.contextmanager
def databases(
    backends: Sequence[str], sqlite_dir: Path | None = None, *, log: Callable[[str], None] = print,
    max_connections: int | None = None,
) -> Iterator[Callable[[str], str]]:
    """Start the servers ``backends`` need; yield ``make_url(backend) -> fresh database URL``.

    Every call of ``make_url`` creates a new, empty database (a new file for
    SQLite, under ``sqlite_dir`` or a temporary directory). ``max_connections``
    sets the servers' limit (default: theirs).
    """
    password = secrets.token_hex(12)
    servers: dict[str, PostgresServer | MariaDBServer] = {}
    counter = iter(range(1_000_000))
    with contextlib.ExitStack() as stack:
        if sqlite_dir is None:
            sqlite_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stagetune-bench-")))
        sqlite_dir.mkdir(parents=True, exist_ok=True)
        old_pgpass = os.environ.get("PGPASSFILE")
        try:
            for backend in backends:
                if backend == "sqlite":
                    continue
                options = {} if max_connections is None else {"max_connections": max_connections}
                server = (PostgresServer if backend == "postgresql" else MariaDBServer)(**options)
                stack.callback(_stop, server, log)
                limit = "" if max_connections is None else f" (max_connections {max_connections})"
                log(f"starting a throwaway {server.name} server on 127.0.0.1:{server.port}{limit}")
                server.start()
                server.create_user(_USER, password)
                if backend == "postgresql":
                    pgpass = server.write_pgpass(server.base_dir / "pgpass", _USER, password)
                    os.environ["PGPASSFILE"] = str(pgpass)
                else:
                    server.write_option_file(server.base_dir / "client.cnf", _USER, password)
                servers[backend] = server

            def make_url(backend: str) -> str:
                name = f"bench_{os.getpid()}_{next(counter)}"
                if backend == "sqlite":
                    return f"sqlite:///{sqlite_dir / name}.db"
                server = servers[backend]
                server.create_database(name, _USER)
                if backend == "mysql":
                    return server.url(name, _USER, query=f"read_default_file={server.option_file}")
                return server.url(name, _USER)

            yield make_url
        finally:
            if old_pgpass is None:
                os.environ.pop("PGPASSFILE", None)
            else:
                os.environ["PGPASSFILE"] = old_pgpass


def _stop(server: PostgresServer | MariaDBServer, log: Callable[[str], None]) -> None:
    log(f"stopping the {server.name} server")
    server.cleanup()
