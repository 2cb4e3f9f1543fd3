"""Who is calling the hub: API tokens (only their sha256 is stored) and signed session cookies for the dashboard.

A token is shown once, when it is created. Requests carry it as `Authorization: Bearer TOKEN`; the dashboard
trades it for a session cookie at `POST /login`. The cookie names the token, not the token itself, and is signed
with a per-hub secret, so revoking a token also ends every dashboard session opened with it.
"""

import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import ApiToken, AuditEntry
from edgekit.hub.deps import Secret, Sessions

COOKIE = "edgekit_session"
SESSION_S = 12 * 3600
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ADMIN = "admin"


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created: float
    created_by: str
    revoked: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def local_actor() -> str:
    """The audit name for commands run on the hub machine itself (`edgekit hub token …`)."""
    try:
        return f"local:{getpass.getuser()}"[:64]
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary container uid
        return "local"


def audit(sessions: sessionmaker, actor: str, action: str, **detail) -> None:
    with sessions.begin() as session:
        session.add(AuditEntry(ts=time.time(), actor=actor, action=action, detail=detail))


def create_token(sessions: sessionmaker, name: str, actor: str) -> str:
    """A new token for `name` (shown once: only its hash is kept). A revoked name cannot be reused."""
    if not TOKEN_NAME.match(name):
        raise BadInput(f"token name '{name}': use 1-64 letters, digits and . _ @ -, starting with a letter or digit")
    token = secrets.token_urlsafe(32)
    with sessions.begin() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise BadInput(f"token name '{name}' is taken (edgekit hub token list)")
        session.add(ApiToken(name=name, token_hash=hash_token(token), created=time.time(), created_by=actor))
        session.add(AuditEntry(ts=time.time(), actor=actor, action="token.create", detail={"name": name}))
    return token


def revoke_token(sessions: sessionmaker, name: str, actor: str) -> None:
    with sessions.begin() as session:
        token = session.scalar(select(ApiToken).where(ApiToken.name == name))
        if token is None:
            raise BadInput(f"no token named '{name}' (edgekit hub token list)")
        if not token.revoked:
            token.revoked = True
            session.add(AuditEntry(ts=time.time(), actor=actor, action="token.revoke", detail={"name": name}))


def list_tokens(sessions: sessionmaker) -> list[TokenInfo]:
    with sessions() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.created))
        return [TokenInfo(t.name, t.created, t.created_by, t.revoked) for t in rows]


def ensure_admin_token(sessions: sessionmaker) -> str | None:
    """On a hub's first start (no tokens at all), create the `admin` token and return it; else None."""
    with sessions() as session:
        if session.scalar(select(ApiToken.id).limit(1)) is not None:
            return None
    return create_token(sessions, ADMIN, "hub")


def token_actor(sessions: sessionmaker, token: str) -> str | None:
    """The name of a valid (known, not revoked) token, else None."""
    with sessions() as session:
        return session.scalar(
            select(ApiToken.name).where(ApiToken.token_hash == hash_token(token), ApiToken.revoked.is_(False))
        )


def _token_name_valid(sessions: sessionmaker, name: str) -> bool:
    with sessions() as session:
        revoked = session.scalar(select(ApiToken.revoked).where(ApiToken.name == name))
    return revoked is False


def hub_secret(data_dir: Path) -> bytes:
    """The per-hub key that signs session cookies, created once in `<data_dir>/secret`, readable by the owner only."""
    path = data_dir / "secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise BadInput(f"{path}: too short to be a hub secret; delete it to make a new one") from None
        return secret
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    return path.read_bytes()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_cookie(secret: bytes, name: str, now: float | None = None) -> str:
    """`payload.signature`: the token's name and an expiry, HMAC-SHA256 signed."""
    payload = _b64(json.dumps({"n": name, "exp": int((now or time.time()) + SESSION_S)}).encode())
    return f"{payload}.{_b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())}"


def cookie_name(secret: bytes, cookie: str) -> str | None:
    """The token name a cookie was issued for, when its signature holds and it has not expired; else None."""
    payload, _, signature = cookie.partition(".")
    expected = _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())
    if not signature or not hmac.compare_digest(signature, expected):
        return None
    try:
        data = json.loads(_unb64(payload))
        name, expires = str(data["n"]), float(data["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    return name if expires > time.time() else None


def authenticate(request: Request, sessions: Sessions, secret: Secret) -> str | None:
    """The actor behind a request (a bearer token first, then the session cookie), or None."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return token_actor(sessions, credentials.strip())
    cookie = request.cookies.get(COOKIE)
    if cookie:
        name = cookie_name(secret, cookie)
        # The cookie outlives nothing: a revoked token ends its dashboard sessions too.
        if name is not None and _token_name_valid(sessions, name):
            return name
    return None


MaybeActor = Annotated[str | None, Depends(authenticate)]


async def require_actor(actor: MaybeActor) -> str:
    """The caller's token name, or 401. Async: it only checks what `authenticate` found."""
    if actor is None:
        raise HTTPException(
            status_code=401,
            detail="authentication required: send 'Authorization: Bearer TOKEN' or log in at /login",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return actor


Actor = Annotated[str, Depends(require_actor)]
