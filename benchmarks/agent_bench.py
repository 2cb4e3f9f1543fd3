"""The device agent's overheads and fleet update speed, measured side by side in one run on loopback Mosquitto.

1. Inference overhead (target: agent p50 <= 1.05x bare): the agent's inference p50 (inside the full agent: source
   thread, every result published over MQTT through the SQLite outbox, telemetry) and ONNX Runtime's own p50 (an
   InferenceSession with its defaults, no edgekit) on the same model and the same preprocessed input, in rounds of
   neighbouring 1 s blocks in alternating order. The ratio that counts is against the bare runtime run at the
   source's frame rate, the same case: at 30 fps a model that takes less than 33 ms idles between frames in any
   program, and a loop that never idles keeps its threads spinning and its caches warm (and on a busy machine it
   is the one the scheduler slows down). The back-to-back ratio is printed too. The agent's latencies are the ones
   it puts in its results, tapped from its statistics, so no subscriber shares its process.
2. Agent RSS (target: <= 100 MiB): `python -m edgekit agent` with the ONNX Runtime adapter running MobileNetV2, and
   beside it a bare ONNX Runtime process (Python, NumPy, onnxruntime, the same model at the same rate), sampled
   alternately once both settled.
3. Fleet update: a ~20 MB bundle delivered (chunked over MQTT), verified, self-tested, switched and health-checked
   on 50 simulated devices in one process. Target <= 60 s.

    python benchmarks/agent_bench.py [--rounds 20] [--devices 50] [--megabytes 20] [--source-fps 30] [--no-fleet]
"""

import argparse
import os
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
from rich.markup import escape
from rich.table import Table

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.fleet import Fleet, FleetSettings
from edgekit.agents.sources import Frame, Pacer, SourceConfig, parse_source, to_feeds
from edgekit.agents.stats import InferenceStats
from edgekit.bundle import open_bundle, sha256_file
from edgekit.compile.pipeline import CompileRequest, compile_model
from edgekit.compile.synthetic import mobilenet_v2, wide_mlp
from edgekit.hub.broker import MosquittoBroker
from edgekit.hub.transfer import BundleServer
from edgekit.profiles import load_profile
from edgekit.protocol import DesiredBundle, DesiredState, ReportedState, Topic, device_topic, encode
from edgekit.signing import generate_keypair
from edgekit.trust import public_pem, sign_desired

console = Console(stderr=True)
BLOCK_S = 1.0  # short alternating blocks: this shared VM's speed drifts within seconds, so compare neighbours
SETTLE_S = 0.3
PROFILE = "x86-64-avx2"  # the fp32 ONNX Runtime build is the same on any x86-64 host
TARGET_RATIO = 1.05
TARGET_RSS_MIB = 100.0
STARTUP_TIMEOUT_S = 120.0  # a loaded 2-core machine takes a while to import and load
RSS_SETTLE_S = 5.0  # after both ran their first inference
RSS_SAMPLES = 10
RSS_INTERVAL_S = 0.5
# The bare process of the RSS comparison: what running the model takes without edgekit.
BARE_PROCESS = """
import sys, time
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = {session.get_inputs()[0].name: np.random.default_rng(0).random([int(n) for n in sys.argv[2].split(",")],
                                                                        dtype=np.float32)}
period = 1 / float(sys.argv[3])
session.run(None, feeds)
print("running", flush=True)
while True:
    session.run(None, feeds)
    time.sleep(period)
"""


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


class LatencyTap(InferenceStats):
    """The agent's own inference statistics, which also keep every latency for the benchmark: the very numbers it
    puts in each result, read without a subscriber in the agent's process (on a device the hub reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []

    def record(self, latency_s: float) -> None:
        super().record(latency_s)
        self.latencies.append(latency_s)


class ThreadCpu:
    """CPU seconds of the agent's Python threads other than `inference` (link, outbox drain, source, telemetry):
    the work that competes with the runtime's threads for the cores."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> dict[int, float]:
        skip = {"MainThread", "inference"}
        ids = [t.native_id for t in threading.enumerate() if t.name not in skip and t.native_id is not None]
        return {tid: seconds for tid in ids if (seconds := _thread_cpu_s(tid)) is not None}

    def elapsed_s(self) -> float:
        now = self._sample()
        return sum(seconds - self._start.get(tid, 0.0) for tid, seconds in now.items())


def _thread_cpu_s(tid: int) -> float | None:
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # the thread ended, or no /proc
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_session(model: Path) -> Callable[[dict[str, np.ndarray]], None]:
    """ONNX Runtime as a user would run it without edgekit: an InferenceSession with its default options."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def bare_p50(run: Callable[[], None], seconds: float, fps: float | None) -> float:
    """p50 ms of `run` for `seconds`: at `fps` as the agent's source delivers frames, or back to back (None)."""
    pacer = Pacer(fps) if fps else None
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if pacer is not None and not pacer.wait(timeout=1.0):
            continue
        started = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - started)
    return statistics.median(latencies) * 1000


def agent_p50(agent: Agent, tap: LatencyTap, source: SourceConfig, seconds: float) -> tuple[float, int, float]:
    """(p50 ms, inferences, CPU ms of the agent's other threads per inference) with the source on for `seconds`."""
    agent.runner.use_source(source)
    time.sleep(SETTLE_S)  # the source thread starting and the first frames are not what a running agent does
    tap.latencies.clear()
    others = ThreadCpu()
    time.sleep(seconds)
    latencies, cpu_s = list(tap.latencies), others.elapsed_s()
    agent.runner.use_source(None)
    if not latencies:
        raise RuntimeError("the agent ran no inference")
    return statistics.median(latencies) * 1000, len(latencies), cpu_s * 1000 / len(latencies)


def inference_overhead(
    broker: MosquittoBroker, bundle: Path, public: Path, hub: HubKey, work: Path, rounds: int, source_fps: float
) -> dict:
    """Rounds of three neighbouring blocks, in alternating order: the agent, the bare runtime at the source's frame
    rate (the same case: the same frames at the same rate), and the bare runtime back to back."""
    source_spec = f"synthetic:?fps={source_fps:g}"
    agent = Agent(AgentSettings(device_id="bench-agent", broker=broker.url, data_dir=work / "agent", trust_key=public,
                                hub_key=hub.public, bundle=bundle, source=source_spec, telemetry_s=1.0))  # fmt: skip
    tap = agent.runner.stats = LatencyTap()
    agent.start()
    agent.link.wait_connected(10)
    model = agent.runner.model
    if model is None:
        raise RuntimeError("the agent did not activate the bundle")
    manifest, source = model.bundle.manifest, parse_source(source_spec)
    spec = manifest.inputs[0]
    image = np.random.default_rng(0).integers(0, 256, (spec.shape[2], spec.shape[3], 3), dtype=np.uint8)
    feeds = to_feeds(Frame(image, "image"), spec, manifest.preprocessing)
    session = bare_session(model.bundle.root / manifest.entrypoint)
    run = lambda: session(feeds)  # noqa: E731
    blocks: dict[str, Callable[[], float]] = {
        "paced": lambda: bare_p50(run, BLOCK_S, source_fps),
        "back_to_back": lambda: bare_p50(run, BLOCK_S, None),
    }
    rows: list[dict[str, float]] = []
    try:
        agent.runner.use_source(None)
        bare_p50(run, 1.0, None)  # warm-up
        for index in range(rounds):
            row: dict[str, float] = {}
            order = ["agent", "paced", "back_to_back"]
            for name in order if index % 2 == 0 else order[::-1]:
                if name == "agent":
                    row["agent"], row["inferences"], row["others_ms"] = agent_p50(agent, tap, source, BLOCK_S)
                else:
                    row[name] = blocks[name]()
            rows.append(row)
    finally:
        agent.stop()
    return {"rows": rows, "source_fps": source_fps}


def rss_side_by_side(
    broker: MosquittoBroker, bundle: Path, public: Path, hub: HubKey, work: Path, source_fps: float
) -> dict[str, list[float]]:
    """RSS of `python -m edgekit agent` and of a bare ONNX Runtime process running the same model at the same rate,
    sampled alternately once both run and settled."""
    root = work / "rss-bare"
    manifest = open_bundle(bundle, root, None)
    shape = ",".join(str(n) for n in manifest.inputs[0].shape)
    agent_command = [sys.executable, "-m", "edgekit", "agent", "--broker", broker.url, "--device-id", "rss-agent",
                     "--data", str(work / "rss-agent"), "--trust-key", str(public), "--hub-key", str(hub.public),
                     "--bundle", str(bundle), "--source", f"synthetic:?fps={source_fps:g}",
                     "--telemetry-s", "1"]  # fmt: skip
    bare_command = [sys.executable, "-c", BARE_PROCESS, str(root / manifest.entrypoint), shape, f"{source_fps:g}"]
    with FirstResult(broker, "rss-agent") as first_result:
        agent = subprocess.Popen(agent_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare = subprocess.Popen(bare_command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        processes = {"agent": agent, "bare": bare}
        try:
            first_result.wait(STARTUP_TIMEOUT_S)
            if bare.stdout is None or bare.stdout.readline().strip() != "running":
                raise RuntimeError(f"the bare process exited with {bare.wait()}")
            time.sleep(RSS_SETTLE_S)
            return _sample_rss(processes)
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=20)


class FirstResult:
    """Waits for a device's first result on the broker: its model is loaded and running."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self._got = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self._client.on_message = lambda *_: self._got.set()
        self._client.connect("127.0.0.1", broker.port)
        self._client.subscribe(device_topic(device_id, Topic.RESULTS), qos=0)
        self._client.loop_start()

    def wait(self, timeout: float) -> None:
        if not self._got.wait(timeout):
            raise RuntimeError(f"no result from the agent within {timeout:g} s")

    def __enter__(self) -> "FirstResult":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _sample_rss(processes: dict[str, subprocess.Popen]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in processes}
    for _ in range(RSS_SAMPLES):
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"the {name} process exited with {process.returncode}")
            samples[name].append(psutil.Process(process.pid).memory_info().rss / 2**20)
        time.sleep(RSS_INTERVAL_S)
    return samples


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
    parser.add_argument("--no-fleet", action="store_true", help="Skip the fleet update (parts 1 and 2 only).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-agent-bench-") as scratch:
        work = Path(scratch)
        private, public = generate_keypair(work / "keys")
        hub = HubKey(work / "hub")
        console.print("building the MobileNetV2-224 fp32 bundle …")
        mobilenet = build_bundle(work, mobilenet_v2(), "mobilenet", "1.0.0", private, (1, 3, 224, 224))
        with MosquittoBroker(work / "broker") as broker:
            console.print("1/3 inference overhead …")
            overhead = inference_overhead(broker, mobilenet, public, hub, work, args.rounds, args.source_fps)
            console.print("2/3 agent RSS …")
            rss = rss_side_by_side(broker, mobilenet, public, hub, work, args.source_fps)
            update = None
            if not args.no_fleet:
                console.print(f"3/3 fleet update: {args.devices} devices (building a small and a ~20 MB classifier) …")
                small = build_bundle(work, wide_mlp(0.05), "wide", "1.0.0", private, (1, 64))
                big = build_bundle(work, wide_mlp(args.megabytes), "wide", "2.0.0", private, (1, 64))
                update = fleet_update(broker, small, big, public, hub, work, args.devices)
    report(overhead, rss, update)


def _spread(values: list[float], digits: int) -> str:
    """median [min–max] (interquartile range)"""
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return escape(f"{median:.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}] "
                  f"(IQR {q1:.{digits}f}–{q3:.{digits}f})")  # fmt: skip


def report(overhead: dict, rss: dict[str, list[float]], update: dict | None) -> None:
    rows, fps = overhead["rows"], overhead["source_fps"]
    paced = [row["agent"] / row["paced"] for row in rows]
    back_to_back = [row["agent"] / row["back_to_back"] for row in rows]
    ratio, rss_mib = statistics.median(paced), statistics.median(rss["agent"])
    table = Table(title="edgekit agent benchmark (loopback Mosquitto, one run)")
    table.add_column("measure")
    table.add_column(escape("median [min–max] (IQR)"), justify="right")
    table.add_column("target", justify="right")
    case = f"MobileNetV2-224 fp32, ORT, source {fps:g} fps, {len(rows)} rounds"
    table.add_row(f"agent p50 ÷ bare ORT p50 at the same frame rate ({case})", _spread(paced, 3),
                  f"<= {TARGET_RATIO} {'MET' if ratio <= TARGET_RATIO else 'MISSED'}")  # fmt: skip
    table.add_row("  agent p50 ÷ bare ORT p50 back to back", _spread(back_to_back, 3), "")
    for name, label in (("agent", "agent"), ("paced", "bare, paced"), ("back_to_back", "bare, back to back")):
        table.add_row(f"  {label} p50 ms", _spread([row[name] for row in rows], 2), "")
    table.add_row("  agent inferences per block", _spread([row["inferences"] for row in rows], 0), "")
    table.add_row("  CPU ms of the agent's other threads per inference", _spread([r["others_ms"] for r in rows], 2), "")
    table.add_row("  per-round ratios (paced)", " ".join(f"{r:.3f}" for r in paced), "")
    table.add_row("agent RSS MiB (python -m edgekit agent, ORT, MobileNetV2 running)", _spread(rss["agent"], 1),
                  f"<= {TARGET_RSS_MIB:g} {'MET' if rss_mib <= TARGET_RSS_MIB else 'MISSED'}")  # fmt: skip
    table.add_row("  bare ORT process RSS MiB (Python, NumPy, onnxruntime, same model)", _spread(rss["bare"], 1), "")
    if update is not None:
        table.add_row(
            f"deliver + activate {update['bytes'] / 2**20:.1f} MiB bundle to {update['devices']} devices",
            f"{update['seconds']:.1f} s" + ("" if update["finished"] else " (TIMED OUT)"),
            "<= 60 s",
        )
        table.add_row("  devices healthy on the new bundle", f"{update['healthy']}/{update['devices']}", "")
        table.add_row("  chunks served", str(update["chunks"]), "")
    Console(width=140).print(table)
    print(
        f"TARGET p50 ratio agent/bare (paced, median of {len(rows)} rounds): {ratio:.3f} <= {TARGET_RATIO}: "
        f"{'met' if ratio <= TARGET_RATIO else 'missed'} (back to back: {statistics.median(back_to_back):.3f})"
    )
    print(
        f"TARGET agent RSS (median of {len(rss['agent'])} samples): {rss_mib:.1f} MiB <= {TARGET_RSS_MIB:g} MiB: "
        f"{'met' if rss_mib <= TARGET_RSS_MIB else 'missed'} (bare ORT process: {statistics.median(rss['bare']):.1f})"
    )


if __name__ == "__main__":
    main()
