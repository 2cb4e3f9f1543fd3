"""Who is calling the hub: API tokens (only their sha256 is stored) and signed session cookies for the dashboard.

A token is shown once, when it is created. Requests carry it as `Authorization: Bearer TOKEN`; the dashboard
trades it for a session cookie at `POST /login`. The cookie names the token, not the token itself, and is signed
with a key kept in the database (every hub process on it signs with the same one), so revoking a token also ends
every dashboard session opened with it.

Each token has a scope: `read` (GET only), `operate` (also push, deploy, halt, labels) or `admin` (also tokens and
enrollment). A route states the scope it needs with `Actor` (read), `Operator` or `Admin`; a weaker token gets 403
naming the scope needed. The scope is looked up on every request, so a session cookie carries none.
"""

import base64
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import ApiToken, AuditEntry, HubSetting, dialect_insert
from edgekit.hub.deps import Secret, Sessions
from edgekit.hub.scopes import DEFAULT_SCOPE, SCOPES, Scope, scope_allows

COOKIE = "edgekit_session"
SESSION_S = 12 * 3600
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ADMIN = "admin"
COOKIE_KEY = "cookie_key"  # its `hub_settings` row


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scope: str
    created: float
    created_by: str
    revoked: bool


@dataclass(frozen=True)
class Caller:
    """Who a request authenticates as: a token's name and scope."""

    name: str
    scope: Scope


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


def create_token(sessions: sessionmaker, name: str, actor: str, scope: str = DEFAULT_SCOPE) -> str:
    """A new token for `name` (shown once: only its hash is kept). A revoked name cannot be reused."""
    if not TOKEN_NAME.match(name):
        raise BadInput(f"token name '{name}': use 1-64 letters, digits and . _ @ -, starting with a letter or digit")
    if scope not in SCOPES:
        raise BadInput(f"token scope '{scope}': expected one of {', '.join(SCOPES)}")
    token = secrets.token_urlsafe(32)
    with sessions.begin() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise BadInput(f"token name '{name}' is taken (edgekit hub token list)")
        session.add(ApiToken(name=name, token_hash=hash_token(token), created=time.time(), created_by=actor,
                             scope=scope))  # fmt: skip
        session.add(AuditEntry(ts=time.time(), actor=actor, action="token.create",
                               detail={"name": name, "scope": scope}))  # fmt: skip
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
        return [TokenInfo(t.name, t.scope, t.created, t.created_by, t.revoked) for t in rows]


def ensure_admin_token(sessions: sessionmaker) -> str | None:
    """On a hub's first start (no tokens at all), create the `admin` token and return it; else None."""
    with sessions() as session:
        if session.scalar(select(ApiToken.id).limit(1)) is not None:
            return None
    return create_token(sessions, ADMIN, "hub", scope=ADMIN)


def _active_caller(sessions: sessionmaker, *where) -> Caller | None:
    with sessions() as session:
        row = session.execute(select(ApiToken.name, ApiToken.scope).where(*where, ApiToken.revoked.is_(False))).first()
    return Caller(row.name, row.scope) if row else None


def token_caller(sessions: sessionmaker, token: str) -> Caller | None:
    """Who a valid (known, not revoked) token is, else None."""
    return _active_caller(sessions, ApiToken.token_hash == hash_token(token))


def hub_secret(sessions: sessionmaker, data_dir: Path) -> bytes:
    """The key that signs session cookies, kept in the database (`hub_settings`) so that every hub process on it
    (replicas) accepts the cookies of every other. The first hub makes it; one made by an older hub in
    `<data_dir>/secret` is moved there (its cookies stay valid) and the file removed."""
    with sessions() as session:
        stored = session.scalar(select(HubSetting.value).where(HubSetting.name == COOKIE_KEY))
    if stored is None:
        offered = _old_secret_file(data_dir) or secrets.token_bytes(32)
        with sessions.begin() as session:  # ON CONFLICT: of hubs starting at once, the first one's key stays
            insert = dialect_insert(session)(HubSetting).values(name=COOKIE_KEY, value=offered.hex())
            session.execute(insert.on_conflict_do_nothing())
            stored = session.scalar(select(HubSetting.value).where(HubSetting.name == COOKIE_KEY))
    (data_dir / "secret").unlink(missing_ok=True)
    return bytes.fromhex(stored)


def _old_secret_file(data_dir: Path) -> bytes | None:
    path = data_dir / "secret"
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(secret) < 32:
        raise BadInput(f"{path}: too short to be a hub secret; delete it to make a new one")
    return secret


def private_data_dir(data_dir: Path) -> list[Path]:
    """Make the hub's folder its owner's only (folders 0700, files 0600): the database, the secret, the broker's
    passwords. Returns what was open to others, e.g. made by an older hub under a 022 umask."""
    tightened = []
    for folder, folders, files in os.walk(data_dir):
        for path in [Path(folder)] + [Path(folder, name) for name in folders + files]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not mode & 0o077:
                continue
            path.chmod(0o700 if stat.S_ISDIR(mode) else 0o600)
            tightened.append(path)
    return sorted(set(tightened))


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


def _bearer_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return (credentials.strip() or None) if scheme.lower() == "bearer" else None


def authenticate(request: Request, sessions: Sessions, secret: Secret) -> Caller | None:
    """Who is behind a request (a bearer token first, then the session cookie), or None."""
    token = _bearer_token(request)
    if token is not None:
        return token_caller(sessions, token)
    cookie = request.cookies.get(COOKIE)
    name = cookie_name(secret, cookie) if cookie else None
    # The cookie outlives nothing: a revoked token ends its dashboard sessions too.
    return _active_caller(sessions, ApiToken.name == name) if name is not None else None


MaybeCaller = Annotated[Caller | None, Depends(authenticate)]


def require_scope(needed: Scope) -> Callable[[Caller | None], Awaitable[Caller]]:
    """A dependency: the caller, when its token has `needed` (or a stronger scope); else 401 or 403."""

    async def caller_with_scope(caller: MaybeCaller) -> Caller:  # async: it only checks what authenticate found
        if caller is None:
            raise HTTPException(
                status_code=401,
                detail="authentication required: send 'Authorization: Bearer TOKEN' or log in at /login",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not scope_allows(caller.scope, needed):
            raise HTTPException(
                status_code=403,
                detail=f"this needs a token with scope '{needed}'; token '{caller.name}' has scope '{caller.scope}' "
                f"(edgekit hub token create NAME --scope {needed})",
            )
        return caller

    caller_with_scope.needed_scope = needed  # type: ignore[attr-defined]  # read by the route audit in the tests
    return caller_with_scope


require_read, require_operate, require_admin = (require_scope(s) for s in SCOPES)


def _actor_name(check) -> Any:
    """Depends() on the name of a caller that passed `check`: the audit log's actor."""

    async def actor_name(caller: Annotated[Caller, Depends(check)]) -> str:
        return caller.name

    return Depends(actor_name)


ReadCaller = Annotated[Caller, Depends(require_read)]
Actor = Annotated[str, _actor_name(require_read)]  # any valid token
Operator = Annotated[str, _actor_name(require_operate)]  # push, deploy, halt, labels
Admin = Annotated[str, _actor_name(require_admin)]  # tokens, enrollment
