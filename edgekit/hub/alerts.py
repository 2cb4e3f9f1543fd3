"""The dashboard's alerts: offline devices, failed updates, latency regressions and input drift, each one query.

A regression compares a device's current p50 latency with its median over the last hour; that median is the one
costly query, so `MedianCache` keeps it, recomputed in the background.
"""

import logging
import threading
import time
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from edgekit.hub.db import Device, EventRecord, TelemetrySample

log = logging.getLogger(__name__)

FAILED_UPDATE_TYPES = ("update.refused", "update.rolled_back", "update.failed")
REGRESSION_FACTOR = 1.5
REGRESSION_WINDOW_S = 3600.0
REGRESSION_MIN_SAMPLES = 10  # fewer samples than this make a median too noisy to call a regression
# Sub-millisecond models jitter past 1.5× from scheduling alone (0.05 → 0.09 ms); a regression must also be this big.
REGRESSION_MIN_DELTA_MS = 0.5
MEDIAN_REFRESH_S = 60.0


def offline_alerts(session: Session, now: float, silent_s: float, limit: int) -> list[dict[str, Any]]:
    """Devices that said they went offline (or whose Last Will did), and online ones silent for `silent_s`."""
    rows = session.execute(
        select(Device.id, Device.online, Device.last_seen, Device.bundle_label)
        .where(or_(Device.online.is_(False), Device.last_seen < now - silent_s))
        .order_by(Device.last_seen.desc())
        .limit(limit)
    ).all()
    return [
        {"kind": "offline", "level": "error" if not online else "warning", "device_id": device_id, "ts": last_seen,
         "message": "offline" if not online else f"no message for {now - last_seen:.0f} s", "bundle": bundle}
        for device_id, online, last_seen, bundle in rows
    ]  # fmt: skip


def failed_update_alerts(session: Session, since: float, limit: int) -> list[dict[str, Any]]:
    """Events of level error and the update outcomes that mean a device did not take (or keep) a bundle."""
    rows = session.scalars(
        select(EventRecord)
        .where(EventRecord.ts >= since, or_(EventRecord.level == "error", EventRecord.type.in_(FAILED_UPDATE_TYPES)))
        .order_by(EventRecord.ts.desc())
        .limit(limit)
    ).all()
    return [
        {"kind": "failed_update" if e.type.startswith("update.") else "error", "level": "error",
         "device_id": e.device_id, "ts": e.ts, "type": e.type, "message": e.message}
        for e in rows
    ]  # fmt: skip


def hourly_medians(session: Session, since: float) -> dict[str, tuple[float, int]]:
    """Each device's median p50 latency since `since` and its sample count, computed in the database.

    Window functions run on SQLite ≥ 3.25 and PostgreSQL alike; the median is the mean of the one or two middle
    rows, so only one row per device comes back however many samples the hour holds."""
    value = TelemetrySample.latency_p50_ms
    ranked = (
        select(
            TelemetrySample.device_id.label("device_id"),
            value.label("value"),
            func.row_number().over(partition_by=TelemetrySample.device_id, order_by=value).label("rank"),
            func.count().over(partition_by=TelemetrySample.device_id).label("n"),
        )
        .where(TelemetrySample.ts >= since, value.is_not(None))
        .subquery()
    )
    # Integer division in both dialects: the middle rank, or the two middle ranks for an even count.
    middle = or_(ranked.c.rank == (ranked.c.n + 1) / 2, ranked.c.rank == (ranked.c.n + 2) / 2)
    statement = select(ranked.c.device_id, func.avg(ranked.c.value), func.max(ranked.c.n)).where(middle)
    rows = session.execute(statement.group_by(ranked.c.device_id)).all()
    return {device_id: (float(median), int(n)) for device_id, median, n in rows}


class MedianCache:
    """Each device's hour median p50, recomputed in the background at most every `MEDIAN_REFRESH_S`.

    A fleet of 1,000 devices reporting every 5 s puts 720,000 samples in an hour, and ranking them takes seconds;
    the median of an hour moves slowly, so a minute-old one is as good, while each device's current p50 is read
    fresh on every request."""

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()  # guards the fields below
        self._computing = threading.Lock()  # one computation at a time; a caller with nothing cached waits on it
        self._medians: dict[str, tuple[float, int]] | None = None
        self._computed = 0.0
        self._refreshing = False
        self._thread: threading.Thread | None = None

    def _fresh(self) -> bool:
        return self._medians is not None and time.monotonic() - self._computed < MEDIAN_REFRESH_S

    def get(self) -> dict[str, tuple[float, int]]:
        with self._lock:
            medians = self._medians
            if medians is not None and not self._fresh() and not self._refreshing:
                self._start_refresh()  # answer with the cached ones meanwhile
        return medians if medians is not None else self._refresh()

    def warm(self) -> None:
        """Compute in the background when nothing is cached yet, so the first alerts request waits less."""
        with self._lock:
            if self._medians is None and not self._refreshing:
                self._start_refresh()

    def stop(self) -> None:
        """Wait for a computation in flight: the hub closes the database after its workers."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    def _start_refresh(self) -> None:
        self._refreshing = True
        self._thread = threading.Thread(target=self._background, name="hub-medians", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        try:
            self._refresh()
        except Exception:  # logged; the next request tries again
            log.exception("alerts: computing the hour's median latencies failed")
        finally:
            with self._lock:
                self._refreshing = False

    def _refresh(self) -> dict[str, tuple[float, int]]:
        with self._computing:
            with self._lock:
                if self._fresh():  # computed while this caller waited for the lock
                    return self._medians
            with self.sessions() as session:
                medians = hourly_medians(session, time.time() - REGRESSION_WINDOW_S)
            with self._lock:
                self._medians, self._computed = medians, time.monotonic()
            return medians


def regression_alerts(session: Session, medians: dict[str, tuple[float, int]]) -> list[dict[str, Any]]:
    """Online devices whose current p50 latency is over 1.5× (and 0.5 ms above) their median over the last hour."""
    current = session.execute(
        select(Device.id, Device.latency_p50_ms, Device.last_seen, Device.bundle_label).where(
            and_(Device.online.is_(True), Device.latency_p50_ms.is_not(None))
        )
    ).all()
    alerts = []
    for device_id, p50, last_seen, bundle in current:
        median, samples = medians.get(device_id, (0.0, 0))
        regressed = p50 > REGRESSION_FACTOR * median and p50 - median >= REGRESSION_MIN_DELTA_MS
        if samples >= REGRESSION_MIN_SAMPLES and median > 0 and regressed:
            alerts.append({"kind": "latency_regression", "level": "warning", "device_id": device_id, "ts": last_seen,
                           "message": f"p50 {p50:.2f} ms is {p50 / median:.1f}× the hour's median {median:.2f} ms",
                           "current_ms": p50, "median_ms": median, "samples": samples, "bundle": bundle})  # fmt: skip
    return sorted(alerts, key=lambda a: a["current_ms"] / a["median_ms"], reverse=True)


def drift_alerts(session: Session, threshold: float, limit: int) -> list[dict[str, Any]]:
    """Devices whose newest telemetry scores input drift above `threshold`, the worst first (`devices.health`, the
    newest telemetry's blocks; JSON paths work in SQLite and PostgreSQL alike)."""
    score = Device.health[("drift", "score")].as_float()
    rows = session.execute(
        select(Device.id, Device.last_seen, Device.bundle_label, score, Device.health[("drift", "feature")].as_string(),
               Device.health[("drift", "samples")].as_integer())
        .where(score > threshold)
        .order_by(score.desc())
        .limit(limit)
    ).all()  # fmt: skip
    return [
        {"kind": "drift", "level": "warning", "device_id": device_id, "ts": last_seen, "bundle": bundle,
         "score": value, "feature": feature, "samples": samples, "threshold": threshold,
         "message": f"input drift {value:.2f} (PSI of {feature} over the last {samples} inputs) is above {threshold}"}
        for device_id, last_seen, bundle, value, feature, samples in rows
    ]  # fmt: skip


def fleet_alerts(sessions: sessionmaker, medians: MedianCache, since_s: float, silent_s: float,
                 limit: int, drift_threshold: float) -> dict[str, Any]:  # fmt: skip
    """Every kind of alert, at most `limit` of each: devices silent for `silent_s`, failed updates in the last
    `since_s`, latency regressions, and devices whose inputs drifted past `drift_threshold`, the worst first."""
    now = time.time()
    with sessions() as session:
        found = {
            "offline": offline_alerts(session, now, silent_s, limit),
            "failed_updates": failed_update_alerts(session, now - since_s, limit),
            "latency_regressions": regression_alerts(session, medians.get())[:limit],
            "drift": drift_alerts(session, drift_threshold, limit),
        }
    return {"ts": now, "count": sum(len(v) for v in found.values()), **found}
