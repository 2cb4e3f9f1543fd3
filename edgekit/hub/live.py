"""The dashboard's live feed: what ingest has just stored, merged per browser and pushed as Server-Sent Events.

Ingest calls the feed (a `Hub.listeners` entry) from its writer thread; each browser's stream waits on its own
event in the HTTP server's loop, so a slow browser gets the latest values, not a backlog.

Hub replicas on PostgreSQL each store part of the fleet's messages (shared subscriptions share them out), so
each replica's feed also takes what the others stored (`FleetRelay`): every replica sends what it stored with
NOTIFY and LISTENs for the others'. Push, not polling: a few ms from one replica's commit to another's browsers,
no query per interval per replica, and no message table needs an id to poll by (telemetry is keyed by device and
seq). NOTIFY is not durable: a replica that was disconnected misses what was sent meanwhile, which a live view can
afford (a page load reads the database). SQLite means a single hub: no relay.
"""

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

CHANNEL = "edgekit_live"
NOTIFY_MAX_BYTES = 7000  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
RELAY_QUEUE = 1000  # stored batches waiting for their NOTIFY; past it the live view misses some, ingest never waits
STREAM_COALESCE_S = 0.25  # batch ingest's 50 ms flushes so a browser gets a few updates a second, not dozens
STREAM_KEEPALIVE_S = 15.0
MAX_EVENTS_PER_PUSH = 50
MAX_SAMPLES_PER_PUSH = 500


class Subscriber:
    """One browser's pending updates, merged between pushes so a slow client gets the latest, not a backlog."""

    def __init__(self, loop: asyncio.AbstractEventLoop, device: str | None) -> None:
        self.loop = loop
        self.device = device  # the device page wants every sample of its device; the fleet page only the latest
        self.wake = asyncio.Event()
        self.devices: dict[str, dict[str, Any]] = {}
        self.samples: list[list[Any]] = []
        self.events: list[dict[str, Any]] = []
        self.last_sent = time.monotonic()

    def take(self) -> dict[str, Any] | None:
        if not (self.devices or self.samples or self.events):
            return None
        message = {"ts": time.time(), "devices": self.devices}
        if self.events:
            message["events"] = self.events[-MAX_EVENTS_PER_PUSH:]
        if self.device is not None and self.samples:
            message["samples"] = {self.device: self.samples[-MAX_SAMPLES_PER_PUSH:]}
        self.devices, self.samples, self.events = {}, [], []
        return message


def _sample(m: Any) -> list[Any]:
    return [m.ts, m.latency_p50_ms, m.latency_p95_ms, m.fps, m.cpu_percent, m.temperature_c]


def _device_delta(kind: str, m: Any) -> dict[str, Any] | None:
    """The fleet-table cells a stored message changes."""
    if kind == "telemetry":
        return {"latency_p50_ms": m.latency_p50_ms, "latency_p95_ms": m.latency_p95_ms, "fps": m.fps,
                "cpu_percent": m.cpu_percent, "memory_mb": m.memory_mb, "temperature_c": m.temperature_c,
                "last_seen": m.ts, "online": True, **({"bundle_label": m.bundle} if m.bundle else {})}  # fmt: skip
    if kind == "status":
        if m.state == "offline":  # often the Last Will, whose ts is when it was registered, not when it fired
            return {"online": False}
        delta = {"online": True, "last_seen": m.ts}
        if m.bundle:
            delta |= {"bundle_id": m.bundle.id, "bundle_label": f"{m.bundle.name}@{m.bundle.version}"}
        return delta
    if kind in ("results", "events"):
        return {"last_seen": m.ts, "online": True}
    if kind in ("reported", "config"):
        delta = {"update_state": m.update.state} if hasattr(m, "update") else {}
        if getattr(m, "bundle", None):
            delta |= {"bundle_id": m.bundle.id, "bundle_label": f"{m.bundle.name}@{m.bundle.version}"}
        return delta or None
    return None


# One stored message as the live view sees it: device id, its fleet-table cells, its event, its telemetry sample.
Update = tuple[str, dict[str, Any] | None, dict[str, Any] | None, list[Any] | None]


def updates(stored: list[tuple[str, str, Any]]) -> list[Update]:
    """What the live view shows of stored messages (JSON-ready, so it can go to other replicas too)."""
    found: list[Update] = []
    for device_id, kind, model in stored:
        delta = _device_delta(kind, model)
        event = None
        if kind == "events":
            event = {"device_id": device_id, "ts": model.ts, "type": model.type, "level": model.level,
                     "message": model.message[:300]}  # fmt: skip
        sample = _sample(model) if kind == "telemetry" else None
        if delta or event or sample:
            found.append((device_id, delta, event, sample))
    return found


class LiveFeed:
    """Bridges ingest's writer thread to the browsers' event loop: merge under a lock, wake each stream."""

    def __init__(self, stopping: threading.Event) -> None:
        """`stopping` is set when the hub begins to stop: every stream then ends, since the HTTP server waits for
        open responses before its lifespan stops the workers."""
        self.stopping = stopping
        self._lock = threading.Lock()
        self._subscribers: set[Subscriber] = set()

    def subscribe(self, device: str | None) -> Subscriber:
        subscriber = Subscriber(asyncio.get_running_loop(), device)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def __call__(self, stored: list[tuple[str, str, Any]]) -> None:
        """A `Hub.listeners` entry: runs in ingest's writer thread, so it must be quick and must never raise."""
        try:
            if self._subscribers:
                self.merge(updates(stored))
        except Exception:  # a dashboard bug must never cost ingest a batch
            log.exception("dashboard live feed: merging %d stored messages failed", len(stored))

    def merge(self, found: list[Update]) -> None:
        """Add updates (this process's, or another replica's) to every browser's pending push, and wake them."""
        with self._lock:
            subscribers = list(self._subscribers)
            if not subscribers:
                return
            for device_id, delta, event, sample in found:
                for s in subscribers:
                    if delta:
                        s.devices.setdefault(device_id, {}).update(delta)
                    if event:
                        s.events.append(event)
                    if sample and s.device == device_id:
                        s.samples.append(sample)
            for s in subscribers:
                if (s.devices or s.events) and not s.loop.is_closed():  # closed: the HTTP server is stopping
                    del s.events[:-MAX_EVENTS_PER_PUSH]
                    s.loop.call_soon_threadsafe(s.wake.set)

    async def events(self, device: str | None, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """Server-Sent Events for one browser until it goes away (`disconnected`) or the hub stops."""
        subscriber = self.subscribe(device)  # here, not in the endpoint: `finally` then always unsubscribes it
        try:
            yield "retry: 2000\n\n"
            yield f"event: hello\ndata: {json.dumps({'ts': time.time()})}\n\n"
            while not self.stopping.is_set():
                try:
                    # Wake at least every second to notice a hub shutdown: uvicorn waits for open streams to end.
                    await asyncio.wait_for(subscriber.wake.wait(), timeout=1.0)
                except TimeoutError:
                    if await disconnected():
                        break
                    if time.monotonic() - subscriber.last_sent > STREAM_KEEPALIVE_S:
                        subscriber.last_sent = time.monotonic()
                        yield ": keepalive\n\n"
                    continue
                await asyncio.sleep(STREAM_COALESCE_S)
                with self._lock:
                    subscriber.wake.clear()
                    message = subscriber.take()
                if message is not None:
                    subscriber.last_sent = time.monotonic()
                    yield f"data: {json.dumps(message, separators=(',', ':'))}\n\n"
        finally:
            self.unsubscribe(subscriber)


class FleetRelay:
    """Between hub replicas on PostgreSQL: what this process stored goes out by NOTIFY (a `Hub.listeners` entry;
    a thread of its own sends, so ingest never waits on it), and what the others stored comes in by LISTEN into
    `feed`. Each message names the replica that sent it, so a replica skips its own."""

    def __init__(self, engine: Engine, replica: str, feed: LiveFeed) -> None:
        self.engine = engine
        self.replica = replica
        self.feed = feed
        self.dropped = 0  # stored batches not relayed (queue full or the database away): reported in the log
        self._outbox: queue.Queue[list[Update]] = queue.Queue(RELAY_QUEUE)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send_loop, name="hub-live-notify", daemon=True),
                         threading.Thread(target=self._listen_loop, name="hub-live-listen", daemon=True)]  # fmt: skip

    def __call__(self, stored: list[tuple[str, str, Any]]) -> None:
        try:
            found = updates(stored)
            if found:
                self._outbox.put_nowait(found)
        except queue.Full:
            self.dropped += 1
        except Exception:  # a relay bug must never cost ingest a batch
            log.exception("live relay: %d stored messages not relayed", len(stored))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            try:
                found = self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                with self.engine.begin() as connection:
                    for payload in notify_payloads(self.replica, found):
                        connection.execute(text("SELECT pg_notify(:channel, :payload)"),
                                           {"channel": CHANNEL, "payload": payload})  # fmt: skip
            except Exception:  # the database is away: this batch is not relayed, the next one is tried
                self.dropped += 1
                log.warning("live relay: NOTIFY failed (%d batches not relayed so far)", self.dropped)

    def _listen_loop(self) -> None:
        import psycopg

        dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for notice in connection.notifies(timeout=1.0):
                            self._received(notice.payload)
            except Exception:  # the database went away: listen again once it is back
                log.warning("live relay: LISTEN connection lost; retrying", exc_info=True)
                self._stop.wait(1.0)

    def _received(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message["from"] != self.replica:
                self.feed.merge([tuple(update) for update in message["updates"]])
        except (ValueError, KeyError, TypeError):
            log.warning("live relay: ignored a malformed notification on %s", CHANNEL)


def notify_payloads(replica: str, found: list[Update]) -> list[str]:
    """`found` as JSON payloads under PostgreSQL's NOTIFY size limit, each naming the sending replica."""
    payloads: list[str] = []
    batch: list[str] = []
    size = 0
    for update in found:
        encoded = json.dumps(update, separators=(",", ":"))
        if len(encoded) > NOTIFY_MAX_BYTES - 200:  # one message too big for any payload (a huge event): left out
            continue
        if batch and size + len(encoded) > NOTIFY_MAX_BYTES - 200:
            payloads.append(_payload(replica, batch))
            batch, size = [], 0
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        payloads.append(_payload(replica, batch))
    return payloads


def _payload(replica: str, encoded: list[str]) -> str:
    return f'{{"from":{json.dumps(replica)},"updates":[{",".join(encoded)}]}}'
