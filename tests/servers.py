"""Throwaway PostgreSQL and MariaDB servers for tests: real servers on loopback.

Each server lives in its own base directory (data, socket, pid file, log) on a
free port, is administered through its Unix socket, and is stopped by PID.
Outage tests stop and restart the same data directory on the same port
(:meth:`stop_for`). Servers still running at interpreter exit or on SIGTERM are
stopped by hooks installed here, so an aborted test session leaves none behind.

Run as root (CI), the server processes run as the ``postgres``/``mysql`` users,
which the database packages create; as another user they run as that user.
Binaries missing: run ``scripts/install_system_deps.sh`` as root.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["ServerError", "PostgresServer", "MariaDBServer", "free_port"]

INSTALL_HINT = "run `scripts/install_system_deps.sh` as root to install the test servers"
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """A test server could not be installed, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _continue_family(pid: int) -> None:
    """SIGCONT ``pid`` and its descendants: a server a fault test froze (SIGSTOP) must not
    sit out the stop timeout because one of its processes is still stopped."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            os.kill(current, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _stop_pid(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` and wait for it to exit; SIGKILL after a timeout."""
    _continue_family(pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + _STOP_TIMEOUT_S
        time.sleep(0.05)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_running: set[_Server] = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.cleanup()


def _stop_all_on_sigterm() -> None:
    """Also stop the servers when the test run is terminated (a CI timeout)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum: int, frame: object) -> None:
        _stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


class _Server:
    """What both servers share: base dir, port, lifecycle, outage simulation."""

    name = "server"
    service_user = "root"
    default_driver = ""

    def __init__(self, base_dir: Path | None = None, port: int | None = None, *,
                 max_connections: int = 300) -> None:
        self._owns_base_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"stagetune-{self.name}-"))
        self.port = port or free_port()
        self.max_connections = max_connections
        self._run_as_service_user = os.geteuid() == 0
        if self._run_as_service_user:
            try:
                account = pwd.getpwnam(self.service_user)
            except KeyError:
                raise ServerError(f"no '{self.service_user}' user for {self.name}; {INSTALL_HINT}")
            os.chown(self.base_dir, account.pw_uid, account.pw_gid)
        os.chmod(self.base_dir, 0o700)

    def _as_service_user(self, command: list[str]) -> list[str]:
        if self._run_as_service_user:
            return ["runuser", "-u", self.service_user, "--", *command]
        return command

    def _run(self, command: list[str], what: str) -> None:
        done = subprocess.run(self._as_service_user(command), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"{self.name}: {what} failed ({done.returncode}):\n"
                              f"{done.stdout}{done.stderr}")

    def start(self) -> None:
        """Initialise the data directory on first use, then start and wait until ready."""
        _stop_all_on_sigterm()
        self._start()
        with _running_lock:
            _running.add(self)

    def stop(self) -> None:
        """Stop the server by PID and wait until it has exited (data is kept)."""
        self._stop()
        with _running_lock:
            _running.discard(self)

    def pid(self) -> int | None:
        raise NotImplementedError

    def is_running(self) -> bool:
        pid = self.pid()
        return pid is not None and _pid_alive(pid)

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop_for(self, seconds: float) -> threading.Thread:
        """Stop the server now and start it again after ``seconds`` in the background.

        Returns:
            The restarting thread; ``join()`` it to wait until the server is back.
        """
        self.stop()

        def restart_later() -> None:
            time.sleep(seconds)
            self.start()

        thread = threading.Thread(target=restart_later, name=f"restart-{self.name}", daemon=True)
        thread.start()
        return thread

    def cleanup(self) -> None:
        """Stop the server at once (data is discarded) and remove a base dir it created."""
        try:
            self._stop(immediate=True)
            with _running_lock:
                _running.discard(self)
        finally:
            if self._owns_base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, database: str, user: str, password: str | None = None, *,
            query: str = "") -> str:
        """SQLAlchemy URL over TCP; without ``password`` the driver finds it elsewhere."""
        secret = f":{quote(password, safe='')}" if password else ""
        suffix = f"?{query}" if query else ""
        return f"{self.default_driver}://{user}{secret}@127.0.0.1:{self.port}/{database}{suffix}"

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self, *, immediate: bool = False) -> None:
        raise NotImplementedError

    @staticmethod
    def _check_identifier(name: str) -> str:
        if not name.replace("_", "a").isalnum() or name[0].isdigit():
            raise ValueError(f"test database/user names must be plain identifiers, got {name!r}")
        return name


class PostgresServer(_Server):
    """A PostgreSQL server (password auth over TCP, trust over its Unix socket)."""

    name = "postgresql"
    service_user = "postgres"
    default_driver = "postgresql+psycopg2"

    def __init__(self, base_dir: Path | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        self.bin_dir = self._find_bin_dir()
        super().__init__(base_dir, port, **kwargs)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"

    @staticmethod
    def _find_bin_dir() -> Path:
        candidates = [os.environ.get("STAGETUNE_PG_BINDIR", ""), "/usr/lib/postgresql/15/bin",
                      *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
        on_path = shutil.which("pg_ctl")
        candidates.append(str(Path(on_path).parent) if on_path else "")
        for candidate in filter(None, candidates):
            if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
                return Path(candidate)
        raise ServerError("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                          f"/usr/lib/postgresql/*/bin or PATH; {INSTALL_HINT}")

    def _start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--no-sync"], "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base_dir} "
                   f"-c fsync=off -c max_connections={self.max_connections}")
        try:
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                       str(self.log_path), "-w", "-t", str(int(_START_TIMEOUT_S)), "-o", options,
                       "start"], "pg_ctl start")
        except ServerError as exc:
            raise ServerError(f"{exc}\nserver log:\n{_log_tail(self.log_path)}") from None

    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _stop(self, *, immediate: bool = False) -> None:
        pid = self.pid()
        if pid is not None:
            # PostgreSQL's shutdown modes: SIGINT "fast", SIGQUIT "immediate" (no checkpoint).
            _stop_pid(pid, signal.SIGQUIT if immediate else signal.SIGINT)

    def admin(self) -> Any:
        """A superuser psycopg2 connection over the Unix socket (autocommit)."""
        import psycopg2

        connection = psycopg2.connect(host=str(self.base_dir), port=self.port, user="postgres",
                                      dbname="postgres")
        connection.autocommit = True
        return connection

    def create_user(self, user: str, password: str) -> None:
        """Create (or re-password) a login role."""
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
                verb = "ALTER" if cursor.fetchone() else "CREATE"
                cursor.execute(f"{verb} ROLE {self._check_identifier(user)} LOGIN PASSWORD %s",
                               (password,))
        finally:
            connection.close()

    def create_database(self, name: str, user: str, password: str | None = None) -> None:
        """Create database ``name`` owned by ``user`` (created first if ``password``)."""
        if password is not None:
            self.create_user(user, password)
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {self._check_identifier(name)} "
                               f"OWNER {self._check_identifier(user)}")
        finally:
            connection.close()

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still connected to it."""
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {self._check_identifier(name)} "
                               "WITH (FORCE)")
        finally:
            connection.close()

    def write_pgpass(self, path: Path, user: str, password: str) -> Path:
        """Write a libpq password file for ``user`` on this server (mode 600)."""
        path.write_text(f"127.0.0.1:{self.port}:*:{user}:{password}\n"
                        f"localhost:{self.port}:*:{user}:{password}\n")
        path.chmod(0o600)
        return path


class MariaDBServer(_Server):
    """A MariaDB server (root over its Unix socket; test users over TCP)."""

    name = "mariadb"
    service_user = "mysql"
    default_driver = "mysql+pymysql"

    def __init__(self, base_dir: Path | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        self.server_binary = self._find_binary("mariadbd")
        self.install_binary = self._find_binary("mariadb-install-db")
        super().__init__(base_dir, port, **kwargs)
        self.data_dir = self.base_dir / "data"
        self.socket_path = self.base_dir / "mysqld.sock"
        self.pid_path = self.base_dir / "mysqld.pid"
        self.log_path = self.base_dir / "error.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.option_file: Path | None = None

    @staticmethod
    def _find_binary(name: str) -> str:
        for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if candidate and os.access(candidate, os.X_OK):
                return candidate
        raise ServerError(f"MariaDB binary {name} not found in PATH or /usr/sbin; {INSTALL_HINT}")

    def _start(self) -> None:
        if not (self.data_dir / "mysql").is_dir():
            self._run([self.install_binary, "--no-defaults", f"--user={self.service_user}",
                       f"--datadir={self.data_dir}", "--auth-root-authentication-method=socket",
                       "--skip-test-db"], "mariadb-install-db")
        command = [self.server_binary, "--no-defaults", f"--datadir={self.data_dir}",
                   f"--socket={self.socket_path}", f"--pid-file={self.pid_path}",
                   f"--port={self.port}", "--bind-address=127.0.0.1",
                   f"--log-error={self.log_path}", "--skip-name-resolve",
                   "--innodb-flush-log-at-trx-commit=2",
                   f"--max-connections={self.max_connections}"]
        if self._run_as_service_user:
            command.insert(2, f"--user={self.service_user}")
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise ServerError(f"mariadbd exited with {self._process.returncode}; error log:\n"
                                  f"{_log_tail(self.log_path)}")
            try:
                self.admin().close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self._stop(immediate=True)
                    raise ServerError(f"mariadbd not ready after {_START_TIMEOUT_S:g} s; "
                                      f"error log:\n{_log_tail(self.log_path)}") from None
                time.sleep(0.1)

    def pid(self) -> int | None:
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        try:
            return int(self.pid_path.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _stop(self, *, immediate: bool = False) -> None:
        pid = self.pid()
        if pid is not None:
            _stop_pid(pid, signal.SIGKILL if immediate else signal.SIGTERM)
        if self._process is not None:
            self._process.wait()  # reap it
            self._process = None

    def admin(self) -> Any:
        """A root PyMySQL connection over the Unix socket (autocommit)."""
        import pymysql

        return pymysql.connect(unix_socket=str(self.socket_path), user="root", autocommit=True,
                               connect_timeout=5)

    def create_user(self, user: str, password: str) -> None:
        """Create (or re-password) ``user`` for both loopback host names."""
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                for host in ("127.0.0.1", "localhost"):
                    account = f"'{self._check_identifier(user)}'@'{host}'"
                    cursor.execute(f"CREATE USER IF NOT EXISTS {account} IDENTIFIED BY %s",
                                   (password,))
                    cursor.execute(f"ALTER USER {account} IDENTIFIED BY %s", (password,))
        finally:
            connection.close()

    def create_database(self, name: str, user: str, password: str | None = None) -> None:
        """Create database ``name`` with all privileges for ``user``."""
        if password is not None:
            self.create_user(user, password)
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {self._check_identifier(name)}")
                for host in ("127.0.0.1", "localhost"):
                    cursor.execute(f"GRANT ALL ON {name}.* TO "
                                   f"'{self._check_identifier(user)}'@'{host}'")
        finally:
            connection.close()

    def drop_database(self, name: str) -> None:
        """Drop ``name``, killing the connections still using it (they would block)."""
        connection = self.admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT id FROM information_schema.processlist WHERE db = %s",
                               (name,))
                for (thread_id,) in cursor.fetchall():
                    try:
                        cursor.execute(f"KILL {int(thread_id)}")
                    except Exception:  # it ended by itself meanwhile
                        pass
                cursor.execute(f"DROP DATABASE IF EXISTS {self._check_identifier(name)}")
        finally:
            connection.close()

    def write_option_file(self, path: Path, user: str, password: str) -> Path:
        """Write a ``[client]`` option file for ``?read_default_file=`` (mode 600).

        It is remembered as :attr:`option_file`.
        """
        path.write_text(f"[client]\nuser={user}\npassword={password}\nhost=127.0.0.1\n"
                        f"port={self.port}\n")
        path.chmod(0o600)
        self.option_file = path
        return path
