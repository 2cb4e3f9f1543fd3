"""Typed dependencies: what a route needs of the running hub, taken from the state the app's lifespan yields
(`edgekit.hub.app`). A route names the part it uses, e.g. `sessions: Sessions`, never the whole hub."""

from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import sessionmaker

from edgekit.hub.alerts import MedianCache
from edgekit.hub.bench import BenchJobs
from edgekit.hub.downloads import DownloadLinks
from edgekit.hub.link import BrokerLink
from edgekit.hub.live import LiveFeed
from edgekit.hub.registry import Registry
from edgekit.hub.rollouts import Deployments
from edgekit.hub.transfer import DeltaCache


def _lifespan_state(name: str) -> Any:
    """Depends() on one entry of the lifespan's state (Starlette copies it into every request's `state`)."""

    async def get(request: Request) -> Any:  # async: a plain lookup needs no worker thread
        return getattr(request.state, name)

    return Depends(get)


Sessions = Annotated[sessionmaker, _lifespan_state("sessions")]
RegistryDep = Annotated[Registry, _lifespan_state("registry")]
DeploymentsDep = Annotated[Deployments, _lifespan_state("deployments")]
BenchJobsDep = Annotated[BenchJobs, _lifespan_state("bench")]
Link = Annotated[BrokerLink, _lifespan_state("link")]
Feed = Annotated[LiveFeed, _lifespan_state("feed")]
Medians = Annotated[MedianCache, _lifespan_state("medians")]
Secret = Annotated[bytes, _lifespan_state("secret")]  # signs session cookies
Metrics = Annotated[CollectorRegistry, _lifespan_state("metrics")]
DownloadLinksDep = Annotated[DownloadLinks, _lifespan_state("download_links")]
DeltasDep = Annotated[DeltaCache, _lifespan_state("deltas")]
DriftThreshold = Annotated[float, _lifespan_state("drift_threshold")]  # edgekit hub --drift-threshold
