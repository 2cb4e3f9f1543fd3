"""Agent fixtures: signed bundles of real models, a bundle server next to a broker or on an in-memory link, agents
that stop themselves."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import MemoryHubClient, MqttServedBundles, ServedBundles, started_agents
from helpers import compile_bundle

from edgekit.agents.agent import Agent
from edgekit.agents.memory import MemoryLink
from edgekit.hub.broker import EmbeddedBroker

BIG_VERSION = "2.0.0"
HIDDEN = 32_000  # 64x32000 + 32000x10 fp32 weights: a ~9.5 MB bundle, 37 chunks of 256 KiB


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


@pytest.fixture(scope="session")
def big_bundle(signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 2.0.0: an ONNX MLP with input (1, 64) and a few MB of weights, signed, so a download takes a while."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("big-bundle")
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((64, HIDDEN)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, 10)) / np.sqrt(HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["hidden"]), helper.make_node("Relu", ["hidden"], ["relu"]),
             helper.make_node("MatMul", ["relu", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "big.onnx"))
    np.savez(folder / "calibration.npz", input=rng.random((20, 64), dtype=np.float32))
    out = compile_bundle(folder / "big.onnx", folder / "calibration.npz", signing_keys[0], BIG_VERSION,
                         folder / f"digits-{BIG_VERSION}.ekb")  # fmt: skip
    assert out.stat().st_size > 5_000_000
    return out


@pytest.fixture
def served(broker: EmbeddedBroker) -> Iterator[ServedBundles]:
    bundles = MqttServedBundles(broker)
    yield bundles
    bundles.close()


@pytest.fixture
def link() -> MemoryLink:
    """An in-memory link for one agent: the test plays the broker and the hub."""
    return MemoryLink()


@pytest.fixture
def served_in_memory(link: MemoryLink) -> Iterator[ServedBundles]:
    """The hub's BundleServer answering the chunk requests `link`'s agent sends."""
    bundles = ServedBundles(MemoryHubClient(link))
    bundles.server.start()
    yield bundles
    bundles.close()


@pytest.fixture
def start_agent(tmp_path: Path, signing_keys: tuple[Path, Path]) -> Iterator[Callable[..., Agent]]:
    """`agent_helpers.started_agents` under tmp_path, trusting the session's bundle key too; stopped at teardown."""
    with started_agents(tmp_path, trust_key=signing_keys[1]) as start:
        yield start
