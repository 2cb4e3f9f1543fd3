"""`edgekit hub`: one object that holds the hub's parts and runs them in-process.

`Hub.start()` starts the embedded broker (unless there is an external one) and the HTTP server in a thread; the
app's lifespan (`edgekit.hub.app`) starts and stops the background workers: ingest, the MQTT link, the live feed,
the median cache, retention and the rollout driver. `Hub.stop()` undoes it all, the database last.

The embedded broker admits only its users (`edgekit.hub.acl.BrokerUsers`): the hub's own and the devices that
`Hub.enroll` enrolled. An open broker takes `insecure_broker`.
"""

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import select

from edgekit.drift import LARGE
from edgekit.enrollment import Enrollment
from edgekit.errors import BadInput
from edgekit.hub.acl import HUB_USER, BrokerUsers, check_share_group
from edgekit.hub.app import create_app
from edgekit.hub.auth import hub_secret
from edgekit.hub.bench import BenchJobs
from edgekit.hub.broker import EmbeddedBroker, MosquittoBroker, reload_broker, start_embedded_broker
from edgekit.hub.config import Configs
from edgekit.hub.datasets import SampleIngest
from edgekit.hub.db import Device, database_url, open_database
from edgekit.hub.downloads import DownloadLinks
from edgekit.hub.ingest import Ingest, Message, device_ids
from edgekit.hub.jetstream import check_jetstream
from edgekit.hub.keys import HubTrust
from edgekit.hub.leases import CONTROLLER, Lease
from edgekit.hub.link import DEFAULT_SESSION_EXPIRY_S, MAX_SESSION_EXPIRY_S, BrokerLink, MqttVersion, hub_client_id
from edgekit.hub.registry import Registry
from edgekit.hub.retention import Retention
from edgekit.hub.rollouts import CONTROLLER_LEASE_S, Deployments, RolloutDriver
from edgekit.hub.store import check_store_url, open_store
from edgekit.hub.transfer import DeltaCache
from edgekit.mqtt import with_login
from edgekit.protocol import (
    CAPTURE_SINCE,
    DOWNLOAD_LINKS_SINCE,
    SHADOW_SINCE,
    BenchJob,
    DesiredBundle,
    DesiredState,
    Topic,
    agent_takes,
    device_topic,
    encode,
)
from edgekit.trust import DEFAULT_DESIRED_TTL_S, TrustRoot

log = logging.getLogger(__name__)
# The HTTP thread's whole shutdown: open responses, then every worker's own stop (ingest's flush the longest).
HTTP_STOP_S = 60.0


@dataclass(frozen=True)
class HubSettings:
    data_dir: Path
    broker: str | None = None  # None: start an embedded one
    db: str | None = None  # None: SQLite in data_dir
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    trust_key: Path | None = None  # bundles pushed must be signed by it; None: hashes only
    share_group: str | None = None  # MQTT shared subscription group for several hub processes
    broker_port: int | None = None  # embedded broker port; None: any free port
    broker_host: str = "127.0.0.1"  # where the embedded broker listens; 0.0.0.0 for devices on the network
    prefer_broker: str = "mosquitto"
    controller: bool = True  # drive rollouts (and run retention) in this process
    insecure_broker: bool = False  # embedded broker open to anyone, on every topic (no passwords, no ACL)
    desired_ttl_s: float = DEFAULT_DESIRED_TTL_S  # how long a signed desired state stays acceptable
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S  # how long the broker keeps the hub's session while it is away
    mqtt_version: MqttVersion | None = None  # None: 3.1.1 for an embedded amqtt, which speaks nothing newer; else 5
    jetstream: str | None = None  # NATS URLs: device messages through JetStream (edgekit.hub.jetstream), not MQTT
    bundle_store: str | None = None  # s3://BUCKET/PREFIX; None: bundle bytes in the database
    public_urls: tuple[str, ...] = ()  # where devices download bundles from; none: the HTTP address it listens on
    drift_threshold: float = LARGE  # a `drift` alert for a device whose newest input drift score (PSI) is above it

    def __post_init__(self) -> None:
        if self.share_group is not None:
            check_share_group(self.share_group)
        if self.bundle_store is not None:
            check_store_url(self.bundle_store)
        if self.jetstream is not None:
            check_jetstream(self.jetstream, self.broker)
        if not 0 <= self.session_expiry_s <= MAX_SESSION_EXPIRY_S:
            raise BadInput(f"--session-expiry {self.session_expiry_s}: expected seconds from 0 to "
                           f"{MAX_SESSION_EXPIRY_S} (MQTT's most, which never expires)")  # fmt: skip
        if not self.drift_threshold > 0:
            raise BadInput(f"--drift-threshold {self.drift_threshold}: expected a drift score (PSI) above 0, e.g. "
                           f"{LARGE} for a large shift")  # fmt: skip


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database and secrets live here
        self.embedded: EmbeddedBroker | None = None
        self.broker_url = settings.broker or ""
        self.users = None if settings.broker or settings.insecure_broker else BrokerUsers(settings.data_dir / "broker")
        self.trust = HubTrust(settings.data_dir / "trust", settings.trust_key, settings.desired_ttl_s)
        self.engine, self.sessions = open_database(database_url(settings.db, settings.data_dir))
        self.replica = hub_client_id(settings.data_dir)  # names this process among replicas: leases, /metrics
        self.registry = Registry(settings.data_dir, self.sessions, self.trust.bundle_keys,
                                 open_store(settings.bundle_store, self.sessions))  # fmt: skip
        self.registry.store_local_files()
        self.deltas = DeltaCache(self.registry.path)  # for chunks and HTTP downloads alike
        self.links = DownloadLinks(
            hub_secret(self.sessions, settings.data_dir),
            list(settings.public_urls) or [public_url(settings.http_host, settings.http_port)],
        )
        self.ingest = Ingest(self.sessions, on_stored=self._on_stored)
        self.ingest.samples = SampleIngest(self.sessions, self.publish)  # captured inputs (edgekit.hub.datasets)
        self.listeners: list = []  # callables(stored) for live views (the dashboard's SSE feed)
        # Devices whose `online` this process has answered since their last `offline`: a device says `online` again
        # with every state it reports, and each answer (its desired state signed again) made it report once more.
        self._answered_online: set[str] = set()
        # Run where the driver runs: raw telemetry for a day, then per-minute rollups for 90 days.
        # Replicas on one database all run them; leases let one at a time do the work (edgekit.hub.leases).
        self.retention = Retention(self.sessions, replica=self.replica) if settings.controller else None
        self.driver = None
        if settings.controller:
            lease = Lease(self.sessions, CONTROLLER, self.replica, CONTROLLER_LEASE_S)
            self.driver = RolloutDriver(self.sessions, self.send_desired, self.registry, lease)
        self.rollouts = Deployments(self.sessions, self.send_desired, self.registry, self.driver)
        self.configs = Configs(self.sessions, self.send_desired)  # device and group configuration (edgekit.hub.config)
        self.bench = BenchJobs(self.sessions, self.send_bench)  # candidates timed on devices (edgekit.hub.bench)
        self.stopping = threading.Event()  # set by stop(): open live streams end, so the server can stop
        self.link: BrokerLink | None = None  # from start(), when the broker's address is known
        self.app: FastAPI | None = None
        self.http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    def _on_stored(self, stored: list[Message]) -> None:
        online = self._came_online(stored)
        if online and self.settings.controller:  # replicas that may drive rollouts sign; --no-controller ones never
            self._refresh_devices(online)
            self.configs.follow_groups(online)  # enrolled, or away, since a group it is in was configured
        for listener in list(self.listeners):
            listener(stored)

    def _came_online(self, stored: list[Message]) -> list[str]:
        """The devices whose stored statuses say they (re)connected: `online` after `offline`, or first seen by this
        process."""
        came = []
        for device_id, kind, message in stored:
            if kind != Topic.STATUS:
                continue
            if message.state == "offline":
                self._answered_online.discard(device_id)
            elif device_id not in self._answered_online:
                self._answered_online.add(device_id)
                came.append(device_id)
        return came

    # ---- signed control messages ------------------------------------------------------------------------------

    def send_desired(self, device_id: str, desired: DesiredState, agent_version: str | None) -> None:
        """Sign `desired` for the device (fresh expiry) and publish it, retained. What the device's `agent_version`
        (from its status) cannot take is left out: download links before 0.2 (the bundles it names come with
        links that expire with the desired state from 0.2 on), a shadow bundle before 0.3 (the rollout controller
        does not ask such a device to shadow; this keeps a stored desired state from being refused whole), a
        capture policy before 0.4 (such a device captures nothing)."""
        if desired.shadow is not None and not agent_takes(agent_version, SHADOW_SINCE):
            desired = desired.model_copy(update={"shadow": None})
        if desired.capture is not None and not agent_takes(agent_version, CAPTURE_SINCE):
            desired = desired.model_copy(update={"capture": None})
        if agent_takes(agent_version, DOWNLOAD_LINKS_SINCE):
            desired = self._with_links(desired, device_id, time.time() + self.settings.desired_ttl_s)
        self.publish(device_topic(device_id, Topic.DESIRED), self.trust.sign_desired(device_id, desired), True)

    def send_bench(self, device_id: str, job: BenchJob, ttl_s: float) -> None:
        """Sign `job` for the device, its bundle with download links that last as long as the job, and publish it
        (not retained: a job the device does not take now fails, rather than running whenever it comes back)."""
        bundle = job.bundle.model_copy(update={"urls": self.links.urls(job.bundle.id, device_id, time.time() + ttl_s)})
        signed = self.trust.sign_bench(device_id, job.model_copy(update={"bundle": bundle}), ttl_s)
        self.publish(device_topic(device_id, Topic.BENCH), signed)

    def _with_links(self, desired: DesiredState, device_id: str, expires: float) -> DesiredState:
        def linked(bundle: DesiredBundle) -> DesiredBundle:
            return bundle.model_copy(update={"urls": self.links.urls(bundle.id, device_id, expires)})

        changes: dict[str, Any] = {}
        if desired.bundle is not None:
            changes["bundle"] = linked(desired.bundle)
        if desired.shadow is not None:
            changes["shadow"] = desired.shadow.model_copy(update={"bundle": linked(desired.shadow.bundle)})
        return desired.model_copy(update=changes)

    def _refresh_devices(self, ids: list[str]) -> None:
        """For devices that (re)connected: the trust chain if it moved past the first root, and their current
        desired state signed again, so one that was away longer than its expiry can still take it (same rev: a
        device that has it ignores it)."""
        if self.trust.root.version > 1:
            chain = encode(self.trust.chain())
            for device_id in ids:
                self.publish(device_topic(device_id, Topic.TRUST), chain, True)
        with self.sessions() as session:
            query = select(Device.id, Device.desired, Device.agent_version).where(Device.id.in_(ids))
            rows = session.execute(query).all()
        for device_id, desired, agent_version in rows:
            if desired:
                try:
                    self.send_desired(device_id, DesiredState.model_validate(desired), agent_version)
                except ValidationError:  # stored under older bounds: the rollout's timeout resolves it
                    log.warning("%s: stored desired state no longer valid, not signed again", device_id)

    def rotate_keys(self, new_hub_key: bool, bundle_keys: list[str] | None) -> TrustRoot:
        """Issue the next trust root (`HubTrust.rotate`), announce it to every device the hub knows or enrolled,
        and sign every current desired state again with the key that root names."""
        root = self.trust.rotate(new_hub_key, bundle_keys)
        with self.sessions() as session:
            known = set(device_ids(session))
        known |= set(self.users.device_ids()) if self.users else set()
        self._refresh_devices(sorted(known))
        return root

    def start(self) -> None:
        """Start the broker (when embedded) and the HTTP server, whose lifespan starts the workers. Returns at once:
        `wait_http()` and `wait_connected()` say when they are up."""
        settings = self.settings
        if not settings.broker:
            if self.users is None:
                log.warning("INSECURE: the embedded broker accepts anyone, on every device's topics "
                            "(--insecure-broker): anyone who reaches it can steer every device")  # fmt: skip
            self.embedded = start_embedded_broker(settings.data_dir / "broker", settings.broker_port,
                                                  settings.prefer_broker, settings.broker_host,
                                                  self.users.ensure() if self.users else None)  # fmt: skip
            # The hub itself always connects over loopback, whatever address devices use.
            login = (HUB_USER, self.users.hub_password) if self.users else None
            self.broker_url = loopback_url(self.embedded, login)
        self.link = BrokerLink(self.broker_url, self.ingest, self.registry, settings.share_group,
                               hub_client_id(settings.data_dir), settings.session_expiry_s,
                               self._mqtt_version(), self.deltas)  # fmt: skip
        if settings.jetstream:
            self.link.use_jetstream(settings.jetstream, self.replica)
        self.app = create_app(self)
        config = uvicorn.Config(self.app, host=settings.http_host, port=settings.http_port, log_level="warning")
        self.http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self.http.run, name="hub-http", daemon=True)
        self._http_thread.start()

    def _mqtt_version(self) -> MqttVersion:
        if self.settings.mqtt_version is not None:
            return self.settings.mqtt_version
        if self.settings.jetstream or (self.embedded is not None and self.embedded.kind == "amqtt"):
            return "3.1.1"  # nats-server and amqtt speak nothing newer
        return "5"

    def enroll(self, device_ids: list[str]) -> list[Enrollment]:
        """New broker credentials for each device (replacing any it had), in effect at once; with the broker's address
        as devices reach it and the bundle trust key."""
        if self.users is None or self.embedded is None:
            raise BadInput("the hub enrolls devices only on its own embedded broker, started without "
                           "--insecure-broker; give devices on an external broker their login there")  # fmt: skip
        enrollments = self.users.enroll(device_ids, device_broker(self.embedded.host, self.embedded.port),
                                        self.trust.root)  # fmt: skip
        self._reload_users()
        return enrollments

    def add_hub_user(self, name: str) -> str:
        """A loopback broker URL with a new user that has the hub's rights (`BrokerUsers.add_hub_user`)."""
        if self.users is None or self.embedded is None:
            raise BadInput("hub users exist only on the hub's own embedded broker (without --insecure-broker)")
        login = self.users.add_hub_user(name)
        self._reload_users()
        return loopback_url(self.embedded, login)

    def _reload_users(self) -> None:
        if isinstance(self.embedded, MosquittoBroker):
            reload_broker(self.embedded.data_dir)

    def wait_connected(self, timeout: float) -> bool:
        return self.link is not None and self.link.wait_connected(timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.link.publish(topic, payload, retain)

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    def wait_http(self, timeout: float) -> bool:
        """True once the server listens, its workers running; False after `timeout`, or as soon as the server gave
        up starting (uvicorn logs why: the port, or the worker that failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http is not None and self.http.started:
                return True
            if self._http_thread is not None and not self._http_thread.is_alive():
                return False
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.http is not None:
            self.stopping.set()
            # The server answers what is open, then its lifespan stops the workers, the rollout driver first.
            self.http.should_exit = True
            self._http_thread.join(timeout=HTTP_STOP_S)
        if self.embedded is not None:
            self.embedded.stop()
        self.engine.dispose()


def reachable_host(host: str) -> str:
    """How devices reach a server listening on `host`: this machine's name when it listens on every address."""
    return socket.getfqdn() if host in ("0.0.0.0", "::", "") else host


def device_broker(host: str, port: int | None) -> str:
    """The embedded broker's URL as devices reach it."""
    return f"mqtt://{reachable_host(host)}:{port}"


def public_url(host: str, port: int) -> str:
    """The hub's HTTP address as devices reach it, without --public-url."""
    return f"http://{reachable_host(host)}:{port}"


def loopback_url(broker: EmbeddedBroker, login: tuple[str, str] | None) -> str:
    """The embedded broker's URL for clients on this machine (the hub itself), with `login` (user, password)."""
    url = f"mqtt://127.0.0.1:{broker.port}"
    return with_login(url, *login) if login else url
