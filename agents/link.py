"""How the agent reaches the hub: the `Link` protocol, and `MqttLink`, its paho implementation.

MqttLink: reconnect with jittered backoff (edgekit.mqtt.Connection), Last Will, retained status, persistent
session, subscriptions restored on every connect, and the outbox drained in seq order.

A message leaves the outbox only when the broker acknowledged it (QoS 1 PUBACK). After a reconnect every
unacknowledged message is published again from the oldest, so the hub may see a seq twice (it de-duplicates)
but never out of order and never missing.

The other direction has no acknowledgement the agent sees: a broker can keep a connection up while a persistent
session's subscriptions deliver nothing (nats-server's MQTT support, 2.9 to 2.11, after a node is lost or under
load: nats-io/nats-server#5282, #6989). With `watch_downlink`, the link publishes a nonce to a topic of its own
every `PROBE_S` and expects it back within `PROBE_WAIT_S`; when it does not come, it subscribes to every topic
again (which also brings the retained desired state again), and waits longer before the next probe each time
that did not help (a broker whose ACL refuses the probe topic). A subscription the broker refuses in its SUBACK
(nats-server under load, when it cannot create the session's JetStream consumer in time) is asked for again after
`RESUBSCRIBE_S`.
"""

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as mqtt

from edgekit.agents.store import Outbox
from edgekit.mqtt import Backoff, BrokerAddress, Connection, TlsFiles, new_client

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
# Unacknowledged messages handed to paho at once; bounds memory when a long outage backlog is replayed.
MAX_IN_FLIGHT = 200
PROBE_S = 60.0  # how often the link checks that its subscriptions deliver (module docstring)
PROBE_WAIT_S = 15.0  # how long its echo may take
PROBE_BACKOFF_MAX = 64  # after failed probes the interval doubles, up to this many times PROBE_S
RESUBSCRIBE_S = 2.0  # after the broker refused a subscription


class Link(Protocol):
    """What the agent needs of its connection to the hub. The agent writes everything the hub must not miss to its
    outbox and calls `notify`; the link sends it and acknowledges it there once delivered."""

    @property
    def connected(self) -> bool: ...

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Route messages on `topic` (exact name) to `handler`."""

    def publish_state(self, topic: str, payload: bytes) -> None:
        """Retained state (status, reported config): only the latest matters; dropped while offline."""

    def publish_direct(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Requests that are meaningless later (e.g. asking for bundle chunks); False when offline."""

    def notify(self) -> None:
        """The outbox has something new."""

    def start(self, outbox: Outbox, on_connect: Callable[[], None]) -> None:
        """Connect (and keep reconnecting), drain `outbox`; `on_connect` runs after every (re)connect."""

    def stop(self, goodbye: tuple[str, bytes] | None = None) -> None:
        """Disconnect; `goodbye` (topic, payload) is published as retained state first."""

    def wait_connected(self, timeout: float) -> bool: ...


class MqttLink:
    """The Link over paho-mqtt (module docstring); the outbox and the connect hook arrive with `start`."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        will: tuple[str, bytes],
        tls_files: TlsFiles | None = None,
        backoff: Backoff = Backoff(),
        keepalive: int = 30,
    ) -> None:
        self.address = address
        self.outbox: Outbox | None = None
        self._on_connect_hook: Callable[[], None] = lambda: None
        self._handlers: dict[str, Handler] = {}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._wake = threading.Condition()
        # Only the drain thread touches these: paho calls on_publish holding its own lock, so acks are passed
        # over in a deque instead of taking a lock that publish() would need too.
        self._in_flight: dict[int, int] = {}  # paho mid -> outbox seq
        self._acked: deque[int] = deque()
        self._cursor = 0  # highest seq handed to paho since the last connect
        self._restart_drain = threading.Event()
        self.connects = 0
        self.resubscribes = 0  # subscriptions renewed after a probe that did not come back
        self.refused_subscriptions = 0  # SUBACKs that refused a topic (each asked for again)
        self._subscribing: dict[int, list[str]] = {}  # SUBSCRIBE packet id → its topics, until the SUBACK
        self._probe_topic: str | None = None
        self._probe_nonce = b""
        self._probe_seen = threading.Event()
        self._client = self._make_client(client_id, will, tls_files)
        self._connection = Connection(self._client, address, backoff, keepalive, on_lost=self._connected.clear)
        self._drain = threading.Thread(target=self._drain_loop, name="mqtt-outbox", daemon=True)

    def _make_client(self, client_id: str, will: tuple[str, bytes], tls_files: TlsFiles | None) -> mqtt.Client:
        # clean_session=False: the broker keeps our subscriptions and queues QoS 1 messages (desired state,
        # bundle chunks) while we are away.
        client = new_client(self.address, client_id, tls_files, clean_session=False)
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.max_inflight_messages_set(MAX_IN_FLIGHT)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Route messages on `topic` (exact name) to `handler`; restored after every reconnect."""
        self._handlers[topic] = handler
        if self.connected:
            self._subscribe([topic])

    def publish_state(self, topic: str, payload: bytes) -> None:
        """Retained state (status, reported config): only the latest matters, so it bypasses the outbox."""
        if self.connected:
            self._client.publish(topic, payload, qos=1, retain=True)

    def publish_direct(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        return self.connected and self._client.publish(topic, payload, qos=qos).rc == mqtt.MQTT_ERR_SUCCESS

    def notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def watch_downlink(self, topic: str) -> None:
        """Probe on `topic` (one this client may publish and subscribe to) that subscriptions deliver, and renew
        them when they do not (module docstring). Call before start()."""
        self._probe_topic = topic
        self._handlers[topic] = self._on_probe

    def start(self, outbox: Outbox, on_connect: Callable[[], None]) -> None:
        self.outbox, self._on_connect_hook = outbox, on_connect
        self._connection.start()
        self._drain.start()
        if self._probe_topic is not None:
            threading.Thread(target=self._probe_loop, args=(self._probe_topic,), name="mqtt-probe", daemon=True).start()

    def _on_probe(self, topic: str, payload: bytes) -> None:
        if payload == self._probe_nonce:
            self._probe_seen.set()

    def _probe_loop(self, topic: str) -> None:
        failed = 0
        while not self._stop.wait(PROBE_S * min(2**failed, PROBE_BACKOFF_MAX)):
            if not self.connected:
                continue
            self._probe_seen.clear()
            self._probe_nonce = secrets.token_hex(8).encode()
            self._client.publish(topic, self._probe_nonce, qos=1)
            if self._probe_seen.wait(PROBE_WAIT_S) or not self.connected:
                failed = 0
                continue
            failed += 1
            self.resubscribes += 1
            log.warning("the broker delivered nothing to this client for %g s (its probe did not come back): "
                        "subscribing again", PROBE_WAIT_S)  # fmt: skip
            self._client.unsubscribe(list(self._handlers))
            self._subscribe(list(self._handlers))

    def stop(self, goodbye: tuple[str, bytes] | None = None) -> None:
        """Disconnect cleanly; `goodbye` (e.g. status offline) is published first, since a clean disconnect
        does not fire the Last Will."""
        if goodbye and self.connected:
            info = self._client.publish(goodbye[0], goodbye[1], qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self._stop.set()
        self.notify()
        self._connection.stop()
        if self._drain.is_alive():
            self._drain.join(timeout=5)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        self._subscribe(list(self._handlers))
        self._restart_drain.set()
        self._connected.set()
        self._on_connect_hook()
        self.notify()

    def _subscribe(self, topics: list[str]) -> None:
        result, mid = self._client.subscribe([(topic, 1) for topic in topics])
        if result == mqtt.MQTT_ERR_SUCCESS:
            self._subscribing[mid] = topics

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        topics = self._subscribing.pop(mid, [])
        refused = [topic for topic, code in zip(topics, reason_codes, strict=False) if code.is_failure]
        if not refused:
            return
        self.refused_subscriptions += len(refused)
        log.warning("the broker refused the subscription to %s: asking again in %g s", ", ".join(refused),
                    RESUBSCRIBE_S)  # fmt: skip
        timer = threading.Timer(RESUBSCRIBE_S, self._subscribe_again, args=(refused,))
        timer.daemon = True
        timer.start()

    def _subscribe_again(self, topics: list[str]) -> None:
        if self.connected and not self._stop.is_set():  # else the next connect subscribes to every topic anyway
            self._subscribe(topics)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        handler = self._handlers.get(message.topic)
        if handler is None:
            return
        try:
            handler(message.topic, message.payload)
        except Exception:
            # A handler bug must not take the network thread (and with it the whole link) down.
            log.exception("handler for %s failed", message.topic)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acked.append(mid)
        self.notify()

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._settle_acks()
            if self._restart_drain.is_set():
                # Whatever was in flight before the reconnect is sent again, from the oldest unacknowledged.
                self._restart_drain.clear()
                self._in_flight.clear()
                self._cursor = 0
            if not self.connected or not self._send_batch():
                with self._wake:
                    self._wake.wait(timeout=0.5)

    def _settle_acks(self) -> None:
        seqs = []
        while self._acked:
            seq = self._in_flight.pop(self._acked.popleft(), None)
            if seq is not None:
                seqs.append(seq)
        if seqs:
            self.outbox.ack(seqs)

    def _send_batch(self) -> bool:
        """Hand the next queued messages to paho; False when there was nothing to send or no room."""
        room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return False
        batch = self.outbox.peek(after=self._cursor, limit=room)
        for message in batch:
            if not self.connected:
                return False
            info = self._client.publish(message.topic, message.payload, qos=message.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return False
            self._cursor = message.seq
            if message.qos == 0:
                self.outbox.ack([message.seq])
            else:
                self._in_flight[info.mid] = message.seq
        return bool(batch)
