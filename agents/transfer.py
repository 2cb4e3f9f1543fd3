"""Device side of the bundle transfer: a resumable, in-order chunk download (protocol in docs/protocol.md).

The partial file is only ever appended to in chunk order, so after a crash or power cut the number of whole
chunks on disk is where the download resumes; the whole file's sha256 is checked before anything trusts it.
"""

import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgekit.protocol import BundleRef, ChunkHeader, ChunkRequest

CHUNK_SIZE = 256 * 1024
WINDOW = 8  # chunks requested ahead: enough to keep a loopback or LAN link busy, bounded memory on the broker
STALL_S = 3.0  # no chunk for this long: ask again from where we are


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
