"""Who is calling: `/api/me`, and `/login` (a token traded for the dashboard's session cookie) and `/logout`."""

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs

from anyio import to_thread
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import RedirectResponse

from edgekit.hub import auth
from edgekit.hub.auth import ReadCaller
from edgekit.hub.deps import Secret, Sessions
from edgekit.hub.routes import unprocessable
from edgekit.hub.schemas import MeOut

router = APIRouter()

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


@dataclass(frozen=True)
class LoginForm:
    token: str
    next: str


async def login_form(request: Request) -> LoginForm:
    """The urlencoded login form. Parsed here, not with FastAPI's Form(): that needs python-multipart, one more
    dependency for two fields."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    if not token:
        raise unprocessable(["body", "token"], "field required")
    return LoginForm(token, (form.get("next") or ["/"])[0])


@router.get("/api/me", response_model=MeOut, summary="The token name and scope this request authenticates as")
def me(caller: ReadCaller) -> MeOut:
    return MeOut(actor=caller.name, scope=caller.scope)


@router.post("/login", openapi_extra=LOGIN_BODY, status_code=303, summary="Trade a token for a session cookie")
async def login(
    request: Request, form: Annotated[LoginForm, Depends(login_form)], sessions: Sessions, secret: Secret
) -> Response:
    caller = await to_thread.run_sync(auth.token_caller, sessions, form.token)
    if caller is None:
        raise HTTPException(status_code=401, detail="the hub refused the token (unknown or revoked)")
    actor = caller.name
    await to_thread.run_sync(lambda: auth.audit(sessions, actor, "login", client=_client(request)))
    target = form.next
    # Only same-site paths: a login link must not bounce the user to another site.
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(auth.COOKIE, auth.session_cookie(secret, actor), max_age=auth.SESSION_S, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")  # fmt: skip
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


@router.post("/logout", status_code=303)
def logout() -> Response:
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/")
    return response
