"""The web dashboard, served by the hub itself: pages, their static files, `/api/alerts` and the live feed.

Pages are one HTML shell plus vanilla JS modules (`static/js/`) that read the REST API; charts are uPlot, vendored
under `static/vendor/uplot/` with its licence. Live values come over Server-Sent Events (`/api/stream`), fed by a
listener in `hub.listeners` that ingest calls with what it has just stored. Pages need a login: without one they
answer 401 with the login form as the body, so a browser shows the form and a script sees the status.
"""

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from edgekit.hub.auth import authenticate, require_actor
from edgekit.hub.db import Device, EventRecord, TelemetrySample

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/devices/{device_id}", "/bundles", "/rollouts", "/events", "/audit")
FAILED_UPDATE_TYPES = ("update.refused", "update.rolled_back", "update.failed")
REGRESSION_FACTOR = 1.5
REGRESSION_WINDOW_S = 3600.0
REGRESSION_MIN_SAMPLES = 10  # fewer samples than this make a median too noisy to call a regression
# Sub-millisecond models jitter past 1.5× from scheduling alone (0.05 → 0.09 ms); a regression must also be this big.
REGRESSION_MIN_DELTA_MS = 0.5
MEDIAN_REFRESH_S = 60.0
STREAM_COALESCE_S = 0.25  # batch ingest's 50 ms flushes so a browser gets a few updates a second, not dozens
STREAM_KEEPALIVE_S = 15.0
MAX_EVENTS_PER_PUSH = 50
MAX_SAMPLES_PER_PUSH = 500

router = APIRouter()


# ---------------------------------------------------------------------------------------------------- pages


def _login_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "login.html").read_text(), status_code=401, headers={"Cache-Control": "no-store"})


def _page(request: Request) -> Response:
    """The page shell for a signed-in user, else 401 with the login form (the same URL works after signing in)."""
    if authenticate(request) is None:
        return _login_page()
    median_cache(request.app).warm()  # the page asks for /api/alerts next
    return FileResponse(STATIC / "app.html", headers={"Cache-Control": "no-store"})


for _path in PAGES:
    router.add_api_route(_path, _page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)


@router.get("/static/{path:path}", include_in_schema=False)
def static_file(path: str) -> FileResponse:
    """Scripts, styles and the vendored chart library: code only, no fleet data, so no login (the form uses them)."""
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
        raise HTTPException(404, f"no static file '{path}'")
    return FileResponse(target, headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------------------------------- alerts


def _sessions(request: Request):
    return request.app.state.hub.sessions


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

    def __init__(self, sessions) -> None:
        self.sessions = sessions
        self._lock = threading.Lock()  # guards the fields below
        self._computing = threading.Lock()  # one computation at a time; a caller with nothing cached waits on it
        self._medians: dict[str, tuple[float, int]] | None = None
        self._computed = 0.0
        self._refreshing = False

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

    def _start_refresh(self) -> None:
        self._refreshing = True
        threading.Thread(target=self._background, name="dashboard-medians", daemon=True).start()

    def _background(self) -> None:
        try:
            self._refresh()
        except Exception:  # logged; the next request tries again
            log.exception("dashboard: computing the hour's median latencies failed")
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


_state_lock = threading.Lock()


def median_cache(app) -> MedianCache:
    with _state_lock:
        if getattr(app.state, "median_cache", None) is None:
            app.state.median_cache = MedianCache(app.state.hub.sessions)
    return app.state.median_cache


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


@router.get("/api/alerts", tags=["dashboard"])
def alerts(
    request: Request,
    actor: Annotated[str, Depends(require_actor)],
    since_s: Annotated[float, Query(gt=0, le=30 * 86400, description="How far back failed updates count")] = 86400,
    silent_s: Annotated[float, Query(gt=0, description="An online device this quiet counts as offline")] = 120,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    """Offline devices, failed updates and latency regressions (current p50 > 1.5× the device's hour median)."""
    now = time.time()
    with _sessions(request)() as session:
        found = {
            "offline": offline_alerts(session, now, silent_s, limit),
            "failed_updates": failed_update_alerts(session, now - since_s, limit),
            "latency_regressions": regression_alerts(session, median_cache(request.app).get())[:limit],
        }
    return {"ts": now, "count": sum(len(v) for v in found.values()), **found}


# ---------------------------------------------------------------------------------------------------- live feed


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

    def __init__(self) -> None:
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
        """hub.listeners entry: runs in ingest's writer thread, so it must be quick and must never raise."""
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


def live_feed(request: Request) -> LiveFeed:
    """The app's feed, registered in `hub.listeners` on first use (one per app, however many browsers)."""
    state = request.app.state
    with _state_lock:
        if getattr(state, "live_feed", None) is None:
            state.live_feed = LiveFeed()
            state.hub.listeners.append(state.live_feed)
    return state.live_feed


def _server_exiting(request: Request) -> bool:
    http = getattr(request.app.state.hub, "http", None)
    return bool(getattr(http, "should_exit", False))


async def _events(request: Request, feed: LiveFeed, device: str | None) -> AsyncIterator[str]:
    subscriber = feed.subscribe(device)  # here, not in the endpoint: `finally` then always unsubscribes it
    try:
        yield "retry: 2000\n\n"
        yield f"event: hello\ndata: {json.dumps({'ts': time.time()})}\n\n"
        while not _server_exiting(request):
            try:
                # Wake at least every second to notice a hub shutdown: uvicorn waits for open streams to end.
                await asyncio.wait_for(subscriber.wake.wait(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    break
                if time.monotonic() - subscriber.last_sent > STREAM_KEEPALIVE_S:
                    subscriber.last_sent = time.monotonic()
                    yield ": keepalive\n\n"
                continue
            await asyncio.sleep(STREAM_COALESCE_S)
            with feed._lock:
                subscriber.wake.clear()
                message = subscriber.take()
            if message is not None:
                subscriber.last_sent = time.monotonic()
                yield f"data: {json.dumps(message, separators=(',', ':'))}\n\n"
    finally:
        feed.unsubscribe(subscriber)


@router.get("/api/stream", tags=["dashboard"])
async def stream(
    request: Request,
    actor: Annotated[str, Depends(require_actor)],
    device: Annotated[str | None, Query(max_length=64, description="Also send this device's every sample")] = None,
) -> StreamingResponse:
    """Server-Sent Events: `data:` JSON with the changed fleet cells per device, new events, and with `device`
    that device's telemetry samples as [ts, p50, p95, fps, cpu, temperature]."""
    feed = live_feed(request)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(request, feed, device), media_type="text/event-stream", headers=headers)
