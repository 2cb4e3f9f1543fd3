"""A throwaway NATS cluster for tests, from Debian's `nats-server`: N servers on free loopback ports, each with
JetStream (its store in a temp dir), an MQTT 3.1.1 listener and routes to the others; logins required.

Users: `hub` may do anything (the hub's NATS and MQTT connections); each device added with `add_devices` may only
use its own `edgekit.v1.<id>.>` subjects, which is its `edgekit/v1/<id>/#` topics over MQTT (docs/brokers.md,
"NATS"). Devices added while the cluster runs take effect at once (a config reload on every node).

Named nats_cluster, not nats: pytest puts tests/ first on sys.path, and a tests/nats.py would hide nats-py.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgekit.hub.broker import LOOPBACK, free_port
from edgekit.hub.jetstream import subject_of
from edgekit.mqtt import with_login
from edgekit.protocol import PREFIX

BINARY = shutil.which("nats-server") or "/usr/sbin/nats-server"
MISSING = "needs Debian package nats-server (apt-get install nats-server, or `make sysdeps`)"
HUB_USER = "hub"
START_TIMEOUT_S = 30.0
CLUSTER_NAME = "edgekit-test"
RELOADED = "Reloaded server configuration"  # what nats-server logs once a reload is in effect


def available() -> bool:
    return os.access(BINARY, os.X_OK)


START_ATTEMPTS = 3  # starts of a cluster whose ports another process took first


@dataclass
class Node:
    name: str
    folder: Path
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.folder / "nats.conf"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def device_permissions(device_id: str) -> dict:
    """What a device may do: its own subjects only. `$MQTT.sub.>` is where the server delivers QoS 1 messages to an
    MQTT subscriber; nats-server 2.9 checks the user's permissions on it too (later versions allow it implicitly)."""
    own = subject_of(f"{PREFIX}/{device_id}") + ".>"
    return {"publish": {"allow": [own]}, "subscribe": {"allow": [own, "$MQTT.sub.>"]}}


class NatsCluster:
    """`start()` returns once every node serves clients, MQTT and JetStream (a meta leader elected); `kill(i)` is a
    kill -9 of node i, `restart(i)` starts it again on its ports with its store; `stop()` ends all, removes files."""

    def __init__(self, size: int = 3, mqtt_ack_wait: str | None = None) -> None:
        """`mqtt_ack_wait` (e.g. "2s"): how long the server waits for an MQTT client's PUBACK before it sends the
        message again; None: the server's default (30 s)."""
        # A short path under /tmp: pytest's tmp_path can be long, and nothing here needs to outlive the cluster.
        self.root = Path(tempfile.mkdtemp(prefix="eknats-"))
        self.nodes = [Node(f"n{i}", self.root / f"n{i}") for i in range(size)]
        self.hub_password = secrets.token_urlsafe(16)
        self.devices: dict[str, str] = {}  # device id → password
        self._mqtt_ack_wait = mqtt_ack_wait

    # ---- addresses --------------------------------------------------------------------------------------------

    def nats_url(self) -> str:
        """Every node's client address, the hub's login on the first (nats-py takes a list)."""
        return ",".join(f"nats://{HUB_USER}:{self.hub_password}@{LOOPBACK}:{n.client_port}" for n in self.nodes)

    def mqtt_urls(self, first: int = 0) -> str:
        """Every node's MQTT address, starting at node `first` (clients try them in that order), without a login."""
        return ",".join(f"mqtt://{LOOPBACK}:{n.mqtt_port}" for n in self.nodes[first:] + self.nodes[:first])

    def hub_mqtt_url(self) -> str:
        return with_login(self.mqtt_urls(), HUB_USER, self.hub_password)

    def device_url(self, device_id: str, first: int = 0) -> str:
        return with_login(self.mqtt_urls(first), device_id, self.devices[device_id])

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> "NatsCluster":
        for node in self.nodes:
            (node.folder / "jetstream").mkdir(parents=True, exist_ok=True)
            self._write_config(node)
            self._spawn(node)
        self.wait_ready()
        return self

    def add_devices(self, device_ids: list[str]) -> dict[str, str]:
        """Logins for these devices (each may use only its own subjects), in effect on every running node."""
        fresh = {device_id: secrets.token_urlsafe(16) for device_id in device_ids}
        self.devices |= fresh
        running = [node for node in self.nodes if node.running]
        reloads = {node.name: self._reloads(node) for node in running}
        for node in self.nodes:
            self._write_config(node)
        for node in running:
            node.process.send_signal(signal.SIGHUP)  # nats-server reloads its users on SIGHUP
        deadline = time.monotonic() + START_TIMEOUT_S
        while any(self._reloads(node) <= reloads[node.name] for node in running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the NATS nodes did not reload their users in {START_TIMEOUT_S:g} s")
            time.sleep(0.05)
        return fresh

    def kill(self, index: int) -> None:
        """kill -9: no goodbye to clients or routes, as when a machine dies."""
        process = self.nodes[index].process
        assert process is not None
        process.kill()
        process.wait()

    def restart(self, index: int) -> None:
        node = self.nodes[index]
        self._write_config(node)
        self._spawn(node)
        self.wait_ready()

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- internals --------------------------------------------------------------------------------------------

    def _spawn(self, node: Node) -> None:
        with (node.folder / "server.log").open("ab") as log:
            node.process = subprocess.Popen([BINARY, "-c", str(node.config)], stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log)  # fmt: skip

    def _write_config(self, node: Node) -> None:
        routes = [f"nats-route://{LOOPBACK}:{other.cluster_port}" for other in self.nodes if other is not node]
        users = [{"user": HUB_USER, "password": self.hub_password}]
        users += [{"user": d, "password": p, "permissions": device_permissions(d), "allowed_connection_types": ["MQTT"]}
                  for d, p in self.devices.items()]  # fmt: skip
        # JSON is valid NATS configuration syntax: every name and password quoted as it should be.
        config = {
            "server_name": node.name,
            "listen": f"{LOOPBACK}:{node.client_port}",
            "http": f"{LOOPBACK}:{node.monitor_port}",
            "jetstream": {"store_dir": str(node.folder / "jetstream")},
            "cluster": {"name": CLUSTER_NAME, "listen": f"{LOOPBACK}:{node.cluster_port}", "routes": routes},
            "mqtt": {
                "listen": f"{LOOPBACK}:{node.mqtt_port}",
                "stream_replicas": min(3, len(self.nodes)),
                **({"ack_wait": self._mqtt_ack_wait} if self._mqtt_ack_wait else {}),
            },
            "authorization": {"users": users},
        }
        node.config.write_text(json.dumps(config, indent=2))

    def _monitor(self, node: Node, path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{node.monitor_port}{path}", timeout=2) as answer:
                return json.loads(answer.read())
        except (OSError, ValueError):
            return None

    def _node_ready(self, node: Node) -> bool:
        """Serving, routed to every other running node, JetStream current with a meta leader elected."""
        if not node.running:
            return True
        health = self._monitor(node, "/healthz?js-server-only=true")  # not every MQTT session current
        routes = self._monitor(node, "/routez")
        jsz = self._monitor(node, "/jsz")
        if not health or health.get("status") != "ok" or not routes or not jsz:
            return False
        peers = sum(other.running for other in self.nodes) - 1
        leader = (jsz.get("meta_cluster") or {}).get("leader")
        return routes.get("num_routes", 0) >= peers and bool(leader)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not all(self._node_ready(node) for node in self.nodes):
            for node in self.nodes:
                if node.process is not None and node.process.poll() not in (None, -signal.SIGKILL):
                    raise RuntimeError(f"nats-server {node.name} exited: {self._log_tail(node)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the NATS cluster was not ready in {timeout:g} s; "
                                   f"{self._log_tail(self.nodes[0])}")  # fmt: skip
            time.sleep(0.1)

    def _reloads(self, node: Node) -> int:
        """How many times the node has reloaded its configuration (it logs each)."""
        try:
            return (node.folder / "server.log").read_text(errors="replace").count(RELOADED)
        except OSError:
            return 0

    def _log_tail(self, node: Node, lines: int = 15) -> str:
        try:
            tail = (node.folder / "server.log").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"no log for {node.name}"
        return f"last lines of {node.name}'s log:\n" + "\n".join(tail)


def started_nats_cluster(size: int = 3, mqtt_ack_wait: str | None = None) -> Iterator[NatsCluster]:
    """Generator for fixtures: a started cluster of `size` nodes, stopped afterwards; skips without nats-server."""
    if not available():
        pytest.skip(MISSING)
    cluster = _start_on_free_ports(size, mqtt_ack_wait)
    try:
        yield cluster
    finally:
        cluster.stop()


def _start_on_free_ports(size: int, mqtt_ack_wait: str | None) -> NatsCluster:
    """A started cluster; on other ports when a node finds one of its ports taken (they are picked free, then bound
    by nats-server: another test process may take one in between, as once in CI)."""
    attempt = 1
    while True:
        cluster = NatsCluster(size, mqtt_ack_wait)
        try:
            return cluster.start()
        except RuntimeError as error:
            cluster.stop()
            if "address already in use" not in str(error) or attempt == START_ATTEMPTS:
                raise
            attempt += 1
