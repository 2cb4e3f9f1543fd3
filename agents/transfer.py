"""Device side of the bundle transfer: the `BundleFetcher` protocol, and `ChunkFetcher`, which asks the hub for
a bundle in chunks over the agent's link and writes them with a resumable, in-order `Download` (protocol in
docs/protocol.md).

The partial file is only ever appended to in chunk order, so after a crash or power cut the number of whole
chunks on disk is where the download resumes; the whole file's sha256 is checked before anything trusts it.
"""

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgekit.agents.link import Link
from edgekit.agents.runner import Report
from edgekit.protocol import (
    BundleRef,
    ChunkHeader,
    ChunkRequest,
    PayloadRejected,
    Topic,
    decode_chunk,
    device_topic,
    encode,
)

CHUNK_SIZE = 256 * 1024
CHUNK_MAX_PAYLOAD = 4 * 1024 * 1024 + 4096
WINDOW = 8  # chunks requested ahead: enough to keep a loopback or LAN link busy, bounded memory on the broker
STALL_S = 3.0  # no chunk for this long: ask again from where we are
POLL_S = 1.0  # how often a running download checks for a stall, reports progress and notices the agent stopping

Reject = Callable[[str, str, int], None]  # reject(topic, reason, payload bytes): a payload.rejected event


class FetchFailed(Exception):
    """The bundle could not be fetched; the message says why (it goes into the update.failed event)."""


class BundleFetcher(Protocol):
    def fetch(self, target: BundleRef, report: Report, stopping: threading.Event) -> Path:
        """The bundle file, its whole sha256 checked against `target.id`; raises FetchFailed. Progress goes to
        `report` as update.progress events; gives up when `stopping` is set."""


class ChunkFetcher:
    """Bundles in chunks over the agent's link: requests on transfer/request, chunks on transfer/chunk. Chunks of
    no running transfer, and malformed ones, are passed to `reject`."""

    def __init__(self, link: Link, device_id: str, folder: Path, reject: Reject) -> None:
        self._link = link
        self._folder = folder
        self._reject = reject
        self._request_topic = device_topic(device_id, Topic.TRANSFER_REQUEST)
        self._downloads: dict[str, Download] = {}
        link.subscribe(device_topic(device_id, Topic.TRANSFER_CHUNK), self._on_chunk)

    def fetch(self, target: BundleRef, report: Report, stopping: threading.Event) -> Path:
        download = Download(self._folder, target, self._request)
        self._downloads[target.id] = download
        if download.resumed_from:
            report("update.progress", f"resuming download at chunk {download.resumed_from}/{download.total}",
                   bundle=target.id, received=download.received_bytes)  # fmt: skip
        download.start()
        reported = 0
        while not download.finished.wait(POLL_S):
            if stopping.is_set():
                # Left registered: chunks still on their way land in the partial file the next start resumes.
                raise FetchFailed("agent stopping during download")
            download.poke()
            quarter = 4 * download.received_bytes // target.size
            if quarter > reported:
                reported = quarter
                report("update.progress", f"downloaded {25 * quarter}%", bundle=target.id,
                       received=download.received_bytes)  # fmt: skip
        del self._downloads[target.id]
        if download.error:
            raise FetchFailed(download.error)
        return download.done_path

    def _request(self, request: ChunkRequest) -> bool:
        return self._link.publish_direct(self._request_topic, encode(request))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            header, data = decode_chunk(payload, CHUNK_MAX_PAYLOAD)
        except PayloadRejected as error:
            self._reject(topic, str(error), len(payload))
            return
        download = self._downloads.get(header.bundle)
        if download is None:
            self._reject(topic, f"chunk {header.index} of bundle {header.bundle[:12]}: no such transfer running",
                         len(payload))  # fmt: skip
            return
        problem = download.on_chunk(header, data)
        if problem:
            self._reject(topic, problem, len(payload))


class Download:
    def __init__(
        self,
        folder: Path,
        ref: BundleRef,
        request: Callable[[ChunkRequest], bool],
        chunk_size: int = CHUNK_SIZE,
        window: int = WINDOW,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ref = ref
        self.part = folder / f"{ref.id}.part"
        self.done_path = folder / f"{ref.id}.ekb"
        self._meta = folder / f"{ref.id}.json"
        self._request = request
        self.window = window
        self.chunk_size = self._resume_chunk_size(chunk_size)
        self.total = -(-ref.size // self.chunk_size)
        self.next_index = self._resume_index()
        self.resumed_from = self.next_index
        self._requested_until = self.next_index
        self._last_progress = time.monotonic()
        self._lock = threading.Lock()
        self.finished = threading.Event()
        self.error: str | None = None

    def _resume_chunk_size(self, default: int) -> int:
        """A resumed download must keep the chunk size it started with."""
        try:
            return int(json.loads(self._meta.read_text())["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError):
            self._meta.write_text(json.dumps({"chunk_size": default, "bundle": self.ref.model_dump()}))
            return default

    def _resume_index(self) -> int:
        if self.done_path.is_file():
            return self.total
        size = self.part.stat().st_size if self.part.is_file() else 0
        whole = min(size // self.chunk_size, self.total)
        with open(self.part, "ab") as handle:
            handle.truncate(whole * self.chunk_size)  # drop a chunk cut short by a crash
        return whole

    @property
    def received_bytes(self) -> int:
        return min(self.next_index * self.chunk_size, self.ref.size)

    def start(self) -> None:
        if self.next_index >= self.total:
            self._finish()
            return
        self._ask(self.next_index, self.window)

    def _ask(self, index: int, count: int) -> None:
        count = min(count, self.total - index)
        if count > 0:
            self._requested_until = max(self._requested_until, index + count)
            self._request(ChunkRequest(bundle=self.ref.id, index=index, count=count, chunk_size=self.chunk_size))

    def on_chunk(self, header: ChunkHeader, data: bytes) -> str | None:
        """Take one chunk; returns why it was rejected, or None. Out-of-order and repeated chunks are ignored."""
        with self._lock:
            if self.finished.is_set() or header.index != self.next_index:
                return None
            problem = self._check(header, data)
            if problem:
                return problem
            with open(self.part, "ab") as handle:
                handle.write(data)
            self.next_index += 1
            self._last_progress = time.monotonic()
            if self.next_index == self.total:
                self._finish()
            elif self._requested_until - self.next_index <= self.window // 2:
                self._ask(self._requested_until, self.window - (self._requested_until - self.next_index))
            return None

    def _check(self, header: ChunkHeader, data: bytes) -> str | None:
        if header.error:
            self.error = f"the server cannot send bundle {self.ref.id[:12]}: {header.error}"
            self.finished.set()
            return self.error
        expected = min(self.chunk_size, self.ref.size - header.index * self.chunk_size)
        if header.size != self.ref.size or header.total != self.total or len(data) != expected:
            return f"chunk {header.index}: {len(data)} bytes of a {header.size}-byte bundle, expected {expected}"
        if hashlib.sha256(data).hexdigest() != header.sha256:
            return f"chunk {header.index}: sha256 does not match its header (corrupted in transfer)"
        return None

    def _finish(self) -> None:
        if not self.done_path.is_file():
            digest = hashlib.sha256()
            with open(self.part, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != self.ref.id:
                # Start over rather than keep a file that can never verify.
                self.part.unlink(missing_ok=True)
                self._meta.unlink(missing_ok=True)
                self.error = "the downloaded bundle's sha256 does not match the desired bundle id"
                self.finished.set()
                return
            self.part.replace(self.done_path)
        self._meta.unlink(missing_ok=True)
        self.finished.set()

    def poke(self) -> None:
        """Called periodically: re-request after a stall (lost chunks, reconnect, server restart)."""
        with self._lock:
            if not self.finished.is_set() and time.monotonic() - self._last_progress > STALL_S:
                self._last_progress = time.monotonic()
                self._requested_until = self.next_index
                self._ask(self.next_index, self.window)

    def discard(self) -> None:
        for path in (self.part, self.done_path, self._meta):
            path.unlink(missing_ok=True)
