"""`BulkClient` (edgekit.hub.link), the hub's paho with a faster way in for QoS 1 PUBLISHes, against paho itself on
a real Mosquitto: both subscribe to the same messages (QoS 1 and 2, MQTT 5 properties, a retained one, payloads
larger than its read buffer), and the hub's must see exactly what paho's sees; its batched PUBACKs must settle every
message with the broker. And the packets its fast path takes, or leaves to paho, byte by byte."""

import random
import struct
import sys
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import host_port, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgekit.hub.link import READ_SIZE, BulkClient, InOrderAcks, _BufferedSocket, connect_properties

TIMEOUT_S = 30.0
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from hub_bench import remaining_length  # noqa: E402  (the benchmark's publishers write packets too)

Seen = tuple[str, bytes, int, bool]  # topic, payload, QoS, retain


class Subscriber:
    """A client of `client_type` subscribed to `prefix/#` at QoS 1 on a persistent MQTT 5 session (a resumed one keeps
    its subscription: subscribing again would bring the retained message again); with BulkClient it acknowledges as
    the hub does (manual acks, `InOrderAcks`), when told to."""

    def __init__(self, url: str, client_type: type[mqtt.Client], prefix: str, client_id: str) -> None:
        self.client = client_type(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.acks = InOrderAcks(self.client) if isinstance(self.client, BulkClient) else None
        if self.acks is not None:
            self.client.manual_ack_set(True)
        self.seen: list[Seen] = []
        self.receipts: list = []
        self.client.on_message = self._on_message
        self._prefix = prefix
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(*host_port(url), clean_start=False, properties=connect_properties(600))
        self.client.loop_start()
        assert self._subscribed.wait(TIMEOUT_S), f"{client_id} was not subscribed"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if flags.session_present:
            self._subscribed.set()
        else:
            client.subscribe(f"{self._prefix}/#", qos=1)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.seen.append((message.topic, message.payload, message.qos, message.retain))
        if self.acks is not None:
            self.receipts.append(self.acks.receive(message))

    def wait_seen(self, count: int) -> list[Seen]:
        wait_until(lambda: len(self.seen) >= count, TIMEOUT_S, f"{count} messages")
        return self.seen

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def with_user_property(value: str) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = ("trace", value)
    return properties


def publish_all(url: str, messages: list[tuple[str, bytes, int, bool, Properties | None]]) -> None:
    """Publish and wait for every acknowledgement; within paho's default window of 20 in flight (paho does not keep
    to the broker's Receive Maximum: with no window, Mosquitto's 100 was overrun and it forwarded some messages to
    no subscriber at all)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    client.connect(*host_port(url))
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos, retain, properties)
                 for topic, payload, qos, retain, properties in messages]  # fmt: skip
        for info in infos:
            info.wait_for_publish(TIMEOUT_S)
            assert info.is_published(), "the broker did not take every message"
    finally:
        client.disconnect()
        client.loop_stop()


def mixed_messages(prefix: str, count: int) -> list[tuple[str, bytes, int, bool, Properties | None]]:
    """Mostly small QoS 1 (the fast path); QoS 2, user properties, empty and over-buffer payloads among them. (No QoS
    0: the broker may drop those for one subscriber and not the other.)"""
    rng = random.Random(19)
    messages = []
    for index in range(count):
        size = rng.choice([0, 1, 40, 300, 300, 300, 300, 300, 5_000, READ_SIZE + 1_000 + rng.randrange(20_000)])
        payload = rng.randbytes(size)
        qos = rng.choice([1, 1, 1, 1, 2])
        properties = with_user_property(str(index)) if rng.random() < 0.1 else None
        messages.append((f"{prefix}/d{index % 7}/telemetry", payload, qos, False, properties))
    return messages


def test_bulk_client_receives_what_paho_receives_and_acknowledges_it(mosquitto) -> None:
    prefix = f"bulk-{uuid.uuid4().hex[:8]}"
    publish_all(mosquitto.url, [(f"{prefix}/retained", b"kept", 1, True, None)])
    bulk_id = f"bulk-{uuid.uuid4().hex[:8]}"
    bulk = Subscriber(mosquitto.url, BulkClient, prefix, bulk_id)
    plain = Subscriber(mosquitto.url, mqtt.Client, prefix, f"paho-{uuid.uuid4().hex[:8]}")
    try:
        messages = mixed_messages(prefix, 600)
        publish_all(mosquitto.url, messages)
        expected = plain.wait_seen(len(messages) + 1)
        assert bulk.wait_seen(len(messages) + 1) == expected
        assert expected[0] == (f"{prefix}/retained", b"kept", 1, True)
        # In the broker's order, which forwards a QoS 2 message only once its publisher released it.
        assert sorted((topic, payload) for topic, payload, *_ in expected[1:]) == sorted(
            (topic, payload) for topic, payload, *_ in messages
        )
        assert bulk.acks is not None
        bulk.acks.done(bulk.receipts)
        # A round trip on the same connection, which the broker reads in order: once this is acknowledged, so are
        # the PUBACKs before it (a disconnect right after them may lose some).
        sync = bulk.client.publish(f"{prefix}-sync", b"", qos=1)
        sync.wait_for_publish(TIMEOUT_S)
        assert sync.is_published()
    finally:
        bulk.close()
        plain.close()
    # The same session again: had a PUBACK gone missing, the broker would send its message before the new one.
    again = Subscriber(mosquitto.url, BulkClient, prefix, bulk_id)
    try:
        publish_all(mosquitto.url, [(f"{prefix}/after", b"new", 1, False, None)])
        assert again.wait_seen(1) == [(f"{prefix}/after", b"new", 1, False)]
    finally:
        again.close()


def test_message_callback_add_is_refused() -> None:
    client = BulkClient(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    with pytest.raises(TypeError):
        client.message_callback_add("a/#", lambda *args: None)


# ---- the fast path's packets ---------------------------------------------------------------------------------------


def publish_packet(topic: bytes, payload: bytes, mid: int, v5: bool, header: int = 0x32, properties=b"\x00") -> bytes:
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + (properties if v5 else b"") + payload
    return bytes([header]) + remaining_length(len(body)) + body


def buffered(data: bytes) -> _BufferedSocket:
    sock = _BufferedSocket(None)
    sock._buffer = data
    return sock


@pytest.mark.parametrize("v5", [False, True])
def test_whole_plain_qos1_publishes_are_taken_in_turn(v5: bool) -> None:
    large = bytes(range(256)) * 100  # a remaining length of three bytes
    stream = publish_packet(b"a/b", b"hi", 7, v5) + publish_packet(b"t", large, 65535, v5, header=0x3B)
    sock = buffered(stream + publish_packet(b"q0", b"z", 0, v5, header=0x30)[:5])
    assert sock.take_publish(v5) == (0x32, b"a/b", 7, b"hi")
    assert sock.take_publish(v5) == (0x3B, b"t", 65535, large)  # DUP and RETAIN set
    assert sock.take_publish(v5) is None  # QoS 0, and cut short: paho's to read
    assert sock.pending() == 5 and sock.recv(100) == publish_packet(b"q0", b"z", 0, v5, header=0x30)[:5]


@pytest.mark.parametrize(
    "packet",
    [
        publish_packet(b"a/b", b"hi", 7, True)[:-1],  # continues past the buffer
        publish_packet(b"a/b", b"hi", 7, True, properties=b"\x02\x01\x01"),  # MQTT 5 properties (a format)
        publish_packet(b"", b"hi", 7, True),  # a topic alias would stand for the topic: paho's
        publish_packet(b"a/b", b"hi", 7, True, header=0x34),  # QoS 2
        bytes([0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),  # a remaining length of five bytes: malformed
        bytes([0x32, 0x01, 0x00]),  # too short for a topic length
        bytes([0x32, 0x03, 0x00, 0x05, 0x61]),  # a topic longer than the packet
        bytes([0x40, 0x02, 0x00, 0x01]),  # a PUBACK
        b"",
    ],
)
def test_anything_else_is_left_to_paho(packet: bytes) -> None:
    sock = buffered(packet)
    assert sock.take_publish(True) is None
    assert sock.pending() == len(packet)
