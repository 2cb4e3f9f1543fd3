"""The hub's REST API (`/api/...`, OpenAPI at `/docs`), login, `/healthz` and `/metrics`.

Every route except `/healthz`, `/login`, `/logout` and the docs needs a token (see `edgekit.hub.auth`). Errors the
caller can fix come back as 422 in FastAPI's own shape, `{"detail": [{"loc": [...], "msg": ...}]}`, so clients
report every error the same way: the field, then the reason.
"""

import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select, text
from sqlalchemy.orm import Session

import edgekit.hub.dashboard
from edgekit import __version__
from edgekit.errors import EdgekitError
from edgekit.hub import auth
from edgekit.hub.db import (
    AuditEntry,
    BundleRecord,
    Deployment,
    Device,
    EventRecord,
    TelemetryRollup,
    TelemetrySample,
)
from edgekit.hub.rollouts import UnknownDeployment
from edgekit.protocol import DEVICE_ID

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
WRITE_BLOCK = 4 * 1024 * 1024  # upload bytes gathered before one (threaded) disk write
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,63}$")
TARGET = re.compile(rf"^(all|group:[A-Za-z0-9][A-Za-z0-9_./-]{{0,63}}(=[^\s]{{0,128}})?|{DEVICE_ID[1:-1]})$")

Actor = Annotated[str, Depends(auth.require_actor)]


# ---------------------------------------------------------------- response and request models


class Model(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DeviceOut(Model):
    id: str
    labels: dict[str, Any]
    online: bool
    first_seen: float
    last_seen: float
    agent_version: str | None
    profile: str | None
    runtimes: list[str]
    bundle_id: str | None
    bundle_label: str | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    fps: float | None
    cpu_percent: float | None
    memory_mb: float | None
    temperature_c: float | None
    desired_rev: int


class DeviceDetail(DeviceOut):
    reported: dict[str, Any] | None = Field(None, description="The device's last ReportedState (config/reported)")
    desired: dict[str, Any] | None = Field(None, description="The DesiredState the hub last sent, when known")


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: dict[str, str] = Field(description="Replaces all of the device's labels")

    @field_validator("labels")
    @classmethod
    def _keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not LABEL_KEY.match(key):
                raise ValueError(f"label key '{key}': use 1-64 letters, digits and _ . / -")
            if len(value) > 128 or any(c.isspace() for c in value):
                raise ValueError(f"label '{key}': values are at most 128 characters without spaces")
        return labels


class TelemetryOut(Model):
    ts: float
    seq: int | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    fps: float | None = None
    inferences: int | None = None
    cpu_percent: float | None = None
    memory_mb: float | None = None
    temperature_c: float | None = None
    queue_depth: int | None = None
    dropped_frames: int | None = None
    store_depth: int | None = None
    bundle: str | None = None
    samples: int | None = Field(None, description="Raw samples folded into this point (resolution=minute)")


class EventOut(Model):
    device_id: str
    seq: int
    ts: float
    type: str
    level: str
    message: str
    data: dict[str, Any]


class BundleOut(Model):
    id: str
    name: str
    version: str
    size: int
    profile: str
    backend: str
    precision: str
    signing_key_id: str
    uploaded: float
    uploaded_by: str


class BundleDetail(BundleOut):
    manifest: dict[str, Any]


class PushOut(BundleOut):
    created: bool = Field(description="False when the registry already had these exact bytes")


class DeploymentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle_id: str = Field(min_length=8, max_length=64, pattern=r"^[0-9a-f]+$", description="sha256 or prefix")
    target: str = Field(description="A device id, group:KEY[=VALUE] (devices by label) or all")
    canary_percent: float = Field(10, gt=0, le=100)
    wave_percent: float = Field(30, gt=0, le=100)
    failure_threshold: float = Field(0.2, ge=0, le=1, description="Fraction of a wave that may fail")
    wave_timeout_s: float = Field(600, gt=0, le=7 * 24 * 3600)
    health_checks: int | None = Field(
        None, ge=1, le=10_000, description="Inferences a device must run on the new bundle before it counts healthy"
    )

    @field_validator("target")
    @classmethod
    def _target(cls, target: str) -> str:
        if not TARGET.match(target):
            raise ValueError("expected a device id, group:KEY[=VALUE] or all")
        return target


class HaltIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("halted by an operator", max_length=500)


class DeploymentDeviceOut(Model):
    device_id: str
    wave: int
    state: str
    previous_bundle_id: str | None
    rev: int | None
    detail: str
    updated: float


class WaveOut(BaseModel):
    wave: int = Field(description="0 is the canary")
    total: int
    states: dict[str, int]


class DeploymentOut(Model):
    id: int
    bundle_id: str
    target: str
    canary_percent: float
    wave_percent: float
    failure_threshold: float
    wave_timeout_s: float
    health_checks: int | None = None
    state: str
    current_wave: int
    waves: int
    reason: str
    created: float
    created_by: str
    updated: float
    devices_total: int = 0
    states: dict[str, int] = Field(default_factory=dict, description="Devices per state")


class DeploymentDetail(DeploymentOut):
    bundle: BundleOut | None = None
    wave_progress: list[WaveOut] = []
    devices: list[DeploymentDeviceOut] = []


class AuditOut(Model):
    id: int
    ts: float
    actor: str
    action: str
    detail: dict[str, Any]


class Health(BaseModel):
    ok: bool
    broker: bool = Field(description="The hub's MQTT client is connected")
    db: bool
    version: str = __version__


# ---------------------------------------------------------------- helpers


def _hub(request: Request):
    return request.app.state.hub


def unprocessable(loc: list[str | int], msg: str, kind: str = "value_error") -> HTTPException:
    """A 422 shaped like FastAPI's validation errors, so clients print every one the same way."""
    return HTTPException(status_code=422, detail=[{"loc": loc, "msg": msg, "type": kind}])


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


def _deployment_out(deployment: Deployment, counts: Counter) -> DeploymentOut:
    out = DeploymentOut.model_validate(deployment)
    out.states, out.devices_total = dict(counts), sum(counts.values())
    return out


def _user_message(error: Exception, *paths: Path) -> str:
    """An error's text without our temporary file names, which mean nothing to the caller."""
    message = str(error)
    for path in paths:
        message = message.replace(f"{path}: ", "").replace(str(path), "the upload")
    return message


# ---------------------------------------------------------------- routes

api = APIRouter(prefix="/api", dependencies=[Depends(auth.require_actor)])


@api.get("/me", summary="The token name this request authenticates as")
def me(actor: Actor) -> dict[str, str]:
    return {"actor": actor}


@api.get("/devices", response_model=list[DeviceOut])
def list_devices(
    request: Request,
    label: Annotated[list[str], Query(description="KEY=VALUE (or KEY: has the label); repeat to AND them")] = [],  # noqa: B006
    online: bool | None = None,
) -> list[Device]:
    filters = _label_filters(label)
    statement = select(Device).order_by(Device.id)
    if online is not None:
        statement = statement.where(Device.online.is_(online))
    with _hub(request).sessions() as session:
        # Labels are a JSON column; filtering here keeps SQLite and PostgreSQL on one code path.
        return [d for d in session.scalars(statement) if _matches(d.labels or {}, filters)]


@api.get("/devices/{device_id}", response_model=DeviceDetail)
def get_device(request: Request, device_id: str) -> DeviceDetail:
    with _hub(request).sessions() as session:
        device = _device_or_404(session, device_id)
        detail = DeviceDetail.model_validate(device)
        detail.desired = getattr(device, "desired", None)
        return detail


@api.put("/devices/{device_id}/labels", response_model=DeviceOut)
def put_labels(request: Request, device_id: str, body: LabelsIn, actor: Actor) -> Device:
    hub = _hub(request)
    with hub.sessions.begin() as session:
        device = _device_or_404(session, device_id)
        device.labels = dict(body.labels)
        session.add(AuditEntry(ts=time.time(), actor=actor, action="labels",
                               detail={"device": device_id, "labels": body.labels}))  # fmt: skip
    return device


@api.get("/devices/{device_id}/telemetry", response_model=list[TelemetryOut])
def get_telemetry(
    request: Request,
    device_id: str,
    since: Annotated[float, Query(description="Unix time; only samples after it")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="The newest N samples, oldest first")] = 1000,
    resolution: Literal["raw", "minute"] = "raw",
) -> list[Any]:
    with _hub(request).sessions() as session:
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


@api.get("/events", response_model=list[EventOut])
def list_events(
    request: Request,
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
    with _hub(request).sessions() as session:
        return list(session.scalars(statement.order_by(EventRecord.ts.desc()).limit(limit)))


@api.get("/bundles", response_model=list[BundleOut])
def list_bundles(request: Request) -> list[BundleRecord]:
    return _hub(request).registry.all()


@api.get("/bundles/{bundle_id}", response_model=BundleDetail, summary="A bundle by sha256 or ≥8-character prefix")
def get_bundle(request: Request, bundle_id: str) -> BundleRecord:
    try:
        return _hub(request).registry.find(bundle_id)
    except EdgekitError as error:
        raise HTTPException(status_code=404, detail=str(error)) from None


BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@api.post(
    "/bundles",
    response_model=PushOut,
    status_code=201,
    openapi_extra=BUNDLE_BODY,
    summary="Push a .ekb (raw body); verified before it is stored. 201 created, 200 already there",
    responses={200: {"model": PushOut}, 413: {}, 415: {}, 422: {}},
)
async def push_bundle(request: Request, response: Response, actor: Actor) -> PushOut:
    hub = _hub(request)
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise HTTPException(status_code=415, detail="send the .ekb as the raw body, application/octet-stream")
    limit = request.app.state.max_bundle_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    upload = await _receive(request, hub.registry.dir, limit)
    try:
        if upload.stat().st_size == 0:
            raise unprocessable(["body"], "empty body: send the .ekb file's bytes")
        try:
            record, created = await to_thread.run_sync(hub.registry.add, upload, actor)
        except EdgekitError as error:
            raise unprocessable(["body"], _user_message(error, upload), "bundle_invalid") from None
    finally:
        upload.unlink(missing_ok=True)
    auth.audit(hub.sessions, actor, "push", bundle_id=record.id, name=record.name, version=record.version,
               created=created)  # fmt: skip
    response.status_code = 201 if created else 200
    return PushOut(**BundleOut.model_validate(record).model_dump(), created=created)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(status_code=413, detail=f"bundles are limited to {limit / (1 << 20):g} MiB")


async def _receive(request: Request, folder: Path, limit: int) -> Path:
    """Stream the body to a temporary file beside the registry (never all in memory), enforcing the size cap."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".incoming-", suffix=".ekb")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            size, block = 0, bytearray()
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # a chunked upload declares no length: count what arrives
                    raise _too_large(limit)
                block += chunk
                if len(block) >= WRITE_BLOCK:
                    await to_thread.run_sync(handle.write, bytes(block))
                    block.clear()
            await to_thread.run_sync(handle.write, bytes(block))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@api.post("/deployments", response_model=DeploymentDetail, status_code=201, responses={422: {}})
def create_deployment(request: Request, body: DeploymentIn, actor: Actor) -> DeploymentDetail:
    hub = _hub(request)
    try:
        bundle = hub.registry.find(body.bundle_id)
    except EdgekitError as error:
        raise unprocessable(["body", "bundle_id"], str(error)) from None
    try:
        deployment = hub.rollouts.create(
            bundle.id, body.target, canary_percent=body.canary_percent, wave_percent=body.wave_percent,
            failure_threshold=body.failure_threshold, wave_timeout_s=body.wave_timeout_s, actor=actor,
            health_checks=body.health_checks,
        )  # fmt: skip
    except EdgekitError as error:
        # Deployments.create refuses targets that match no device, or a device already in a running rollout.
        raise unprocessable(["body", "target"], str(error)) from None
    auth.audit(hub.sessions, actor, "deploy", deployment_id=deployment.id, bundle_id=bundle.id,
               bundle=f"{bundle.name}@{bundle.version}", target=body.target)  # fmt: skip
    return _deployment_detail(hub, deployment.id)


@api.get("/deployments", response_model=list[DeploymentOut])
def list_deployments(
    request: Request, state: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeploymentOut]:
    return [_deployment_out(d, counts) for d, counts in _hub(request).rollouts.recent(state, limit)]


def _deployment_detail(hub, deployment_id: int) -> DeploymentDetail:
    try:
        deployment, devices, bundle = hub.rollouts.detail(deployment_id)
    except UnknownDeployment:
        raise HTTPException(status_code=404, detail=f"no deployment {deployment_id}") from None
    waves: dict[int, Counter] = {}
    for device in devices:
        waves.setdefault(device.wave, Counter())[device.state] += 1
    counts = sum(waves.values(), Counter())
    detail = DeploymentDetail(**_deployment_out(deployment, counts).model_dump())
    detail.bundle = BundleOut.model_validate(bundle) if bundle else None
    detail.wave_progress = [WaveOut(wave=w, total=sum(c.values()), states=dict(c)) for w, c in sorted(waves.items())]
    detail.devices = [DeploymentDeviceOut.model_validate(d) for d in devices]
    return detail


@api.get("/deployments/{deployment_id}", response_model=DeploymentDetail)
def get_deployment(request: Request, deployment_id: int) -> DeploymentDetail:
    return _deployment_detail(_hub(request), deployment_id)


@api.post("/deployments/{deployment_id}/halt", response_model=DeploymentDetail, responses={404: {}, 409: {}})
def halt_deployment(request: Request, deployment_id: int, actor: Actor, body: HaltIn | None = None) -> DeploymentDetail:
    hub = _hub(request)
    reason = (body or HaltIn()).reason
    with hub.sessions() as session:
        deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise HTTPException(status_code=404, detail=f"no deployment {deployment_id}")
    if deployment.state != "running":
        raise HTTPException(status_code=409, detail=f"deployment {deployment_id} is already {deployment.state}")
    try:
        hub.rollouts.halt(deployment_id, actor, reason)
    except EdgekitError as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    auth.audit(hub.sessions, actor, "halt", deployment_id=deployment_id, reason=reason)
    return _deployment_detail(hub, deployment_id)


@api.get("/audit", response_model=list[AuditOut])
def list_audit(
    request: Request,
    actor: str | None = None,
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[AuditEntry]:
    statement = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        statement = statement.where(AuditEntry.actor == actor)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    with _hub(request).sessions() as session:
        return list(session.scalars(statement))


public = APIRouter()


@public.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(request: Request) -> JSONResponse:
    hub = _hub(request)
    db = True
    try:
        with hub.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception:  # any database failure means not healthy; the body says which part
        db = False
    broker = hub.client is not None and hub.client.is_connected()
    health = Health(ok=db and broker, broker=broker, db=db)
    return JSONResponse(health.model_dump(), status_code=200 if health.ok else 503)


LOGIN_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "properties": {"token": {"type": "string"}, "next": {"type": "string"}},
                    "required": ["token"],
                }
            }
        },
    }
}


@public.post("/login", openapi_extra=LOGIN_BODY, status_code=303, summary="Trade a token for a session cookie")
async def login(request: Request) -> Response:
    # The form is parsed by hand: python-multipart would be one more dependency for one field.
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    if not token:
        raise unprocessable(["body", "token"], "field required")
    hub = _hub(request)
    actor = await to_thread.run_sync(auth.token_actor, hub.sessions, token)
    if actor is None:
        raise HTTPException(status_code=401, detail="the hub refused the token (unknown or revoked)")
    await to_thread.run_sync(lambda: auth.audit(hub.sessions, actor, "login", client=_client(request)))
    target = (form.get("next") or ["/"])[0]
    # Only same-site paths: a login link must not bounce the user to another site.
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(auth.COOKIE, auth.session_cookie(request.app.state.secret, actor), max_age=auth.SESSION_S,
                        httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")  # fmt: skip
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


@public.post("/logout", status_code=303)
def logout() -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/")
    return response


def create_app(hub) -> FastAPI:
    """The hub's ASGI app: API, login, health, metrics and the dashboard, all over `hub`'s database."""
    from edgekit.hub.metrics import hub_registry, metrics_router

    # Swagger UI's scripts served by the hub itself (fastapi-offline vendors them): /docs works without internet.
    app = FastAPIOffline(
        title="edgekit hub",
        redoc_url=None,
        version=__version__,
        description="Devices, telemetry, events, bundles and staged rollouts of an edgekit fleet. "
        "Authenticate with `Authorization: Bearer TOKEN` (`edgekit hub token create NAME`).",
    )
    app.state.hub = hub
    app.state.secret = auth.hub_secret(hub.settings.data_dir)
    app.state.metrics_registry = hub_registry(hub)
    app.state.max_bundle_bytes = MAX_BUNDLE_BYTES
    app.include_router(public)
    app.include_router(api)
    app.include_router(metrics_router)
    app.include_router(edgekit.hub.dashboard.router)
    return app
