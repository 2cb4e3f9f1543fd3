"""The hub's ASGI app: REST API (`/api/...`, OpenAPI at `/docs`), login, dashboard, `/healthz` and `/metrics`.

Its lifespan owns the hub's background workers: they start before the server accepts a request and stop after it
has answered the last one. Every route except `/healthz`, `/login`, `/logout`, static files and the docs needs a
token (see `edgekit.hub.auth`).
"""

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy import text

from edgekit import __version__
from edgekit.hub import dashboard
from edgekit.hub.alerts import MedianCache
from edgekit.hub.auth import hub_secret, private_data_dir, require_read
from edgekit.hub.deps import Link, Sessions
from edgekit.hub.guard import WebGuard
from edgekit.hub.live import FleetRelay, LiveFeed
from edgekit.hub.metrics import hub_registry, metrics_router
from edgekit.hub.routes import audit, bundles, deployments, devices, downloads, enrollment, session, tokens, trust
from edgekit.hub.routes import bench as bench_routes
from edgekit.hub.routes import config as config_routes
from edgekit.hub.routes import datasets as dataset_routes
from edgekit.hub.schemas import Health

if TYPE_CHECKING:
    from edgekit.hub.service import Hub

log = logging.getLogger(__name__)
health_router = APIRouter()


@health_router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(sessions: Sessions, link: Link) -> JSONResponse:
    db = True
    try:
        with sessions() as db_session:
            db_session.execute(text("SELECT 1"))
    except Exception:  # any database failure means not healthy; the body says which part
        db = False
    broker = link.connected
    health = Health(ok=db and broker, broker=broker, db=db)
    return JSONResponse(health.model_dump(), status_code=200 if health.ok else 503)


@contextmanager
def running_workers(hub: "Hub") -> Iterator[tuple[LiveFeed, MedianCache]]:
    """Start the workers, each after what it needs, and stop them in the reverse order, also when a later one fails
    to start: the rollout driver and retention (when this process runs them) stop first, so no rollout advances
    while the MQTT link and ingest go away; ingest stops last, writing what it had queued."""
    with ExitStack() as stack:
        hub.ingest.start()
        stack.callback(hub.ingest.stop)
        hub.link.start()
        stack.callback(hub.link.stop)
        feed = LiveFeed(hub.stopping)
        hub.listeners.append(feed)
        stack.callback(hub.listeners.remove, feed)
        if hub.engine.dialect.name == "postgresql":  # maybe one of several replicas: each feed shows every one's
            relay = FleetRelay(hub.engine, hub.replica, feed)
            relay.start()
            stack.callback(relay.stop)
            hub.listeners.append(relay)
            stack.callback(hub.listeners.remove, relay)
        medians = MedianCache(hub.sessions)
        stack.callback(medians.stop)
        for worker in (hub.retention, hub.driver):
            if worker is not None:
                worker.start()
                stack.callback(worker.stop)
        yield feed, medians


def create_app(hub: "Hub") -> FastAPI:
    """The app over `hub`'s database, registry, rollouts and MQTT link; its lifespan runs `running_workers(hub)`."""
    # Read (or made) here, in the caller's thread: a broken old secret file stops the start with its own message.
    secret = hub_secret(hub.sessions, hub.settings.data_dir)
    opened = private_data_dir(hub.settings.data_dir)
    if opened:
        log.warning("%s: made %d paths readable by their owner only (were open to others): %s", hub.settings.data_dir,
                    len(opened), ", ".join(str(p.relative_to(hub.settings.data_dir)) for p in opened[:5])
                    + (", …" if len(opened) > 5 else ""))  # fmt: skip
    metrics = hub_registry(hub)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Starting and stopping the workers starts and joins threads; nothing else needs the event loop then.
        with running_workers(hub) as (feed, medians):
            # What edgekit.hub.deps hands the routes, by name.
            yield {
                "sessions": hub.sessions,
                "registry": hub.registry,
                "deployments": hub.rollouts,
                "configs": hub.configs,
                "bench": hub.bench,
                "link": hub.link,
                "feed": feed,
                "medians": medians,
                "secret": secret,
                "metrics": metrics,
                "download_links": hub.links,
                "deltas": hub.deltas,
                "insecure_broker": hub.embedded is not None and hub.users is None,  # the dashboard's red banner
                "drift_threshold": hub.settings.drift_threshold,
            }

    # Swagger UI's scripts served by the hub itself (fastapi-offline vendors them): /docs works without internet.
    app = FastAPIOffline(
        title="edgekit hub",
        redoc_url=None,
        version=__version__,
        description="Devices, telemetry, events, bundles and staged rollouts of an edgekit fleet. "
        "Authenticate with `Authorization: Bearer TOKEN` (`edgekit hub token create NAME`).",
        lifespan=lifespan,
    )
    api = APIRouter(prefix="/api", dependencies=[Depends(require_read)])
    for routes in (devices, config_routes, bundles, deployments, audit, tokens, dataset_routes, bench_routes):
        api.include_router(routes.router)
    api.include_router(enrollment.router_for(hub.enroll))  # needs the hub's broker, not only its database
    api.include_router(trust.router_for(lambda: hub.trust.root, hub.rotate_keys))  # and its keys
    for router in (health_router, session.router, downloads.router, api, metrics_router, dashboard.router):
        app.include_router(router)
    app.add_middleware(WebGuard)
    return app
