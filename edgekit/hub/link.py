"""The hub's one MQTT client: device messages in (to ingest), chunk requests in (to the transfer server), desired
states out. `edgekit.mqtt.Connection` keeps it connected.

Durability: the hub keeps an MQTT 5 session the broker holds while the hub is away (a client id kept in the data
dir, `clean_start=False`, a session expiry), so what devices send then waits in the broker. paho acknowledges
nothing by itself (manual acks): a device message is acknowledged once ingest committed it (or dropped it as
invalid), in the order it came (`InOrderAcks`), so a hub that dies before the commit gets it again. When the
database fails on a batch, the link reconnects: the broker then sends everything unacknowledged again.

Throughput: the client is paho with a faster way in for what the hub mostly receives, QoS 1 device messages
(`BulkClient`): reads of 64 KiB, not three system calls per packet; such a PUBLISH handed to `on_message` without
paho's per-message work; a batch's PUBACKs written at once. Bare paho spends more on each message than ingest's
validation and insert together (`benchmarks/hub_bench.py`).

On a NATS cluster (`use_jetstream`) the sequenced messages and chunk requests come through JetStream instead
(`edgekit.hub.jetstream`); this client keeps the state topics, desired states and chunks.
"""

import logging
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTT_LOG_DEBUG, MQTT_LOG_ERR, MQTTErrorCode
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
READ_SIZE = 64 * 1024  # bytes asked of the socket at once: a few hundred telemetry messages
# Packets read in one go before paho's loop gets to write (PUBACKs, desired states, chunks, pings) and to check the
# keepalive: a few reads' worth, some milliseconds.
READ_BURST = 1_000
PUBACK = 0x40
# A PUBACK as a 32-bit word: type, remaining length 2, then the packet id (MQTT 3.1.1 and 5 alike: 5's success)
_PUBACK_HEAD = PUBACK << 24 | 2 << 16


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


class _BufferedSocket:
    """A socket read READ_SIZE bytes at a time: paho asks for each packet in three reads or more (its first byte, its
    length byte by byte, the rest), each a system call on a plain socket. Its `pending()`, which paho asks of TLS
    sockets, counts what waits here, so that paho's loop reads it without waiting on the socket first."""

    __slots__ = ("_buffer", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos == len(self._buffer):
            # BlockingIOError (or TLS's SSLWantReadError) when nothing waits; b"" once the broker closed.
            self._buffer, self._pos = self._sock.recv(READ_SIZE), 0
        start = self._pos
        self._pos = min(start + size, len(self._buffer))
        return self._buffer[start : self._pos]

    def take_publish(self, v5: bool) -> tuple[int, bytes, int, bytes] | None:
        """(header, topic, packet id, payload) of the QoS 1 PUBLISH without properties that is next in the buffer,
        whole, taken out of it; None, leaving the buffer as it is, for anything else (another packet, one that
        continues past the buffer, properties, a malformed one)."""
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < 2 or buffer[pos] & 0xF6 != 0x32:  # PUBLISH, QoS 1, any DUP and RETAIN
            return None
        length, shift, cursor = 0, 0, pos + 1
        while True:  # the remaining length: 7 bits a byte, at most 4 bytes
            if cursor == len(buffer) or shift > 21:
                return None
            byte = buffer[cursor]
            length |= (byte & 0x7F) << shift
            cursor, shift = cursor + 1, shift + 7
            if not byte & 0x80:
                break
        end = cursor + length
        if end > len(buffer) or length < 2:
            return None
        topic_end = cursor + 2 + (buffer[cursor] << 8 | buffer[cursor + 1])
        payload = topic_end + 2 + v5  # after the packet id and, in MQTT 5, a property length of 0 (one byte)
        if topic_end == cursor + 2 or payload > end or (v5 and buffer[payload - 1] != 0):
            return None
        self._pos = end
        mid = buffer[topic_end] << 8 | buffer[topic_end + 1]
        return buffer[pos], buffer[cursor + 2 : topic_end], mid, buffer[payload:end]

    def pending(self) -> int:
        inner: Callable[[], int] | None = getattr(self._sock, "pending", None)
        return len(self._buffer) - self._pos + (inner() if inner else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Received(mqtt.MQTTMessage):
    """A QoS 1 message `BulkClient` took itself: paho's MQTTMessage, without the MQTTMessageInfo (and its Condition)
    that paho makes for every message received and that only messages sent use."""

    __slots__ = ()

    def __init__(self, header: int, topic: bytes, mid: int, payload: bytes) -> None:
        self._topic, self.mid, self.payload = topic, mid, payload
        self.qos, self.dup, self.retain = 1, bool(header & 0x08), bool(header & 0x01)
        self.state, self.timestamp, self.info, self.properties = mqtt.mqtt_ms_invalid, 0.0, None, None


class BulkClient(mqtt.Client):
    """paho for a client that receives many small QoS 1 messages and acknowledges them itself (the hub):
    - it reads through `_BufferedSocket`, and on until the socket has no more (paho reads one packet per wait when
      nothing it sent is in flight);
    - a QoS 1 PUBLISH without MQTT 5 properties that is whole in the buffer goes to `on_message` straight, without
      paho's per-packet work (reads, locks, a Properties object, a debug log line, the per-topic callback match:
      `message_callback_add` is refused);
    - `ack_all` sends a run of PUBACKs in one write, not one each.
    The rest is paho's own code: connecting, keepalive, publishing, and reading every other packet. It overrides paho
    2's `loop_read` and `_create_socket` and uses its internals (`_in_packet`, `_packet_read`, `_packet_queue`);
    tests/hub/test_ingest.py drives it against Mosquitto."""

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        v5 = self._protocol == mqtt.MQTTv5
        taken = False
        try:
            for _ in range(READ_BURST):
                sock = self._sock
                if sock is None:
                    return MQTTErrorCode.MQTT_ERR_NO_CONN
                if self._in_packet["command"] == 0 and (publish := sock.take_publish(v5)) is not None:
                    self._deliver(*publish)
                    taken = True
                    continue
                rc = self._packet_read()
                if rc > 0:
                    return self._loop_rc_handle(rc)
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    break
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        finally:
            if taken:  # what paho's own reads note for the keepalive, once a burst
                with self._msgtime_mutex:
                    self._last_bytes_received = time.monotonic()

    def _deliver(self, header: int, topic: bytes, mid: int, payload: bytes) -> None:
        """on_message as paho calls it, for a PUBLISH that `_BufferedSocket.take_publish` took."""
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, _Received(header, topic, mid, payload))
            except Exception as err:
                self._easy_log(MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def message_callback_add(self, sub: str, callback: Any) -> None:
        raise TypeError("BulkClient hands every message to on_message")

    def ack_all(self, mids: Sequence[int]) -> None:
        """PUBACK each of `mids` (QoS 1 packet ids), in this order, in one write."""
        if mids:
            self._easy_log(MQTT_LOG_DEBUG, "Sending PUBACK (Mids: %s)", mids)
            packets = struct.pack(f"!{len(mids)}I", *[_PUBACK_HEAD | mid for mid in mids])
            self._packet_queue(PUBACK, packets, 0, 0)


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

    def __init__(self, client: BulkClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._pending: deque[Receipt] = deque()

    def receive(self, message: mqtt.MQTTMessage) -> Receipt | None:
        """Called in paho's thread for every message, before it is handed on; None for QoS 0 (nothing to ack).
        Without the lock: deque.append is atomic, and reset() runs in paho's thread too."""
        if message.qos == 0:
            return None
        receipt = Receipt(message.mid)
        self._pending.append(receipt)
        return receipt

    def done(self, receipts: Iterable[Receipt | None]) -> None:
        """These messages are stored or dropped for good: acknowledge them and what waited behind them."""
        with self._lock:
            for receipt in receipts:
                if receipt is not None:
                    receipt.done = True
            pending = self._pending
            mids = []
            while pending and pending[0].done:
                mids.append(pending.popleft().mid)
            self._client.ack_all(mids)

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
            client = new_client(address, client_id, protocol=mqtt.MQTTv5, client_type=BulkClient)
            session: dict = {"clean_start": False, "properties": connect_properties(session_expiry_s)}
        else:
            client = new_client(address, client_id, protocol=mqtt.MQTTv311, clean_session=False,
                                client_type=BulkClient)  # fmt: skip
            session = {}
        self.client = cast(BulkClient, client)
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
