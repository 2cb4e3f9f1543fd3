"""What uploading captured samples costs telemetry (agents/capture.py, docs/datasets.md): a real hub with its embedded
Mosquitto and one in-process agent on a 640x480 noise video (each captured frame a ~0.9 MB PNG, 15 chunks). First
the agent runs without capture, then with a policy that captures every frame, so the uploader is busy throughout.
Telemetry latency is the time from the agent stamping a telemetry message to the hub storing it (one clock).

Printed: telemetry latency p50/p95 idle and during the upload, their ratio, and the upload's rate.

    python benchmarks/capture_bench.py [--seconds 15] [--telemetry-s 0.2]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
from agent_bench import build_bundle
from rich.console import Console
from rich.table import Table

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.compile.synthetic import small_cnn
from edgekit.hub.auth import create_token
from edgekit.hub.broker import free_port
from edgekit.hub.db import Dataset
from edgekit.hub.service import Hub, HubSettings
from edgekit.protocol import Topic
from edgekit.signing import generate_keypair

console = Console(stderr=True)
DEVICE = "bench-1"


def write_clip(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15, (640, 480))
    for seed in range(60):  # distinct frames: each is captured once, so the uploader stays busy through the phase
        writer.write(np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    writer.release()
    return path


class Latencies:
    """Telemetry latency as the hub stores each message, in the current phase's list."""

    def __init__(self) -> None:
        self.phase: list[float] = []

    def __call__(self, stored: list) -> None:
        now = time.time()
        self.phase.extend(now - m.ts for device, kind, m in stored if device == DEVICE and kind == Topic.TELEMETRY)

    def measure(self, seconds: float) -> list[float]:
        self.phase = []
        time.sleep(seconds)
        return self.phase


def stored_bytes(hub: Hub) -> int:
    with hub.sessions() as session:
        dataset = session.get(Dataset, "cnn")
        return dataset.stored_bytes if dataset else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="Length of each phase")
    parser.add_argument("--telemetry-s", type=float, default=0.2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capture-bench-"))
    key, public = generate_keypair(work)
    bundle = build_bundle(work, small_cnn(), "cnn", "1.0.0", key, (1, 3, 32, 32))
    hub = Hub(HubSettings(data_dir=work / "hub", broker_port=free_port(), http_port=free_port(), trust_key=public))
    hub.start()
    assert hub.wait_connected(15) and hub.wait_http(15), "the hub did not start"
    hub.registry.add(bundle, "bench")
    latencies = Latencies()
    hub.listeners.append(latencies)
    broker = hub.enroll([DEVICE])[0].broker_url()
    agent = Agent(AgentSettings(device_id=DEVICE, broker=broker, data_dir=work / "agent", trust_key=public,
                                hub_key=hub.trust.public_key_file, trust_version=hub.trust.root.version,
                                source=f"video:{write_clip(work / 'clip.avi')}", bundle=bundle,
                                telemetry_s=args.telemetry_s))  # fmt: skip
    agent.start()
    try:
        time.sleep(3)  # connected, first telemetry stored
        idle = latencies.measure(args.seconds)
        token = create_token(hub.sessions, "bench", "bench", "operate")
        policy = {"random_rate": 1.0, "max_per_day": 100_000, "max_bytes_per_day": 10 * 1024**3}
        answer = httpx.put(f"{hub.http_url}/api/devices/{DEVICE}/config", json={"capture": policy},
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
        answer.raise_for_status()
        time.sleep(2)
        before, started = stored_bytes(hub), time.monotonic()
        busy = latencies.measure(args.seconds)
        rate = (stored_bytes(hub) - before) / (time.monotonic() - started)
        capture = agent.capture.spool.stats()
    finally:
        agent.stop()
        hub.stop()
    table = Table("phase", "telemetry", "p50 ms", "p95 ms")
    for name, values in (("idle", idle), ("uploading", busy)):
        p95 = statistics.quantiles(values, n=20)[-1] * 1000
        table.add_row(name, str(len(values)), f"{statistics.median(values) * 1000:.1f}", f"{p95:.1f}")
    console.print(table)
    console.print(f"p50 ratio uploading/idle: {statistics.median(busy) / statistics.median(idle):.2f}; p95 ratio: "
                  f"{statistics.quantiles(busy, n=20)[-1] / statistics.quantiles(idle, n=20)[-1]:.2f}; upload "
                  f"{rate / 1024**2:.2f} MiB/s; spool: {capture.captured} captured, {capture.uploaded} uploaded, "
                  f"{capture.dropped} dropped (bound), {capture.spooled} waiting")  # fmt: skip


if __name__ == "__main__":
    main()
