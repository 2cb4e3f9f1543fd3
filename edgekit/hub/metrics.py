"""`GET /metrics`: the fleet and the hub in Prometheus text format, computed from the database at scrape time.

A collector (not process-global counters) because several hubs may share one process in tests, and because the
numbers that matter — devices online, rollout states — live in the shared database, not in this process.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from sqlalchemy import func, select

from edgekit import __version__
from edgekit.hub.auth import Actor
from edgekit.hub.db import BundleRecord, Deployment, Device
from edgekit.hub.deps import Metrics
from edgekit.schema import unknown

if TYPE_CHECKING:
    from edgekit.hub.service import Hub

DEPLOYMENT_STATES = ("running", "completed", "halted")
PER_DEVICE = (
    ("latency_p50_ms", "edgekit_device_latency_p50_ms", "Median inference latency in the last telemetry, ms"),
    ("latency_p95_ms", "edgekit_device_latency_p95_ms", "95th percentile inference latency, ms"),
    ("fps", "edgekit_device_fps", "Inferences per second in the last telemetry"),
    ("cpu_percent", "edgekit_device_cpu_percent", "Device CPU use, percent"),
    ("temperature_c", "edgekit_device_temperature_celsius", "Device temperature, °C"),
)


class HubCollector:
    def __init__(self, hub: "Hub") -> None:
        self.hub = hub

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration time: the database may not be reachable yet

    def collect(self) -> Iterator[Metric]:
        yield from self._replica()
        yield from self._ingest()
        with self.hub.sessions() as session:
            columns = [getattr(Device, column) for column, _, _ in PER_DEVICE]
            devices = list(session.execute(select(Device.id, Device.online, Device.last_seen, *columns)))
            deployments = dict(session.execute(select(Deployment.state, func.count()).group_by(Deployment.state)).all())
            bundles = session.scalar(select(func.count()).select_from(BundleRecord))
        yield GaugeMetricFamily("edgekit_devices", "Devices the hub has seen", value=len(devices))
        yield GaugeMetricFamily("edgekit_devices_online", "Devices online now", value=sum(d.online for d in devices))
        yield GaugeMetricFamily("edgekit_bundles", "Bundles in the registry", value=bundles or 0)
        by_state = GaugeMetricFamily("edgekit_deployments", "Deployments by state", labels=["state"])
        for state in sorted(set(DEPLOYMENT_STATES) | set(deployments)):
            by_state.add_metric([state], deployments.get(state, 0))
        yield by_state
        online = GaugeMetricFamily("edgekit_device_online", "1 when the device is online", labels=["device"])
        seen = GaugeMetricFamily("edgekit_device_last_seen_timestamp_seconds", "Last message", labels=["device"])
        gauges = [GaugeMetricFamily(name, help_text, labels=["device"]) for _, name, help_text in PER_DEVICE]
        for row in devices:
            online.add_metric([row.id], 1 if row.online else 0)
            seen.add_metric([row.id], row.last_seen)
            for (column, _, _), gauge in zip(PER_DEVICE, gauges, strict=True):
                value = getattr(row, column)
                if value is not None:  # no sample yet: no series, rather than a misleading 0
                    gauge.add_metric([row.id], value)
        yield from (online, seen, *gauges)

    def _replica(self) -> Iterator[Metric]:
        """Which hub process answered: replicas on one database report the same fleet, so a scrape of each says
        which one it is (its MQTT client id, stable across restarts) and whether it drives rollouts now."""
        yield InfoMetricFamily("edgekit_hub", "This hub process", value={"replica": self.hub.replica,
                                                                          "version": __version__})  # fmt: skip
        driver = self.hub.driver
        leading = 1 if driver is not None and driver.running and driver.leading else 0
        yield GaugeMetricFamily("edgekit_hub_rollout_controller",
                                "1 while this hub process is the rollout controller (holds the lease)",
                                value=leading)  # fmt: skip

    def _ingest(self) -> Iterator[Metric]:
        stats = self.hub.ingest.stats
        yield CounterMetricFamily("edgekit_ingest_received", "MQTT messages received", value=stats.received)
        yield CounterMetricFamily("edgekit_ingest_stored", "Messages stored", value=stats.stored)
        yield CounterMetricFamily("edgekit_ingest_duplicates", "Duplicates dropped", value=stats.duplicates)
        invalid = CounterMetricFamily("edgekit_ingest_invalid", "Invalid payloads dropped", labels=["reason"])
        for reason, count in sorted(stats.invalid.items()):
            invalid.add_metric([reason], count)
        if not stats.invalid:
            invalid.add_metric(["none"], 0)
        yield invalid
        yield GaugeMetricFamily(
            "edgekit_ingest_pending", "Messages waiting for the writer", value=self.hub.ingest.pending()
        )
        # Per process, like the log line it goes with: fields a newer agent sent that this hub ignored.
        ignored = CounterMetricFamily("edgekit_unknown_fields", "Payload fields this hub does not know, ignored",
                                      labels=["field"])  # fmt: skip
        for field, count in sorted(unknown.counts.items()):
            ignored.add_metric([field], count)
        yield ignored
        connected = 1 if self.hub.link.connected else 0
        yield GaugeMetricFamily(
            "edgekit_hub_broker_connected", "1 when the hub is connected to its broker", value=connected
        )


metrics_router = APIRouter()


def hub_registry(hub: "Hub") -> CollectorRegistry:
    """A registry of its own per hub, so two hubs in one process (tests) never share series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return registry


@metrics_router.get("/metrics", summary="Prometheus text format", response_class=Response)
def metrics(_actor: Actor, registry: Metrics) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
