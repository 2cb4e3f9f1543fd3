"""Server side of the bundle transfer: answers devices' chunk requests from bundle files on disk, and requests that
name a `base` with the chunks of a delta from that bundle (`DeltaCache`, docs/protocol.md "Delta updates").

The hub runs one; tests, the fleet simulator and benchmarks run one next to a broker. Requests are served by
worker threads, never in the MQTT network thread, so a big transfer does not stall other traffic.

Load is bounded three ways: hubs in a share group (or on JetStream) get each request once, so exactly one answers;
a request identical to one still waiting in the queue (a device re-asking after a stall while the hub is busy) is
dropped, not answered twice; and a worker waits for the broker's PUBACK every `IN_FLIGHT_BYTES`, so chunks leave
no faster than the broker takes them instead of piling up in the hub's memory.
"""

import contextlib
import hashlib
import logging
import os
import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from edgekit.delta import DeltaError, encode_delta
from edgekit.protocol import (
    PREFIX,
    ChunkHeader,
    ChunkRequest,
    PayloadRejected,
    Topic,
    decode,
    device_topic,
    encode_chunk,
    parse_topic,
)

log = logging.getLogger(__name__)

Resolver = Callable[[str], Path | None]
DELTA_CACHE_BYTES = 1024**3
IN_FLIGHT_BYTES = 4 * 1024 * 1024  # per worker: chunk bytes published before waiting for the broker's PUBACK
PUBACK_WAIT_S = 10.0  # a broker that takes longer is down or stuck: the device asks again after its stall timeout


class BundleServer:
    def __init__(
        self, client: mqtt.Client, resolve: Resolver, workers: int = 2, deltas: "DeltaCache | None" = None
    ) -> None:
        """`client` is a connected (or connecting) paho client owned by the caller; `resolve` maps a bundle
        sha256 to its file, or None when this server does not have it; `deltas` makes and keeps the deltas it
        serves to devices that name a `base` (by default beside the bundles' folder)."""
        self._client = client
        self._resolve = resolve
        self._deltas = deltas or DeltaCache(resolve)
        # One queue per worker and a device always lands on the same one: its chunks then leave in order.
        self._queues: list[queue.Queue[tuple[str, ChunkRequest] | None]] = [
            queue.Queue(maxsize=10_000) for _ in range(workers)
        ]
        self._waiting: set[tuple] = set()  # requests queued, not yet taken by a worker (`_key`)
        self._waiting_lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._serve, args=(q,), daemon=True, name="bundle-server") for q in self._queues
        ]
        self.rejected = 0
        self.chunks_sent = 0
        self.deltas_served = 0  # requests for a delta's first chunk that were answered with it
        self.duplicates = 0  # requests dropped because the same one was still waiting

    @property
    def topic_filter(self) -> str:
        return f"{PREFIX}/+/{Topic.TRANSFER_REQUEST}"

    def start(self, route: bool = True, subscribe: bool = True, share_group: str | None = None) -> None:
        """Subscribe (call again from the client's on_connect) and start the workers.

        `route=False`: the caller's own on_message passes requests to `on_request` (cheaper for a busy client than
        paho's per-message topic-tree lookup for callbacks). `share_group`: subscribe as one of the group's members,
        so that of several hubs exactly one answers each request. `subscribe=False`: requests come some other way
        (a JetStream consumer) and reach `handle_request`."""
        if route:
            self._client.message_callback_add(self.topic_filter, self.on_request)
        if subscribe:
            shared = f"$share/{share_group}/" if share_group else ""
            self._client.subscribe(shared + self.topic_filter, qos=1)
        for worker in self._workers:
            if not worker.is_alive():
                worker.start()

    def stop(self) -> None:
        for requests in self._queues:
            requests.put(None)
        for worker in self._workers:
            worker.join(timeout=5)

    def on_request(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.handle_request(message.topic, message.payload)

    def handle_request(self, topic: str, payload: bytes) -> None:
        """Queue one device's chunk request (MQTT topic, payload) for a worker; never raises."""
        parsed = parse_topic(topic)
        try:
            request = decode(ChunkRequest, payload, max_bytes=4096)
        except PayloadRejected as error:
            self.rejected += 1
            log.warning("rejected chunk request on %s: %s", topic, error)
            return
        if parsed is None:
            return
        item = (parsed[0], request)
        with self._waiting_lock:
            if _key(item) in self._waiting:
                self.duplicates += 1
                return
            self._waiting.add(_key(item))
        try:
            self._queues[zlib.crc32(parsed[0].encode()) % len(self._queues)].put_nowait(item)
        except queue.Full:
            self._taken(item)
            self.rejected += 1  # the device re-asks after its stall timeout

    def _taken(self, item: tuple[str, ChunkRequest]) -> None:
        with self._waiting_lock:
            self._waiting.discard(_key(item))

    def _serve(self, requests: queue.Queue) -> None:
        while (item := requests.get()) is not None:
            self._taken(item)
            device_id, request = item
            try:
                self._send(device_id, request)
            except OSError as error:
                log.warning("cannot serve %s to %s: %s", request.bundle[:12], device_id, error)

    def _send(self, device_id: str, request: ChunkRequest) -> None:
        topic = device_topic(device_id, Topic.TRANSFER_CHUNK)
        path = self._resolve(request.bundle)
        if path is None or not path.is_file():
            self._send_error(topic, request, "unknown bundle")
            return
        delta = self._delta(request.bundle, request.base) if request.base is not None else None
        if delta is None:
            self._send_chunks(topic, request, path)
            return
        if request.index == 0:
            self.deltas_served += 1
        self._send_chunks(topic, request, delta.path, request.base, delta.sha256)

    def _delta(self, bundle: str, base: str) -> "CachedDelta | None":
        """The delta from `base` to `bundle`, or None to send the whole bundle: the base is unknown here, or no delta
        pays (the device treats whole-bundle chunks as the answer; docs/protocol.md "Delta updates")."""
        try:
            return self._deltas.get(base, bundle)
        except DeltaError as error:
            log.debug("no delta %s → %s, sending the whole bundle: %s", base[:12], bundle[:12], error)
            return None

    def _send_error(self, topic: str, request: ChunkRequest, error: str) -> None:
        header = ChunkHeader(bundle=request.bundle, index=request.index, total=1, size=1, sha256="0" * 64,
                             error=error)  # fmt: skip
        self._client.publish(topic, encode_chunk(header, b""), qos=1)

    def _send_chunks(
        self, topic: str, request: ChunkRequest, path: Path, base: str | None = None, delta_sha256: str | None = None
    ) -> None:
        """Chunks `request` asks for of the file at `path`; `base` and `delta_sha256` mark a delta's."""
        size = path.stat().st_size
        total = -(-size // request.chunk_size)
        unacked = 0
        with open(path, "rb") as handle:
            for index in range(request.index, min(request.index + request.count, total)):
                data = os.pread(handle.fileno(), request.chunk_size, index * request.chunk_size)
                header = ChunkHeader(bundle=request.bundle, index=index, total=total, size=size,
                                     sha256=hashlib.sha256(data).hexdigest(), base=base,
                                     delta_sha256=delta_sha256)  # fmt: skip
                sent = self._client.publish(topic, encode_chunk(header, data), qos=1)
                self.chunks_sent += 1
                unacked += len(data)
                if unacked >= IN_FLIGHT_BYTES:
                    _wait_acked(sent)
                    unacked = 0
        if unacked:
            _wait_acked(sent)


def _key(item: tuple[str, ChunkRequest]) -> tuple:
    device_id, request = item
    return device_id, request.bundle, request.index, request.count, request.chunk_size, request.base


def _wait_acked(sent: mqtt.MQTTMessageInfo) -> None:
    """Until the broker acknowledged `sent` (and, PUBACKs coming in order, what was published before it)."""
    with contextlib.suppress(RuntimeError, ValueError):  # not connected, or paho's queue full: the device re-asks
        sent.wait_for_publish(PUBACK_WAIT_S)


@dataclass(frozen=True)
class CachedDelta:
    path: Path
    sha256: str


class DeltaCache:
    """Deltas between the bundles `resolve` finds, made on first request and kept as files in a folder of their
    own, at most `max_bytes` of them (the least recently served go first). A delta is kept only if it is at most
    `MAX_RATIO` of its bundle: above that the whole bundle costs little more and, unlike a delta, resumes after a
    cut (a new model entirely, or a base of another model). Pairs with no delta are remembered, not tried again."""

    MAX_RATIO = 0.5
    MAX_REMEMBERED = 10_000  # pairs without a delta, in memory: a bound against devices naming made-up bases

    def __init__(self, resolve: Resolver, folder: Path | None = None, max_bytes: int = DELTA_CACHE_BYTES) -> None:
        """`folder` None: `deltas/` beside the folder of the target bundle's file (`<hub data>/deltas`)."""
        self._resolve = resolve
        self._folder = folder
        self._max_bytes = max_bytes
        self._known: dict[Path, CachedDelta] = {}
        self._none: dict[tuple[str, str], str] = {}
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, base: str, target: str) -> CachedDelta:
        """The delta from bundle `base` to bundle `target` (sha256s); raises DeltaError when there is none."""
        if (base, target) in self._none:
            raise DeltaError(self._none[(base, target)])
        base_path, target_path = self._resolve(base), self._resolve(target)
        if base_path is None or target_path is None:
            raise DeltaError(f"bundle {(target if base_path else base)[:12]} is not here")
        path = (self._folder or target_path.parent.with_name("deltas")) / f"{base}-{target}.zst"
        with self._guard:
            lock = self._locks.setdefault(path, threading.Lock())
        with lock:  # many devices asking for one new pair at once: it is made once
            cached = self._known.get(path)
            if cached is None or not path.is_file():
                cached = self._made(base_path, target_path, path, (base, target))
                self._known[path] = cached
            os.utime(path)
        return cached

    def _made(self, base: Path, target: Path, path: Path, pair: tuple[str, str]) -> CachedDelta:
        if path.is_file():  # made before a restart
            data = path.read_bytes()
            return CachedDelta(path, hashlib.sha256(data).hexdigest())
        target_bytes = target.read_bytes()
        try:
            data = encode_delta(base.read_bytes(), target_bytes)
            if len(data) > self.MAX_RATIO * len(target_bytes):
                raise DeltaError(f"a delta would be {len(data)} bytes of the bundle's {len(target_bytes)}")
        except DeltaError as error:
            self._remember_none(pair, str(error))
            raise
        write_file(path, data)
        with self._guard:  # two new pairs made at once must not both delete and measure the same files
            self._evict(path.parent, keep=path)
        return CachedDelta(path, hashlib.sha256(data).hexdigest())

    def _remember_none(self, pair: tuple[str, str], reason: str) -> None:
        with self._guard:
            if len(self._none) >= self.MAX_REMEMBERED:
                self._none.clear()
            self._none[pair] = reason

    def _evict(self, folder: Path, keep: Path) -> None:
        files = sorted((p for p in folder.glob("*.zst") if p != keep), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files) + keep.stat().st_size
        for old in files:
            if total <= self._max_bytes:
                return
            total -= old.stat().st_size
            old.unlink(missing_ok=True)
            self._known.pop(old, None)


def write_file(path: Path, data: bytes) -> None:
    """Written under a temp name, then renamed: a reader sees the whole file or none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{threading.get_ident()}")
    temp.write_bytes(data)
    temp.replace(path)
