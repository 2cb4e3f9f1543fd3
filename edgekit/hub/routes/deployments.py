"""`/api/deployments`: staged rollouts planned, listed, read and halted (`edgekit.hub.rollouts.Deployments`)."""

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from edgekit.errors import EdgekitError
from edgekit.hub.auth import Operator, audit
from edgekit.hub.db import Deployment
from edgekit.hub.deps import DeploymentsDep, RegistryDep, Sessions
from edgekit.hub.rollouts import Deployments, UnknownDeployment
from edgekit.hub.routes import unprocessable
from edgekit.hub.schemas import (
    BundleOut,
    DeploymentDetail,
    DeploymentDeviceOut,
    DeploymentIn,
    DeploymentOut,
    HaltIn,
    WaveOut,
)

router = APIRouter()


def _deployment_out(deployment: Deployment, counts: Counter) -> DeploymentOut:
    out = DeploymentOut.model_validate(deployment)
    out.states, out.devices_total = dict(counts), sum(counts.values())
    return out


@contextmanager
def _found(deployment_id: int) -> Iterator[None]:
    """An unknown deployment id is the caller's 404."""
    try:
        yield
    except UnknownDeployment:
        raise HTTPException(status_code=404, detail=f"no deployment {deployment_id}") from None


def _detail(deployments: Deployments, deployment_id: int) -> DeploymentDetail:
    with _found(deployment_id):
        deployment, devices, bundle = deployments.detail(deployment_id)
    waves: dict[int, Counter] = {}
    for device in devices:
        waves.setdefault(device.wave, Counter())[device.state] += 1
    counts = sum(waves.values(), Counter())
    detail = DeploymentDetail(**_deployment_out(deployment, counts).model_dump())
    detail.bundle = BundleOut.model_validate(bundle) if bundle else None
    detail.wave_progress = [WaveOut(wave=w, total=sum(c.values()), states=dict(c)) for w, c in sorted(waves.items())]
    detail.devices = [DeploymentDeviceOut.model_validate(d) for d in devices]
    return detail


@router.post("/deployments", response_model=DeploymentDetail, status_code=201, responses={422: {}})
def create_deployment(body: DeploymentIn, actor: Operator, deployments: DeploymentsDep, registry: RegistryDep,
                      sessions: Sessions) -> DeploymentDetail:  # fmt: skip
    try:
        bundle = registry.find(body.bundle_id)
    except EdgekitError as error:
        raise unprocessable(["body", "bundle_id"], str(error)) from None
    try:
        deployment = deployments.create(
            bundle.id, body.target, canary_percent=body.canary_percent, wave_percent=body.wave_percent,
            failure_threshold=body.failure_threshold, wave_timeout_s=body.wave_timeout_s, actor=actor,
            health_checks=body.health_checks, shadow=body.shadow, gates=body.gates, min_samples=body.min_samples,
            shadow_budget=body.shadow_budget,
        )  # fmt: skip
    except EdgekitError as error:
        # Deployments.create refuses targets that match no device, or a device already in a running rollout.
        raise unprocessable(["body", "target"], str(error)) from None
    audit(sessions, actor, "deploy", deployment_id=deployment.id, bundle_id=bundle.id,
          bundle=f"{bundle.name}@{bundle.version}", target=body.target, shadow=body.shadow,
          gates=[gate["text"] for gate in deployment.gates])  # fmt: skip
    return _detail(deployments, deployment.id)


@router.get("/deployments", response_model=list[DeploymentOut])
def list_deployments(
    deployments: DeploymentsDep, state: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeploymentOut]:
    return [_deployment_out(d, counts) for d, counts in deployments.recent(state, limit)]


@router.get("/deployments/{deployment_id}", response_model=DeploymentDetail)
def get_deployment(deployments: DeploymentsDep, deployment_id: int) -> DeploymentDetail:
    return _detail(deployments, deployment_id)


@router.post("/deployments/{deployment_id}/halt", response_model=DeploymentDetail, responses={404: {}, 409: {}})
def halt_deployment(deployments: DeploymentsDep, sessions: Sessions, deployment_id: int, actor: Operator,
                    body: HaltIn | None = None) -> DeploymentDetail:  # fmt: skip
    reason = (body or HaltIn()).reason
    with _found(deployment_id):
        deployment = deployments.get(deployment_id)
    if deployment.state != "running":
        raise HTTPException(status_code=409, detail=f"deployment {deployment_id} is already {deployment.state}")
    try:
        deployments.halt(deployment_id, actor, reason)
    except EdgekitError as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    audit(sessions, actor, "halt", deployment_id=deployment_id, reason=reason)
    return _detail(deployments, deployment_id)
