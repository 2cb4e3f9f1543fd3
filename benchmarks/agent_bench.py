"""The device agent's overheads and fleet update speed, measured side by side in one run on loopback Mosquitto.

1. Inference overhead: the agent's inference p50 (inside the full agent: source thread, MQTT publishing of every
   result, SQLite outbox) ÷ the bare runtime's p50 on the same bundle and the same preprocessed input, in
   interleaved rounds. Target <= 1.05.
2. Agent RSS: `python -m edgekit agent` as its own process with the ONNX Runtime adapter, after it ran a while.
3. Fleet update: a ~20 MB bundle delivered (chunked over MQTT), verified, self-tested, switched and health-checked
   on 50 simulated devices in one process. Target <= 60 s.

    python benchmarks/agent_bench.py [--rounds 20] [--devices 50] [--megabytes 20] [--source-fps 30]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import paho.mqtt.client as mqtt
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.fleet import Fleet, FleetSettings
from edgekit.agents.runtimes import get_runtime
from edgekit.agents.sources import Frame, parse_source, to_feeds
from edgekit.bundle import open_bundle, sha256_file
from edgekit.compile.pipeline import CompileRequest, compile_model
from edgekit.compile.synthetic import mobilenet_v2, wide_mlp
from edgekit.hub.broker import MosquittoBroker
from edgekit.hub.transfer import BundleServer
from edgekit.profiles import load_profile
from edgekit.protocol import DesiredBundle, DesiredState, ReportedState, Result, Topic, device_topic, encode
from edgekit.signing import generate_keypair
from edgekit.trust import public_pem, sign_desired

console = Console(stderr=True)
BLOCK_S = 1.0  # short alternating blocks: this shared VM's speed drifts within seconds, so compare neighbours
PROFILE = "x86-64-avx2"  # the fp32 ONNX Runtime build is the same on any x86-64 host


class HubKey:
    """The hub's desired-state signing key, played by the benchmark; agents trust `public` (their --hub-key)."""

    def __init__(self, folder: Path) -> None:
        self.key = Ed25519PrivateKey.generate()
        folder.mkdir(parents=True, exist_ok=True)
        self.public = folder / "hub.pub"
        self.public.write_text(public_pem(self.key))

    def sign(self, desired: DesiredState, device_id: str) -> bytes:
        """The `config/desired` payload the hub publishes for `device_id`."""
        return encode(sign_desired(self.key, device_id, desired, ttl_s=3600.0))


def build_bundle(work: Path, model, name: str, version: str, key: Path, shape: tuple[int, ...]) -> Path:
    onnx.save(model, str(work / f"{name}.onnx"))
    np.savez(work / f"{name}-calib.npz", input=np.random.default_rng(0).random((8, *shape[1:]), dtype=np.float32))
    request = CompileRequest(
        model=work / f"{name}.onnx", profile=load_profile(PROFILE), out=work / f"{name}-{version}.ekb",
        backend="onnxruntime", precision="fp32", calibration=work / f"{name}-calib.npz", sign_key=key, name=name,
        version=version, bench_seconds=0.1, max_accuracy_drop=100.0, min_cosine=0.0,
    )  # fmt: skip
    compile_model(request)
    return request.out


def bare_runner(bundle: Path, work: Path) -> Callable[[], None]:
    """The runtime adapter alone on the same bundle and the same preprocessed synthetic frame as the agent."""
    root = work / "bare"
    manifest = open_bundle(bundle, root, None)
    session = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target)
    spec = manifest.inputs[0]
    image = np.random.default_rng(0).integers(0, 256, (spec.shape[2], spec.shape[3], 3), dtype=np.uint8)
    feeds = to_feeds(Frame(image, "image"), spec, manifest.preprocessing)
    return lambda: session.run(feeds)


def bare_p50(run: Callable[[], None], seconds: float) -> float:
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000


class ResultLatencies:
    """The latency the agent itself reports in every result (the time around its runtime call), read off MQTT."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.values: list[float] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.values.append(Result.model_validate_json(m.payload).latency_ms)
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(device_topic(device_id, Topic.RESULTS), qos=0)
        self.client.loop_start()

    def p50(self, seconds: float) -> float:
        """Median over `seconds`, counted from the first result after the agent's source (re)started."""
        deadline = time.monotonic() + 10
        self.values.clear()
        while not self.values:
            if time.monotonic() > deadline:
                raise RuntimeError("the agent sent no results within 10 s of its source starting")
            time.sleep(0.01)
        self.values.clear()
        time.sleep(seconds)
        if not self.values:
            raise RuntimeError("the agent sent no results")
        return statistics.median(self.values)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def inference_overhead(
    broker: MosquittoBroker, bundle: Path, public: Path, hub: HubKey, work: Path, rounds: int, source_fps: float
) -> dict:
    source_spec = f"synthetic:?fps={source_fps:g}"
    agent = Agent(AgentSettings(device_id="bench-agent", broker=broker.url, data_dir=work / "agent", trust_key=public,
                                hub_key=hub.public, bundle=bundle, source=source_spec, telemetry_s=1.0))  # fmt: skip
    agent.start()
    agent.link.wait_connected(10)
    results = ResultLatencies(broker, "bench-agent")
    source = parse_source(source_spec)
    run = bare_runner(bundle, work)
    bare_p50(run, 1.0)  # warm-up
    ratios, agent_ms, bare_ms = [], [], []
    try:
        for _ in range(rounds):
            agent.runner.use_source(None)
            time.sleep(0.2)
            bare = bare_p50(run, BLOCK_S)
            agent.runner.use_source(source)
            inside = results.p50(BLOCK_S)
            ratios.append(inside / bare)
            agent_ms.append(inside)
            bare_ms.append(bare)
    finally:
        results.close()
        agent.stop()
    return {"ratio": statistics.median(ratios), "agent_ms": statistics.median(agent_ms),
            "bare_ms": statistics.median(bare_ms), "ratios": ratios}  # fmt: skip


def agent_rss(broker: MosquittoBroker, bundle: Path, public: Path, hub: HubKey, work: Path, seconds: float) -> float:
    command = [sys.executable, "-m", "edgekit", "agent", "--broker", broker.url, "--device-id", "rss-agent",
               "--data", str(work / "rss-agent"), "--trust-key", str(public), "--hub-key", str(hub.public),
               "--bundle", str(bundle), "--source", "synthetic:?fps=30", "--telemetry-s", "1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
        if process.poll() is not None:
            raise RuntimeError(f"the agent exited with {process.returncode}")
        return psutil.Process(process.pid).memory_info().rss / 2**20
    finally:
        process.terminate()
        process.wait(timeout=20)


def fleet_update(
    broker: MosquittoBroker, old: Path, new: Path, public: Path, hub: HubKey, work: Path, devices: int
) -> dict:
    server_client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bundle-server")
    server = BundleServer(server_client, {sha256_file(new): new}.get, workers=4)
    server_client.on_connect = lambda *a: server.start()
    server_client.connect("127.0.0.1", broker.port)
    server_client.loop_start()
    fleet = Fleet(FleetSettings(devices, broker.url, work / "fleet", public, old, "synthetic:?fps=2", "bench", 5.0,
                                hub_key=hub.public))  # fmt: skip
    fleet.start()
    connected = fleet.wait_connected(60)
    healthy: set[str] = set()
    done = threading.Event()
    new_id = sha256_file(new)

    def on_reported(client, userdata, message) -> None:
        reported = ReportedState.model_validate_json(message.payload)
        if reported.bundle and reported.bundle.id == new_id and reported.update.state == "healthy":
            healthy.add(message.topic.split("/")[2])
            if len(healthy) == devices:
                done.set()

    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher.on_message = on_reported
    watcher.connect("127.0.0.1", broker.port)
    watcher.subscribe(f"edgekit/v1/+/{Topic.REPORTED}", qos=1)
    watcher.loop_start()
    desired = DesiredState(
        rev=1, health_checks=3,
        bundle=DesiredBundle(id=new_id, name="wide", version="2.0.0", size=new.stat().st_size),
    )  # fmt: skip
    # Signed for each device, as the hub does before it publishes.
    payloads = {agent.device_id: hub.sign(desired, agent.device_id) for agent in fleet.agents}
    started = time.perf_counter()
    for device_id, payload in payloads.items():
        watcher.publish(device_topic(device_id, Topic.DESIRED), payload, qos=1, retain=True)
    finished = done.wait(timeout=300)
    elapsed = time.perf_counter() - started
    fleet.stop()
    for client in (watcher, server_client):
        client.disconnect()
        client.loop_stop()
    server.stop()
    return {"seconds": elapsed, "healthy": len(healthy), "devices": devices, "connected": connected,
            "finished": finished, "bytes": new.stat().st_size, "chunks": server.chunks_sent}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--megabytes", type=float, default=20.0)
    # A camera's rate: the agent runs each frame as it comes, publishing every result, as on a device.
    parser.add_argument("--source-fps", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-agent-bench-") as scratch:
        work = Path(scratch)
        private, public = generate_keypair(work / "keys")
        hub = HubKey(work / "hub")
        console.print("building bundles (MobileNetV2-224 fp32, a small and a ~20 MB classifier) …")
        mobilenet = build_bundle(work, mobilenet_v2(), "mobilenet", "1.0.0", private, (1, 3, 224, 224))
        small = build_bundle(work, wide_mlp(0.05), "wide", "1.0.0", private, (1, 64))
        big = build_bundle(work, wide_mlp(args.megabytes), "wide", "2.0.0", private, (1, 64))
        with MosquittoBroker(work / "broker") as broker:
            console.print("1/3 inference overhead …")
            overhead = inference_overhead(broker, mobilenet, public, hub, work, args.rounds, args.source_fps)
            console.print("2/3 agent RSS …")
            rss = agent_rss(broker, mobilenet, public, hub, work, 15.0)
            console.print(f"3/3 fleet update: {args.devices} devices …")
            update = fleet_update(broker, small, big, public, hub, work, args.devices)
    report(overhead, rss, update, args.source_fps)


def report(overhead: dict, rss: float, update: dict, source_fps: float) -> None:
    table = Table(title="edgekit agent benchmark (loopback Mosquitto, one run)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(f"agent p50 ÷ bare runtime p50 (MobileNetV2-224 fp32, ORT; source {source_fps:g} fps)",
                  f"{overhead['ratio']:.3f}", "<= 1.05")  # fmt: skip
    table.add_row("  agent p50 / bare p50", f"{overhead['agent_ms']:.2f} ms / {overhead['bare_ms']:.2f} ms", "")
    table.add_row("  per-round ratios", " ".join(f"{r:.3f}" for r in overhead["ratios"]), "")
    table.add_row("agent RSS, ONNX Runtime adapter, MobileNetV2 loaded", f"{rss:.0f} MiB", "")
    table.add_row(
        f"deliver + activate {update['bytes'] / 2**20:.1f} MiB bundle to {update['devices']} devices",
        f"{update['seconds']:.1f} s" + ("" if update["finished"] else " (TIMED OUT)"),
        "<= 60 s",
    )
    table.add_row("  devices healthy on the new bundle", f"{update['healthy']}/{update['devices']}", "")
    table.add_row("  chunks served", str(update["chunks"]), "")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
