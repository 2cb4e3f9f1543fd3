"""Telemetry retention: raw samples older than a horizon become one `TelemetryRollup` row per device and minute.

Each pass deletes the aged raw rows with `DELETE … RETURNING` and folds what it got back into the rollups in the
same transaction, so a sample is counted exactly once even when two hub processes run retention at the same time
(a row can be deleted only once) or a late replay brings raw rows for a minute that was already rolled up (the
rollup is merged, not overwritten). Running it again with nothing aged changes nothing.
"""

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgekit.hub.db import TelemetryRollup, TelemetrySample, dialect_insert
from edgekit.hub.leases import RETENTION, Lease

log = logging.getLogger(__name__)

WINDOW_S = 3600.0  # raw rows handled per transaction, so a large backlog does not become one huge transaction
AVERAGED = ("latency_p50_ms", "fps", "cpu_percent")


@dataclass
class _Minute:
    samples: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(AVERAGED, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AVERAGED, 0))
    temperature_c: float | None = None

    def add(self, values: dict[str, float | None], temperature: float | None) -> None:
        self.samples += 1
        for name, value in values.items():
            if value is not None:
                self.sums[name] += value
                self.counts[name] += 1
        if temperature is not None and (self.temperature_c is None or temperature > self.temperature_c):
            self.temperature_c = temperature

    def row(self, device_id: str, minute: int) -> dict:
        averages = {name: self.sums[name] / self.counts[name] if self.counts[name] else None for name in AVERAGED}
        return {"device_id": device_id, "minute": minute, "samples": self.samples,
                "temperature_c": self.temperature_c, **averages}  # fmt: skip


def downsample(sessions: sessionmaker, older_than_s: float, now: float | None = None) -> int:
    """Roll raw telemetry older than `older_than_s` into per-minute rollups and delete it; how many raw rows.

    The horizon is rounded down to a whole minute, so a minute is never split between raw rows and a rollup by
    one pass."""
    cutoff = math.floor(((now if now is not None else time.time()) - older_than_s) / 60) * 60
    total = 0
    while True:
        with sessions.begin() as session:
            oldest = session.scalar(select(func.min(TelemetrySample.ts)).where(TelemetrySample.ts < cutoff))
            if oldest is None:
                return total
            total += _roll_window(session, min(cutoff, math.floor(oldest / 60) * 60 + WINDOW_S))


def _roll_window(session: Session, before: float) -> int:
    columns = (TelemetrySample.device_id, TelemetrySample.ts, TelemetrySample.temperature_c,
               *(getattr(TelemetrySample, name) for name in AVERAGED))  # fmt: skip
    deleted = session.execute(delete(TelemetrySample).where(TelemetrySample.ts < before).returning(*columns)).all()
    minutes: dict[tuple[str, int], _Minute] = {}
    for device_id, ts, temperature, *values in deleted:
        key = (device_id, math.floor(ts / 60))
        minutes.setdefault(key, _Minute()).add(dict(zip(AVERAGED, values, strict=True)), temperature)
    rows = [bucket.row(device_id, minute) for (device_id, minute), bucket in sorted(minutes.items())]
    if rows:
        session.execute(_merge_statement(session), rows)
    return len(deleted)


def _merge_statement(session: Session):
    """INSERT a rollup, or fold it into the one already there: averages weighted by sample count (a NULL side
    takes the other), the maximum of the maxima, the counts added. Done by the database, under the row's lock."""
    statement = dialect_insert(session)(TelemetryRollup)
    old, new = TelemetryRollup.__table__.c, statement.excluded
    total = old.samples + new.samples

    def either(a, b, both):
        return case((a.is_(None), b), (b.is_(None), a), else_=both)

    merged = {name: either(old[name], new[name], (old[name] * old.samples + new[name] * new.samples) / total)
              for name in AVERAGED}  # fmt: skip
    old_t, new_t = old.temperature_c, new.temperature_c
    hottest = either(old_t, new_t, case((old_t >= new_t, old_t), else_=new_t))
    return statement.on_conflict_do_update(
        index_elements=[old.device_id, old.minute],
        set_={"samples": total, "temperature_c": hottest, **merged},
    )


def prune_rollups(sessions: sessionmaker, older_than_s: float, now: float | None = None) -> int:
    """Delete rollups older than `older_than_s`; how many."""
    before = ((now if now is not None else time.time()) - older_than_s) // 60
    with sessions.begin() as session:
        return session.execute(delete(TelemetryRollup).where(TelemetryRollup.minute < before)).rowcount


class Retention:
    """Runs `downsample` (and `prune_rollups` when `keep_rollups_s` is set) every `interval_s` in a thread.

    Given its hub's `replica` id (hub replicas on one database), a pass runs only in the process holding the
    retention lease, so replicas do not repeat each other's work; without one it is still safe, only wasteful, in
    several processes at once."""

    def __init__(
        self,
        sessions: sessionmaker,
        raw_s: float = 86400.0,
        keep_rollups_s: float | None = 90 * 86400.0,
        interval_s: float = 300.0,
        replica: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.raw_s = raw_s
        self.keep_rollups_s = keep_rollups_s
        self.interval_s = interval_s
        # Held across passes: a replica that dies leaves retention to another one two intervals later.
        self.lease = Lease(sessions, RETENTION, replica, 2 * interval_s) if replica is not None else None
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-retention", daemon=True)

    def start(self) -> "Retention":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self.lease is not None:
            self.lease.release()

    def run_once(self) -> int:
        """One pass; 0 without one when another hub process holds the retention lease."""
        if self.lease is not None and not self.lease.acquire():
            return 0
        rolled = downsample(self.sessions, self.raw_s)
        if self.keep_rollups_s is not None:
            prune_rollups(self.sessions, self.keep_rollups_s)
        self.passes += 1
        return rolled

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rolled = self.run_once()
                if rolled:
                    log.info("retention: rolled %d raw telemetry samples into per-minute rollups", rolled)
            except Exception:  # a database hiccup must not end retention; the next pass catches up
                log.exception("retention: a pass failed")
            self._stop.wait(self.interval_s)
