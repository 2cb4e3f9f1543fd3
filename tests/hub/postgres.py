"""A throwaway PostgreSQL cluster for tests, from Debian's binaries: initdb into a temp dir, one server on a free
loopback port (its unix socket in the same dir), a database `edgekit`, everything removed on stop.

initdb and postgres refuse to run as root. As root the server runs as the `postgres` system user (setpriv, which
execs, so the server stays our direct child); inside a user namespace that maps only root (`tests/offline` runs
the tests in one) that user does not exist to the kernel, so the server runs in a nested user namespace that maps
root to `postgres`: it sees itself as `postgres` while the files stay root's. Not root: it runs as we are.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgekit.hub.broker import LOOPBACK, free_port


def _binaries() -> Path:
    """$EDGEKIT_PG_BIN, else the newest Debian server (bookworm ships 15: /usr/lib/postgresql/15/bin)."""
    if os.environ.get("EDGEKIT_PG_BIN"):
        return Path(os.environ["EDGEKIT_PG_BIN"])
    versions = Path("/usr/lib/postgresql").glob("*/bin/initdb")
    found = sorted(versions, key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


BIN = _binaries()
MISSING = (f"PostgreSQL (Debian postgresql) is not installed: no server binaries in {BIN} (apt-get install postgresql, "
           "or `make sysdeps`)")  # fmt: skip
DATABASE = "edgekit"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
SERVER_USER = "postgres"


def available() -> bool:
    return all(os.access(BIN / name, os.X_OK) for name in ("initdb", "postgres"))


def _works(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0


def _server_user_prefix() -> tuple[list[str], bool]:
    """The command prefix that runs a program as a non-root user, and whether our files must be chowned to it."""
    if os.geteuid() != 0:
        return [], False
    as_user = ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups", "--"]
    if _works([*as_user, "true"]):
        return as_user, True
    nested = ["unshare", f"--map-user={SERVER_USER}", f"--map-group={SERVER_USER}", "--"]
    if _works([*nested, "true"]):
        return nested, False
    raise RuntimeError(f"running as root and neither setpriv nor unshare can run a program as {SERVER_USER!r}")


class PostgresCluster:
    """`start()` returns once `url` accepts connections; `stop()` shuts the server down and deletes its files."""

    def __init__(self) -> None:
        # A short path under /tmp: the unix socket path must fit in 107 bytes, which pytest's tmp_path may not.
        self.root = Path(tempfile.mkdtemp(prefix="ekpg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._prefix, self._chown = _server_user_prefix()

    @property
    def url(self) -> str:
        return self.database_url(DATABASE)

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{name}"

    def start(self) -> "PostgresCluster":
        if self._chown:
            shutil.chown(self.root, SERVER_USER, SERVER_USER)
        # fsync off: a test cluster that is thrown away needs no durability, and initdb's syncs cost seconds.
        self._run(BIN / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")  # fmt: skip
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            if self._start_server():
                self.create_database(DATABASE)
                return self
        raise RuntimeError(f"PostgreSQL did not start; {self._log_tail()}")

    def _run(self, *argv: str | Path) -> None:
        done = subprocess.run([*self._prefix, *map(str, argv)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr or done.stdout}")

    def _start_server(self) -> bool:
        options = [f"port={self.port}", f"listen_addresses={LOOPBACK}", f"unix_socket_directories={self.root}",
                   "fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200"]  # fmt: skip
        argv = [*self._prefix, str(BIN / "postgres"), "-D", str(self.data)]
        for option in options:
            argv += ["-c", option]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._accepts():
                return True
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not accept connections in {START_TIMEOUT_S:g} s; {self._log_tail()}")

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(host=LOOPBACK, port=self.port, user="postgres", dbname="postgres", connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """An empty database (a fresh one per test keeps tests on one cluster independent); its URL."""
        import psycopg

        with psycopg.connect(host=LOOPBACK, port=self.port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log}"
        return f"last lines of {self.log}:\n" + "\n".join(tail)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, no waiting for clients
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_cluster() -> Iterator[PostgresCluster]:
    """Generator for fixtures: a running cluster (with an empty `edgekit` database); skips without PostgreSQL."""
    if not available():
        pytest.skip(MISSING)
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def postgres_url() -> Iterator[str]:
    """Generator for fixtures: `postgresql://postgres@127.0.0.1:PORT/edgekit`, an empty database."""
    for cluster in postgres_cluster():
        yield cluster.url
