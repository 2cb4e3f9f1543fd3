"""MQTT helpers for tests: start a broker of either kind, subscribe and record, publish once.

Every wait has a timeout and fails with what was received so far, so a broken broker fails a test, never hangs it.
"""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage, MQTTv5, topic_matches_sub
from paho.mqtt.reasoncodes import ReasonCode

from edgekit.hub.broker import AmqttBroker, EmbeddedBroker, MosquittoBroker, mosquitto_available
from edgekit.mqtt import parse_broker_url

BROKER_KINDS = ["mosquitto", "amqtt"]
NO_MOSQUITTO = "Debian mosquitto not installed (make sysdeps installs it)"
TIMEOUT_S = 5.0


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


def make_broker(kind: str, data_dir: Path) -> EmbeddedBroker:
    """A stopped broker of `kind` on a free loopback port; mosquitto keeps its files in `data_dir`."""
    if kind == "mosquitto":
        return MosquittoBroker(data_dir)
    if kind == "amqtt":
        return AmqttBroker()
    raise ValueError(f"unknown broker kind {kind!r}")


def started_broker(kind: str, data_dir: Path) -> Iterator[EmbeddedBroker]:
    """Generator for fixtures: a started broker of `kind`, stopped afterwards; skips where mosquitto is missing."""
    if kind == "mosquitto" and not mosquitto_available():
        pytest.skip(NO_MOSQUITTO)
    with make_broker(kind, data_dir) as started:
        yield started


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def client_for(url: str, client_id: str = "", clean_session: bool = True) -> Client:
    """A paho client (not connected) that logs in with the URL's user and password, if it has them."""
    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
    address = parse_broker_url(url)
    if address.username:
        client.username_pw_set(address.username, address.password)
    return client


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy (returned); fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


class Subscriber:
    """A paho client that subscribes at QoS 1 on every (re)connect and records what it receives.

    With a fixed `client_id` and clean_session=False the broker keeps its subscriptions and queues QoS 1 messages
    while it is away. Reconnects by itself within a second of the broker coming back.
    """

    def __init__(
        self,
        url: str,
        *topic_filters: str,
        client_id: str = "",
        clean_session: bool = True,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.topic_filters = topic_filters or ("#",)
        self._received: list[Message] = []
        self._changed = threading.Condition()
        self.connections = 0
        self.subscriptions = 0
        self.client = client_for(url, client_id, clean_session)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        host, port = host_port(url)
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        try:
            self.wait_subscribed(1, timeout)
        except AssertionError:
            self.close()
            raise

    def _on_connect(self, client: Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            return
        # Subscribing again on every connect covers brokers that forgot the session (amqtt restarts, clean sessions).
        client.subscribe([(topic_filter, 1) for topic_filter in self.topic_filters])
        with self._changed:
            self.connections += 1
            self._changed.notify_all()

    def _on_subscribe(
        self, client: Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        with self._changed:
            self.subscriptions += 1
            self._changed.notify_all()

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        with self._changed:
            self._received.append(Message(message.topic, message.payload, bool(message.retain)))
            self._changed.notify_all()

    def _wait(self, condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what()}")

    def wait_subscribed(self, count: int = 1, timeout: float = TIMEOUT_S) -> None:
        """Until the broker acknowledged `count` subscribes in all, i.e. the client is back after count-1 outages."""
        self._wait(
            lambda: self.subscriptions >= count, timeout, lambda: f"subscribe #{count} (had {self.subscriptions})"
        )

    def messages(self, topic_filter: str = "#", retained: bool | None = None) -> list[tuple[str, bytes]]:
        """(topic, payload) received on topics matching `topic_filter`, in arrival order; `retained` filters on
        the retain flag (True: delivered from the broker's retained store)."""
        with self._changed:
            return [
                (m.topic, m.payload)
                for m in self._received
                if topic_matches_sub(topic_filter, m.topic) and retained in (None, m.retain)
            ]

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = TIMEOUT_S, topic_filter: str = "#"
    ) -> list[tuple[str, bytes]]:
        """Until predicate(messages(topic_filter)) holds; returns those messages."""
        self._wait(lambda: predicate(self.messages(topic_filter)), timeout, lambda: f"messages; got {self.messages()}")
        return self.messages(topic_filter)

    def wait_count(self, count: int, topic_filter: str = "#", timeout: float = TIMEOUT_S) -> list[tuple[str, bytes]]:
        return self.wait_for(lambda messages: len(messages) >= count, timeout, topic_filter)

    def close(self) -> None:
        """Disconnect cleanly: a clean_session=False session stays on the broker, and no Last Will is sent."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def publish(
    url: str, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = TIMEOUT_S
) -> None:
    """Connect, publish one message, wait until the broker acknowledged it (QoS 1/2), disconnect."""
    publish_many(url, [(topic, payload)], qos=qos, retain=retain, timeout=timeout)


def publish_many(
    url: str, messages: list[tuple[str, bytes | str]], qos: int = 1, retain: bool = False, timeout: float = TIMEOUT_S
) -> None:
    """publish() for several messages over one connection, in order."""
    client = client_for(url)
    host, port = host_port(url)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for (topic, _), info in zip(messages, infos, strict=True):
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise AssertionError(f"broker at {url} did not acknowledge a publish to {topic} in {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()


class Probe:
    """One plain paho client (MQTT 5 unless `protocol` says otherwise), as an attacker or a victim would run it:
    records its CONNACK, its disconnections, the reason codes of its SUBACKs and what it receives. Does not reconnect
    by itself."""

    def __init__(self, url: str, client_id: str = "", timeout: float = TIMEOUT_S, protocol: int = MQTTv5) -> None:
        self.connacks: list[ReasonCode] = []
        self.disconnects = 0
        self.granted: list[list[ReasonCode]] = []
        self._received: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        address = parse_broker_url(url)
        if address.username:
            self.client.username_pw_set(address.username, address.password)
        self.client.on_connect = lambda _c, _u, _f, reason, _p: self._note(self.connacks.append, reason)
        self.client.on_disconnect = lambda *_: self._note(self._count_disconnect, None)
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: self._note(self.granted.append, reasons)
        self.client.on_message = lambda _c, _u, m: self._note(self._received.append, (m.topic, m.payload))
        self.client.connect(address.host, address.port, keepalive=10)
        self.client.loop_start()
        self.wait(lambda: bool(self.connacks), timeout, "a CONNACK")

    def _count_disconnect(self, _: None) -> None:
        self.disconnects += 1

    def _note(self, change: Callable[[Any], None], value: Any) -> None:
        with self._changed:
            change(value)
            self._changed.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; got {self._received}")

    @property
    def accepted(self) -> bool:
        return bool(self.connacks) and not self.connacks[0].is_failure

    def subscribe(self, *topic_filters: str, timeout: float = TIMEOUT_S) -> list[ReasonCode]:
        """Subscribe at QoS 1; the broker's reason code for each filter (granted or refused)."""
        before = len(self.granted)
        self.client.subscribe([(topic_filter, 1) for topic_filter in topic_filters])
        self.wait(lambda: len(self.granted) > before, timeout, f"the SUBACK for {topic_filters}")
        return self.granted[before]

    def publish(self, topic: str, payload: bytes, retain: bool = False, timeout: float = TIMEOUT_S) -> None:
        """Publish at QoS 1 and wait for the PUBACK (which Mosquitto also sends for a publish its ACL drops)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)

    def messages(self, topic_filter: str = "#") -> list[tuple[str, bytes]]:
        with self._changed:
            return [(topic, payload) for topic, payload in self._received if topic_matches_sub(topic_filter, topic)]

    def wait_for(self, topic: str, payload: bytes, timeout: float = TIMEOUT_S) -> None:
        self.wait(lambda: (topic, payload) in self._received, timeout, f"{payload!r} on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
