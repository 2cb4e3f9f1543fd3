"""What the hub does for the browser's side of its security: refuse cross-site requests on cookie sessions
(CSRF) and send security headers on every response. One pure ASGI middleware, so it also covers the live feed's
stream and routes added later.

CSRF: SameSite=Strict cookies do not separate ports of one host (a page on http://hub:9999 is "same-site" with
http://hub:8080), so any state-changing request (POST, PUT, PATCH, DELETE) that a session cookie could
authenticate, and /login and /logout, must come from the hub's own origin. Requests with a bearer token are
exempt: a browser never adds one on its own, which is how `edgekit push/deploy` and scripts authenticate.
"""

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from edgekit.hub.auth import COOKIE

ASGIScope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SESSION_PATHS = frozenset({"/login", "/logout"})
HEADERS = {
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}
# Pages may load the hub's own scripts, styles, images and API, plus the inline scripts the hub itself wrote
# (hashed per page); nothing may frame them. uPlot and Swagger UI set styles through the DOM, which CSP allows.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'{hashes}; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
OTHER_CSP = "default-src 'none'; frame-ancestors 'none'"
INLINE_SCRIPT = re.compile(rb"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)


def cross_site_refusal(method: str, path: str, headers: Headers) -> str | None:
    """Why a request must be refused as cross-site, or None when it may pass (see the module's docstring)."""
    if method not in UNSAFE_METHODS or headers.get("authorization", "").lower().startswith("bearer "):
        return None
    if path not in SESSION_PATHS and f"{COOKIE}=" not in headers.get("cookie", ""):
        return None  # no session to ride on: the route's own authentication answers
    host = headers.get("host", "")
    origin = headers.get("origin")
    site = headers.get("sec-fetch-site")
    if origin and origin != "null":
        seen = urlsplit(origin).netloc
    elif site is not None:
        # The browser's own verdict (a header pages cannot set); our form posts send `Origin: null` under
        # Referrer-Policy: no-referrer, so this is what tells them apart from an opaque-origin attacker page.
        seen = host if site == "same-origin" else f"a {site} page"
    else:
        seen = urlsplit(headers.get("referer", "")).netloc or "nowhere (no Origin, Referer or Sec-Fetch-Site)"
    if host and seen == host:
        return None
    return (
        f"cross-site request refused: {method} {path} came from {seen}, not this hub ({host or 'no Host header'}); "
        "use the dashboard itself, or an API token (Authorization: Bearer)"
    )


def page_csp(html: bytes) -> str:
    """The CSP for one HTML page: its own inline scripts allowed by hash, no other inline code."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in INLINE_SCRIPT.findall(html)
    )
    return PAGE_CSP.format(hashes=hashes)


class WebGuard:
    """ASGI middleware: 403 for cross-site state changes on a cookie session, security headers on every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = cross_site_refusal(scope["method"], scope["path"], Headers(scope=scope))
        if refusal is not None:
            await _send_json(send, 403, refusal)
            return
        await self.app(scope, receive, _with_headers(send))


def _with_headers(send: Send) -> Send:
    """`send` that adds the security headers; an HTML page is held until its end, to hash its inline scripts."""
    held: list[Message] = []

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            if Headers(raw=message["headers"]).get("content-type", "").startswith("text/html"):
                held.append(message)
                return
            message["headers"] = list(message["headers"]) + _security_headers(OTHER_CSP)
        elif held and message["type"] == "http.response.body":
            held.append(message)
            if message.get("more_body"):
                return
            start, *bodies = held
            html = b"".join(b.get("body", b"") for b in bodies)
            start["headers"] = list(start["headers"]) + _security_headers(page_csp(html))
            held.clear()
            await send(start)
            await send({"type": "http.response.body", "body": html})
            return
        await send(message)

    return send_with_headers


def _security_headers(csp: str) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in {**HEADERS, "content-security-policy": csp}.items()]


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + _security_headers(OTHER_CSP)})
    await send({"type": "http.response.body", "body": body})
