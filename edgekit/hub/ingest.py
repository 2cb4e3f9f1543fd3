"""MQTT → database: validate every device message, drop duplicates by (device, seq), write in batches.

Telemetry, results and events arrive on a shared subscription when `share_group` is set (`$share/GROUP/…`), or
from JetStream consumers shared by the hubs on a NATS cluster (`edgekit.hub.jetstream`, through `receive`), so
several hub processes split them; de-duplication is the database's primary key, so a message that two
processes both receive (a replay after reconnect) is stored once. Status and reported state are retained
state, subscribed normally by every hub process: writing the latest twice is harmless.

Throughput: paho's network thread only appends (topic, payload, receipt) to a deque; one writer thread validates and
writes everything that queued up since its last batch in one transaction. The sequenced rows go in as multi-row
`INSERT … ON CONFLICT DO NOTHING RETURNING` statements built once per table (the RETURNING rows are exactly the
newly stored messages, so duplicates need no second query), and each device's row is updated once per batch
with its newest values, not once per message. Under load a batch is everything that arrived while the previous one
was written (up to `batch_size`); the bigger the batch, the cheaper each message (`benchmarks/hub_bench.py`).

Sample chunks (`samples`, captured inputs) are handed to `edgekit.hub.datasets.SampleIngest` in the writer thread, in
arrival order with the rest; it stores them in its own transactions and counts what it refuses in `stats.invalid`.

A malformed message is counted in `stats.invalid` (by reason) and dropped; it never stops ingest and never costs
the valid messages of its batch (see `Ingest._store`). That includes a `config/reported` whose rev is out of the
protocol's bounds (`edgekit.protocol.MAX_REV`, "config/reported: invalid"): the rollout driver derives the next
desired rev from the stored one, so an unbounded rev never reaches the database.

Acknowledgement (`acknowledge_with`, the hub's `edgekit.hub.link.InOrderAcks`, or `edgekit.hub.jetstream.SplitAcks`
on a NATS cluster): a message is acknowledged to the
broker only once its batch committed, or was dropped as invalid (it would never store). A batch the database failed
on is not: the broker delivers it again, and de-duplication absorbs what had been stored after all. So a hub killed
between receipt and commit loses nothing.
"""

import gc
import json
import logging
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from sqlalchemy import BigInteger, case, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgekit.hub.db import Device, EventRecord, ResultRecord, TelemetrySample
from edgekit.protocol import (
    DEVICE_ID,
    PREFIX,
    Event,
    PayloadRejected,
    ReportedState,
    Result,
    Status,
    Telemetry,
    Topic,
    decode,
    parse_topic,
)

if TYPE_CHECKING:
    from edgekit.hub.datasets import SampleIngest

log = logging.getLogger(__name__)

SEQUENCED = {Topic.TELEMETRY: Telemetry, Topic.RESULTS: Result, Topic.EVENTS: Event}
STATE = {Topic.STATUS: Status, Topic.REPORTED: ReportedState}
MODELS = SEQUENCED | STATE
MAX_PAYLOAD = 256 * 1024
# Messages waiting for the writer; past it paho's thread waits, so the broker's flow control holds the rest.
QUEUE_BOUND = 200_000
ROWS_PER_STATEMENT = 500  # 500 × 14 telemetry columns stays under SQLite's 32,766 bound parameters
WRITE_ATTEMPTS = 3  # a deadlock between two hub processes or a busy SQLite file is retried, then the batch is lost
MAX_SEQ = 2**63 - 1
TOPIC_CACHE = 100_000
# Python's cyclic garbage collector, for the whole process: (allocations before a young collection, young collections
# before a middle one, middle ones before a full one). See `_collect_less_often`.
GC_THRESHOLDS = (50_000, 20, 20)
_DEVICE_ID = re.compile(DEVICE_ID)


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    invalid: Counter = field(default_factory=Counter)
    batches: int = 0
    # messages of batches the database failed on WRITE_ATTEMPTS times (e.g. it is down): delivered again when
    # acknowledging, else lost
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "stored": self.stored, "duplicates": self.duplicates,
                "invalid": sum(self.invalid.values()), "invalid_by_reason": dict(self.invalid),
                "batches": self.batches, "failed": self.failed}  # fmt: skip


def subscriptions(share_group: str | None, sequenced: bool = True) -> list[str]:
    """The topic filters of what ingest takes over MQTT; `sequenced=False`: the state topics only (telemetry,
    results and events come another way, `edgekit.hub.jetstream`)."""
    shared = f"$share/{share_group}/" if share_group else ""
    per_device = [f"{shared}{PREFIX}/+/{name}" for name in (*SEQUENCED, Topic.SAMPLES)] if sequenced else []
    return per_device + [f"{PREFIX}/+/{name}" for name in STATE]


Message = tuple[str, str, Any]  # (device_id, kind, validated payload)
Received = tuple[str, bytes, Any]  # (topic, payload, receipt for the acknowledger or None)


class Acknowledger(Protocol):
    """Acknowledges messages to the broker by the receipts given to `Ingest.on_message`."""

    window: int  # how many unacknowledged messages the broker sends at most

    def done(self, receipts: list[Any]) -> None: ...

    def redeliver(self) -> None: ...


class Ingest:
    def __init__(
        self,
        sessions: sessionmaker,
        batch_size: int = 20_000,
        flush_s: float = 0.25,
        on_stored: Callable[[list[Message]], None] | None = None,
    ) -> None:
        """`on_stored` gets (device_id, kind, payload) of what was newly stored, e.g. for the dashboard's live feed.

        A batch is what queued up during the last write (at most `batch_size`); when little comes in, the writer
        waits `flush_s` between batches, which bounds how stale the database and the live feed can be."""
        self.sessions = sessions
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.stats = IngestStats()
        self._on_stored = on_stored
        self._acks: Acknowledger | None = None
        self.samples: SampleIngest | None = None  # takes the `samples` topic's chunks (edgekit.hub.datasets)
        # The writer starts at once when this many wait (else it lets more come for up to flush_s).
        self._eager = batch_size
        # deque.append and popleft are atomic: paho's thread hands messages over without taking a lock.
        self._inbox: deque[Received] = deque()
        self._stopping = False
        self._wake = threading.Event()
        self._queued = 0  # appended by paho's thread
        self._handled = 0  # taken off the inbox and written or dropped by the writer
        self._known: set[str] = set()  # device ids whose row exists; the hub never deletes device rows
        self._topics: dict[str, tuple] = {}  # topic → (device, kind, model) or () when not ours; topics repeat
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)

    def acknowledge_with(self, acks: Acknowledger) -> None:
        """Have `acks` acknowledge each message once it is stored or dropped for good (before start())."""
        self._acks = acks
        # The broker sends at most its window before an ack: waiting for more than half of it would only idle.
        self._eager = max(1, min(self.batch_size, acks.window // 2))

    def start(self) -> None:
        _collect_less_often()
        self._writer.start()

    def stop(self) -> None:
        """Write what is queued, then end the writer."""
        self._stopping = True
        self._wake.set()
        if self._writer.is_alive():
            self._writer.join(timeout=30)

    @property
    def running(self) -> bool:
        return self._writer.is_alive()

    def on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage, receipt: Any = None) -> None:
        """paho callback: only queue here; parsing and writing happen in the writer thread. Never raises: an
        exception would end paho's network thread. `receipt` goes back to the acknowledger once the message is
        settled."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.stats.received += 1
            self.stats.invalid["unknown topic"] += 1
            if self._acks is not None:
                self._acks.done([receipt])
            return
        self.receive(topic, message.payload, receipt)

    def receive(self, topic: str, payload: bytes, receipt: Any = None) -> None:
        """Queue one message that came some other way than paho (a JetStream consumer: `edgekit.hub.jetstream`);
        as `on_message`, it blocks only while the inbox is full."""
        self.stats.received += 1
        inbox = self._inbox
        while len(inbox) >= QUEUE_BOUND and not self._stopping:
            time.sleep(0.01)
        inbox.append((topic, payload, receipt))
        self._queued += 1
        if len(inbox) >= self._eager and not self._wake.is_set():  # set() takes a lock: not once per message
            self._wake.set()

    def pending(self) -> int:
        return len(self._inbox)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written or dropped (for tests and benchmarks)."""
        target = self._queued
        deadline = time.monotonic() + timeout
        while self._handled < target:
            if time.monotonic() > deadline or not self.running:
                return False
            self._wake.set()
            time.sleep(0.005)
        return True

    def _write_loop(self) -> None:
        while True:
            started = time.monotonic()
            batch = self._take()
            if batch:
                self._settle(batch, self._write_safely(batch))
                self._handled += len(batch)
            elif self._stopping:
                return
            if len(self._inbox) < self._eager and not self._stopping:
                # Little is waiting: let more come, so that batches stay large and commits few.
                self._wake.wait(max(0.0, self.flush_s - (time.monotonic() - started)))
                self._wake.clear()

    def _take(self) -> list[Received]:
        inbox = self._inbox
        count = min(len(inbox), self.batch_size)
        return [inbox.popleft() for _ in range(count)]

    def _write_safely(self, batch: list[Received]) -> bool:
        """Whether the batch is settled: stored, or dropped for good. False only when the database failed on it."""
        try:
            return self._write_batch(batch)
        except Exception:  # a bug must not end ingest; the batch is lost (delivered again, it would fail again)
            self.stats.failed += len(batch)
            log.exception("ingest: a batch of %d messages was lost", len(batch))
            return True

    def _settle(self, batch: list[Received], settled: bool) -> None:
        """Acknowledge a settled batch, in arrival order; have an unsettled one delivered again."""
        if self._acks is None:
            return
        if settled:
            self._acks.done([receipt for _, _, receipt in batch])
        else:
            self._acks.redeliver()

    def _write_batch(self, batch: list[Received]) -> bool:
        messages = self._parse(batch)
        if not messages:
            return True
        stored = self._store(messages)
        if stored is None:
            return False
        if self._on_stored:
            try:
                self._on_stored(stored)
            except Exception:  # a live view's bug must not stop ingest
                log.exception("ingest: an on_stored listener failed")
        return True

    def _parse(self, batch: list[Received]) -> list[Message]:
        """The valid messages in arrival order; the others counted in stats.invalid by reason."""
        messages: list[Message] = []
        invalid = self.stats.invalid
        topics = self._topics
        for topic, payload, _ in batch:
            parsed = topics.get(topic)
            if parsed is None:
                parsed = topics[topic] = _device_and_kind(topic)
                if len(topics) > TOPIC_CACHE:  # a flood of made-up topics must not grow it without bound
                    topics.clear()
            if not parsed and self.samples is not None and (sender := _sample_sender(topic)):
                if refused := self.samples.receive(sender, payload):
                    invalid[refused] += 1
                continue
            if not parsed:
                invalid["unknown topic"] += 1
                continue
            device_id, kind, model_type = parsed
            if kind in STATE and not payload:
                continue  # a retained message being cleared
            try:
                model = decode(model_type, payload, MAX_PAYLOAD)
            except PayloadRejected as error:
                invalid[f"{kind}: invalid"] += 1
                log.debug("invalid %s from %s: %s", kind, device_id, error)
                continue
            if not _in_range(kind, model):
                invalid[f"{kind}: seq or ts out of range"] += 1
                continue
            messages.append((device_id, kind, model))
        return messages

    def _store(self, messages: list[Message]) -> list[Message] | None:
        """Write in one transaction; what was newly stored (with the state messages), or None when the database
        failed on it (then possibly on only a part: the rest was stored, and a redelivery finds it duplicate).

        Lock conflicts and a lost connection are retried. Anything else means some message the database will not
        take (a bug in the fitting below, a value the other dialect refuses): the batch is halved until that
        message is alone, and it is counted invalid, so one bad message never costs the others."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return self._write(messages)
            except OperationalError as error:
                if attempt == WRITE_ATTEMPTS:
                    self.stats.failed += len(messages)
                    fate = "left it to be delivered again" if self._acks else "dropped it"
                    log.error("ingest: the database failed %d times on a batch of %d messages, %s: %s",
                              attempt, len(messages), fate, error)  # fmt: skip
                    return None
                log.warning("ingest: writing a batch failed (attempt %d), retrying: %s", attempt, error)
                time.sleep(0.1 * attempt)
            except Exception as error:
                if len(messages) == 1:
                    device_id, kind, _ = messages[0]
                    self.stats.invalid["refused by the database"] += 1
                    log.warning("ingest: the database refused a %s message from %s: %s", kind, device_id, error)
                    return []
                half = len(messages) // 2
                first, second = self._store(messages[:half]), self._store(messages[half:])
                return None if first is None or second is None else first + second
        return None

    def _write(self, messages: list[Message]) -> list[Message]:
        """One transaction; the stats change only once it committed, so they never count a rolled-back row."""
        rows: dict[str, list[tuple[str, Any]]] = {name: [] for name in SEQUENCED}
        states: dict[tuple[str, str], Any] = {}
        for device_id, kind, model in messages:
            if kind in STATE:
                states[(device_id, kind)] = model  # the newest one wins
            else:
                rows[kind].append((device_id, model))
        stored: list[Message] = []
        duplicates = 0
        with self.sessions.begin() as session:
            new_devices = {device_id for device_id, _, _ in messages} - self._known
            if new_devices:
                _ensure_devices(session, new_devices)
            connection = session.connection()
            _lock_devices(session, {device_id for device_id, _, _ in messages})
            for kind, kind_rows in rows.items():
                if kind_rows:
                    inserted = _insert(connection, kind, kind_rows)
                    stored += inserted
                    duplicates += len(kind_rows) - len(inserted)
            _apply_latest(connection, rows, stored)
            _apply_states(session, states)
        self._known |= new_devices
        self.stats.stored += len(stored)
        self.stats.duplicates += duplicates
        self.stats.batches += 1
        return stored + [(d, k, m) for (d, k), m in states.items()]


def _collect_less_often() -> None:
    """Raise the collector's thresholds to at least GC_THRESHOLDS. Messages wait in the inbox and the batch long
    enough to outlive young collections; with Python's defaults (700, 10, 10) each batch's hundred thousand objects
    reach the oldest generation and set off full collections, each a walk over every object of the process: a third
    of ingest's CPU time (benchmarks/hub_bench.py). Cycles are still collected, less often."""
    gc.set_threshold(*(max(now, ours) for now, ours in zip(gc.get_threshold(), GC_THRESHOLDS, strict=True)))


def _in_range(kind: str, model: Any) -> bool:
    """Valid JSON for the model, but is it storable: a seq must fit its BIGINT key, and a time must be a time (an
    infinite `ts` in a retained state would hold the device's last_seen forever). Revs are bounded by the model."""
    if not math.isfinite(model.ts):
        return False
    return kind not in SEQUENCED or model.seq <= MAX_SEQ


def _device_and_kind(topic: str) -> tuple:
    """(device id, kind, payload model) for a topic ingest takes, else ()."""
    parsed = parse_topic(topic)
    model_type = MODELS.get(parsed[1]) if parsed else None
    if model_type is None or not _DEVICE_ID.fullmatch(parsed[0]):
        return ()
    return (parsed[0], parsed[1], model_type)


def _sample_sender(topic: str) -> str | None:
    """The device a `samples` topic is of, else None."""
    parsed = parse_topic(topic)
    return parsed[0] if parsed and parsed[1] == Topic.SAMPLES and _DEVICE_ID.fullmatch(parsed[0]) else None


def _lock_devices(session: Session, devices: set[str]) -> None:
    """PostgreSQL: lock the batch's device rows up front, in id order. The batch updates them in three passes
    (activity, latest telemetry, states), each in id order; but hub replicas all take every state message, so two of
    them update the same rows at once, and rows locked in pass order deadlocked (seen in the 100-device scale test).
    SQLite has one writer at a time."""
    if session.bind.dialect.name == "postgresql" and devices:
        session.execute(select(Device.id).where(Device.id.in_(sorted(devices))).order_by(Device.id).with_for_update())


def _ensure_devices(session: Session, devices: set[str]) -> None:
    """Rows for devices seen for the first time, through the ORM table so every column gets its default."""
    now = time.time()
    # last_seen starts at 0: the device's first message, whatever its clock says, then counts as news.
    rows = [{"id": d, "first_seen": now, "last_seen": 0.0, "labels": {}, "runtimes": []} for d in sorted(devices)]
    session.execute(_insert_ignore(session, Device), rows)


def _insert_ignore(session: Session, table):
    """INSERT … ON CONFLICT DO NOTHING in the session's dialect."""
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


# ---- sequenced rows: (column names, row builder) per kind --------------------------------------------------------
# Values are fitted to their columns, so that what validated also stores in both dialects: counters clamped to
# the column's integer range (PostgreSQL refuses an INTEGER over 2^31; SQLite would take it), strings cut to the
# column's length (PostgreSQL enforces VARCHAR(n)) and without NUL characters (PostgreSQL text cannot hold them).


def _int_bound(column) -> int:
    return 2**63 - 1 if isinstance(column.type, BigInteger) else 2**31 - 1


def _fit_int(value: int, bound: int) -> int:
    return value if -bound <= value <= bound else max(-bound, min(bound, value))


def _fit_text(value: str | None, length: int | None = None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value[:length] if length is not None and len(value) > length else value


_T = TelemetrySample.__table__.c
TELEMETRY_COLUMNS = ("device_id", "seq", "ts", "latency_p50_ms", "latency_p95_ms", "fps", "inferences",
                     "cpu_percent", "memory_mb", "temperature_c", "queue_depth", "dropped_frames", "store_depth",
                     "bundle", "drift_score")  # fmt: skip
_COUNT_BOUND = min(_int_bound(_T[name]) for name in ("inferences", "queue_depth", "dropped_frames", "store_depth"))
_BUNDLE_LENGTH = _T.bundle.type.length
_RESULT_BUNDLE_LENGTH = ResultRecord.__table__.c.bundle.type.length


# The hot path: the values straight from the model's field dict (one C call), fitted only when one needs it.
_telemetry_values = itemgetter(*TELEMETRY_COLUMNS[1:-1])


def _telemetry_row(device_id: str, m: Telemetry) -> tuple:
    v = _telemetry_values(m.__dict__)
    b, bundle = _COUNT_BOUND, v[12]
    drift = m.drift.score if m.drift is not None else None
    if (-b <= v[5] <= b and -b <= v[9] <= b and -b <= v[10] <= b and -b <= v[11] <= b
            and (bundle is None or (len(bundle) <= _BUNDLE_LENGTH and "\x00" not in bundle))):  # fmt: skip
        return (device_id, *v, drift)
    return (device_id, *v[:5], _fit_int(v[5], b), *v[6:9], _fit_int(v[9], b), _fit_int(v[10], b),
            _fit_int(v[11], b), _fit_text(bundle, _BUNDLE_LENGTH), drift)  # fmt: skip


def _result_row(device_id: str, m: Result) -> tuple:
    summary = m.model_dump(include={"task", "top", "detections", "values", "source"}, exclude_none=True)
    return (device_id, m.seq, m.ts, _fit_text(m.bundle, _RESULT_BUNDLE_LENGTH), m.latency_ms, json.dumps(summary))


def _event_row(device_id: str, m: Event) -> tuple:
    return (device_id, m.seq, m.ts, m.type, m.level, _fit_text(m.message[:4000]), json.dumps(m.data))


TABLES: dict[str, tuple[str, tuple[str, ...], Callable[[str, Any], tuple]]] = {
    Topic.TELEMETRY: (TelemetrySample.__tablename__, TELEMETRY_COLUMNS, _telemetry_row),
    Topic.RESULTS: (ResultRecord.__tablename__, ("device_id", "seq", "ts", "bundle", "latency_ms", "summary"),
                    _result_row),
    Topic.EVENTS: (EventRecord.__tablename__, ("device_id", "seq", "ts", "type", "level", "message", "data"),
                   _event_row),
}  # fmt: skip


def _placeholder(connection: Connection) -> str:
    return "?" if connection.dialect.paramstyle == "qmark" else "%s"


def _insert_sql(connection: Connection, table: str, columns: Sequence[str], rows: int) -> str:
    mark = _placeholder(connection)
    one = "(" + ", ".join([mark] * len(columns)) + ")"
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)} "
            "ON CONFLICT DO NOTHING RETURNING device_id, seq")  # fmt: skip


def _insert(connection: Connection, kind: str, kind_rows: list[tuple[str, Any]]) -> list[tuple[str, str, Any]]:
    """Insert a batch's messages of one kind; the ones newly stored (not duplicates) as (device, kind, model)."""
    table, columns, to_row = TABLES[kind]
    # Duplicates inside the batch collapse here, the first one kept as the database keeps the first one stored.
    # Sorted by key (never by payload: models do not order), so two hub processes lock keys in the same order.
    first: dict[tuple[str, int], tuple[str, Any]] = {}
    for d, m in kind_rows:
        first.setdefault((d, m.seq), (d, m))
    unique = sorted(first.items(), key=itemgetter(0))
    values = [to_row(d, m) for _, (d, m) in unique]
    stored: list[tuple[str, str, Any]] = []
    for start in range(0, len(values), ROWS_PER_STATEMENT):
        chunk = values[start : start + ROWS_PER_STATEMENT]
        sql = _insert_sql(connection, table, columns, len(chunk))
        inserted = connection.exec_driver_sql(sql, tuple(chain.from_iterable(chunk))).fetchall()
        messages = unique[start : start + ROWS_PER_STATEMENT]
        if len(inserted) == len(chunk):  # the usual case: none was there yet
            stored += [(d, kind, m) for _, (d, m) in messages]
        else:
            keys = {(d, s) for d, s in inserted}
            stored += [(d, kind, m) for key, (d, m) in messages if key in keys]
    return stored


# ---- device rows -------------------------------------------------------------------------------------------------

HEALTH_BLOCKS = ("model", "shadow", "drift")
LATEST_COLUMNS = ("latency_p50_ms", "latency_p95_ms", "fps", "cpu_percent", "memory_mb", "temperature_c")
_latest_values = attrgetter(*LATEST_COLUMNS)


def _apply_latest(connection: Connection, rows: dict[str, list[tuple[str, Any]]], stored: list[Message]) -> None:
    """The fleet table's columns, one UPDATE per device and batch (sent as an executemany each):
    - `last_seen` and `online` from the device's newest message, when it is newer than what the row has;
    - the latency/fps/CPU/… columns from its newly stored telemetry with the highest seq, when that seq is above
      `last_seq` (the seq of the telemetry they show), so a replay of old telemetry never overwrites newer values."""
    newest: dict[str, Telemetry] = {}
    for device_id, kind, m in stored:
        if kind == Topic.TELEMETRY and (device_id not in newest or m.seq > newest[device_id].seq):
            newest[device_id] = m
    seen: dict[str, float] = {}
    for kind_rows in rows.values():
        for device_id, m in kind_rows:
            if m.ts > seen.get(device_id, -math.inf):
                seen[device_id] = m.ts
    mark = _placeholder(connection)
    if seen:
        activity = [(ts, True, d, ts) for d, ts in sorted(seen.items())]
        sql = f"UPDATE devices SET last_seen = {mark}, online = {mark} WHERE id = {mark} AND last_seen < {mark}"
        connection.exec_driver_sql(sql, activity)
    if newest:
        values = [(*_latest_values(m), _health(m), m.seq, d, m.seq) for d, m in sorted(newest.items())]
        columns = ", ".join(f"{c} = {mark}" for c in (*LATEST_COLUMNS, "health", "last_seq"))
        connection.exec_driver_sql(f"UPDATE devices SET {columns} WHERE id = {mark} AND last_seq < {mark}", values)


def _health(m: Telemetry) -> str | None:
    """The telemetry's model-health blocks as the devices.health JSON; None (SQL NULL) when it has none."""
    blocks = {name: block.model_dump(mode="json") for name in HEALTH_BLOCKS if (block := getattr(m, name))}
    return json.dumps(blocks) if blocks else None


_D = Device.__table__.c


def _bundle_columns(bundle) -> dict[str, Any]:
    if bundle is None:
        return {}
    return {
        "bundle_id": bundle.id,
        "bundle_label": _fit_text(f"{bundle.name}@{bundle.version}", _D.bundle_label.type.length),
    }


def _apply_states(session: Session, states: dict[tuple[str, str], Any]) -> None:
    """After the telemetry: `status` decides `online` (an `offline` after the device's last telemetry in the same
    batch must win). last_seen only moves forward: a Last Will carries the time its client connected."""
    for (device_id, kind), model in sorted(states.items()):
        if kind == Topic.STATUS:
            ts = max(model.ts, 0.0)
            values = {"online": model.state == "online", "last_seen": case((Device.last_seen < ts, ts),
                                                                           else_=Device.last_seen)}  # fmt: skip
            if model.state == "online":
                values |= {"agent_version": _fit_text(model.agent_version, _D.agent_version.type.length),
                           "profile": _fit_text(model.profile, _D.profile.type.length), "runtimes": model.runtimes,
                           **_bundle_columns(model.bundle)}  # fmt: skip
        else:
            values = {"reported": model.model_dump(mode="json"), **_bundle_columns(model.bundle)}
            values["last_seen"] = case((Device.last_seen < model.ts, model.ts), else_=Device.last_seen)
        session.execute(update(Device).where(Device.id == device_id).values(**values))


def device_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Device.id).order_by(Device.id)))
