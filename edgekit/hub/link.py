"""The hub's one MQTT client: device messages in (to ingest), chunk requests in (to the transfer server), desired
states out. `edgekit.mqtt.Connection` keeps it connected.

Durability: the hub keeps an MQTT 5 session the broker holds while the hub is away (a client id kept in the data
dir, `clean_start=False`, a session expiry), so what devices send then waits in the broker. paho acknowledges
nothing by itself (manual acks): a device message is acknowledged once ingest committed it (or dropped it as
invalid), in the order it came (`InOrderAcks`), so a hub that dies before the commit gets it again. When the
database fails on a batch, the link reconnects: the broker then sends everything unacknowledged again.

On a NATS cluster (`use_jetstream`) the sequenced messages and chunk requests come through JetStream instead
(`edgekit.hub.jetstream`); this client keeps the state topics, desired states and chunks.
"""

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.enrollment import write_private
from edgekit.hub.ingest import Ingest, subscriptions
from edgekit.hub.jetstream import JetStreamSource
from edgekit.hub.registry import Registry
from edgekit.hub.transfer import BundleServer, DeltaCache
from edgekit.mqtt import Backoff, Connection, new_client, parse_broker_url
from edgekit.protocol import Topic

log = logging.getLogger(__name__)
CHUNK_REQUEST_SUFFIX = "/" + Topic.TRANSFER_REQUEST
# Short: the hub is usually next to its broker, and devices wait on it for chunks and desired state.
HUB_BACKOFF = Backoff(initial_s=0.2, max_s=10.0)
# How many messages the broker may send before the hub acknowledges (MQTT 5 Receive Maximum). Acks wait for the
# database commit, so this window is what one batch can hold: small would mean small batches and slow ingest.
RECEIVE_MAXIMUM = 10_000
DEFAULT_SESSION_EXPIRY_S = 86_400
MAX_SESSION_EXPIRY_S = 2**32 - 1  # MQTT 5: the session never expires
CLIENT_ID_FILE = "mqtt-client-id"


def hub_client_id(data_dir: Path) -> str:
    """This hub process's MQTT client id: made once and kept in its data dir, so a restarted hub resumes its session.
    (The embedded Mosquitto binds the client id to the login anyway; an external broker needs a stable one.)"""
    path = data_dir / CLIENT_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        client_id = f"edgekit-hub-{uuid.uuid4().hex[:12]}"
        write_private(path, client_id + "\n")
        return client_id


@dataclass(eq=False, slots=True)
class Receipt:
    """One QoS 1 message received, waiting for its PUBACK."""

    mid: int
    done: bool = False


class InOrderAcks:
    """PUBACKs in the order the PUBLISHes came (MQTT 5 requires it for QoS 1), each one only once its message is
    done with and every message before it too.

    After a lost connection the broker sends again what was not acknowledged; receipts of the old connection are
    forgotten then, so a late ack can never answer a packet id that the broker has since given to another message.
    """

    window = RECEIVE_MAXIMUM

    def __init__(self, client: mqtt.Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pending: deque[Receipt] = deque()

    def receive(self, message: mqtt.MQTTMessage) -> Receipt | None:
        """Called in paho's thread for every message, before it is handed on; None for QoS 0 (nothing to ack)."""
        if message.qos == 0:
            return None
        receipt = Receipt(message.mid)
        with self._lock:
            self._pending.append(receipt)
        return receipt

    def done(self, receipts: Iterable[Receipt | None]) -> None:
        """These messages are stored or dropped for good: acknowledge them and what waited behind them."""
        with self._lock:
            for receipt in receipts:
                if receipt is not None:
                    receipt.done = True
            pending = self._pending
            while pending and pending[0].done:
                self._client.ack(pending.popleft().mid, 1)

    def redeliver(self) -> None:
        """Messages could not be stored: reconnect, so the broker sends them (and all unacknowledged) again. Until
        then nothing behind them is acknowledged."""
        log.warning("ingest could not store a batch: reconnecting so that the broker delivers it again")
        self._client.disconnect()

    def reset(self) -> None:
        """The connection is gone; the broker will deliver every unacknowledged message again on the next one."""
        with self._lock:
            self._pending.clear()


def connect_properties(session_expiry_s: int) -> Properties:
    """The hub's MQTT 5 CONNECT properties: how long the broker keeps its session, how much it may send unacked."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry_s
    properties.ReceiveMaximum = RECEIVE_MAXIMUM
    return properties


MqttVersion = Literal["5", "3.1.1"]


class BrokerLink:
    def __init__(
        self,
        url: str,
        ingest: Ingest,
        registry: Registry,
        share_group: str | None,
        client_id: str,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        version: MqttVersion = "5",
        deltas: DeltaCache | None = None,
    ) -> None:
        """MQTT 5 where the broker speaks it (the session expiry and Receive Maximum are MQTT 5's); 3.1.1 for brokers
        that speak only that (amqtt, NATS): a persistent session there too (clean_session false), which the broker
        keeps as long as it likes, and its own in-flight window (Mosquitto: `max_inflight_messages`)."""
        address = parse_broker_url(url)
        self.version = version
        if version == "5":
            self.client = new_client(address, client_id, protocol=mqtt.MQTTv5)
            session: dict = {"clean_start": False, "properties": connect_properties(session_expiry_s)}
        else:
            self.client = new_client(address, client_id, protocol=mqtt.MQTTv311, clean_session=False)
            session = {}
        self.client.max_inflight_messages_set(1000)
        self.client.manual_ack_set(True)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self._acks = InOrderAcks(self.client)
        ingest.acknowledge_with(self._acks)
        self._ingest = ingest
        self._share_group = share_group
        self.transfer = BundleServer(self.client, registry.path, workers=4, deltas=deltas)
        self._connection = Connection(self.client, address, HUB_BACKOFF, name="hub-mqtt", on_lost=self._acks.reset,
                                      **session)  # fmt: skip
        self._connected = threading.Event()
        self.source: JetStreamSource | None = None  # use_jetstream()
        self.session_resumed = False  # whether the broker still had the session at the last connect

    def use_jetstream(self, url: str, name: str) -> None:
        """Take telemetry, results, events and chunk requests from JetStream's shared consumers at `url` (NATS
        URLs, `edgekit.hub.jetstream`; `name` shows in the server's connection list): this client then subscribes to
        the state topics only, and still publishes desired states and chunks. Before start()."""
        self.source = JetStreamSource(url, self._ingest, self.transfer.handle_request, self._acks, name=name)

    def start(self) -> None:
        self._connection.start()
        if self.source is not None:
            self.source.start()

    def stop(self) -> None:
        if self.source is not None:
            self.source.stop()
        self._connection.stop()
        if self._connected.is_set():  # the transfer workers start with the first connection
            self.transfer.stop()

    @property
    def connected(self) -> bool:
        return self.client.is_connected() and (self.source is None or self.source.connected)

    def wait_connected(self, timeout: float) -> bool:
        """Until the first connection is up and subscribed (and JetStream consumed from, in that mode)."""
        deadline = time.monotonic() + timeout
        if not self._connected.wait(timeout):
            return False
        return self.source is None or self.source.wait_ready(max(0.0, deadline - time.monotonic()))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the hub: %s", reason_code)
            return
        self.session_resumed = flags.session_present
        log.info("connected to the broker: %s", "session resumed" if flags.session_present else "new session")
        # A resumed session keeps its subscriptions; subscribing again is harmless and covers a new session.
        jetstream = self.source is not None
        # On NATS only the state topics come this way, at QoS 0: nats-server sends a QoS 1 message that was not acked
        # (its connection died with a node) again after its ack wait, after newer ones, and an old retained state
        # would then overwrite the device's current one. At QoS 0 nothing is sent again, and every (re)subscribe
        # brings each device's latest retained state.
        for topic in subscriptions(self._share_group, sequenced=not jetstream):
            client.subscribe(topic, qos=0 if jetstream else 1)
        self.transfer.start(route=False, subscribe=not jetstream, share_group=self._share_group)
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        receipt = self._acks.receive(message)
        try:
            chunk_request = message.topic.endswith(CHUNK_REQUEST_SUFFIX)
        except UnicodeDecodeError:
            chunk_request = False  # ingest counts it as an unknown topic
        if not chunk_request:
            self._ingest.on_message(client, userdata, message, receipt)
            return
        try:
            self.transfer.on_request(client, userdata, message)
        finally:
            self._acks.done([receipt])  # a lost chunk request is asked again by the device: nothing to keep
