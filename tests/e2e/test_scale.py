"""Two hub replicas carry a 100-device fleet through a rollout while parts of the system die (issue #16; `-m slow`,
`make test-all` runs them alone after the rest, with the soak: about 4 minutes on Mosquitto, 6 on NATS).

Two `edgekit hub` processes on one PostgreSQL, 100 real agents (in one process, as `edgekit fleet simulate` runs
them), on either broker shape of docs/scaling.md:

- **mosquitto**: one authenticated Mosquitto; the replicas share device messages and chunk requests through an MQTT
  5 shared subscription (`--share-group`).
- **nats**: a 3-node NATS cluster; each device's URL names every node, starting with its own (it moves to the next
  when one dies); the replicas take device messages and chunk requests from durable JetStream consumers they share
  (`--jetstream`).

A bundle pushed to replica A is deployed through replica B. Once the canary is healthy the replica that drives
rollouts is killed with SIGKILL (and, on NATS, a broker node too); the other takes over. The rollout must complete,
no device may be sent two revs for the deployment, no telemetry may be lost (every seq a device gave out is in the
database or still in its outbox, counted once the killed replica is back), and a dashboard login made on either
replica works on the other. Figures go into the reliability table before the assertions.
"""

import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from brokers import Subscriber
from hub.postgres import postgres_cluster
from hub_helpers import broker_acknowledged, bundle_revs, fleet_ids, lost_messages, wait_devices_reported, wait_until
from nats_cluster import HUB_USER as NATS_HUB_USER
from nats_cluster import started_nats_cluster
from reliability import record
from sqlalchemy import select

from edgekit.agents.fleet import Fleet, FleetSettings
from edgekit.hub.acl import BrokerUsers
from edgekit.hub.auth import COOKIE, create_token
from edgekit.hub.broker import free_port, start_embedded_broker
from edgekit.hub.db import Deployment, DeploymentDevice, EventRecord, Lease, open_database
from edgekit.hub.link import CLIENT_ID_FILE
from edgekit.hub.rollouts import CONTROLLER_LEASE_S
from edgekit.mqtt import with_login

pytestmark = [pytest.mark.slow, pytest.mark.soak]  # 100 agents and 2 hubs: alone, after the rest (make test-all)

DEVICES = 100
GROUP = "hubs-scale-5e0c2a9b71d4"
TIMEOUT_S = 120.0
ROLLOUT_S = 300.0
TELEMETRY_S = 1.0
MAX_COPIES = 10  # desired states published for one device, all revs
SOURCE = "synthetic:?fps=2"  # inferences to count healthy on: light, for 100 agents in one process
REPLICAS = ("a", "b")


@dataclass
class Shape:
    """A broker shape: each replica's broker arguments, each device's URL, a watcher's URL; `kill_node` kills -9 a
    broker node of a cluster (None: one broker, which this test does not kill)."""

    name: str
    hub_args: dict[str, list[str]]
    device_urls: dict[str, str]
    watcher_url: str
    kill_node: Callable[[], None] | None = None


@contextmanager
def mosquitto_shape(folder: Path, ids: list[str]) -> Iterator[Shape]:
    users = BrokerUsers(folder / "broker-users")
    passwords = users.add_devices(ids)
    logins = {name: users.add_hub_user(f"replica-{name}") for name in REPLICAS}  # one each: ids bind to users
    watcher = users.add_hub_user("watcher")
    broker = start_embedded_broker(folder / "broker", users=users.ensure())
    url = f"mqtt://127.0.0.1:{broker.port}"
    try:
        yield Shape(
            name="mosquitto, shared subscriptions",
            hub_args={name: ["--broker", with_login(url, *logins[name]), "--share-group", GROUP] for name in REPLICAS},
            device_urls={device_id: with_login(url, device_id, passwords[device_id]) for device_id in ids},
            watcher_url=with_login(url, *watcher),
        )
    finally:
        broker.stop()


@contextmanager
def nats_shape(folder: Path, ids: list[str]) -> Iterator[Shape]:
    for cluster in started_nats_cluster(3):
        cluster.add_devices(ids)
        node_0 = f"mqtt://127.0.0.1:{cluster.nodes[0].mqtt_port}"  # the watcher's: node 1 is the one killed
        yield Shape(
            name="3-node NATS cluster, JetStream",
            hub_args={
                name: ["--broker", cluster.hub_mqtt_url(), "--jetstream", cluster.nats_url()] for name in REPLICAS
            },
            device_urls={device_id: cluster.device_url(device_id, first=n % 3) for n, device_id in enumerate(ids)},
            watcher_url=with_login(node_0, NATS_HUB_USER, cluster.hub_password),
            kill_node=lambda cluster=cluster: cluster.kill(1),
        )


SHAPES = {"mosquitto": mosquitto_shape, "nats": nats_shape}


class Replicas:
    """The two `edgekit hub` processes, each with its own data dir, log and HTTP port, on one database; both name
    both addresses as download links (`--public-url`), so a device whose link's replica died uses the other."""

    def __init__(self, folder: Path, db: str, shape: Shape, trust_key: Path) -> None:
        self.folder, self.db, self.shape, self.trust_key = folder, db, shape, trust_key
        self.ports = {name: free_port() for name in REPLICAS}
        self.processes: dict[str, subprocess.Popen] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def data(self, name: str) -> Path:
        return self.folder / f"replica-{name}"

    def start(self, name: str) -> None:
        links = [arg for other in REPLICAS for arg in ("--public-url", self.url(other))]
        command = [sys.executable, "-m", "edgekit", "hub", "--data", str(self.data(name)), "--db", self.db,
                   "--http", f"127.0.0.1:{self.ports[name]}", "--trust-key", str(self.trust_key), *links,
                   *self.shape.hub_args[name]]  # fmt: skip
        log = self.folder / f"replica-{name}.log"
        with log.open("a") as output:
            process = self.processes[name] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        wait_until(lambda: process.poll() is not None or _up(self.url(name)), TIMEOUT_S, f"replica {name} to start")
        assert process.poll() is None, f"replica {name} exited: {log.read_text()[-2000:]}"

    def start_both(self) -> None:
        """A first; B with a copy of A's trust folder (replicas sign with one hub key, docs/hub.md "Replicas")."""
        self.start("a")
        shutil.copytree(self.data("a") / "trust", self.data("b") / "trust")
        self.start("b")

    def replica_id(self, name: str) -> str:
        return (self.data(name) / CLIENT_ID_FILE).read_text().strip()

    def kill(self, name: str) -> None:
        self.processes[name].kill()
        self.processes[name].wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _up(url: str) -> bool | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=5, trust_env=False).status_code == 200 or None
    except httpx.HTTPError:
        return None


@pytest.fixture
def pg_url() -> Iterator[str]:
    for cluster in postgres_cluster():
        yield cluster.create_database("scale")


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_two_replicas_carry_a_fleet_through_a_rollout_while_a_replica_and_a_broker_node_die(
    shape_name: str, pg_url: str, cnn_bundles: dict, tmp_path: Path
) -> None:
    ids = fleet_ids("sim", DEVICES)
    _, sessions = open_database(pg_url)
    db = SimpleNamespace(sessions=sessions)
    token = create_token(sessions, "ops", "test", scope="admin")
    with ExitStack() as stack:
        shape = stack.enter_context(SHAPES[shape_name](tmp_path, ids))
        scenario = f"2 hub replicas, {DEVICES} devices ({shape.name})"
        replicas = Replicas(tmp_path, pg_url, shape, cnn_bundles["public"])
        stack.callback(replicas.stop)
        replicas.start_both()
        api = {name: stack.enter_context(httpx.Client(base_url=replicas.url(name), timeout=60, trust_env=False,
                                                      headers={"Authorization": f"Bearer {token}"}))
               for name in REPLICAS}  # fmt: skip
        agents = Fleet(FleetSettings(count=DEVICES, broker="", data_dir=tmp_path / "fleet",
                                     trust_key=cnn_bundles["public"], bundle=cnn_bundles["v1"], source=SOURCE,
                                     telemetry_s=TELEMETRY_S, brokers=shape.device_urls,
                                     hub_key=replicas.data("a") / "trust" / "hub.pub", trust_version=1))  # fmt: skip
        agents.start()
        stack.callback(agents.stop)
        # A session the broker keeps: a watcher dropped by its keepalive in this busy process misses nothing.
        watcher = stack.enter_context(Subscriber(shape.watcher_url, "edgekit/v1/+/config/desired",
                                                 client_id="scale-watcher", clean_session=False,
                                                 timeout=TIMEOUT_S))  # fmt: skip
        wait_devices_reported(db, ids, TIMEOUT_S)

        pushed = api["a"].post("/api/bundles", content=cnn_bundles["v2"].read_bytes(),
                               headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert pushed.status_code == 201, pushed.text
        bundle_id = pushed.json()["id"]
        body = {"bundle_id": bundle_id, "target": "all", "canary_percent": 5, "wave_percent": 25,
                "wave_timeout_s": 180, "health_checks": 3}  # fmt: skip
        created = api["b"].post("/api/deployments", json=body)
        record(scenario, "deployments of a bundle pushed to A created through B", int(created.status_code == 201), None)
        assert created.status_code == 201, created.text
        deployment_id = created.json()["id"]

        explain = lambda: _in_flight(sessions, deployment_id, agents)  # noqa: E731
        _wait(lambda: _healthy(sessions, deployment_id) >= 5 or None, TIMEOUT_S, "the canary to be healthy", explain)
        controller = next(name for name in REPLICAS if replicas.replica_id(name) == _lease_holder(sessions))
        survivor = next(name for name in REPLICAS if name != controller)
        replicas.kill(controller)
        killed = time.monotonic()
        if shape.kill_node is not None:
            shape.kill_node()
        healthy_at_kill = _healthy(sessions, deployment_id)
        wait_until(lambda: _lease_holder(sessions) == replicas.replica_id(survivor) or None, TIMEOUT_S,
                   f"replica {survivor} to take over the rollouts")  # fmt: skip
        takeover_s = time.monotonic() - killed
        _wait(lambda: _state(sessions, deployment_id) != "running" or None, ROLLOUT_S, "the rollout to end", explain)
        # The watcher shares this busy process with 100 agents: it may lag behind the devices it watches.
        seen = lambda: len(bundle_revs(watcher, bundle_id)) == len(_members(sessions, deployment_id))  # noqa: E731
        with suppress(AssertionError):
            wait_until(seen, 60, "the watcher to see a desired state for every member")
        revs = bundle_revs(watcher, bundle_id)
        published = watcher.messages("edgekit/v1/+/config/desired", retained=False)  # not copies from the store
        copies = Counter(topic.split("/")[2] for topic, _ in published)

        replicas.start(controller)  # back: it resumes its broker session and stores what it had not acknowledged
        refused_logins = sum(
            not _login_works_on(replicas, token, made, used) for made, used in (("a", "b"), ("b", "a"))
        )
        agents.stop()
        renewed = sum(agent.link.resubscribes > 0 for agent in agents.agents)
        refused = sum(agent.link.refused_subscriptions for agent in agents.agents)
        acknowledged = broker_acknowledged(agents)
        lost = lost_messages(acknowledged, sessions, timeout=TIMEOUT_S)

    members = _members(sessions, deployment_id)
    sent = sum(map(len, acknowledged.values()))
    twice = sorted(device for device, seen in revs.items() if len(seen) > 1)
    not_healthy = [(m.device_id, m.state, m.detail) for m in members if m.state != "healthy"]
    record(scenario, "seconds from kill -9 of the controller replica to the takeover", round(takeover_s, 2),
           CONTROLLER_LEASE_S + 5)  # fmt: skip
    record(scenario, "devices healthy when the controller was killed", healthy_at_kill)
    record(scenario, f"devices not healthy on the bundle after the rollout (of {DEVICES})",
           len(not_healthy) + DEVICES - len(members), 0)  # fmt: skip
    record(scenario, "devices sent two revs for the deployment", len(twice), 0)
    most_copies = max(copies.values(), default=0)
    # Copies of one rev are expected (a takeover, a reconnect, a device showing no sign of it for 30 s); a loop
    # between the hub's answer to `online` and the device's report once sent ~200 per device.
    record(scenario, "copies of a device's desired states published (the most for one device)", most_copies,
           MAX_COPIES)  # fmt: skip
    record(scenario, "device messages (telemetry, results, events) acknowledged by the broker", sent)
    record(scenario, "of them lost", lost, 0)
    for transport, count in sorted(_downloads(sessions, bundle_id).items()):
        record(scenario, f"bundle downloads over {transport.upper()}", count)
    record(scenario, "dashboard logins on one replica refused by the other", refused_logins, 0)
    record(scenario, "devices whose broker stopped delivering, until their probe renewed the subscriptions", renewed)
    record(scenario, "subscriptions the broker refused (asked for again)", refused)
    assert _state(sessions, deployment_id) == "completed", not_healthy
    assert healthy_at_kill < DEVICES, "the rollout was over before the kill"
    assert len(members) == DEVICES and not_healthy == []
    assert twice == [], {device: revs[device] for device in twice}
    unseen = sorted(device for device in ids if device not in revs)
    assert {m.device_id: {m.rev} for m in members} == {device: revs.get(device) for device in ids}, (
        f"the watcher ({watcher.connections} connections, {len(watcher.messages())} messages) saw no desired state "
        f"for {len(unseen)} devices: {unseen[:10]}"
    )
    assert most_copies <= MAX_COPIES, copies.most_common(5)
    assert sent > DEVICES * 20 and lost == 0
    assert refused_logins == 0


def _wait(condition: Callable[[], object], timeout: float, what: str, explain: Callable[[], str]) -> None:
    """wait_until, and on a timeout what the devices still in flight say."""
    try:
        wait_until(condition, timeout, what)
    except AssertionError as error:
        raise AssertionError(f"{error}; {explain()}") from None


def _in_flight(sessions, deployment_id: int, agents: Fleet) -> str:
    """Each member still in flight: the agent's applied rev and probe renewals, and its last events at the hub."""
    by_id = {agent.device_id: agent for agent in agents.agents}
    lines = []
    for member in _members(sessions, deployment_id):
        if member.state != "sent":
            continue
        agent = by_id[member.device_id]
        query = select(EventRecord.type, EventRecord.message).where(EventRecord.device_id == member.device_id)
        with sessions() as session:
            events = session.execute(query.order_by(EventRecord.seq.desc()).limit(3)).all()
        lines.append(f"{member.device_id}: sent rev {member.rev}, applied {agent._applied_rev}, "
                     f"probe renewals {agent.link.resubscribes}, refused subscriptions "
                     f"{agent.link.refused_subscriptions}, connected {agent.link.connected}, "
                     f"last events {[tuple(event) for event in events]}")  # fmt: skip
    return "in flight: " + "; ".join(lines[:10])


def _login_works_on(replicas: Replicas, token: str, made: str, used: str) -> bool:
    """A dashboard login (the token traded for a session cookie) on replica `made` is accepted by `used`."""
    origin = replicas.url(made)
    with httpx.Client(base_url=origin, trust_env=False, headers={"Origin": origin}) as browser:
        if browser.post("/login", data={"token": token}).status_code not in (200, 303):
            return False
        cookie = browser.cookies[COOKIE]
    return httpx.get(f"{replicas.url(used)}/api/me", cookies={COOKIE: cookie}, trust_env=False).status_code == 200


def _downloads(sessions, bundle_id: str) -> Counter:
    """How devices got the bundle: their update.downloaded events by transport."""
    query = select(EventRecord.data).where(EventRecord.type == "update.downloaded")
    with sessions() as session:
        return Counter(data.get("transport") for data in session.scalars(query) if data.get("bundle") == bundle_id)


def _lease_holder(sessions) -> str | None:
    with sessions() as session:
        return session.scalar(select(Lease.holder).where(Lease.name == "controller", Lease.expires > time.time()))


def _members(sessions, deployment_id: int) -> list[DeploymentDevice]:
    with sessions() as session:
        return list(session.scalars(select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)))


def _healthy(sessions, deployment_id: int) -> int:
    return sum(member.state == "healthy" for member in _members(sessions, deployment_id))


def _state(sessions, deployment_id: int) -> str:
    with sessions() as session:
        return session.get(Deployment, deployment_id).state
