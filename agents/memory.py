"""`MemoryLink`: a `Link` with no network, like httpx's MockTransport. The agent runs unchanged (outbox, update
logic, runtimes); what it sends is recorded, and the test plays the hub: it delivers messages to the agent and
answers what the agent sends (e.g. a BundleServer answering chunk requests).

In the package rather than under tests/, next to MqttLink: it implements the same protocol, so a change to `Link`
meets both, and benchmarks or other suites can run agents without a broker.
"""

import logging
import queue
import threading
from collections.abc import Callable

from paho.mqtt.client import topic_matches_sub

from edgekit.agents.link import Handler
from edgekit.agents.store import Outbox

log = logging.getLogger(__name__)

DRAIN_BATCH = 500


class MemoryLink:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._hub_handlers: list[tuple[str, Handler]] = []
        self._sent: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()
        self._drain_lock = threading.Lock()
        self._outbox: Outbox | None = None
        self._connected = threading.Event()
        # Messages to the agent are handed over on one thread of their own, in order, as paho's network thread
        # does: a handler that sends (a download asking for the next chunks) must not re-enter the sender.
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._deliverer = threading.Thread(target=self._deliver_loop, name="memory-link", daemon=True)

    # ---- the agent's side: the Link protocol ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._handlers[topic] = handler

    def publish_state(self, topic: str, payload: bytes) -> None:
        if self.connected:
            self._send(topic, payload)

    def publish_direct(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        if not self.connected:
            return False
        self._send(topic, payload)
        return True

    def notify(self) -> None:
        """Sends the whole outbox at once, in the caller's thread: delivered means acknowledged here."""
        with self._drain_lock:
            while self.connected and (batch := self._outbox.peek(after=0, limit=DRAIN_BATCH)):
                for message in batch:
                    self._send(message.topic, message.payload)
                self._outbox.ack([message.seq for message in batch])

    def start(self, outbox: Outbox, on_connect: Callable[[], None]) -> None:
        self._outbox = outbox
        self._connected.set()
        self._deliverer.start()
        on_connect()
        self.notify()

    def stop(self, goodbye: tuple[str, bytes] | None = None) -> None:
        if goodbye:
            self.publish_state(*goodbye)
        with self._drain_lock:  # no drain in progress reads the outbox once the agent closes it
            self._connected.clear()
        self._inbox.put(None)
        if self._deliverer.is_alive():
            self._deliverer.join(timeout=5)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ---- the hub's side -------------------------------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes) -> None:
        """Hand `payload` on `topic` to the agent's handler for it (none: dropped, as by a broker)."""
        self._inbox.put((topic, payload))

    def on_send(self, topic_filter: str, handler: Handler) -> None:
        """Call `handler(topic, payload)` for everything the agent sends on topics matching `topic_filter`, in
        the sending thread."""
        self._hub_handlers.append((topic_filter, handler))

    def messages(self, topic_filter: str = "#") -> list[tuple[str, bytes]]:
        """(topic, payload) of everything the agent sent on matching topics, in order."""
        with self._changed:
            return [(topic, payload) for topic, payload in self._sent if topic_matches_sub(topic_filter, topic)]

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float, topic_filter: str = "#"
    ) -> list[tuple[str, bytes]]:
        """Until predicate(messages(topic_filter)) holds; returns those messages. TimeoutError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.messages(topic_filter)), timeout):
                got = self.messages(topic_filter)
                raise TimeoutError(f"{timeout:g} s without the messages awaited on {topic_filter}; got {got[-5:]}")
        return self.messages(topic_filter)

    def _send(self, topic: str, payload: bytes) -> None:
        with self._changed:
            self._sent.append((topic, payload))
            self._changed.notify_all()
        for topic_filter, handler in self._hub_handlers:
            if topic_matches_sub(topic_filter, topic):
                handler(topic, payload)

    def _deliver_loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload = item
            handler = self._handlers.get(topic)
            if handler is None:
                continue
            try:
                handler(topic, payload)
            except Exception:
                log.exception("handler for %s failed", topic)  # as MqttLink: the link outlives a handler bug
