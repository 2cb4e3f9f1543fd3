"""examples/sensor-anomaly end to end, as its README runs it: train the PCA detector, compile it to a signed int8
bundle with the CLI, stream the fake sensor over a pseudo-terminal into a real agent on a real Mosquitto, and check
that the windows with injected faults come back as anomalies and the healthy ones do not."""

import json
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import sequenced
from brokers import Subscriber
from helpers import CliResult
from typer.testing import CliRunner

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.runtimes import get_runtime
from edgekit.bundle import open_bundle
from edgekit.cli import app
from edgekit.mqtt import Backoff
from edgekit.protocol import Result
from edgekit.signing import generate_keypair

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sensor-anomaly"
WINDOWS, EVERY = 48, 4  # 12 fault windows (4 of each kind) among 36 healthy ones: about 6 s of signal at 1 kHz
WINDOW_S = 128 / 1000
RESULTS = "edgekit/v1/sensor-1/results"
START_S = 15.0  # agent start-up and bundle verification on a loaded 2-core machine
INT8_MARGIN = 0.01  # the compile's own default budget: at most 1 accuracy point below fp32


@dataclass
class Compiled:
    data: Path  # train.py's output folder
    bundle: Path
    public_key: Path


def run_cli(*args: str | Path) -> CliResult:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return CliResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compiled]:
    """train.py run as a user would, then `edgekit compile` int8 for this host's profile, signed."""
    root = tmp_path_factory.mktemp("sensor-anomaly")
    with pytest.MonkeyPatch.context() as patch:
        # Module scope runs before the per-test EDGEKIT_HOME fixture: keep caches out of the real home here too.
        patch.setenv("EDGEKIT_HOME", str(root / "home"))
        subprocess.run([sys.executable, str(EXAMPLE / "train.py"), str(root / "data")], check=True)
        private, public = generate_keypair(root / "keys")
        bundle = root / "anomaly.ekb"
        result = run_cli("compile", root / "data" / "anomaly.onnx", "--profile", "x86-64-avx2",
                         "--precision", "int8", "--calibration", root / "data" / "calibration.npz",
                         "--sign-key", private, "--bench-seconds", "0.1", "-o", bundle)  # fmt: skip
        assert result.exit_code == 0, result.output
        yield Compiled(root / "data", bundle, public)


def predictions(session, windows: np.ndarray) -> np.ndarray:
    return np.array([int(np.argmax(session.run({"window": window[None]})[0])) for window in windows])


def test_int8_bundle_detects_held_out_faults_as_well_as_fp32(compiled: Compiled):
    assert run_cli("verify", compiled.bundle, "--trust-key", compiled.public_key).exit_code == 0
    test = np.load(compiled.data / "test.npz")
    windows, labels, kinds = test["window"], test["labels"], test["kinds"]
    fp32 = predictions(get_runtime("onnxruntime").load(compiled.data / "anomaly.onnx", {}), windows)
    with tempfile.TemporaryDirectory() as scratch:
        manifest = open_bundle(compiled.bundle, Path(scratch), trust_key=None)
        assert manifest.precision == "int8"
        session = get_runtime(manifest.runtime).load(Path(scratch) / manifest.entrypoint, manifest.target)
        int8 = predictions(session, windows)
    fp32_accuracy, int8_accuracy = float(np.mean(fp32 == labels)), float(np.mean(int8 == labels))
    print(f"held-out windows ({len(labels)}): fp32 {fp32_accuracy:.4f}, int8 {int8_accuracy:.4f} ({manifest.backend})")
    assert fp32_accuracy >= 0.97
    assert abs(fp32_accuracy - int8_accuracy) <= INT8_MARGIN
    healthy = kinds == "normal"
    assert np.mean(int8[healthy]) <= 0.01  # false alarms on healthy windows
    for fault in ("impulse", "shift", "clip"):
        assert np.mean(int8[kinds == fault]) >= 0.85, fault


@pytest.fixture
def sensor(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """(port, kinds): sensor.py on a pseudo-terminal; it streams once a reader opens the port."""
    truth = tmp_path / "truth.json"
    command = [sys.executable, str(EXAMPLE / "sensor.py"), "--pty", "--windows", str(WINDOWS),
               "--every", str(EVERY), "--truth", str(truth)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready, "sensor.py printed no port in 10 s"
        line = process.stdout.readline()
        assert line.startswith("serial port: "), line
        yield line.split(": ", 1)[1].strip(), json.loads(truth.read_text())["kinds"]
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_agent_reports_injected_faults_from_the_serial_sensor(
    compiled: Compiled, mosquitto, sensor, hub_signer, tmp_path
):
    port, kinds = sensor
    settings = AgentSettings(device_id="sensor-1", broker=mosquitto.url, data_dir=tmp_path / "agent",
                             trust_key=compiled.public_key, hub_key=hub_signer.public, bundle=compiled.bundle,
                             threads=1, telemetry_s=1.0,
                             source=f"serial:{port}?baud=115200&window=128",
                             backoff=Backoff(initial_s=0.2, max_s=1.0))  # fmt: skip
    with Subscriber(mosquitto.url, RESULTS) as sub:
        agent = Agent(settings)
        agent.start()
        try:
            sub.wait_count(WINDOWS, RESULTS, timeout=START_S + WINDOWS * WINDOW_S * 2)
        finally:
            agent.stop()
        results: list[Result] = sequenced(sub.messages(RESULTS), Result)
    assert len(results) == WINDOWS  # the port keeps every sample: one result per window, none dropped
    assert all(r.source == {"malformed": 0} and r.bundle.startswith("anomaly@") for r in results)
    flagged = [r.top[0].label == 1 for r in results]
    faults = [i for i, kind in enumerate(kinds) if kind != "normal"]
    healthy = [i for i, kind in enumerate(kinds) if kind == "normal"]
    missed = [i for i in faults if not flagged[i]]
    false_alarms = [i for i in healthy if flagged[i]]
    # Tolerance: every fault window is caught (this seed's faults score P(anomaly) >= 0.98, residual energy >= 2.7x
    # the threshold) and at most one of the 36 healthy windows is flagged (held-out false-alarm rate: 1 in 987).
    assert not missed and len(false_alarms) <= 1, (missed, false_alarms, [r.top for r in results])
    assert all(r.top[0].score > 0.9 for i, r in enumerate(results) if i in faults), [r.top for r in results]
    spacing = float(np.median(np.diff([r.frame_ts for r in results])))
    assert 0.8 * WINDOW_S < spacing < 1.2 * WINDOW_S  # windows arrive at the sensor's pace, not in a burst
