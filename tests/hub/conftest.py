"""Hub fixtures: a whole hub (embedded broker, SQLite, ingest, registry, rollouts, HTTP) on free ports."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgekit.hub.broker import free_port
from edgekit.hub.service import Hub, HubSettings


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """make(**HubSettings fields) → a started Hub in tmp_path/hub-N, stopped at teardown.

    Defaults: embedded broker (Mosquitto when installed) and HTTP on free loopback ports, SQLite in the data dir."""
    hubs: list[Hub] = []

    def make(**fields) -> Hub:
        settings = {"data_dir": tmp_path / f"hub-{len(hubs)}", "http_port": free_port(), "broker_port": free_port(),
                    **fields}  # fmt: skip
        hub = Hub(HubSettings(**settings))
        hub.start()
        hubs.append(hub)
        assert hub.wait_connected(15), "the hub did not connect to its broker"
        assert hub.wait_http(15), "the hub's HTTP server did not start"
        return hub

    yield make
    for hub in reversed(hubs):
        hub.stop()


@pytest.fixture
def hub(make_hub) -> Hub:
    return make_hub()
