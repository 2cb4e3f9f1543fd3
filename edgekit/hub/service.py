"""`edgekit hub`: wires the broker, database, ingest, bundle registry, rollout controller and the HTTP server."""

import logging
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edgekit.hub.broker import EmbeddedBroker, start_embedded_broker
from edgekit.hub.db import database_url, open_database
from edgekit.hub.ingest import Ingest, subscriptions
from edgekit.hub.registry import Registry
from edgekit.hub.retention import Retention
from edgekit.hub.rollouts import Deployments, RolloutDriver
from edgekit.hub.transfer import BundleServer
from edgekit.mqtt import Backoff, Connection, new_client, parse_broker_url
from edgekit.protocol import Topic

log = logging.getLogger(__name__)
CHUNK_REQUEST_SUFFIX = "/" + Topic.TRANSFER_REQUEST
# Short: the hub is usually next to its broker, and devices wait on it for chunks and desired state.
HUB_BACKOFF = Backoff(initial_s=0.2, max_s=10.0)


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
    controller: bool = True  # run the rollout controller in this process


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.embedded: EmbeddedBroker | None = None
        self.broker_url = settings.broker or ""
        self.engine, self.sessions = open_database(database_url(settings.db, settings.data_dir))
        self.registry = Registry(settings.data_dir, self.sessions, self._trust_key())
        self.ingest = Ingest(self.sessions, on_stored=self._on_stored)
        self.listeners: list = []  # callables(stored) for live views (the dashboard's SSE feed)
        self.client: mqtt.Client | None = None
        self.connection: Connection | None = None
        self.transfer: BundleServer | None = None
        # Run where the driver runs: raw telemetry for a day, then per-minute rollups for 90 days.
        self.retention = Retention(self.sessions) if settings.controller else None
        self.driver = RolloutDriver(self.sessions, self.publish, self.registry) if settings.controller else None
        self.rollouts = Deployments(self.sessions, self.publish, self.registry, self.driver)
        self.http = None
        self._connected = threading.Event()

    def _trust_key(self):
        if self.settings.trust_key is None:
            return None
        from edgekit.signing import load_public_key

        return load_public_key(self.settings.trust_key)

    def _on_stored(self, stored: list) -> None:
        for listener in list(self.listeners):
            listener(stored)

    def start(self) -> None:
        if not self.settings.broker:
            settings = self.settings
            self.embedded = start_embedded_broker(
                settings.data_dir / "broker", settings.broker_port, settings.prefer_broker, settings.broker_host
            )
            # The hub itself always connects over loopback, whatever address devices use.
            self.broker_url = f"mqtt://127.0.0.1:{self.embedded.port}"
        self.ingest.start()
        self._connect_mqtt()
        if self.retention is not None:
            self.retention.start()
        if self.driver is not None:
            self.driver.start()
        self._start_http()

    def _connect_mqtt(self) -> None:
        address = parse_broker_url(self.broker_url)
        # MQTT 5 for shared subscriptions; a unique client id so several hub processes can share a broker.
        self.client = new_client(address, f"edgekit-hub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.transfer = BundleServer(self.client, self.registry.path, workers=4)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.connection = Connection(self.client, address, HUB_BACKOFF, name="hub-mqtt")
        self.connection.start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the hub: %s", reason_code)
            return
        for topic in subscriptions(self.settings.share_group):
            client.subscribe(topic, qos=1)
        self.transfer.start(route=False)
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        if message.topic.endswith(CHUNK_REQUEST_SUFFIX):
            self.transfer.on_request(client, userdata, message)
        else:
            self.ingest.on_message(client, userdata, message)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _start_http(self) -> None:
        import uvicorn

        from edgekit.hub.api import create_app

        config = uvicorn.Config(
            create_app(self), host=self.settings.http_host, port=self.settings.http_port, log_level="warning"
        )
        self.http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self.http.run, name="hub-http", daemon=True)
        self._http_thread.start()

    @property
    def http_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    def wait_http(self, timeout: float) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.http is not None and self.http.started:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        # The driver first: a rollout must not advance while the rest of the hub is going away.
        if self.driver is not None:
            self.driver.stop()
        if self.retention is not None:
            self.retention.stop()
        if self.http is not None:
            self.http.should_exit = True
            self._http_thread.join(timeout=10)
        if self.connection is not None:
            self.connection.stop()
        if self.transfer is not None:
            self.transfer.stop()
        self.ingest.stop()
        if self.embedded is not None:
            self.embedded.stop()
        self.engine.dispose()
