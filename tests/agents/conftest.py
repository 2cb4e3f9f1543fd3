"""Agent fixtures: signed bundles of real models, a bundle server next to a broker, agents that stop themselves."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_helpers import ServedBundles
from helpers import compile_bundle

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.hub.broker import EmbeddedBroker
from edgekit.mqtt import Backoff


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(private, public) key files devices trust in these tests."""
    from edgekit.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def digits_bundle(
    digits: Path, signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """make(version) → a signed fp32 digits bundle (input (1, 64)), built once per version per session."""
    folder = tmp_path_factory.mktemp("digits-bundles")
    built: dict[str, Path] = {}

    def make(version: str = "1.0.0") -> Path:
        if version not in built:
            out = folder / f"digits-{version}.ekb"
            built[version] = compile_bundle(digits, digits / "calibration.npz", signing_keys[0], version, out)
        return built[version]

    return make


@pytest.fixture(scope="session")
def cnn_bundle(
    small_cnn_model: Path,
    small_cnn_calibration: Path,
    signing_keys: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A signed small CNN bundle with an image input (1, 3, 32, 32) NCHW, for camera-like sources."""
    out = tmp_path_factory.mktemp("cnn-bundle") / "cnn-1.0.0.ekb"
    return compile_bundle(small_cnn_model, small_cnn_calibration, signing_keys[0], "1.0.0", out, "cnn")


@pytest.fixture
def served(broker: EmbeddedBroker) -> Iterator[ServedBundles]:
    bundles = ServedBundles(broker)
    yield bundles
    bundles.close()


@pytest.fixture
def start_agent(tmp_path: Path, signing_keys: tuple[Path, Path]) -> Iterator[Callable[..., Agent]]:
    """start(broker, device_id="dev-1", **settings) → a started in-process Agent, stopped at teardown.

    Defaults: trusts the session key, data under tmp_path/<device_id>, telemetry every 0.5 s, fast backoff."""
    agents: list[Agent] = []

    def start(broker: EmbeddedBroker, device_id: str = "dev-1", **settings) -> Agent:
        fields = {"device_id": device_id, "broker": broker.url, "data_dir": tmp_path / device_id,
                  "trust_key": signing_keys[1], "telemetry_s": 0.5, "threads": 1,
                  "backoff": Backoff(initial_s=0.2, max_s=1.0), **settings}  # fmt: skip
        agent = Agent(AgentSettings(**fields))
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
