"""The REST API's request and response models: what `/docs` shows, and what every route validates against."""

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgekit import __version__
from edgekit.errors import BadInput
from edgekit.hub.gates import parse_gate
from edgekit.hub.scopes import DEFAULT_SCOPE, Scope
from edgekit.protocol import DEVICE_ID

LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,63}$")
TARGET = re.compile(rf"^(all|group:[A-Za-z0-9][A-Za-z0-9_./-]{{0,63}}(=[^\s]{{0,128}})?|{DEVICE_ID[1:-1]})$")


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
    health: dict[str, Any] | None = Field(
        None, description="The newest telemetry's model health: model (ModelStats), shadow (ShadowStats), drift"
    )


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
    drift_score: float | None = Field(None, description="Input drift (PSI, Telemetry.drift.score); raw samples only")


class EventOut(Model):
    device_id: str
    seq: int
    ts: float
    type: str
    level: str
    message: str
    data: dict[str, Any]


class ResultOut(Model):
    seq: int
    ts: float
    bundle: str = Field(description="name@version that produced it")
    latency_ms: float
    summary: dict[str, Any] = Field(description="task, and top (classifiers), detections or values; classes carry "
                                    "`name` when the bundle has labels")  # fmt: skip


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
    shadow: bool = Field(False, description="The canary first runs the bundle as a shadow, compared on live input")
    gates: list[str] | None = Field(
        None, max_length=16, description="Health gates, e.g. agreement>=0.98, p95<=1.2x (docs/health.md); "
        "None: the defaults with a shadow, none without"
    )  # fmt: skip
    min_samples: int | None = Field(None, ge=1, le=1_000_000, description="Inputs a device measures before a gate")
    shadow_budget: float = Field(0.25, gt=0, le=4, description="Shadow time as a fraction of the active model's")

    @field_validator("gates")
    @classmethod
    def _gates(cls, gates: list[str] | None) -> list[str] | None:
        for text in gates or []:
            try:
                parse_gate(text)
            except BadInput as error:
                raise ValueError(str(error)) from None  # a 422 that names the gate
        return gates

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
    health: dict[str, Any] | None = Field(None, description="What the gates measured on this device")


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
    shadow: bool = False
    phase: str = Field("waves", description="shadow: the canary runs the bundle as a shadow; waves: installs")
    gates: list[dict[str, Any]] = []
    min_samples: int = 0
    shadow_budget: float = 0.25
    gate_results: list[dict[str, Any]] = Field([], description="Each gate evaluation: value, threshold, passed")


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


class MeOut(BaseModel):
    actor: str = Field(description="The token's name")
    scope: str = Field(description="read, operate or admin")


class TokenIn(BaseModel):
    name: str = Field(description="Who or what uses it; the audit log shows this name")
    scope: Scope = DEFAULT_SCOPE


class TokenOut(BaseModel):
    name: str
    scope: str
    created: float
    created_by: str
    revoked: bool


class TokenCreated(TokenOut):
    token: str = Field(description="Shown once: the hub keeps only its sha256")
