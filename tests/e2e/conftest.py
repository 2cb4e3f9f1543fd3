"""Fixtures for the end-to-end reliability suite (tests/agents and tests/hub fixtures are not visible here)."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import compile_bundle
from hub_helpers import signing_keys

from edgekit.hub.broker import free_port
from edgekit.hub.service import Hub, HubSettings


@pytest.fixture(scope="session")
def cnn_bundles(
    small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The small generated CNN as cnn 1.0.0 and 2.0.0, signed by one key; and that key's public half."""
    folder = tmp_path_factory.mktemp("reliability-bundles")
    key, public = signing_keys(folder / "key")

    def build(version: str) -> Path:
        return compile_bundle(small_cnn_model, small_cnn_calibration, key, version, folder / f"cnn-{version}.ekb",
                              name="cnn")  # fmt: skip

    return {"public": public, "v1": build("1.0.0"), "v2": build("2.0.0")}


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """make(**HubSettings fields) → a started Hub (embedded broker, SQLite) in tmp_path/hub-N, stopped at teardown."""
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
