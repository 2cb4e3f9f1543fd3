"""Sample capture: the inputs the hub's capture policy asks for (docs/datasets.md), kept in an on-disk spool and
uploaded to the hub in chunks when the link is up.

`Capture.consider` runs after each result (Runner._observe): it decides by the policy (low confidence, shadow
disagreement, a random rate) and the day's bounds, encodes the input (an image frame as PNG, a sensor window as
.npy) and spools it. The spool follows the outbox's rules (agents/store.py): SQLite in WAL mode (survives kill -9),
bounded (the oldest samples dropped, counted and reported), and the day's counts persisted, so a restart does not
reset the bounds. Samples are content-addressed by sha256: the same input is captured once (within SEEN_DAYS).

`Uploader` sends one chunk at a time, only while the outbox is (nearly) empty, so telemetry and results go first.
A sample leaves the spool only when the hub acknowledged it (`samples/ack`): a broker restart or a kill -9 in the
middle of an upload means the sample is sent again, and the hub (which keeps the chunks it has) stores it once.
"""

import hashlib
import io
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.agents.store import Outbox, make_private
from edgekit.protocol import (
    SAMPLE_CHUNK_BYTES,
    CapturePolicy,
    CaptureStats,
    PayloadRejected,
    SampleAck,
    SampleHeader,
    SampleMeta,
    SampleReason,
    Topic,
    decode,
    device_topic,
    encode_sample,
)

if TYPE_CHECKING:
    from edgekit.agents.link import Link
    from edgekit.agents.runner import LoadedModel
    from edgekit.agents.shadow import Shadow
    from edgekit.agents.sources import Frame

log = logging.getLogger(__name__)

SPOOL_MAX_SAMPLES = 1000
SPOOL_MAX_BYTES = 64 * 1024**2
OUTBOX_LOW = 10  # the uploader sends a chunk only while the outbox holds at most this many messages
CHUNK_GAP_S = 0.02  # between two chunks: the link stays free for what the outbox gets meanwhile
ACK_WAIT_S = 15.0  # after the last chunk: without the hub's ack by then, the sample is sent again
ACK_WAIT_MAX_S = 600.0  # each wait that got no ack doubles the next, up to this: a hub that is away is not flooded
SEEN_DAYS = 30  # how long a captured sample's sha256 is remembered, so that it is not captured again
COUNTERS = ("captured", "uploaded", "refused", "dropped")

Report = Callable[..., None]  # report(event_type, message, level="info", **data)


@dataclass(frozen=True)
class Spooled:
    sha256: str
    meta: SampleMeta
    data: bytes


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class Spool:
    """The samples waiting for the hub, and the counters that must survive a restart (module docstring)."""

    def __init__(self, path: Path, max_samples: int = SPOOL_MAX_SAMPLES, max_bytes: int = SPOOL_MAX_BYTES) -> None:
        make_private(path)
        self.path = path
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS samples (seq INTEGER PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL,"
            " meta TEXT NOT NULL, data BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS days (day TEXT PRIMARY KEY, count INTEGER, bytes INTEGER)")
        # Every sample captured in the last SEEN_DAYS, uploaded or not: a looping video shows the same frames again,
        # and a sample the hub has must not be captured (and counted) a second time.
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (sha256 TEXT PRIMARY KEY, day TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def day_usage(self, day: str) -> tuple[int, int]:
        """(samples, bytes) captured on `day` (UTC)."""
        with self._lock:
            row = self._db.execute("SELECT count, bytes FROM days WHERE day = ?", (day,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def add(self, sha256: str, meta: SampleMeta, data: bytes) -> int | None:
        """Spool a sample and count it against its day, in one transaction; None when it was captured already
        (module docstring), else how many older samples were dropped to keep the bound."""
        day = utc_day(meta.ts)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute("INSERT OR IGNORE INTO seen (sha256, day) VALUES (?, ?)", (sha256, day))
                if not cursor.rowcount:
                    self._db.execute("ROLLBACK")
                    return None
                self._db.execute("DELETE FROM seen WHERE day < ?", (utc_day(meta.ts - SEEN_DAYS * 86_400),))
                self._db.execute(
                    "INSERT INTO samples (sha256, meta, data) VALUES (?, ?, ?)", (sha256, meta.model_dump_json(), data)
                )
                self._db.execute(
                    "INSERT INTO days (day, count, bytes) VALUES (?, 1, ?) ON CONFLICT (day) DO UPDATE"
                    " SET count = count + 1, bytes = bytes + excluded.bytes",
                    (day, len(data)),
                )
                self._count("captured", 1)
                dropped = self._enforce_bound()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return dropped

    def _enforce_bound(self) -> int:
        dropped = 0
        while True:
            count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM samples").fetchone()
            if count <= 1 or (count <= self.max_samples and size <= self.max_bytes):
                break
            self._db.execute("DELETE FROM samples WHERE seq = (SELECT MIN(seq) FROM samples)")
            dropped += 1
        if dropped:
            self._count("dropped", dropped)
        return dropped

    def _count(self, name: str, by: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )

    def oldest(self) -> Spooled | None:
        with self._lock:
            row = self._db.execute("SELECT sha256, meta, data FROM samples ORDER BY seq LIMIT 1").fetchone()
        return Spooled(row[0], SampleMeta.model_validate_json(row[1]), bytes(row[2])) if row else None

    def remove(self, sha256: str, counter: str) -> bool:
        """Delete a sample the hub answered for, counting it as `counter` (uploaded or refused); False when it was
        not (any more) spooled."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.execute("DELETE FROM samples WHERE sha256 = ?", (sha256,)).rowcount
            if deleted:
                self._count(counter, deleted)
            self._db.execute("COMMIT")
        return bool(deleted)

    def stats(self) -> CaptureStats:
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            spooled, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM samples").fetchone()
        return CaptureStats(**{name: counters.get(name, 0) for name in COUNTERS}, spooled=spooled, spool_bytes=size)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def encode_input(frame: "Frame", feeds: dict[str, Any], input_name: str) -> tuple[str, bytes]:
    """(format, bytes): an image frame as the PNG of what the source gave, anything else as the .npy of the model
    input it became (a sensor window is the model input, reshaped)."""
    if frame.kind == "image":
        import cv2

        ok, png = cv2.imencode(".png", frame.data)
        if ok:
            return "png", png.tobytes()
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(feeds[input_name]), allow_pickle=False)
    return "npy", buffer.getvalue()


def _top_score(result: dict[str, Any]) -> float | None:
    best = (result.get("top") or result.get("detections") or [None])[0]
    return float(best.score) if best is not None else None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The model's answer, as results carry it (top-k or detections, at most 16 of them)."""
    summary = {}
    for key in ("top", "detections"):
        if result.get(key) is not None:
            summary[key] = [item.model_dump(exclude_none=True) for item in result[key][:16]]
    return summary


class Capture:
    """Decides after each result whether to keep its input (module docstring); `use` sets the policy."""

    def __init__(self, spool: Spool, report: Report, rng: random.Random | None = None) -> None:
        self.spool = spool
        self._report = report
        self._policy: CapturePolicy | None = None
        self._rng = rng or random.Random()
        self._shadow_seen: tuple[int, float] = (0, 0.0)  # the shadow's (samples, agreement sum) at the last result

    @property
    def policy(self) -> CapturePolicy | None:
        return self._policy

    def use(self, policy: CapturePolicy | None) -> None:
        self._policy = policy

    def consider(self, model: "LoadedModel", frame: "Frame", feeds: dict[str, Any], result: dict[str, Any],
                 shadow: "Shadow | None") -> SampleReason | None:  # fmt: skip
        """Spool this input when the policy asks for it and the day's bounds allow; why it was kept, or None."""
        try:
            return self._consider(model, frame, feeds, result, shadow)
        except Exception:  # a full disk or a frame that will not encode must not stop the inference loop
            log.exception("capture: the input could not be kept")
            return None

    def _consider(self, model: "LoadedModel", frame: "Frame", feeds: dict[str, Any], result: dict[str, Any],
                  shadow: "Shadow | None") -> SampleReason | None:  # fmt: skip
        policy = self._policy
        if policy is None:
            return None
        disagreed = policy.on_disagreement and self._shadow_disagreed(shadow)
        reason = self._reason(policy, result, disagreed)
        if reason is None:
            return None
        count, size = self.spool.day_usage(utc_day(frame.ts))
        if count >= policy.max_per_day:
            return None
        input_name = model.bundle.manifest.inputs[0].name
        form, data = encode_input(frame, feeds, input_name)
        if len(data) > policy.max_sample_bytes or size + len(data) > policy.max_bytes_per_day:
            return None
        return self._keep(model, frame, result, reason, form, data, input_name)

    def _reason(self, policy: CapturePolicy, result: dict[str, Any], disagreed: bool) -> SampleReason | None:
        score = _top_score(result)
        if policy.below_confidence is not None and score is not None and score < policy.below_confidence:
            return "low_confidence"
        if policy.on_disagreement and disagreed:
            return "disagreement"
        if policy.random_rate and self._rng.random() < policy.random_rate:
            return "random"
        return None

    def _shadow_disagreed(self, shadow: "Shadow | None") -> bool:
        """Whether the shadow compared this input and did not fully agree (its running sums moved by less than 1)."""
        if shadow is None:
            return False
        stats = shadow.stats()
        total = (stats.agreement or 0.0) * stats.samples
        samples, previous = self._shadow_seen
        self._shadow_seen = (stats.samples, total)
        return stats.samples == samples + 1 and total - previous < 0.999

    def _keep(self, model: "LoadedModel", frame: "Frame", result: dict[str, Any], reason: SampleReason, form: str,
              data: bytes, input_name: str) -> SampleReason | None:  # fmt: skip
        bundle = model.bundle
        meta = SampleMeta(ts=frame.ts, bundle=bundle.label, bundle_id=bundle.id, input=input_name, format=form,
                          reason=reason, output=_summary(result))  # fmt: skip
        sha256 = hashlib.sha256(data).hexdigest()
        dropped = self.spool.add(sha256, meta, data)
        if dropped is None:
            return None  # the same input, spooled already
        self._report("sample.captured", f"captured a {form} sample ({reason})", sample=sha256, reason=reason,
                     bytes=len(data))  # fmt: skip
        if dropped:
            self._report("capture.dropped", f"capture spool full: dropped the {dropped} oldest samples",
                         level="warning", dropped=dropped, total_dropped=self.spool.stats().dropped)  # fmt: skip
        return reason


def chunks_of(sample: Spooled) -> Iterator[bytes]:
    """The `samples` payloads of a sample: SAMPLE_CHUNK_BYTES pieces, each with the header (docs/protocol.md)."""
    total = max(1, -(-len(sample.data) // SAMPLE_CHUNK_BYTES))
    for index in range(total):
        data = sample.data[index * SAMPLE_CHUNK_BYTES : (index + 1) * SAMPLE_CHUNK_BYTES]
        header = SampleHeader(sample=sample.sha256, index=index, total=total, size=len(sample.data),
                              sha256=hashlib.sha256(data).hexdigest(), meta=sample.meta)  # fmt: skip
        yield encode_sample(header, data)


class Uploader:
    """Sends spooled samples to the hub one chunk at a time, while the outbox is nearly empty (module docstring)."""

    def __init__(self, spool: Spool, link: "Link", outbox: Outbox, device_id: str, stop: threading.Event) -> None:
        self._spool = spool
        self._link = link
        self._outbox = outbox
        self._stop = stop
        self._topic = device_topic(device_id, Topic.SAMPLES)
        self._ack_topic = device_topic(device_id, Topic.SAMPLES_ACK)
        self._answered = threading.Condition()
        self._ack_wait = ACK_WAIT_S
        self._thread = threading.Thread(target=self._run, name="capture-upload", daemon=True)

    def start(self) -> None:
        self._link.subscribe(self._ack_topic, self._on_ack)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            with self._answered:
                self._answered.notify_all()
            self._thread.join(timeout)

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = decode(SampleAck, payload)
        except PayloadRejected as error:
            log.warning("%s: %s", topic, error)
            return
        if ack.error:
            log.warning("the hub refused sample %s: %s", ack.sample, ack.error)
        self._spool.remove(ack.sample, "refused" if ack.error else "uploaded")
        with self._answered:
            self._answered.notify_all()

    def _run(self) -> None:
        was_connected = False
        while not self._stop.is_set():
            connected = self._link.connected
            if connected and not was_connected:
                # Back from an outage: what went unanswered was likely lost with the link, not ignored by a hub
                # that is away; the doubled wait starts over, so the spool drains as soon as the hub is back.
                self._ack_wait = ACK_WAIT_S
            was_connected = connected
            sample = self._spool.oldest() if connected else None
            if sample is None:
                self._stop.wait(0.5)
                continue
            if self._send(sample):
                self._await_ack(sample.sha256)

    def _send(self, sample: Spooled) -> bool:
        """Every chunk of `sample`, each when the outbox is nearly empty; False when the link went down meanwhile."""
        for chunk in chunks_of(sample):
            if not self._wait_for_room():
                return False
            if not self._link.publish_direct(self._topic, chunk, qos=1):
                return False
            self._stop.wait(CHUNK_GAP_S)
        return True

    def _wait_for_room(self) -> bool:
        while self._outbox.depth() > OUTBOX_LOW and self._link.connected and not self._stop.is_set():
            self._stop.wait(0.05)
        return self._link.connected and not self._stop.is_set()

    def _await_ack(self, sha256: str) -> None:
        deadline = time.monotonic() + self._ack_wait
        with self._answered:
            while not self._stop.is_set() and time.monotonic() < deadline and self._spooled(sha256):
                self._answered.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        acked = not self._spooled(sha256)
        self._ack_wait = ACK_WAIT_S if acked else min(2 * self._ack_wait, ACK_WAIT_MAX_S)

    def _spooled(self, sha256: str) -> bool:
        oldest = self._spool.oldest()
        return oldest is not None and oldest.sha256 == sha256
