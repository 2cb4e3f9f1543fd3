"""`/api/devices/{id}/config` and `/api/groups/{KEY=VALUE}/config`: a device's or a group's configuration (source,
task, thresholds, rates, capture) set and read (`edgekit.hub.config`)."""

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgekit.errors import BadInput
from edgekit.hub.auth import Operator
from edgekit.hub.config import Configs, Sent, UnknownDevice, group_target
from edgekit.hub.db import Device, GroupConfig
from edgekit.hub.routes import unprocessable
from edgekit.protocol import CONFIG_FIELDS, CapturePolicy, Rates, Thresholds
from edgekit.schema import describe_validation_error

router = APIRouter()
# KIND:TARGET as agents parse it (edgekit.agents.sources.parse_source); the device checks the rest.
SOURCE_SPEC = re.compile(r"^[a-z][a-z0-9_-]{0,31}:\S{0,2000}$")
PARTS: dict[str, type[BaseModel]] = {"thresholds": Thresholds, "rates": Rates, "capture": CapturePolicy}


async def _configs(request: Request) -> Configs:
    return request.state.configs  # type: ignore[no-any-return]


ConfigsDep = Annotated[Configs, Depends(_configs)]


class ConfigIn(BaseModel):
    """What to change; a field left out stays as it is, a field given as null goes back to its default."""

    model_config = ConfigDict(extra="forbid")
    source: str | dict[str, Any] | None = Field(
        None, description="KIND:TARGET (camera:0, video:/path/clip.mp4, folder:/path, mqtt:, synthetic:) or an "
        "object with `kind`; null: none from the hub (the agent's own --source)"
    )  # fmt: skip
    task: Literal["auto", "classifier", "detector", "raw"] | None = None
    thresholds: dict[str, Any] | None = Field(None, description="score, top_k, iou: the ones given change")
    rates: dict[str, Any] | None = Field(None, description="telemetry_s, max_fps, results_qos: the ones given change")
    capture: dict[str, Any] | None = Field(None, description="A CapturePolicy (docs/datasets.md); null: capture off")

    @field_validator("source")
    @classmethod
    def _source(cls, source: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(source, str) and not SOURCE_SPEC.match(source):
            raise ValueError(f"'{source[:80]}': expected KIND:TARGET, e.g. camera:0 or video:/data/clip.mp4")
        if isinstance(source, dict) and not isinstance(source.get("kind"), str):
            raise ValueError("expected an object with `kind` (camera, video, folder, mqtt, serial, synthetic)")
        return source

    @field_validator("thresholds", "rates", "capture")
    @classmethod
    def _part(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is None:
            return None
        model = PARTS[str(info.field_name)]
        unknown = sorted(set(value) - set(model.model_fields))
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}; expected {', '.join(model.model_fields)}")
        try:
            model.model_validate(value)
        except ValidationError as error:
            raise ValueError(describe_validation_error(error)) from None
        return value

    def change(self) -> dict[str, Any]:
        """The fields the request gave, nulls included."""
        return self.model_dump(mode="json", include=self.model_fields_set)


class SentOut(BaseModel):
    device: str
    rev: int | None = Field(None, description="The desired state's rev it was sent as")
    error: str = Field("", description="Why it was not sent (the other devices still were)")


class GroupConfigOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    selector: str = Field(description="KEY=VALUE or KEY (the label is set)")
    config: dict[str, Any] = Field(description="The group's configuration: every change merged")
    version: int
    updated: float
    updated_by: str


class ConfigResult(BaseModel):
    target: str = Field(description="The device id, or group:SELECTOR")
    change: dict[str, Any]
    group: GroupConfigOut | None = None
    sent: list[SentOut]


class DeviceConfigOut(BaseModel):
    device: str
    desired: dict[str, Any] = Field(description="The configuration the hub last sent (CONFIG_FIELDS)")
    reported: dict[str, Any] = Field(description="The configuration the device reports running")
    state: dict[str, Any] | None = Field(
        None, description="ReportedState.config: applied or refused, the rev and why (agents from 0.4)"
    )
    groups: list[GroupConfigOut] = Field(description="The group configurations that apply to it, in order")


def _config_fields(state: dict[str, Any] | None) -> dict[str, Any]:
    return {name: value for name, value in (state or {}).items() if name in CONFIG_FIELDS}


def _sent(sent: list[Sent]) -> list[SentOut]:
    return [SentOut(device=s.device, rev=s.rev, error=s.error) for s in sent]


def _device_or_404(configs: Configs, device_id: str) -> Device:
    try:
        return configs.device(device_id)
    except UnknownDevice as error:
        raise HTTPException(status_code=404, detail=str(error)) from None


@router.get("/devices/{device_id}/config", response_model=DeviceConfigOut)
def get_device_config(configs: ConfigsDep, device_id: str) -> DeviceConfigOut:
    device = _device_or_404(configs, device_id)
    reported = device.reported or {}
    groups = [GroupConfigOut.model_validate(g) for g in configs.groups_of(device)]
    return DeviceConfigOut(device=device.id, desired=_config_fields(device.desired),
                           reported=_config_fields(reported), state=reported.get("config"), groups=groups)  # fmt: skip


@router.put("/devices/{device_id}/config", response_model=ConfigResult, responses={404: {}, 422: {}})
def put_device_config(configs: ConfigsDep, device_id: str, body: ConfigIn, actor: Operator) -> ConfigResult:
    _device_or_404(configs, device_id)
    change = body.change()
    try:
        sent = configs.set_device(device_id, change, actor)
    except BadInput as error:
        raise unprocessable(["body"], str(error)) from None
    return ConfigResult(target=device_id, change=change, sent=_sent(sent))


@router.get("/groups/config", response_model=list[GroupConfigOut])
def list_group_configs(configs: ConfigsDep) -> list[GroupConfig]:
    return configs.groups()


@router.get("/groups/{selector}/config", response_model=GroupConfigOut, responses={404: {}})
def get_group_config(configs: ConfigsDep, selector: str) -> GroupConfig:
    group = configs.group(selector)
    if group is None:
        raise HTTPException(status_code=404, detail=f"no configuration for group '{selector}'")
    return group


@router.put("/groups/{selector}/config", response_model=ConfigResult, responses={422: {}})
def put_group_config(configs: ConfigsDep, selector: str, body: ConfigIn, actor: Operator) -> ConfigResult:
    try:
        target = group_target(selector)
    except BadInput as error:
        raise unprocessable(["path", "selector"], str(error)) from None
    change = body.change()
    try:
        group, sent = configs.set_group(selector, change, actor)
    except BadInput as error:
        raise unprocessable(["body"], str(error)) from None
    return ConfigResult(target=target, change=change, group=GroupConfigOut.model_validate(group), sent=_sent(sent))
