"""`/api/enrollments`: a device's broker login, made by the hub and returned once (admin tokens only).

The answer is the enrollment file `edgekit agent --enrollment FILE` reads (`edgekit.enrollment.Enrollment`); the
hub keeps only the password's hash. Enrolling a device again replaces its password."""

from collections.abc import Callable

from fastapi import APIRouter, HTTPException
from pydantic import Field

from edgekit.enrollment import Enrollment
from edgekit.errors import BadInput
from edgekit.hub.auth import Admin, audit
from edgekit.hub.deps import Sessions
from edgekit.protocol import DEVICE_ID
from edgekit.schema import StrictModel

Enroll = Callable[[list[str]], list[Enrollment]]


class EnrollmentIn(StrictModel):
    device_id: str = Field(pattern=DEVICE_ID, description="the device's id: letters, digits, . _ -")


def router_for(enroll: Enroll) -> APIRouter:
    """The routes over `enroll` (`Hub.enroll`): it owns the broker the logins are for."""
    router = APIRouter()

    @router.post("/enrollments", response_model=Enrollment, status_code=201, responses={409: {}})
    def post_enrollment(body: EnrollmentIn, actor: Admin, sessions: Sessions) -> Enrollment:
        try:
            enrollment = enroll([body.device_id])[0]
        except BadInput as error:  # the hub has no broker of its own to enroll on; the request was fine
            raise HTTPException(status_code=409, detail=str(error)) from None
        audit(sessions, actor, "device.enroll", device_id=body.device_id)
        return enrollment

    return router
