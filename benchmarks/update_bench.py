"""Delta updates against full downloads, measured side by side in one run on loopback Mosquitto.

Three realistic updates of one model name, each a pair of real signed int8 bundles built by `edgekit compile`
(MobileNetV2, 128x128, width 0.75, ONNX Runtime int8 for x86-64-avx2):
1. re-calibrated: the same weights quantized with another calibration set;
2. fine-tuned: the last convolution and the classifier's weights changed (as after fine-tuning the head), the
   same calibration set;
3. a new model: another network entirely (MobileNetV2 at width 1.0, other weights) under the same name.

For each: the bundle's bytes and the delta's (edgekit.delta, as the hub's DeltaCache makes it), the same zstd
without a base (what compression alone would save), the hub's time to make the delta (once per pair, then
cached), and the device's time to get the bundle with the agent's own ChunkFetcher over MQTT — the whole file,
and the delta from the old bundle applied and checked — interleaved `--rounds` times. A delta over half
the bundle is not served: the device then downloads it whole ("sent as" says so).

Then what delivery costs the hub: an `edgekit hub` process (its embedded Mosquitto a process of its own) sends
the re-calibrated bundle to `--devices` devices at once, over HTTP (its download links, the agent's HttpFetcher)
and over MQTT (chunks, the agent's ChunkFetcher), and the hub process's CPU time is read before and after each.

    python benchmarks/update_bench.py [--rounds 3] [--devices 20]

Measured here (2 shared cores, --rounds 5): bundles of 2.4 MB (3.3 MB for the new model); deltas 0.297 of the
bundle re-calibrated, 0.190 fine-tuned, 0.607 for the new model (so sent whole), against 0.83 for zstd without a
base; made by the hub in 0.26-0.47 s; on loopback the delta fetch took 0.55x the full one (0.047 s against
0.085 s): there the link is not the bottleneck, the bytes are what a slow link pays for. Of the re-calibrated
delta's 714 KB, 702 KB are the self-test vectors (their inputs come from the calibration set); the model file's
own delta is 11 KB.

Delivery, measured here (50 devices at once, the 2.4 MB re-calibrated bundle, 115 MiB in all): hub CPU 2.4 ms per
device per MiB over HTTP and 2.6 ms over MQTT, where Mosquitto spent another 1.1 ms per MiB (0 over HTTP); all 50
had the bundle after 1.4 s over HTTP and 4.2 s over MQTT (its chunks wait for the broker's PUBACKs). So HTTP's gain
is not the hub's CPU but the broker's, and that HTTP can be put behind any web cache or load balancer.
"""

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import paho.mqtt.client as mqtt
import psutil
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import sessionmaker

from edgekit.agents.http_fetch import HttpFetcher
from edgekit.agents.link import MqttLink
from edgekit.agents.store import Outbox
from edgekit.agents.transfer import Base, ChunkFetcher, Fetched, FetchFailed, FetchLimits
from edgekit.bundle import sha256_file
from edgekit.compile.pipeline import CompileRequest, compile_model
from edgekit.compile.synthetic import mobilenet_v2
from edgekit.delta import encode_delta
from edgekit.enrollment import Enrollment
from edgekit.hub.auth import create_token, hub_secret
from edgekit.hub.broker import MosquittoBroker, free_port
from edgekit.hub.db import database_url, open_database
from edgekit.hub.downloads import DownloadLinks
from edgekit.hub.transfer import BundleServer, DeltaCache
from edgekit.mqtt import parse_broker_url
from edgekit.profiles import load_profile
from edgekit.protocol import BundleRef, DesiredBundle, Status, Topic, device_topic, encode
from edgekit.signing import generate_keypair

console = Console(stderr=True)
PROFILE = "x86-64-avx2"
NAME = "camera"
RESOLUTION = 128
TUNED_LAYERS = 3  # the last initializers of the graph: the head a fine-tune on a new data set changes


def calibration(path: Path, seed: int) -> Path:
    images = np.random.default_rng(seed).random((16, 3, RESOLUTION, RESOLUTION), dtype=np.float32)
    np.savez(path, input=images)
    return path


def fine_tuned(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """`model` with its last TUNED_LAYERS weight tensors moved by a few percent, the rest bit for bit the same."""
    tuned = onnx.ModelProto()
    tuned.CopyFrom(model)
    rng = np.random.default_rng(seed)
    weights = [t for t in tuned.graph.initializer if len(t.dims) > 1][-TUNED_LAYERS:]
    for tensor in weights:
        array = numpy_helper.to_array(tensor)
        moved = array * (1 + 0.05 * rng.standard_normal(array.shape)).astype(array.dtype)
        tensor.CopyFrom(numpy_helper.from_array(moved, tensor.name))
    return tuned


def build(work: Path, model: onnx.ModelProto, calib: Path, version: str, key: Path) -> Path:
    source = work / f"{NAME}-{version}.onnx"
    onnx.save(model, str(source))
    request = CompileRequest(
        model=source, profile=load_profile(PROFILE), out=work / f"{NAME}-{version}.ekb", backend="onnxruntime",
        precision="int8", calibration=calib, sign_key=key, name=NAME, version=version, bench_seconds=0.05,
        max_accuracy_drop=100.0, min_cosine=0.0,
    )  # fmt: skip
    compile_model(request)
    return request.out


def updates(work: Path) -> dict[str, tuple[Path, Path]]:
    """(old, new) bundle pairs by the update's name."""
    key, _ = generate_keypair(work / "keys")
    base_model = mobilenet_v2(resolution=RESOLUTION, width=0.75, classes=100, seed=1)
    calib_a, calib_b = calibration(work / "calib-a.npz", 1), calibration(work / "calib-b.npz", 2)
    console.print("compiling 4 int8 bundles …")
    old = build(work, base_model, calib_a, "1.0.0", key)
    recalibrated = build(work, base_model, calib_b, "1.0.1", key)
    tuned = build(work, fine_tuned(base_model, 3), calib_a, "1.1.0", key)
    other = build(work, mobilenet_v2(resolution=RESOLUTION, width=1.0, classes=100, seed=2), calib_a, "2.0.0", key)
    return {"re-calibrated int8": (old, recalibrated), "fine-tuned head": (old, tuned), "new model": (old, other)}


class Device:
    """The agent's link and ChunkFetcher on their own, talking to the broker at `url` (a BundleServer answers)."""

    def __init__(self, url: str, work: Path, device_id: str = "bench-1") -> None:
        will = (device_topic(device_id, Topic.STATUS), encode(Status(state="offline")))
        self.link = MqttLink(parse_broker_url(url), client_id=device_id, will=will)
        self.folder = work / "downloads"
        self.fetcher = ChunkFetcher(self.link, device_id, self.folder, lambda *rejected: None)
        self.link.start(Outbox(work / "outbox.sqlite"), lambda: None)
        if not self.link.wait_connected(30):
            raise RuntimeError("the device link did not connect")

    def fetch(self, new: Path, base: Base | None) -> tuple[float, int, str]:
        """(seconds, bytes received, how) to get `new` with the agent's fetcher."""
        ref = BundleRef(id=sha256_file(new), name=NAME, version="x", size=new.stat().st_size)
        limits = FetchLimits(attempt=1, deadline_s=600, retries=30)
        start = time.perf_counter()
        fetched = self.fetcher.fetch(ref, lambda *a, **k: None, threading.Event(), limits, base)
        seconds = time.perf_counter() - start
        if fetched.path.read_bytes() != new.read_bytes():
            raise RuntimeError(f"{fetched.via} fetch of {new.name} is not the bundle")
        fetched.path.unlink()
        return seconds, fetched.received, fetched.via


def serve(broker: MosquittoBroker, files: dict[str, Path], deltas: Path) -> tuple[BundleServer, mqtt.Client]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bundle-server")
    server = BundleServer(client, files.get, workers=2, deltas=DeltaCache(files.get, deltas))
    client.on_connect = lambda *a: server.start()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return server, client


def measure(pairs: dict[str, tuple[Path, Path]], broker: MosquittoBroker, work: Path, rounds: int) -> list[dict]:
    files = {sha256_file(path): path for pair in pairs.values() for path in pair}
    server, client = serve(broker, files, work / "deltas")
    device = Device(broker.url, work)
    rows = []
    try:
        for label, (old, new) in pairs.items():
            start = time.perf_counter()
            delta = encode_delta(old.read_bytes(), new.read_bytes())
            encode_s = time.perf_counter() - start
            alone = encode_delta(b"", new.read_bytes())  # the same zstd without a base: what compression alone saves
            base = Base(hashlib.sha256(old.read_bytes()).hexdigest(), old.read_bytes())
            device.fetch(new, base)  # the hub makes and caches the delta; not counted
            full_s, delta_s = [], []
            for _ in range(rounds):
                full_s.append(device.fetch(new, None)[0])
                seconds, received, via = device.fetch(new, base)
                delta_s.append(seconds)
            rows.append({"update": label, "full": new.stat().st_size, "delta": len(delta), "alone": len(alone),
                         "received": received, "via": via, "encode_s": encode_s, "full_s": statistics.median(full_s),
                         "delta_s": statistics.median(delta_s)})  # fmt: skip
    finally:
        device.link.stop()
        server.stop()
        client.disconnect()
        client.loop_stop()
    return rows


class Failing:
    """The HTTP fetcher's fallback here: the HTTP figures must be HTTP's alone."""

    def fetch(self, *args, **kwargs) -> Fetched:
        raise FetchFailed("the HTTP download failed (no MQTT fallback in this benchmark)")


@contextmanager
def hub_process(work: Path, public_key: Path) -> Iterator[tuple[subprocess.Popen, httpx.Client, sessionmaker]]:
    """`edgekit hub` on loopback with an admin token made beforehand; (process, API client, its database)."""
    data = work / "hub"
    data.mkdir(mode=0o700, parents=True)
    _, sessions = open_database(database_url(None, data))
    token = create_token(sessions, "bench", "bench", scope="admin")
    port = free_port()
    command = [sys.executable, "-m", "edgekit", "hub", "--data", str(data), "--http", f"127.0.0.1:{port}",
               "--trust-key", str(public_key)]  # fmt: skip
    with open(work / "hub.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    try:
        deadline = time.monotonic() + 60
        while not _answers(api):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not start: {(work / 'hub.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield process, api, sessions
    finally:
        api.close()
        process.terminate()
        process.wait(60)


def _answers(api: httpx.Client) -> bool:
    try:
        return api.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def delivery(bundle: Path, public_key: Path, work: Path, count: int) -> list[dict]:
    """Hub CPU to send `bundle` to `count` devices at once, over HTTP and over MQTT."""
    with hub_process(work, public_key) as (process, api, sessions):
        ref = _push(api, bundle)
        logins = {f"bench-{n}": _enroll(api, f"bench-{n}") for n in range(count)}
        links = DownloadLinks(hub_secret(sessions, work / "hub"), [str(api.base_url)])
        fetchers = {
            "HTTP": {device: (HttpFetcher(Failing(), work / device / "http"),
                              DesiredBundle(**ref.model_dump(), urls=links.urls(ref.id, device, time.time() + 3600)))
                     for device in logins},
            "MQTT": {device: (Device(enrollment.broker_url(), work / device, device), ref)
                     for device, enrollment in logins.items()},
        }  # fmt: skip
        hub = psutil.Process(process.pid)
        (broker,) = hub.children()  # the embedded Mosquitto
        rows = []
        for transport, devices in fetchers.items():
            before = _cpu_s(hub), _cpu_s(broker)
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=count) as pool:
                done = list(pool.map(lambda item: _fetch(*item, bundle), devices.values()))
            rows.append({"transport": transport, "devices": count, "seconds": time.perf_counter() - start,
                         "hub_cpu_s": _cpu_s(hub) - before[0], "broker_cpu_s": _cpu_s(broker) - before[1],
                         "mib": count * bundle.stat().st_size / 2**20, "ok": sum(done)})  # fmt: skip
        for fetcher, _ in fetchers["MQTT"].values():
            fetcher.link.stop()
    return rows


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _push(api: httpx.Client, bundle: Path) -> BundleRef:
    pushed = api.post("/api/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    pushed.raise_for_status()
    return BundleRef(id=pushed.json()["id"], name=NAME, version="x", size=bundle.stat().st_size)


def _enroll(api: httpx.Client, device_id: str) -> Enrollment:
    answer = api.post("/api/enrollments", json={"device_id": device_id})
    answer.raise_for_status()
    return Enrollment.model_validate(answer.json())


def _fetch(fetcher, target: BundleRef, bundle: Path) -> bool:
    """One device gets the bundle (whole); whether the bytes are the bundle's."""
    limits = FetchLimits(attempt=1, deadline_s=600, retries=30)
    fetcher = getattr(fetcher, "fetcher", fetcher)  # a Device: its ChunkFetcher
    fetched = fetcher.fetch(target, lambda *a, **k: None, threading.Event(), limits, None)
    same = fetched.path.read_bytes() == bundle.read_bytes()
    fetched.path.unlink()
    return same


def report_delivery(rows: list[dict]) -> None:
    table = Table(title="Hub CPU to deliver a bundle: HTTP download links vs MQTT chunks (edgekit hub process)")
    for column in ("transport", "devices at once", "MiB sent", "wall", "hub CPU", "hub CPU per device per MiB",
                   "broker CPU per device per MiB", "bundles intact"):  # fmt: skip
        table.add_column(column, justify="left" if column == "transport" else "right")
    for row in rows:
        table.add_row(row["transport"], str(row["devices"]), f"{row['mib']:.1f}", f"{row['seconds']:.2f} s",
                      f"{row['hub_cpu_s']:.2f} s", f"{1000 * row['hub_cpu_s'] / row['mib']:.2f} ms",
                      f"{1000 * row['broker_cpu_s'] / row['mib']:.2f} ms", f"{row['ok']}/{row['devices']}")  # fmt: skip
    http, mqtt_row = rows
    Console(width=200).print(table)
    console.print(f"MQTT / HTTP hub CPU per MiB: {mqtt_row['hub_cpu_s'] / http['hub_cpu_s']:.1f}x")


def report(rows: list[dict]) -> None:
    table = Table(title="Bundle update: whole file vs delta over MQTT (loopback Mosquitto, median of rounds)")
    for column in ("update", "bundle bytes", "delta bytes", "delta/full", "zstd alone/full", "sent as",
                   "hub: make delta", "device: full", "device: delta", "time delta/full"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("update", "sent as") else "right")
    for row in rows:
        table.add_row(
            row["update"], f"{row['full']:,}", f"{row['delta']:,}", f"{row['delta'] / row['full']:.3f}",
            f"{row['alone'] / row['full']:.3f}", row["via"],
            f"{row['encode_s']:.2f} s", f"{row['full_s']:.3f} s", f"{row['delta_s']:.3f} s",
            f"{row['delta_s'] / row['full_s']:.2f}",
        )  # fmt: skip
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=20, help="devices fetching at once in the delivery part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgekit-update-bench-") as scratch:
        work = Path(scratch)
        pairs = updates(work)
        with MosquittoBroker(work / "broker") as broker:
            report(measure(pairs, broker, work, args.rounds))
        public_key = next((work / "keys").glob("*.pub"))
        report_delivery(delivery(pairs["re-calibrated int8"][1], public_key, work / "delivery", args.devices))


if __name__ == "__main__":
    main()
