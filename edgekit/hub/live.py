"""The dashboard's live feed: what ingest has just stored, merged per browser and pushed as Server-Sent Events.

Ingest calls the feed (a `Hub.listeners` entry) from its writer thread; each browser's stream waits on its own
event in the HTTP server's loop, so a slow browser gets the latest values, not a backlog.
"""

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

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
            self._merge(stored)
        except Exception:  # a dashboard bug must never cost ingest a batch
            log.exception("dashboard live feed: merging %d stored messages failed", len(stored))

    def _merge(self, stored: list[tuple[str, str, Any]]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            if not subscribers:
                return
            for device_id, kind, model in stored:
                delta = _device_delta(kind, model)
                event = None
                if kind == "events":
                    event = {"device_id": device_id, "ts": model.ts, "type": model.type, "level": model.level,
                             "message": model.message[:300]}  # fmt: skip
                for s in subscribers:
                    if delta:
                        s.devices.setdefault(device_id, {}).update(delta)
                    if event:
                        s.events.append(event)
                    if kind == "telemetry" and s.device == device_id:
                        s.samples.append(_sample(model))
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
