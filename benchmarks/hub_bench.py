"""The hub's ingest throughput against a bare MQTT subscriber, and the dashboard's fleet page load time, in one run
on loopback Mosquitto.

1. Ingest: K publisher processes (QoS 1, each with a window of unacknowledged messages) send valid telemetry
   payloads (encoded by `edgekit.protocol`) from many device ids, as fast as the broker takes them. They speak
   MQTT 3.1.1 over a plain socket, PUBLISHes written and PUBACKs read a window at a time: devices publish from
   other machines, and a load generator that spent as much CPU per message as paho does (more than the hub) would
   leave the consumers under test the smaller share of this machine's cores.
   a. for --seconds to a bare paho subscriber in its own process, which only counts what arrives;
   b. then exactly as many messages per publisher, again as fast as they can, to a real `Hub` (its MQTT client,
      ingest and SQLite), until every one is stored.
   The two phases run one after the other with identical load on fresh brokers, not side by side: on a machine
   with few cores two consumers running at once would take CPU from each other and from the publishers, and the
   ratio would measure the scheduler. Each rate is messages ÷ (last one received or stored − the publishers' start),
   so a consumer that falls behind is charged for draining its backlog. The broker queues without limit, so nothing
   is dropped for a slow consumer; "zero loss" is checked by counting the rows at the end.
   Targets: stored/s ÷ bare received/s >= 0.8, and >= 15,000 stored msg/s on SQLite.
   c. For the record, what `Ingest` validates and stores per second fed in-process with no MQTT at all: the hub's
      ceiling if receiving were free (what its MQTT client, `edgekit.hub.link.BulkClient`, costs is the rest).
2. Dashboard: `dashboard_load_time(hub, token, devices)` (below) on the same hub, which then knows `--devices`
   devices.

    python benchmarks/hub_bench.py [--seconds 5] [--publishers 2] [--devices 1000] [--db postgresql://…]
"""

import argparse
import logging
import multiprocessing as mp
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from edgekit.hub.broker import MosquittoBroker, free_port
from edgekit.protocol import Telemetry, Topic, decode, device_topic, encode

console = Console(stderr=True)
WINDOW = 1000  # unacknowledged QoS 1 messages per publisher (our own flow control)
WRITE_RUN = 100  # PUBLISHes a publisher writes at once
TARGET_RATIO = 0.8  # hub stored msg/s ÷ bare subscriber msg/s
TARGET_RATE = 15_000  # hub stored msg/s
DRAIN_IDLE_S = 20.0  # a consumer that makes no progress for this long has lost messages
TOPIC_FILTER = f"edgekit/v1/+/{Topic.TELEMETRY}"


class BenchBroker(MosquittoBroker):
    """Mosquitto that queues without limit for a slow subscriber, so a consumer's speed, not the broker's queue
    bound, decides whether messages are lost; no persistence, which would only add disk writes."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, persistence=False)

    def config(self) -> str:
        lines = [line for line in super().config().splitlines() if not line.startswith("max_queued_messages")]
        return "\n".join([*lines, "max_queued_messages 0", "max_queued_bytes 0"]) + "\n"


def device_names(count: int) -> list[str]:
    return [f"bench-{index:05d}" for index in range(count)]


def telemetry(index: int, seq: int, ts: float) -> Telemetry:
    return Telemetry(seq=seq, ts=ts, latency_p50_ms=3.0 + index % 7, latency_p95_ms=9.5, fps=30.0,
                     inferences=30 * index, cpu_percent=41.5, memory_mb=120.0, temperature_c=55.0 + index % 5,
                     bundle="digits@1.0.0")  # fmt: skip


def payload_template(index: int) -> bytes:
    """Device `index`'s telemetry as `encode` writes it, with `%d` for its seq and `%.6f` for its time: a message
    then costs one formatting, not a model and its encoding. Checked to decode to the model it stands for."""
    seq, ts = 987_654_321, 1_234_567_890.25
    encoded = encode(telemetry(index, seq, ts)).replace(b"%", b"%%")
    template = encoded.replace(b'"seq":%d' % seq, b'"seq":%d', 1).replace(b'"ts":%r' % ts, b'"ts":%.6f', 1)
    if decode(Telemetry, template % (7, 1.5)) != telemetry(index, 7, 1.5):
        raise RuntimeError(f"the telemetry template does not stand for the model: {template!r}")
    return template


def telemetry_stream(devices: list[str]) -> Iterator[tuple[str, bytes]]:
    """(topic, payload) round-robin over `devices`, each device's seq counting up from 1, endlessly."""
    topics = [device_topic(device, Topic.TELEMETRY) for device in devices]
    templates = [payload_template(index) for index in range(len(devices))]
    seq = 0
    while True:
        seq += 1
        for topic, template in zip(topics, templates, strict=True):
            yield topic, template % (seq, time.time())


def connect(url: str, client_id: str) -> mqtt.Client:
    """A paho MQTT 5 client, connected, its network loop in a thread."""
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{client_id} could not connect to {url}")
    return client


def remaining_length(length: int) -> bytes:
    """MQTT's variable-length encoding of a packet's remaining length."""
    encoded = bytearray()
    while True:
        length, digit = length >> 7, length & 0x7F
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, keepalive 60 s (a publisher writes far more often than that)."""
    body = mqtt_string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + mqtt_string(client_id)
    return bytes([0x10]) + remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, mid: int) -> bytes:
    """MQTT 3.1.1 PUBLISH at QoS 1; `topic` already length-prefixed."""
    return b"\x32" + remaining_length(len(topic) + 2 + len(payload)) + topic + mid.to_bytes(2, "big") + payload


class RawPublisher:
    """A QoS 1 publisher on a plain socket: PUBLISHes written WRITE_RUN at a time, at most WINDOW unacknowledged;
    the broker answers a publisher only with PUBACKs (4 bytes each, in order), which it counts."""

    def __init__(self, url: str, client_id: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.settimeout(None)  # blocking: a read that must not wait says so (MSG_DONTWAIT)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"{client_id}: the broker refused the connection: {connack!r}")
        self.sent = self.acked = 0
        self._unread = b""

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise RuntimeError("the broker closed the connection")
            data += chunk
        return data

    def send(self, messages: Iterator[tuple[bytes, bytes]], count: int) -> None:
        """Write `count` PUBLISHes (fewer if WINDOW is full), then read the PUBACKs that came."""
        run = []
        for _ in range(min(count, WINDOW - (self.sent - self.acked))):
            topic, payload = next(messages)
            self.sent += 1
            run.append(publish_packet(topic, payload, self.sent % 65_535 + 1))
        if run:
            self.sock.sendall(b"".join(run))
        self.read_acks(wait=self.sent - self.acked >= WINDOW)

    def read_acks(self, wait: bool) -> None:
        """Count the PUBACKs that came; `wait`: block until at least one does."""
        try:
            received = self.sock.recv(65_536, 0 if wait else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not received:
            raise RuntimeError("the broker closed the connection")
        data = self._unread + received
        whole = len(data) - len(data) % 4
        if data[0:whole:4] != b"\x40" * (whole // 4):
            raise RuntimeError(f"expected only PUBACKs from the broker, got {data[:16]!r}")
        self.acked += whole // 4
        self._unread = data[whole:]

    def close(self) -> None:
        while self.acked < self.sent:
            self.read_acks(wait=True)
        self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def publisher(url: str, index: int, devices: list[str], seconds: float, count: int | None, go, ready, results) -> None:
    """One publishing process: for `seconds`, or exactly `count` messages, as fast as the broker acknowledges."""
    client = RawPublisher(url, f"bench-pub-{index}")
    topics = {device_topic(device, Topic.TELEMETRY): mqtt_string(device_topic(device, Topic.TELEMETRY))
              for device in devices}  # fmt: skip
    messages = ((topics[topic], payload) for topic, payload in telemetry_stream(devices))
    ready.set()
    go.wait()
    started = time.time()
    while (client.sent < count) if count is not None else (time.time() - started < seconds):
        client.send(messages, WRITE_RUN if count is None else min(WRITE_RUN, count - client.sent))
    client.close()
    results.put((index, client.sent, time.time()))


def bare_subscriber(url: str, ready, stop, results) -> None:
    """What a paho client that does nothing with the messages receives: the reference for the hub."""
    client = connect(url, "bench-bare")
    state = {"count": 0, "last": 0.0}

    def on_message(_client, _userdata, _message) -> None:
        state["count"] += 1
        state["last"] = time.time()

    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.subscribe(TOPIC_FILTER, qos=1)
    subscribed.wait(10)
    ready.set()
    while not stop.wait(0.05):
        results.put(("progress", state["count"], state["last"]))
    client.disconnect()
    client.loop_stop()
    results.put(("done", state["count"], state["last"]))


def run_publishers(url: str, k: int, devices: list[str], seconds: float, counts: list[int] | None) -> tuple:
    """Start K publishers on disjoint device sets at the same moment; (start time, sent per publisher, end time)."""
    context = mp.get_context("spawn")  # a clean interpreter per publisher: no threads inherited from this one
    go, results = context.Event(), context.Queue()
    readies = [context.Event() for _ in range(k)]
    processes = [
        context.Process(
            target=publisher,
            args=(url, i, devices[i::k], seconds, counts[i] if counts else None, go, readies[i], results),
            daemon=True,
        )
        for i in range(k)
    ]
    for process in processes:
        process.start()
    for ready, process in zip(readies, processes, strict=True):
        while not ready.wait(0.1):
            if not process.is_alive():
                raise RuntimeError(f"publisher {process.name} exited before it connected (code {process.exitcode})")
    started = time.time()
    go.set()
    return started, processes, results


def collect_publishers(processes: list, results, k: int) -> tuple[list[int], float]:
    sent, ended = [0] * k, 0.0
    for _ in range(k):
        index, count, at = results.get(timeout=600)
        sent[index], ended = count, max(ended, at)
    for process in processes:
        process.join(timeout=30)
    return sent, ended


def bare_rate(work: Path, k: int, devices: list[str], seconds: float) -> dict[str, Any]:
    context = mp.get_context("spawn")
    with BenchBroker(work / "broker-bare") as broker:
        ready, stop, results = context.Event(), context.Event(), context.Queue()
        subscriber = context.Process(target=bare_subscriber, args=(broker.url, ready, stop, results), daemon=True)
        subscriber.start()
        if not ready.wait(30):
            raise RuntimeError("the bare subscriber did not subscribe")
        started, processes, pub_results = run_publishers(broker.url, k, devices, seconds, None)
        sent, published = collect_publishers(processes, pub_results, k)
        total, received, last = sum(sent), 0, 0.0
        progress_at = time.monotonic()
        while received < total and time.monotonic() - progress_at < DRAIN_IDLE_S:
            _, count, last = results.get(timeout=DRAIN_IDLE_S)
            if count > received:
                received, progress_at = count, time.monotonic()
        stop.set()
        subscriber.join(timeout=30)
    return {"sent": sent, "total": total, "received": received, "publish_s": published - started,
            "seconds": last - started, "rate": received / (last - started)}  # fmt: skip


class _Message:
    """What paho hands to on_message, for feeding Ingest without a broker."""

    __slots__ = ("payload", "topic")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload


def writer_capacity(work: Path, devices: list[str], count: int, db: str | None) -> float:
    """Messages/s that Ingest validates and stores with no MQTT in the way: where the hub's ceiling would be if
    receiving cost nothing. Fed through on_message as fast as possible, timed until flushed."""
    from edgekit.hub.db import database_url, open_database
    from edgekit.hub.ingest import Ingest

    stream = telemetry_stream(devices)
    messages = [_Message(*next(stream)) for _ in range(count)]
    engine, sessions = open_database(database_url(db, work / "writer"))
    ingest = Ingest(sessions)
    ingest.start()
    started = time.perf_counter()
    for message in messages:
        ingest.on_message(None, None, message)
    if not ingest.flush(timeout=600) or ingest.stats.stored != count:
        raise RuntimeError(f"ingest stored {ingest.stats.stored} of {count} messages: {ingest.stats.as_dict()}")
    elapsed = time.perf_counter() - started
    ingest.stop()
    engine.dispose()
    return count / elapsed


def ingest_throughput(work: Path, k: int, devices: list[str], counts: list[int], db: str | None):
    """The hub's stored msg/s for exactly `counts` messages per publisher; returns (result, running hub, broker)."""
    from edgekit.hub.db import TelemetrySample
    from edgekit.hub.service import Hub, HubSettings

    broker = BenchBroker(work / "broker-hub").start()
    hub = Hub(HubSettings(data_dir=work / "hub", broker=broker.url, db=db, http_port=free_port(), controller=False))
    hub.start()
    if not hub.wait_connected(15):
        raise RuntimeError("the hub did not connect")
    time.sleep(0.5)  # the subscriptions are sent from the connect callback
    total = sum(counts)
    started, processes, pub_results = run_publishers(broker.url, k, devices, 0.0, counts)
    stats = hub.ingest.stats
    stored, progress_at, done_at = 0, time.monotonic(), time.time()
    while stats.stored < total and time.monotonic() - progress_at < DRAIN_IDLE_S:
        time.sleep(0.01)
        if stats.stored > stored:
            stored, progress_at, done_at = stats.stored, time.monotonic(), time.time()
    sent, published = collect_publishers(processes, pub_results, k)
    with hub.sessions() as session:
        rows = session.scalar(select(func.count()).select_from(TelemetrySample))
        device_count = session.scalar(select(func.count(func.distinct(TelemetrySample.device_id))))
    result = {"sent": sent, "total": total, "stored": stats.stored, "rows": rows, "devices": device_count,
              "publish_s": published - started, "seconds": done_at - started, "rate": rows / (done_at - started),
              "invalid": sum(stats.invalid.values()), "duplicates": stats.duplicates, "batches": stats.batches,
              "lost": total - rows}  # fmt: skip
    return result, hub, broker


# ---- dashboard (owned by the dashboard part of the benchmark) ----------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
# How long the browser took to fetch a path (query string ignored), from its resource timing; null before it has.
RESOURCE_MS = """(path) => {
    const entry = performance.getEntriesByType('resource').find((e) => new URL(e.name).pathname === path);
    return entry ? entry.duration : null;
}"""
MEASURE_JS = (
    "() => {\n    const timing = " + RESOURCE_MS + ";\n"
    """    const nav = performance.getEntriesByType('navigation')[0];
    return {rendered: window.__fleetRenderedAt, rows: Number(document.querySelector('#fleet').dataset.rows),
            dom_rows: document.querySelectorAll('#fleet tbody tr[data-id]').length, api: timing('/api/devices'),
            alerts: timing('/api/alerts'), dom: nav.domContentLoadedEventEnd};
}"""
)


def fill_fleet(hub: Any, devices: int) -> int:
    """Top the hub up to `devices` device rows with realistic latest values (what ingest keeps per device);
    rows that ingest already made are left alone. Returns how many rows the hub then has."""
    import random

    from sqlalchemy import func, insert, select

    from edgekit.hub.db import Device

    with hub.sessions() as session:
        existing = session.scalar(select(func.count()).select_from(Device))
    missing = max(0, devices - existing)
    rng, now = random.Random(7), time.time()
    sites, bundles = ["plant-a", "plant-b", "lab", "store-12"], ["digits@1.0.0", "digits@1.1.0", "cnn@2.0.3"]
    rows = [{"id": f"dash-{index:05d}", "labels": {"site": rng.choice(sites), "tier": rng.choice(["a", "b"])},
             "online": rng.random() > 0.05, "first_seen": now - 86400, "last_seen": now - rng.uniform(0, 30),
             "agent_version": "0.1.0", "profile": "x86-64-avx2", "runtimes": ["onnxruntime"],
             "bundle_id": f"{index % 3:064x}", "bundle_label": bundles[index % 3],
             "latency_p50_ms": rng.uniform(2, 40), "latency_p95_ms": rng.uniform(40, 90), "fps": rng.uniform(5, 30),
             "cpu_percent": rng.uniform(5, 95), "memory_mb": rng.uniform(80, 400), "temperature_c": rng.uniform(35, 80),
             "last_seq": 0, "desired_rev": 0} for index in range(missing)]  # fmt: skip
    if rows:
        with hub.sessions.begin() as session:
            session.execute(insert(Device), rows)
    return existing + missing


def max_id(hub: Any) -> str:
    """The last device id in the fleet table's default (by id) order."""
    from sqlalchemy import func, select

    from edgekit.hub.db import Device

    with hub.sessions() as session:
        return session.scalar(select(func.max(Device.id)))


def dashboard_load_time(hub: Any, token: str, devices: int = 1000, runs: int = 5) -> dict[str, Any]:
    """The fleet page's load time in headless Chromium with `devices` devices in the hub's database: from navigation
    start until the table is painted with every device in it (the page records `performance.now()` in the frame after
    it drew the table; the table renders the rows in view and spacers for the rest, and the count of devices it
    holds is checked).

    Logs in once through `POST /login` (the session cookie, as a person's browser would), then loads the page `runs`
    times: the first load is cold (empty browser cache), the median over the rest warm. Also times `/api/devices`
    and `/api/alerts` (the nav bar's badge, fetched after the table is drawn) as the browser saw them."""
    import statistics

    from playwright.sync_api import sync_playwright

    count = fill_fleet(hub, devices)
    url = hub.http_url + "/"
    loads: list[dict[str, float]] = []
    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            # The Origin a browser's own login form sends: the hub refuses cross-site logins.
            login = context.request.post(hub.http_url + "/login", form={"token": token}, max_redirects=0,
                                         headers={"Origin": hub.http_url})  # fmt: skip
            if login.status != 303:
                raise RuntimeError(f"login failed: HTTP {login.status} {login.text()[:200]}")
            page = context.new_page()
            for _ in range(runs):
                page.goto(url)
                # Functions, not expressions: Playwright evals an expression, which the hub's CSP refuses.
                page.wait_for_function("() => window.__fleetRenderedAt !== undefined", timeout=60_000)
                page.wait_for_function(f"() => ({RESOURCE_MS})('/api/alerts') !== null", timeout=60_000)
                loads.append(page.evaluate(MEASURE_JS))
            # The table holds only the rows in view: scrolled to the end, it must show the last device.
            page.eval_on_selector(".table-wrap", "wrap => wrap.scrollTo(0, wrap.scrollHeight)")
            last = max_id(hub)
            page.wait_for_selector(f'#fleet tr[data-id="{last}"]', timeout=10_000)
        finally:
            browser.close()
    if any(load["rows"] != count for load in loads):
        raise RuntimeError(f"the fleet table held {[load['rows'] for load in loads]} devices, not {count}")
    warm = loads[1:] or loads

    def median(key: str) -> float:
        return round(statistics.median(load[key] for load in warm), 1)

    return {"devices in table": count, "fleet page load, cold (ms)": round(loads[0]["rendered"], 1),
            "fleet page load, warm median (ms)": median("rendered"), "  of which GET /api/devices (ms)": median("api"),
            "  DOMContentLoaded (ms)": median("dom"), "GET /api/alerts after it (ms)": median("alerts"),
            "rows in the DOM (windowed)": loads[-1]["dom_rows"], "runs": len(loads)}  # fmt: skip


# ---- end of dashboard part ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the publishers send in phase a")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--db", default=None, help="hub database URL; default SQLite in a temp dir")
    parser.add_argument("--no-dashboard", action="store_true", help="measure ingest only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    devices = device_names(args.devices)
    with tempfile.TemporaryDirectory(prefix="edgekit-hub-bench-") as scratch:
        work = Path(scratch)
        console.print(f"1a/2 bare paho subscriber: {args.publishers} publishers for {args.seconds:g} s …")
        bare = bare_rate(work, args.publishers, devices, args.seconds)
        console.print(f"1b/2 hub ingest: the same {bare['total']:,} messages …")
        ingest, hub, broker = ingest_throughput(work, args.publishers, devices, bare["sent"], args.db)
        try:
            if args.db is None:  # a second database would need a second server; SQLite is a file away
                console.print("1c/2 ingest alone, fed in-process (no MQTT) …")
                (work / "writer").mkdir()
                ingest["writer_rate"] = writer_capacity(work, devices, min(bare["total"], 200_000), None)
            report_ingest(args, bare, ingest)  # first: the dashboard part may fail on its own
            measure = None if args.no_dashboard else globals().get("dashboard_load_time")
            if measure is not None:
                from edgekit.hub.auth import create_token

                console.print(f"2/2 dashboard fleet page with {args.devices} devices …")
                report_dashboard(measure(hub, create_token(hub.sessions, "bench", "bench"), devices=args.devices))
        finally:
            hub.stop()
            broker.stop()


def report_ingest(args: argparse.Namespace, bare: dict, ingest: dict) -> None:
    db = "SQLite" if not args.db else args.db.split(":")[0]
    table = Table(title=f"edgekit hub ingest (loopback Mosquitto, {args.publishers} publishers, QoS 1, one run)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met")
    ratio = ingest["rate"] / bare["rate"]
    lost = f"{ingest['rows']:,} / {ingest['total']:,} ({ingest['lost']:,})"
    table.add_row(f"hub stored msg/s ÷ bare subscriber msg/s ({db})", f"{ratio:.2f}", f">= {TARGET_RATIO}",
                  verdict(ratio >= TARGET_RATIO))  # fmt: skip
    table.add_row(f"hub stored msg/s, zero loss ({db})", f"{ingest['rate']:,.0f}", f">= {TARGET_RATE:,}",
                  verdict(ingest["rate"] >= TARGET_RATE and ingest["lost"] == 0))  # fmt: skip
    table.add_row("  bare subscriber received msg/s", f"{bare['rate']:,.0f}", "")
    if "writer_rate" in ingest:
        table.add_row("  ingest alone, no MQTT (validate + store) msg/s", f"{ingest['writer_rate']:,.0f}", "")
    table.add_row("  messages (unique telemetry) / devices", f"{ingest['total']:,} / {args.devices:,}", "")
    table.add_row("  bare: received / sent", f"{bare['received']:,} / {bare['total']:,}", "")
    bare_times = f"{bare['publish_s']:.1f} / {bare['seconds']:.1f} s"
    hub_times = f"{ingest['publish_s']:.1f} / {ingest['seconds']:.1f} s"
    table.add_row("  bare: publishers done / last received at", bare_times, "")
    table.add_row("  hub: rows stored / sent (lost)", lost, "0 lost")
    table.add_row("  hub: publishers done / last stored at", hub_times, "")
    table.add_row("  hub: write batches / invalid / duplicates",
                  f"{ingest['batches']:,} / {ingest['invalid']} / {ingest['duplicates']}", "")  # fmt: skip
    Console().print(table)


def verdict(met: bool) -> str:
    return "yes" if met else "NO"


def report_dashboard(dashboard: dict[str, Any]) -> None:
    table = Table(title="edgekit hub dashboard (headless Chromium)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in dashboard.items():
        table.add_row(name, str(value))
    Console().print(table)


if __name__ == "__main__":
    main()
