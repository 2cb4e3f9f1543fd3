"""Device side of the bundle transfer: the `BundleFetcher` protocol, and `ChunkFetcher`, which asks the hub for
a bundle in chunks over the agent's link and writes them with a resumable, in-order `Download` (protocol in
docs/protocol.md).

The partial file is only ever appended to in chunk order, so after a crash or power cut the number of whole
chunks on disk is where the download resumes; the whole file's sha256 is checked before anything trusts it.

Every download is bounded (`FetchLimits`): a deadline in seconds of downloading and a budget of retries without
progress (re-requests after a stall, chunks rejected). Both are spent across restarts (kept next to the partial
file), so a desired state naming a wrong size, or a server that never sends the right bytes, ends in FetchFailed
instead of "downloading" forever. A new rev is a new attempt: a fresh budget, the chunks on disk kept.
"""

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pydantic import Field, ValidationError

from edgekit.agents.bundles import write_atomically
from edgekit.agents.link import Link
from edgekit.agents.runner import Report
from edgekit.delta import DeltaError, apply_delta
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
from edgekit.schema import StrictModel

CHUNK_SIZE = 256 * 1024
CHUNK_MAX_PAYLOAD = 4 * 1024 * 1024 + 4096
WINDOW = 8  # chunks requested ahead: enough to keep a loopback or LAN link busy, bounded memory on the broker
STALL_S = 3.0  # no chunk for this long: ask again from where we are
POLL_S = 1.0  # how often a running download checks for a stall and its budget, reports progress, notices stopping
# The default deadline: a fixed allowance plus the bundle at a slow link's rate, so a big bundle on a slow but
# working link finishes while a stuck download still ends.
DEADLINE_BASE_S = 120.0
DEADLINE_MIN_RATE = 32 * 1024  # bytes per second
# Without a good chunk: ~90 s of silence (a re-request per STALL_S), or ~45 s of a server sending only bad chunks
# (the one at the expected index is rejected, then the stall's re-request: two retries per STALL_S).
DEFAULT_RETRIES = 30
# A delta's re-requests without an answer before the whole bundle is fetched instead: a hub from before deltas that
# refuses the unknown `base` field never answers, and a new hub answers within a stall unless it is making the
# delta of a big pair.
DELTA_RETRIES = 4

Reject = Callable[[str, str, int], None]  # reject(topic, reason, payload bytes): a payload.rejected event


class FetchFailed(Exception):
    """The bundle could not be fetched; the message says why (it goes into the update.failed event)."""


def default_deadline_s(size: int) -> float:
    return DEADLINE_BASE_S + size / DEADLINE_MIN_RATE


class FetchLimits(StrictModel):
    """What one update's download may spend: `deadline_s` seconds of downloading (summed over restarts) and
    `retries` retries in a row without a good chunk. `attempt` (the desired rev) tells a resumed attempt from a
    new one, which starts with a fresh budget."""

    attempt: int
    deadline_s: float = Field(gt=0)
    retries: int = Field(ge=0)


@dataclass(frozen=True)
class Base:
    """A bundle the device holds, as the .ekb bytes it came in: what a delta update starts from."""

    id: str
    data: bytes


@dataclass(frozen=True)
class Fetched:
    """A fetched bundle file and how it came: `received` bytes, the whole file or a delta, in MQTT chunks or over
    HTTP."""

    path: Path
    via: Literal["full", "delta"]
    received: int
    transport: Literal["mqtt", "http"] = "mqtt"


class BundleFetcher(Protocol):
    def fetch(
        self, target: BundleRef, report: Report, stopping: threading.Event, limits: FetchLimits, base: Base | None
    ) -> Fetched:
        """The bundle file, its whole sha256 checked against `target.id`; raises FetchFailed, also once `limits`
        are spent (what an attempt spent survives a restart). With a `base`, a delta from it is tried first; when
        that fails for any reason, the whole file is fetched (an update.progress event says why). Progress goes
        to `report` as update.progress events; gives up when `stopping` is set."""


class _Spent(StrictModel):
    """Kept next to the partial file (`<id>.json`): the chunk size it was started with and the attempt's spending."""

    chunk_size: int = Field(ge=1)
    attempt: int | None = None
    seconds: float = Field(0.0, ge=0)
    retries: int = Field(0, ge=0)


class ChunkFetcher:
    """Bundles in chunks over the agent's link: requests on transfer/request, chunks on transfer/chunk. Chunks of
    no running transfer, and malformed ones, are passed to `reject`."""

    def __init__(self, link: Link, device_id: str, folder: Path, reject: Reject) -> None:
        self._link = link
        self._folder = folder
        self._reject = reject
        self._request_topic = device_topic(device_id, Topic.TRANSFER_REQUEST)
        self._downloads: dict[str, Download | DeltaDownload] = {}
        self._route = threading.Lock()  # chunks are routed on the link's thread, downloads (un)registered on fetch's
        link.subscribe(device_topic(device_id, Topic.TRANSFER_CHUNK), self._on_chunk)

    def fetch(
        self, target: BundleRef, report: Report, stopping: threading.Event, limits: FetchLimits, base: Base | None
    ) -> Fetched:
        def whole(requested: int = 0) -> Download:
            return Download(self._folder, target, self._request, attempt=limits.attempt, requested=requested)

        if base is not None and not Download.on_disk(self._folder, target):  # a partial download is resumed instead
            outcome = self._fetch_delta(target, base, stopping, whole)
            if isinstance(outcome, Fetched):
                return outcome
            if isinstance(outcome, Download):  # the hub answered with the whole bundle
                return Fetched(self._fetch_whole(outcome, report, stopping, limits), "full", target.size)
            report("update.progress", f"no delta update ({outcome}): downloading the whole bundle", bundle=target.id,
                   base=base.id, fallback=outcome)  # fmt: skip
        download = whole()
        if download.resumed_from:
            report("update.progress", f"resuming download at chunk {download.resumed_from}/{download.total}",
                   bundle=target.id, received=download.received_bytes)  # fmt: skip
        download.start()
        return Fetched(self._fetch_whole(download, report, stopping, limits), "full", target.size)

    def _fetch_delta(
        self, target: BundleRef, base: Base, stopping: threading.Event, whole: Callable[[int], "Download"]
    ) -> "Fetched | Download | str":
        """Ask for the bundle as a delta from `base`: the bundle rebuilt from the delta, the whole bundle's
        download when the hub sends that instead (a hub from before deltas, or one for which no delta pays), or
        why the delta failed."""
        delta = DeltaDownload(self._folder, target, base, self._request, whole)
        with self._route:
            self._downloads[target.id] = delta
        delta.start()
        while not delta.finished.wait(POLL_S) and not stopping.is_set():
            delta.poke()
        if delta.successor is not None:
            return delta.successor  # registered already: a stop now is the whole download's (_fetch_whole)
        with self._route:
            del self._downloads[target.id]
        if not delta.finished.is_set():
            raise FetchFailed("agent stopping during download")
        return Fetched(delta.done_path, "delta", delta.size) if delta.error is None else delta.error

    def _fetch_whole(
        self, download: "Download", report: Report, stopping: threading.Event, limits: FetchLimits
    ) -> Path:
        target = download.ref
        with self._route:
            self._downloads[target.id] = download
        reported = 0
        while not download.finished.wait(POLL_S):
            if stopping.is_set():
                # Left registered: chunks still on their way land in the partial file the next start resumes.
                raise FetchFailed("agent stopping during download")
            download.spend(POLL_S)
            over = download.over_budget(limits)
            if over:
                with self._route:
                    del self._downloads[target.id]  # its chunks stay on disk for the next attempt
                raise FetchFailed(over)
            download.poke()
            quarter = 4 * download.received_bytes // target.size
            if quarter > reported:
                reported = quarter
                report("update.progress", f"downloaded {25 * quarter}%", bundle=target.id,
                       received=download.received_bytes)  # fmt: skip
        with self._route:
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
        with self._route:
            download = self._downloads.get(header.bundle)
            if isinstance(download, DeltaDownload) and header.base is None:
                download = download.hand_over()
                if download is not None:
                    self._downloads[header.bundle] = download
        if download is None:
            self._reject(topic, f"chunk {header.index} of bundle {header.bundle[:12]}: no such transfer running",
                         len(payload))  # fmt: skip
            return
        problem = download.on_chunk(header, data)
        if problem:
            self._reject(topic, problem, len(payload))


class _Window:
    """What both downloads do with a chunk taken in order: finish after the last, else keep `window` chunks asked
    for ahead (more when half have arrived)."""

    next_index: int
    window: int
    _requested_until: int
    _last_progress: float

    def _ask(self, index: int, count: int) -> object: ...

    def _finish(self) -> None: ...

    def _advance(self, total: int) -> None:
        self.next_index += 1
        self._last_progress = time.monotonic()
        if self.next_index == total:
            self._finish()
        elif self._requested_until - self.next_index <= self.window // 2:
            self._ask(self._requested_until, self.window - (self._requested_until - self.next_index))


class DeltaDownload(_Window):
    """The delta from `base` to a bundle, in memory (the hub sends one only when it is under half the bundle),
    applied and checked against the bundle's sha256 once whole. Any problem ends it with `error` set, and the
    caller then downloads the whole bundle: a delta is never retried or resumed. When the hub answers with the
    whole bundle's chunks instead, `hand_over` makes the `successor` download that takes them."""

    def __init__(
        self,
        folder: Path,
        ref: BundleRef,
        base: Base,
        request: Callable[[ChunkRequest], bool],
        whole: Callable[[int], "Download"],
        window: int = WINDOW,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ref, self.base = ref, base
        self.done_path = folder / f"{ref.id}.ekb"
        self._request = request
        self._whole = whole
        self.window = window
        self.size = 0  # the delta's, from its first chunk
        self._total = 0
        self._sha256 = ""
        self._data = bytearray()
        self.next_index = 0
        self._requested_until = 0
        self._retries = 0
        self._last_progress = time.monotonic()
        self._lock = threading.Lock()
        self.finished = threading.Event()
        self.error: str | None = None
        self.successor: Download | None = None

    def start(self) -> None:
        self._ask(0, self.window)

    def _ask(self, index: int, count: int) -> None:
        count = min(count, self._total - index) if self._total else count
        if count > 0:
            self._requested_until = max(self._requested_until, index + count)
            self._request(ChunkRequest(bundle=self.ref.id, index=index, count=count, chunk_size=CHUNK_SIZE,
                                       base=self.base.id))  # fmt: skip

    def hand_over(self) -> "Download | None":
        """The whole bundle's download, to take the whole-bundle chunks the hub sent for the first request; None
        once this download has ended."""
        with self._lock:
            if self.finished.is_set() or self.next_index:
                return None
            self.successor = self._whole(self._requested_until)
            self.finished.set()
            return self.successor

    def _fail(self, error: str) -> str:
        self.error = error
        self.finished.set()
        return error

    def on_chunk(self, header: ChunkHeader, data: bytes) -> str | None:
        """Take one chunk of the delta; returns why it was rejected (which ends the delta), or None."""
        with self._lock:
            if self.finished.is_set() or header.base != self.base.id or header.index != self.next_index:
                return None
            problem = self._check(header, data)
            if problem:
                return self._fail(problem)
            self._data += data
            self._advance(self._total)
            return None

    def _check(self, header: ChunkHeader, data: bytes) -> str | None:
        if not self._total:
            if header.size >= self.ref.size or header.delta_sha256 is None:
                return f"a delta of {header.size} bytes for a {self.ref.size}-byte bundle"
            self.size, self._total, self._sha256 = header.size, -(-header.size // CHUNK_SIZE), header.delta_sha256
        expected = min(CHUNK_SIZE, self.size - header.index * CHUNK_SIZE)
        if (header.size, header.total, header.delta_sha256) != (self.size, self._total, self._sha256):
            return f"delta chunk {header.index} is of another delta than chunk 0"
        if len(data) != expected or hashlib.sha256(data).hexdigest() != header.sha256:
            return f"delta chunk {header.index}: {len(data)} bytes (expected {expected}) or sha256 do not match"
        return None

    def _finish(self) -> None:
        try:
            bundle = rebuilt_from_delta(self.base, bytes(self._data), self._sha256, self.ref)
        except DeltaError as error:
            self._fail(str(error))
            return
        write_atomically(self.done_path, bundle)
        self.finished.set()

    def poke(self) -> None:
        """Called periodically: re-request after a stall, and give up after DELTA_RETRIES of them (a hub from
        before deltas that refused the request's `base` field never answers)."""
        with self._lock:
            if self.finished.is_set() or time.monotonic() - self._last_progress <= STALL_S:
                return
            if self._retries >= DELTA_RETRIES:
                self._fail(f"no answer to {DELTA_RETRIES + 1} delta requests {STALL_S:g} s apart")
                return
            self._retries += 1
            self._last_progress = time.monotonic()
            self._requested_until = self.next_index
            self._ask(self.next_index, self.window)


def rebuilt_from_delta(base: Base, delta: bytes, delta_sha256: str, target: BundleRef) -> bytes:
    """The bundle `delta` rebuilds from `base`, however it came (chunks or HTTP): the delta checked against the
    sha256 it was announced with, the result against the target's id. Raises DeltaError saying which failed."""
    if hashlib.sha256(delta).hexdigest() != delta_sha256:
        raise DeltaError("the delta's sha256 does not match its header")
    bundle = apply_delta(base.data, delta, target.size)
    if hashlib.sha256(bundle).hexdigest() != target.id:
        raise DeltaError("the bundle rebuilt from the delta does not match the desired bundle's sha256")
    return bundle


class Download(_Window):
    def __init__(
        self,
        folder: Path,
        ref: BundleRef,
        request: Callable[[ChunkRequest], bool],
        chunk_size: int = CHUNK_SIZE,
        window: int = WINDOW,
        attempt: int | None = None,
        requested: int = 0,
    ) -> None:
        """`requested`: chunks already asked for by someone else (the delta request a hub answered in whole)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.ref = ref
        self.part = folder / f"{ref.id}.part"
        self.done_path = folder / f"{ref.id}.ekb"
        self._meta = folder / f"{ref.id}.json"
        self._request = request
        self.window = window
        spent = self._resume_spent(chunk_size, attempt)
        self.chunk_size, self._attempt = spent.chunk_size, attempt
        self.seconds, self.retries = spent.seconds, spent.retries  # this attempt's spending so far
        self._save()
        self.last_problem = "no chunk has arrived yet"
        self.total = -(-ref.size // self.chunk_size)
        self.next_index = self._resume_index()
        self.resumed_from = self.next_index
        self._requested_until = max(self.next_index, requested)
        self._last_progress = time.monotonic()
        self._lock = threading.Lock()
        self.finished = threading.Event()
        self.error: str | None = None

    @staticmethod
    def on_disk(folder: Path, ref: BundleRef) -> bool:
        """Whether a download of the bundle has begun: some of it on disk (a partial file to resume, or the whole
        file), or time already spent on it (kept across restarts). Such an update goes on with the whole bundle: a
        delta tried again after a restart would spend time outside the update's deadline."""
        part = folder / f"{ref.id}.part"
        begun = (folder / f"{ref.id}.ekb").is_file() or (folder / f"{ref.id}.json").is_file()
        return begun or (part.is_file() and part.stat().st_size > 0)

    def _resume_spent(self, default_chunk_size: int, attempt: int | None) -> _Spent:
        """A resumed download keeps the chunk size it started with, and a resumed attempt what it spent."""
        try:
            spent = _Spent.model_validate_json(self._meta.read_bytes())
        except (OSError, ValidationError):
            spent = _Spent(chunk_size=default_chunk_size, attempt=attempt)
        return spent if spent.attempt == attempt else _Spent(chunk_size=spent.chunk_size, attempt=attempt)

    def _save(self) -> None:
        spent = _Spent(chunk_size=self.chunk_size, attempt=self._attempt, seconds=self.seconds, retries=self.retries)
        write_atomically(self._meta, spent.model_dump_json().encode())

    def spend(self, seconds: float) -> None:
        """Count time spent downloading, and keep it on disk (once per poll) so a restart does not reset it."""
        with self._lock:
            if self.finished.is_set():
                return
            self.seconds += seconds
            self._save()

    def over_budget(self, limits: FetchLimits) -> str | None:
        """Why this attempt must end now, or None."""
        if self.seconds >= limits.deadline_s:
            return (f"no complete bundle within the update's deadline of {limits.deadline_s:g} s of downloading: "
                    f"{self.received_bytes} of {self.ref.size} bytes; last problem: {self.last_problem}")  # fmt: skip
        if self.retries > limits.retries:
            return (f"gave up after {limits.retries} retries without a good chunk: {self.received_bytes} of "
                    f"{self.ref.size} bytes; last problem: {self.last_problem}")  # fmt: skip
        return None

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

    @property
    def bytes_on_disk(self) -> int:
        """How much of the bundle is here: where a byte-range download (HTTP) resumes."""
        if self.done_path.is_file():
            return self.ref.size
        return self.part.stat().st_size if self.part.is_file() else 0

    def append(self, data: bytes) -> None:
        """Bytes that follow what is on disk, from a byte-range download; checked as a whole by `complete`."""
        with open(self.part, "ab") as handle:
            handle.write(data)

    def restart(self) -> None:
        """Drop what is on disk: the server sends from the start."""
        self.part.unlink(missing_ok=True)

    def complete(self) -> str | None:
        """All bytes are on disk (`append`): check the whole file's sha256 and move it in place; why not, or None."""
        with self._lock:
            self._finish()
        return self.error

    def start(self) -> None:
        if self.next_index >= self.total:
            self._finish()
            return
        self._ask(self.next_index, self.window)

    def _ask(self, index: int, count: int) -> bool:
        """Request chunks; whether a request went out."""
        count = min(count, self.total - index)
        if count <= 0:
            return False
        self._requested_until = max(self._requested_until, index + count)
        return self._request(ChunkRequest(bundle=self.ref.id, index=index, count=count, chunk_size=self.chunk_size))

    def on_chunk(self, header: ChunkHeader, data: bytes) -> str | None:
        """Take one chunk; returns why it was rejected, or None. Out-of-order and repeated chunks are ignored."""
        with self._lock:
            # header.base: a late answer to a delta request this download replaced
            if self.finished.is_set() or header.index != self.next_index or header.base is not None:
                return None
            problem = self._check(header, data)
            if problem:
                self.retries += 1
                self.last_problem = problem
                return problem
            with open(self.part, "ab") as handle:
                handle.write(data)
            self.retries = 0
            self._advance(self.total)
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
                if self._ask(self.next_index, self.window):  # unsent (link down): not a retry, the deadline runs
                    self.retries += 1
                    self.last_problem = f"no chunk for {STALL_S:g} s, asked again from chunk {self.next_index}"

    def discard(self) -> None:
        for path in (self.part, self.done_path, self._meta):
            path.unlink(missing_ok=True)
