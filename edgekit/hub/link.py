"""The hub's one MQTT client: device messages in (to ingest), chunk requests in (to the transfer server), desired
states out. `edgekit.mqtt.Connection` keeps it connected."""

import logging
import threading
import uuid

import paho.mqtt.client as mqtt

from edgekit.hub.ingest import Ingest, subscriptions
from edgekit.hub.registry import Registry
from edgekit.hub.transfer import BundleServer
from edgekit.mqtt import Backoff, Connection, new_client, parse_broker_url
from edgekit.protocol import Topic

log = logging.getLogger(__name__)
CHUNK_REQUEST_SUFFIX = "/" + Topic.TRANSFER_REQUEST
# Short: the hub is usually next to its broker, and devices wait on it for chunks and desired state.
HUB_BACKOFF = Backoff(initial_s=0.2, max_s=10.0)


class BrokerLink:
    def __init__(self, url: str, ingest: Ingest, registry: Registry, share_group: str | None) -> None:
        address = parse_broker_url(url)
        # MQTT 5 for shared subscriptions; a unique client id so several hub processes can share a broker.
        self.client = new_client(address, f"edgekit-hub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._ingest = ingest
        self._share_group = share_group
        self._transfer = BundleServer(self.client, registry.path, workers=4)
        self._connection = Connection(self.client, address, HUB_BACKOFF, name="hub-mqtt")
        self._connected = threading.Event()

    def start(self) -> None:
        self._connection.start()

    def stop(self) -> None:
        self._connection.stop()
        if self._connected.is_set():  # the transfer workers start with the first connection
            self._transfer.stop()

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def wait_connected(self, timeout: float) -> bool:
        """Until the first connection is up and subscribed."""
        return self._connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the hub: %s", reason_code)
            return
        for topic in subscriptions(self._share_group):
            client.subscribe(topic, qos=1)
        self._transfer.start(route=False)
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        if message.topic.endswith(CHUNK_REQUEST_SUFFIX):
            self._transfer.on_request(client, userdata, message)
        else:
            self._ingest.on_message(client, userdata, message)
