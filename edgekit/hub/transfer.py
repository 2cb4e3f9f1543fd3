"""Server side of the bundle transfer: answers devices' chunk requests from bundle files on disk.

The hub runs one; tests, the fleet simulator and benchmarks run one next to a broker. Requests are served by
worker threads, never in the MQTT network thread, so a big transfer does not stall other traffic.
"""

import hashlib
import logging
import os
import queue
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

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


class BundleServer:
    def __init__(self, client: mqtt.Client, resolve: Resolver, workers: int = 2) -> None:
        """`client` is a connected (or connecting) paho client owned by the caller; `resolve` maps a bundle
        sha256 to its file, or None when this server does not have it."""
        self._client = client
        self._resolve = resolve
        # One queue per worker and a device always lands on the same one: its chunks then leave in order.
        self._queues: list[queue.Queue[tuple[str, ChunkRequest] | None]] = [
            queue.Queue(maxsize=10_000) for _ in range(workers)
        ]
        self._workers = [
            threading.Thread(target=self._serve, args=(q,), daemon=True, name="bundle-server") for q in self._queues
        ]
        self.rejected = 0
        self.chunks_sent = 0

    @property
    def topic_filter(self) -> str:
        return f"{PREFIX}/+/{Topic.TRANSFER_REQUEST}"

    def start(self, route: bool = True) -> None:
        """Subscribe (call again from the client's on_connect) and start the workers.

        `route=False`: the caller's own on_message passes requests to `on_request` (cheaper for a busy client than
        paho's per-message topic-tree lookup for callbacks)."""
        if route:
            self._client.message_callback_add(self.topic_filter, self.on_request)
        self._client.subscribe(self.topic_filter, qos=1)
        for worker in self._workers:
            if not worker.is_alive():
                worker.start()

    def stop(self) -> None:
        for requests in self._queues:
            requests.put(None)
        for worker in self._workers:
            worker.join(timeout=5)

    def on_request(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        parsed = parse_topic(message.topic)
        try:
            request = decode(ChunkRequest, message.payload, max_bytes=4096)
        except PayloadRejected as error:
            self.rejected += 1
            log.warning("rejected chunk request on %s: %s", message.topic, error)
            return
        if parsed is None:
            return
        try:
            self._queues[zlib.crc32(parsed[0].encode()) % len(self._queues)].put_nowait((parsed[0], request))
        except queue.Full:
            self.rejected += 1  # the device re-asks after its stall timeout

    def _serve(self, requests: queue.Queue) -> None:
        while (item := requests.get()) is not None:
            device_id, request = item
            try:
                self._send(device_id, request)
            except OSError as error:
                log.warning("cannot serve %s to %s: %s", request.bundle[:12], device_id, error)

    def _send(self, device_id: str, request: ChunkRequest) -> None:
        topic = device_topic(device_id, Topic.TRANSFER_CHUNK)
        path = self._resolve(request.bundle)
        if path is None or not path.is_file():
            header = ChunkHeader(bundle=request.bundle, index=request.index, total=1, size=1, sha256="0" * 64,
                                 error="unknown bundle")  # fmt: skip
            self._client.publish(topic, encode_chunk(header, b""), qos=1)
            return
        size = path.stat().st_size
        total = -(-size // request.chunk_size)
        with open(path, "rb") as handle:
            for index in range(request.index, min(request.index + request.count, total)):
                data = os.pread(handle.fileno(), request.chunk_size, index * request.chunk_size)
                header = ChunkHeader(bundle=request.bundle, index=index, total=total, size=size,
                                     sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
                self._client.publish(topic, encode_chunk(header, data), qos=1)
                self.chunks_sent += 1
