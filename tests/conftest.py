"""Shared fixtures: an isolated EDGEKIT_HOME, generated models, the digits example, a CLI runner, MQTT brokers."""

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import HubSigner, shared_signer
from brokers import BROKER_KINDS, started_broker
from helpers import CliResult, compile_bundle
from hub_helpers import signing_keys
from nats_cluster import NatsCluster, started_nats_cluster
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.hub.broker import EmbeddedBroker, free_port
from edgekit.hub.service import Hub, HubSettings

REPO = Path(__file__).resolve().parent.parent

# The reliability suite's summary table (tests/reliability.py): registered here because with xdist only the
# controller prints the summary, and it loads no conftest below tests/.
pytest_plugins = ["reliability"]


@pytest.fixture(autouse=True)
def edgekit_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keys and caches go to a per-test folder, never the developer's own."""
    home = tmp_path_factory.mktemp("edgekit-home")
    monkeypatch.setenv("EDGEKIT_HOME", str(home))
    return home


@pytest.fixture
def cli():
    """Run `edgekit ARGS` in-process; returns exit code, stdout and stderr separately."""

    def run(*args: str | Path) -> CliResult:
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture(scope="session")
def small_cnn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    from edgekit.compile.synthetic import small_cnn

    path = tmp_path_factory.mktemp("models") / "small_cnn.onnx"
    onnx.save(small_cnn(), str(path))
    return path


@pytest.fixture(scope="session")
def small_cnn_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.npz"
    rng = np.random.default_rng(1)
    np.savez(path, input=rng.random((40, 3, 32, 32), dtype=np.float32))
    return path


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example, trained and exported once per session, run as a user would."""
    out = tmp_path_factory.mktemp("digits")
    subprocess.run([sys.executable, str(REPO / "examples" / "digits" / "train.py"), str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def mobilenet_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model, calibration .npz): MobileNetV2 architecture at width 0.35 and 96x96, random weights."""
    import onnx

    from edgekit.compile.synthetic import mobilenet_v2

    folder = tmp_path_factory.mktemp("mobilenet")
    onnx.save(mobilenet_v2(resolution=96, width=0.35), str(folder / "mobilenet_v2.onnx"))
    images = np.random.default_rng(2).random((30, 3, 96, 96), dtype=np.float32)
    np.savez(folder / "calibration.npz", input=images)
    return folder / "mobilenet_v2.onnx", folder / "calibration.npz"


@pytest.fixture(params=BROKER_KINDS, ids=BROKER_KINDS)
def broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A started broker on a free loopback port, once per kind (see tests/brokers.py for clients)."""
    yield from started_broker(request.param, tmp_path_factory.mktemp("broker"))


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A started mosquitto with persistence; skips where it is not installed."""
    yield from started_broker("mosquitto", tmp_path_factory.mktemp("broker"))


@pytest.fixture
def amqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    yield from started_broker("amqtt", tmp_path_factory.mktemp("broker"))


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three authenticated nats-server nodes with JetStream and MQTT listeners (tests/nats_cluster.py); skips where
    Debian's nats-server is not installed."""
    yield from started_nats_cluster(3)


@pytest.fixture(scope="session")
def hub_signer() -> HubSigner:
    """The hub key tests that play the hub sign desired states with; agents take `hub_signer.public`."""
    return shared_signer()


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """make(**HubSettings fields) → a started Hub in tmp_path/hub-N, stopped at teardown.

    Defaults: embedded broker (Mosquitto when installed; devices need `hub_helpers.device_url`, as in the field) and
    HTTP on free loopback ports, SQLite in the data dir."""
    hubs: list[Hub] = []

    def make(**fields) -> Hub:
        settings = {"data_dir": tmp_path / f"hub-{len(hubs)}", "http_port": free_port(), "broker_port": free_port(),
                    **fields}  # fmt: skip
        for _ in range(3):  # a free port can be taken by another test process before the hub binds it: pick again
            hub = Hub(HubSettings(**settings))
            hub.start()
            hubs.append(hub)
            assert hub.wait_connected(15), "the hub did not connect to its broker"
            started = hub.wait_http(15)
            if started or "http_port" in fields:
                break
            hubs.remove(hub)
            hub.stop()
            settings["http_port"] = free_port()
        assert started, "the hub's HTTP server did not start"
        return hub

    yield make
    for hub in reversed(hubs):
        hub.stop()


@pytest.fixture(scope="session")
def cnn_bundles(
    small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The small generated CNN as cnn 1.0.0 and 2.0.0, signed by one key; that key (`key`) and its public half."""
    folder = tmp_path_factory.mktemp("cnn-bundles")
    key, public = signing_keys(folder / "key")

    def build(version: str) -> Path:
        return compile_bundle(small_cnn_model, small_cnn_calibration, key, version, folder / f"cnn-{version}.ekb",
                              name="cnn")  # fmt: skip

    return {"key": key, "public": public, "v1": build("1.0.0"), "v2": build("2.0.0")}
