"""Embedded MQTT brokers for `edgekit hub` without an external broker, for tests and for benchmarks.

Mosquitto (a child process) is preferred: it is ~10x faster than amqtt and keeps sessions, queued messages and
retained messages across restarts. amqtt (pure Python, in a thread of this process) is the fallback when the
Debian package is missing.

With `users` (the hub's default) Mosquitto requires a password, applies the ACL and binds each client id to its
username; amqtt cannot enforce the ACL, so it starts only open (`edgekit hub --insecure-broker`).

Mosquitto dies with the process that started it (a parent-death signal), and a broker left over from a hub killed
before that could act (its pid is in `mosquitto.pid`) is stopped when the next one starts in the same folder.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from edgekit.enrollment import write_private
from edgekit.errors import BadInput, OperationFailed
from edgekit.hub.acl import BrokerUsers

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
# Debian installs mosquitto in /usr/sbin, which is not on a non-root user's PATH.
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
# The hub's session queues every device message while the hub is away (a restart, a crash, an outage replay);
# past a client's queue limit mosquitto DROPS new messages, and its default of 1000 would lose most of a few seconds'
# telemetry from a fleet. So the bound is in payload bytes instead: 256 MiB, about 800,000 telemetry messages, i.e.
# hours of a 100-device fleet (docs/hub.md, "Durability"). The count is only set out of reach, not to 0 ("no
# maximum"): with 0, mosquitto 2.0.11 drops the connection of a client whose QoS 1 publish the ACL denies.
MAX_QUEUED_MESSAGES = 10_000_000
MAX_QUEUED_BYTES = 256 * 2**20
MAX_INFLIGHT_MESSAGES = 100
AMQTT_AUTH_PLUGIN = "AmqttOpenAuthPlugin"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PID_FILE = "mosquitto.pid"
RELOADED = "Reloading config."  # what mosquitto logs when it handles SIGHUP


def mosquitto_binary() -> Path | None:
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    return MOSQUITTO_FALLBACK if os.access(MOSQUITTO_FALLBACK, os.X_OK) else None


def mosquitto_available() -> bool:
    return mosquitto_binary() is not None


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now; another process may still take it before the broker binds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_port_free(host: str, port: int) -> None:
    """Fail early: a broker started on a taken port would look ready because the other listener answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR so that connections of a just-stopped broker in TIME_WAIT do not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OperationFailed(
                    f"cannot start an MQTT broker on {host}:{port}: the port is already in use; "
                    "choose another port or stop the process listening there"
                ) from None
            raise OperationFailed(f"cannot start an MQTT broker on {host}:{port}: {exc.strerror}") from None


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker(ABC):
    """An MQTT broker owned by this process. `start()` returns once clients can connect to `url`."""

    kind: str

    def __init__(self, port: int | None, host: str) -> None:
        self.host = host
        # Chosen on the first start and kept, so that restart() comes back where clients reconnect.
        self.port = port

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the broker has no port until it is started")
        return f"mqtt://{self.host}:{self.port}"

    @property
    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    def start(self) -> EmbeddedBroker: ...

    @abstractmethod
    def stop(self) -> None: ...

    def restart(self) -> None:
        """Stop and start again on the same port, e.g. to test how clients live through a broker outage."""
        self.stop()
        self.start()

    def _claim_port(self) -> int:
        if self.port is None:
            self.port = free_port(self.host)
        else:
            ensure_port_free(self.host, self.port)
        return self.port

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} {'running' if self.running else 'stopped'}>"


class MosquittoBroker(EmbeddedBroker):
    """Debian's mosquitto as a child process, configured and logged under `data_dir`.

    With `persistence`, subscriptions of clean_session=False clients, their queued QoS 1/2 messages and retained
    messages are saved on stop() and every second, and come back after restart().
    """

    kind = "mosquitto"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = LOOPBACK,
        persistence: bool = True,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        max_packet_size: int | None = None,
        users: BrokerUsers | None = None,
    ) -> None:
        super().__init__(port, host)
        self.data_dir = Path(data_dir)
        self.persistence = persistence
        self.password_file = users.password_file if users else password_file
        self.acl_file = users.acl_file if users else acl_file
        self.max_packet_size = max_packet_size
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / PID_FILE

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            f"max_queued_bytes {MAX_QUEUED_BYTES}",
            f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
            f"log_dest file {self.log_path}",
            *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
            "connection_messages true",
        ]
        if self.persistence:
            # A trailing slash: mosquitto concatenates the location and the file name.
            lines += ["persistence true", f"persistence_location {self.data_dir}/", "autosave_interval 1"]
        if self.password_file:
            # A device logging in with another device's client id would otherwise take over its session.
            lines += [f"password_file {self.password_file}", "use_username_as_clientid true"]
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.max_packet_size:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if os.geteuid() == 0:
            # As root mosquitto would switch to the `mosquitto` user, which cannot write to our data_dir.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        binary = mosquitto_binary()
        if binary is None:
            raise OperationFailed("mosquitto is not installed (Debian: apt-get install mosquitto, or `make sysdeps`)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        stop_stale_broker(self.data_dir)
        self._claim_port()
        write_private(self.config_path, self.config())
        # Messages printed before the log file is opened (bad config, root warning) land in the same log.
        with os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C meant for the hub must not kill the broker before the hub
                preexec_fn=_die_with_parent(os.getpid()),
                umask=0o077,  # what the broker writes (its persistence file) is the hub's alone, like the rest
            )
        write_private(self.pid_path, f"{self._process.pid}\n")
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        assert self._process is not None and self.port is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise OperationFailed(f"mosquitto exited with code {code} at start; {self._log_tail()}")
            if accepts_connections(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise OperationFailed(
            f"mosquitto did not listen on {self.host}:{self.port} in {START_TIMEOUT_S:g} s; {self._log_tail()}"
        )

    def _log_tail(self, lines: int = 10) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return f"no log at {self.log_path}"
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGTERM, not SIGKILL: mosquitto writes its persistence database on the way out.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.pid_path.unlink(missing_ok=True)


def _die_with_parent(parent: int) -> Any:
    """For Popen's preexec_fn: the child gets SIGTERM when the thread that started it dies, `kill -9` included
    (Linux's PR_SET_PDEATHSIG); if the parent died before that was set, the child exits at once."""

    def arm() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def running_broker_pid(data_dir: Path) -> int | None:
    """The pid of the mosquitto started with `data_dir`'s config, if it is still running; None otherwise.

    The command line is checked, not only the pid: after a reboot the pid may belong to another program."""
    try:
        pid = int((data_dir / PID_FILE).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(data_dir / "mosquitto.conf").encode() in command else None


def reload_broker(data_dir: Path) -> bool:
    """Make the mosquitto running on `data_dir` read its password and ACL files again (SIGHUP), and wait until it
    has: a device enrolled a moment ago must not be refused. False when none runs there.

    Mosquitto handles the signal in the loop that serves clients, so once it logged the reload, every later login
    sees the new files."""
    pid = running_broker_pid(data_dir)
    if pid is None:
        return False
    log_path = data_dir / "mosquitto.log"
    offset = log_path.stat().st_size
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _logged_since(log_path, offset, RELOADED):
        if time.monotonic() > deadline:
            raise OperationFailed(f"mosquitto (pid {pid}) did not reload its users in {START_TIMEOUT_S:g} s; "
                                  f"see {log_path}")  # fmt: skip
        time.sleep(0.01)
    return True


def _logged_since(log_path: Path, offset: int, line: str) -> bool:
    with log_path.open("rb") as log:
        log.seek(offset)
        return line.encode() in log.read()


def listen_address(data_dir: Path) -> tuple[str, int] | None:
    """(host, port) the mosquitto on `data_dir` listened on when it last started; None before its first start."""
    try:
        config = (data_dir / "mosquitto.conf").read_text()
    except OSError:
        return None
    _, port, host = next(line for line in config.splitlines() if line.startswith("listener ")).split()
    return host, int(port)


def stop_stale_broker(data_dir: Path) -> None:
    """Stop a mosquitto that a killed hub left running on `data_dir` (SIGTERM, then SIGKILL after the stop timeout),
    so the new one gets the port and the persistence files."""
    pid = running_broker_pid(data_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while running_broker_pid(data_dir) == pid:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


class AmqttBroker(EmbeddedBroker):
    """amqtt's broker on its own event loop in a daemon thread of this process.

    Anonymous clients are accepted, topics are not checked. Gaps compared to MosquittoBroker:
    - nothing survives stop() or restart(): sessions, queued messages and retained messages live in memory only;
    - no maximum packet size: any payload is accepted;
    - MQTT 3.1.1 only.
    Persistent sessions (clean_session=False) work while the broker runs, thanks to AmqttOpenAuthPlugin.
    """

    kind = "amqtt"

    def __init__(self, port: int | None = None, host: str = LOOPBACK) -> None:
        super().__init__(port, host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._broker is not None

    def config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # Only our auth plugin: the default list adds $SYS publishing and per-packet logging.
            "plugins": {f"{__name__}.{AMQTT_AUTH_PLUGIN}": {}},
        }

    def start(self) -> AmqttBroker:
        if self.running:
            return self
        self._claim_port()
        started: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, args=(self._loop, started), name=f"amqtt-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._broker = started.result(timeout=START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self.stop()
            raise OperationFailed(f"amqtt did not listen on {self.host}:{self.port} in {START_TIMEOUT_S:g} s") from None
        except Exception as exc:
            self._thread.join(STOP_TIMEOUT_S)
            self._thread = self._loop = None
            raise OperationFailed(f"cannot start amqtt on {self.host}:{self.port}: {exc.__cause__ or exc}") from exc
        return self

    def _serve(self, loop: asyncio.AbstractEventLoop, started: concurrent.futures.Future[Any]) -> None:
        from amqtt.broker import Broker

        async def start() -> Broker:
            broker = Broker(self.config())
            broker._subscriptions = SnapshotIterDict()
            await broker.start()
            return broker

        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(start()))
        except Exception as exc:
            started.set_exception(exc)
        else:
            loop.run_forever()
        finally:
            self._close_loop(loop)

    @staticmethod
    def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def stop(self) -> None:
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        if loop is None or thread is None or not thread.is_alive():
            return
        if broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._disconnect_all(broker), loop).result(timeout=STOP_TIMEOUT_S)
            shutdown = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            # A broker that cannot shut down cleanly still has its loop stopped below.
            with contextlib.suppress(Exception):
                shutdown.result(timeout=STOP_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT_S)

    @staticmethod
    async def _disconnect_all(broker: Any) -> None:
        """Stop listening and drop every client connection before amqtt's own shutdown.

        That shutdown cancels each client's reader task and waits for it, but on Python 3.11 a reader that gets a
        packet just as it is cancelled misses the cancellation and goes on serving a client that keeps publishing:
        shutdown() then hung, never closed its listener, and the stopped broker's port kept accepting connections
        that nobody served. A dropped connection ends every reader, and no publish is acknowledged after stop().
        """
        for server in getattr(broker, "_servers", {}).values():
            if server.instance is not None:
                server.instance.close()
        for transport in list(getattr(asyncio.get_running_loop(), "_transports", {}).values()):
            transport.abort()
        await asyncio.sleep(0.05)  # the aborted connections' callbacks run, and their readers end


class SnapshotIterDict(dict[Any, Any]):
    """A dict whose iteration walks a copy of its keys or items, taken when the iteration starts.

    amqtt 0.12.1 iterates its subscription table across awaits: on every connect (sending retained messages) and on
    every broadcast. A client subscribing to a new topic meanwhile raised "dictionary changed size during iteration"
    inside the connect handler, which left that client with a CONNACK but no message loop: connected and deaf for good
    (CI: one agent of ten never came up). Iterating a snapshot is what amqtt's loops need.
    """

    def __iter__(self) -> Iterator[Any]:
        return iter(list(super().keys()))

    def items(self) -> Any:
        return list(super().items())


def _open_auth_plugin() -> type:
    from amqtt.plugins.base import BaseAuthPlugin

    class OpenAuthPlugin(BaseAuthPlugin):
        """Accept every client without flagging it anonymous.

        amqtt's AnonymousAuthPlugin flags the sessions it accepts as anonymous, and amqtt then drops a disconnected
        anonymous session (its subscriptions and queued QoS 1/2 messages) even with clean_session=False.
        """

        async def authenticate(self, *, session: Any) -> bool:
            return True

    return OpenAuthPlugin


def __getattr__(name: str) -> Any:
    # amqtt loads plugins by dotted path; building the class on first lookup keeps amqtt out of the import.
    if name == AMQTT_AUTH_PLUGIN:
        plugin = globals()[name] = _open_auth_plugin()
        return plugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def start_embedded_broker(
    data_dir: Path,
    port: int | None = None,
    prefer: str = "mosquitto",
    host: str = LOOPBACK,
    users: BrokerUsers | None = None,
) -> EmbeddedBroker:
    """A started broker: mosquitto when installed and preferred, amqtt otherwise; `kind` says which.

    `host` is where it listens: loopback by default; devices on other machines need an address they can reach.
    `users`: only they may connect, each within the ACL; None: anyone may connect and use every topic."""
    if prefer not in ("mosquitto", "amqtt"):
        raise BadInput(f"unknown MQTT broker {prefer!r}; choose mosquitto or amqtt")
    if prefer == "mosquitto" and mosquitto_available():
        return MosquittoBroker(data_dir, port=port, host=host, users=users).start()
    if users is not None:
        raise OperationFailed(
            "the embedded amqtt broker cannot enforce device passwords and topic ACLs: install mosquitto "
            "(Debian: apt-get install mosquitto), use --broker for an external broker, or accept an open broker "
            "with --insecure-broker"
        )
    return AmqttBroker(port=port, host=host).start()
