"""The REST API's routers, one module per resource; `edgekit.hub.app` mounts them (all but `session` under `/api`,
behind a token).

Errors the caller can fix come back as 422 in FastAPI's own shape, `{"detail": [{"loc": [...], "msg": ...}]}`, so
clients report every error the same way: the field, then the reason.
"""

from fastapi import HTTPException


def unprocessable(loc: list[str | int], msg: str, kind: str = "value_error") -> HTTPException:
    """A 422 shaped like FastAPI's validation errors, so clients print every one the same way."""
    return HTTPException(status_code=422, detail=[{"loc": loc, "msg": msg, "type": kind}])
