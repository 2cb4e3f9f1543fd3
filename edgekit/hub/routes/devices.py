"""`/api/devices` (the fleet, labels, telemetry, results) and `/api/events`."""

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgekit.hub.auth import Operator
from edgekit.hub.db import AuditEntry, Device, EventRecord, ResultRecord, TelemetryRollup, TelemetrySample
from edgekit.hub.deps import Sessions
from edgekit.hub.routes import unprocessable
from edgekit.hub.routes.config import ConfigsDep
from edgekit.hub.schemas import LABEL_KEY, DeviceDetail, DeviceOut, EventOut, LabelsIn, ResultOut, TelemetryOut

router = APIRouter()


def _device_or_404(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise HTTPException(status_code=404, detail=f"no device '{device_id}'")
    return device


def _label_filters(labels: list[str]) -> list[tuple[str, str | None]]:
    filters = []
    for item in labels:
        key, sep, value = item.partition("=")
        if not LABEL_KEY.match(key):
            raise unprocessable(["query", "label"], f"'{item}': expected KEY=VALUE or KEY")
        filters.append((key, value if sep else None))
    return filters


def _matches(labels: dict[str, Any], filters: list[tuple[str, str | None]]) -> bool:
    return all(key in labels and (value is None or str(labels[key]) == value) for key, value in filters)


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(
    sessions: Sessions,
    label: Annotated[list[str], Query(description="KEY=VALUE (or KEY: has the label); repeat to AND them")] = [],  # noqa: B006
    online: bool | None = None,
) -> list[Device]:
    filters = _label_filters(label)
    statement = select(Device).order_by(Device.id)
    if online is not None:
        statement = statement.where(Device.online.is_(online))
    with sessions() as session:
        # Labels are a JSON column; filtering here keeps SQLite and PostgreSQL on one code path.
        return [d for d in session.scalars(statement) if _matches(d.labels or {}, filters)]


@router.get("/devices/{device_id}", response_model=DeviceDetail)
def get_device(sessions: Sessions, device_id: str) -> DeviceDetail:
    with sessions() as session:
        device = _device_or_404(session, device_id)
        detail = DeviceDetail.model_validate(device)
        detail.desired = getattr(device, "desired", None)
        return detail


@router.put("/devices/{device_id}/labels", response_model=DeviceOut)
def put_labels(sessions: Sessions, device_id: str, body: LabelsIn, actor: Operator, configs: ConfigsDep) -> Device:
    with sessions.begin() as session:
        device = _device_or_404(session, device_id)
        device.labels = dict(body.labels)
        session.add(AuditEntry(ts=time.time(), actor=actor, action="labels",
                               detail={"device": device_id, "labels": body.labels}))  # fmt: skip
    configs.follow_groups([device_id])  # it may have joined a group that has a configuration (edgekit.hub.config)
    return device


@router.get("/devices/{device_id}/telemetry", response_model=list[TelemetryOut])
def get_telemetry(
    sessions: Sessions,
    device_id: str,
    since: Annotated[float, Query(description="Unix time; only samples after it")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="The newest N samples, oldest first")] = 1000,
    resolution: Literal["raw", "minute"] = "raw",
) -> list[Any]:
    with sessions() as session:
        _device_or_404(session, device_id)
        if resolution == "raw":
            table, ts = TelemetrySample, TelemetrySample.ts
        else:
            table, ts = TelemetryRollup, TelemetryRollup.minute * 60
        rows = list(
            session.scalars(
                select(table).where(table.device_id == device_id, ts > since).order_by(ts.desc()).limit(limit)
            )
        )
    rows.reverse()
    if resolution == "minute":
        return [TelemetryOut(ts=r.minute * 60.0, samples=r.samples, latency_p50_ms=r.latency_p50_ms, fps=r.fps,
                             cpu_percent=r.cpu_percent, temperature_c=r.temperature_c) for r in rows]  # fmt: skip
    return rows


@router.get("/devices/{device_id}/results", response_model=list[ResultOut])
def get_results(
    sessions: Sessions, device_id: str, limit: Annotated[int, Query(ge=1, le=1000, description="The newest N")] = 50
) -> list[ResultRecord]:
    """The device's newest results, newest first."""
    with sessions() as session:
        _device_or_404(session, device_id)
        statement = select(ResultRecord).where(ResultRecord.device_id == device_id)
        return list(session.scalars(statement.order_by(ResultRecord.seq.desc()).limit(limit)))


@router.get("/events", response_model=list[EventOut])
def list_events(
    sessions: Sessions,
    device: str | None = None,
    level: str | None = None,
    type_: Annotated[str | None, Query(alias="type")] = None,
    since: float = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[EventRecord]:
    statement = select(EventRecord).where(EventRecord.ts > since)
    for column, value in ((EventRecord.device_id, device), (EventRecord.level, level), (EventRecord.type, type_)):
        if value is not None:
            statement = statement.where(column == value)
    with sessions() as session:
        return list(session.scalars(statement.order_by(EventRecord.ts.desc()).limit(limit)))
