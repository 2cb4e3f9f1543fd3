"""`/api/bench`: a bundle from the registry timed on a fleet device without activating it (`edgekit.hub.bench`)."""

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from edgekit.errors import BadInput
from edgekit.hub.auth import Operator, audit
from edgekit.hub.bench import BenchRequest, UnknownJob
from edgekit.hub.db import BenchJobRecord
from edgekit.hub.deps import BenchJobsDep, Sessions
from edgekit.hub.routes import unprocessable

router = APIRouter()


class BenchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: str = Field(pattern=r"^[0-9a-f]{64}$", description="The bundle's id (sha256) in the registry")
    target: str = Field(max_length=200, description="A device id, or group:LABEL[=VALUE]: its first online member "
                        "with the bundle's profile")  # fmt: skip
    seconds: float = Field(5.0, gt=0, le=600, description="How long the device times the bundle")
    timeout_s: float | None = Field(None, gt=0, le=7200, description="No answer by then: failed [default: from the "
                                    "bundle's size and `seconds`]")  # fmt: skip
    mode: Literal["bundle", "tvm-trials"] = Field("bundle", description="tvm-trials: a bundle of TVM tuning trials")


class BenchJobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    device_id: str
    bundle_id: str
    created: float
    expires: float
    state: str = Field(description="running, done or failed")
    result: dict[str, Any] | None = Field(None, description="edgekit.protocol.BenchResult (TrialResult for "
                                          "tvm-trials), when done")  # fmt: skip
    reason: str = Field("", description="Why it failed")


def _out(record: BenchJobRecord) -> BenchJobOut:
    return BenchJobOut.model_validate(record)


@router.post("/bench", response_model=BenchJobOut, status_code=201, responses={422: {}})
def start_bench(body: BenchIn, actor: Operator, jobs: BenchJobsDep, sessions: Sessions) -> BenchJobOut:
    try:
        record = jobs.start(BenchRequest(body.bundle, body.target, body.seconds, body.timeout_s, body.mode), actor)
    except BadInput as error:
        raise unprocessable(["body"], str(error)) from None
    audit(sessions, actor, "bench", job=record.id, bundle_id=record.bundle_id, device=record.device_id)
    return _out(record)


@router.get("/bench/{job_id}", response_model=BenchJobOut, responses={404: {}})
def get_bench(job_id: str, jobs: BenchJobsDep) -> BenchJobOut:
    try:
        return _out(jobs.status(job_id))
    except UnknownJob as error:
        raise HTTPException(status_code=404, detail=str(error)) from None
