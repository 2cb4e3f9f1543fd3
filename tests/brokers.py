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
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage, topic_matches_sub
from paho.mqtt.reasoncodes import ReasonCode

from edgekit.hub.broker import AmqttBroker, EmbeddedBroker, MosquittoBroker, mosquitto_available

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


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


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
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
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
    client = Client(CallbackAPIVersion.VERSION2)
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
