"""The web dashboard, served by the hub itself: pages, their static files, `/api/alerts` and the live feed.

Pages are one HTML shell plus vanilla JS modules (`static/js/`) that read the REST API; charts are uPlot, vendored
under `static/vendor/uplot/` with its licence. Live values come over Server-Sent Events (`/api/stream`) from the
live feed (`edgekit.hub.live`). Pages need a login: without one they answer 401 with the login form as the body,
so a browser shows the form and a script sees the status.
"""

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse

from edgekit.hub.alerts import fleet_alerts
from edgekit.hub.auth import Actor, MaybeCaller
from edgekit.hub.deps import DriftThreshold, Feed, Medians, Sessions

STATIC = Path(__file__).parent / "static"
PAGES = ("/", "/devices/{device_id}", "/bundles", "/rollouts", "/events", "/audit", "/datasets", "/datasets/{name}")

INSECURE_BANNER = (
    '<div class="insecure-broker" role="alert">Insecure broker (edgekit hub --insecure-broker): anyone who reaches '
    "it can read every device's messages and steer every device.</div>"
)

router = APIRouter()


def _login_page() -> HTMLResponse:
    return HTMLResponse((STATIC / "login.html").read_text(), status_code=401, headers={"Cache-Control": "no-store"})


def _page(request: Request, caller: MaybeCaller, medians: Medians) -> Response:
    """The page shell for a signed-in user, else 401 with the login form (the same URL works after signing in)."""
    if caller is None:
        return _login_page()
    medians.warm()  # the page asks for /api/alerts next
    return _shell(request.state.insecure_broker)


def _shell(insecure_broker: bool) -> HTMLResponse:
    """The page shell; on a hub whose broker is open to anyone, with a red banner saying so on every page."""
    html = (STATIC / "app.html").read_text()
    if insecure_broker:
        html = html.replace("<body>", f"<body>\n{INSECURE_BANNER}", 1)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


for _path in PAGES:
    router.add_api_route(_path, _page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)


@router.get("/static/{path:path}", include_in_schema=False)
def static_file(path: str) -> FileResponse:
    """Scripts, styles and the vendored chart library: code only, no fleet data, so no login (the form uses them)."""
    target = (STATIC / path).resolve()
    if not target.is_relative_to(STATIC.resolve()) or not target.is_file():
        raise HTTPException(404, f"no static file '{path}'")
    return FileResponse(target, headers={"Cache-Control": "no-cache"})


@router.get("/api/alerts", tags=["dashboard"])
def alerts(
    _actor: Actor,
    sessions: Sessions,
    medians: Medians,
    drift_threshold: DriftThreshold,
    since_s: Annotated[float, Query(gt=0, le=30 * 86400, description="How far back failed updates count")] = 86400,
    silent_s: Annotated[float, Query(gt=0, description="An online device this quiet counts as offline")] = 120,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    """Offline devices, failed updates, latency regressions (current p50 > 1.5× the device's hour median) and input
    drift (the newest drift score over `edgekit hub --drift-threshold`)."""
    return fleet_alerts(sessions, medians, since_s, silent_s, limit, drift_threshold)


@router.get("/api/stream", tags=["dashboard"])
async def stream(
    request: Request,
    _actor: Actor,
    feed: Feed,
    device: Annotated[str | None, Query(max_length=64, description="Also send this device's every sample")] = None,
) -> StreamingResponse:
    """Server-Sent Events: `data:` JSON with the changed fleet cells per device, new events, and with `device`
    that device's telemetry samples as [ts, p50, p95, fps, cpu, temperature]."""
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    events = feed.events(device, request.is_disconnected)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
