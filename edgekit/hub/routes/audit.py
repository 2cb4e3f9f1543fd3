"""`/api/audit`: who pushed, deployed, halted, relabelled, logged in or changed tokens, newest first."""

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from edgekit.hub.db import AuditEntry
from edgekit.hub.deps import Sessions
from edgekit.hub.schemas import AuditOut

router = APIRouter()


@router.get("/audit", response_model=list[AuditOut])
def list_audit(
    sessions: Sessions,
    actor: str | None = None,
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[AuditEntry]:
    statement = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if actor is not None:
        statement = statement.where(AuditEntry.actor == actor)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    with sessions() as session:
        return list(session.scalars(statement))
