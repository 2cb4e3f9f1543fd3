"""The hub's ingest against real parts: Mosquitto, paho publishers sending `edgekit.protocol` payloads, SQLite and a
throwaway PostgreSQL 15 cluster, two ingest processes on one shared subscription, real agents for the Device rows;
and telemetry retention.

Run as a script (`python tests/hub/test_ingest.py BROKER_URL DB_URL SHARE_GROUP`) this file is one ingest process
for the shared-subscription test: it prints `ready` once subscribed, ingests until its stdin closes, then prints
its stats as JSON.
"""

import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from edgekit.hub.db import (
    Device,
    EventRecord,
    ResultRecord,
    TelemetryRollup,
    TelemetrySample,
    database_url,
    open_database,
)
from edgekit.hub.ingest import MAX_PAYLOAD, Ingest, subscriptions
from edgekit.hub.link import BulkClient, InOrderAcks, Receipt, connect_properties
from edgekit.hub.retention import Retention, downsample
from edgekit.protocol import (
    BundleRef,
    Event,
    ReportedState,
    Result,
    Score,
    Status,
    Telemetry,
    Topic,
    device_topic,
    encode,
)

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # the test helpers, also when this file runs as a script (the worker below)

from brokers import host_port, wait_until  # noqa: E402
from hub.postgres import PostgresCluster, postgres_cluster  # noqa: E402
from reliability import record  # noqa: E402

DATABASES = ["sqlite", "postgresql"]
TIMEOUT_S = 30.0
BUNDLE = BundleRef(id="ab" * 32, name="digits", version="1.2.0", size=1234)


# ---- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    yield from postgres_cluster()


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty hub database of each kind (a new PostgreSQL database per test on one cluster)."""
    if request.param == "sqlite":
        return database_url(None, tmp_path)
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    return database_url(cluster.create_database(f"t{uuid.uuid4().hex[:12]}"), tmp_path)


class IngestClient:
    """What the hub wires up for ingest: an MQTT 5 client (on a shared subscription with `share_group`) feeding an
    `Ingest` that writes to `url`."""

    def __init__(self, broker_url: str, url: str, share_group: str | None = None, **ingest: Any) -> None:
        self.engine, self.sessions = open_database(url)
        self.stored: list[tuple[str, str, Any]] = []
        self.ingest = Ingest(self.sessions, on_stored=self.stored.extend, **ingest)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"ingest-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self.ingest.on_message
        self.client.on_connect = lambda client, *_: client.subscribe([(t, 1) for t in subscriptions(share_group)])
        self.granted: list = []
        self._subscribed = threading.Event()
        self.client.on_subscribe = self._on_subscribe
        self._address = host_port(broker_url)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.granted = reason_codes
        self._subscribed.set()

    def start(self) -> "IngestClient":
        self.ingest.start()
        self.client.connect(*self._address)
        self.client.loop_start()
        assert self._subscribed.wait(TIMEOUT_S), "the ingest client was not subscribed"
        assert not any(code.is_failure for code in self.granted), f"subscriptions refused: {self.granted}"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.ingest.stop()
        self.engine.dispose()

    def wait_received(self, count: int) -> None:
        wait_until(lambda: self.ingest.stats.received >= count, TIMEOUT_S, f"{count} messages to arrive")
        assert self.ingest.flush(TIMEOUT_S), "ingest did not write what it received"


@pytest.fixture
def ingest_client() -> Iterator:
    """make(broker_url, db_url, share_group=None) → a started IngestClient, stopped at teardown."""
    clients: list[IngestClient] = []

    def make(broker_url: str, url: str, share_group: str | None = None) -> IngestClient:
        clients.append(IngestClient(broker_url, url, share_group).start())
        return clients[-1]

    yield make
    for client in clients:
        client.stop()


def publish(broker_url: str, messages: list[tuple[str, bytes, bool]]) -> None:
    """Publish (topic, payload, retain) at QoS 1, in order, and wait until the broker acknowledged every one."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(0)  # our messages are in memory anyway; paho's limit costs a rescan per ack
    client.connect(*host_port(broker_url))
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        deadline = time.monotonic() + TIMEOUT_S
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge every message"
    finally:
        client.disconnect()
        client.loop_stop()


def sequenced(device: str, index: int, seq: int, base: float) -> tuple[str, bytes, bool]:
    """Seq 1, 2, 4, 5, … telemetry; every third a result, alternating with an event. One seq per device and kind."""
    ts = base + seq
    if seq % 3:
        payload = Telemetry(seq=seq, ts=ts, latency_p50_ms=seq + index / 100, latency_p95_ms=2.0 * seq, fps=25.0,
                            inferences=seq * 25, cpu_percent=float(seq % 100), memory_mb=100.0,
                            temperature_c=40.0 + index, bundle="digits@1.2.0")  # fmt: skip
        return device_topic(device, Topic.TELEMETRY), encode(payload), False
    if seq % 2:
        payload = Result(seq=seq, ts=ts, frame_ts=ts, bundle="digits@1.2.0", latency_ms=1.5, task="classifier",
                         top=[Score(label=seq % 10, score=0.9)])  # fmt: skip
        return device_topic(device, Topic.RESULTS), encode(payload), False
    payload = Event(seq=seq, ts=ts, type="source.error", level="warning", message=f"frame {seq} lost", data={"n": seq})
    return device_topic(device, Topic.EVENTS), encode(payload), False


def states(device: str, base: float, rev: int) -> list[tuple[str, bytes, bool]]:
    status = Status(state="online", ts=base, agent_version="9.9.9", profile="x86-64-avx2", runtimes=["onnxruntime"],
                    bundle=BUNDLE)  # fmt: skip
    reported = ReportedState(rev=rev, ts=base, bundle=BUNDLE)
    return [(device_topic(device, Topic.STATUS), encode(status), True),
            (device_topic(device, Topic.REPORTED), encode(reported), True)]  # fmt: skip


def stored_keys(sessions) -> list[tuple[str, int]]:
    with sessions() as session:
        return [
            key
            for table in (TelemetrySample, ResultRecord, EventRecord)
            for key in session.execute(select(table.device_id, table.seq)).all()
        ]


def telemetry_plan(devices: list[str], per_device: int, base: float) -> tuple[list, list, list]:
    """(originals interleaved across devices with every 7th re-sent right away, those duplicates, a later replay of
    each device's first 10 messages)."""
    originals = [sequenced(d, i, seq, base) for seq in range(1, per_device + 1) for i, d in enumerate(devices)]
    stream, duplicates = [], []
    for position, message in enumerate(originals):
        stream.append(message)
        if position % 7 == 3:
            stream.append(message)
            duplicates.append(message)
    replay = [sequenced(d, i, seq, base) for seq in range(1, 11) for i, d in enumerate(devices)]
    return stream, duplicates, replay


# ---- the same ingest on SQLite and PostgreSQL --------------------------------------------------------------------


def test_every_message_stored_once_and_devices_updated(mosquitto, db_url: str, ingest_client) -> None:
    devices, per_device = [f"dev-{i:02d}" for i in range(12)], 60
    base = time.time() - 3600
    hub = ingest_client(mosquitto.url, db_url)
    stream, duplicates, replay = telemetry_plan(devices, per_device, base)
    newest_telemetry = max(seq for seq in range(1, per_device + 1) if seq % 3)
    # The same seq with other values, in the same batch and later: the first one stored stays, also in Device.
    impostor = Telemetry(seq=newest_telemetry, ts=base + per_device, latency_p50_ms=999.0, fps=1.0)
    impostor_message = (device_topic(devices[1], Topic.TELEMETRY), encode(impostor), False)
    stream.append(impostor_message)
    duplicates.append(impostor_message)
    replay.append(impostor_message)
    state_messages = [m for i, d in enumerate(devices) for m in states(d, base, rev=i)]
    publish(mosquitto.url, state_messages + stream)
    hub.wait_received(len(state_messages) + len(stream))
    # A replay after the originals were stored (as after an agent's reconnect), and dev-00 going away cleanly.
    goodbye = Status(state="offline", ts=base + per_device + 10)
    publish(mosquitto.url, [*replay, (device_topic(devices[0], Topic.STATUS), encode(goodbye), True)])
    hub.wait_received(len(state_messages) + len(stream) + len(replay) + 1)

    stats = hub.ingest.stats
    unique = len(devices) * per_device
    assert (stats.stored, stats.duplicates) == (unique, len(duplicates) + len(replay))
    assert (sum(stats.invalid.values()), stats.failed) == (0, 0)
    keys = stored_keys(hub.sessions)
    assert len(keys) == unique
    assert set(keys) == {(d, seq) for d in devices for seq in range(1, per_device + 1)}
    sequenced_stored = [(d, m.seq) for d, kind, m in hub.stored if kind not in (Topic.STATUS, Topic.REPORTED)]
    assert sorted(sequenced_stored) == sorted(keys), "on_stored must report each newly stored message once"

    with hub.sessions() as session:
        rows = {device.id: device for device in session.scalars(select(Device))}
    assert sorted(rows) == devices
    for index, device_id in enumerate(devices):
        row = rows[device_id]
        assert row.latency_p50_ms == pytest.approx(newest_telemetry + index / 100), device_id
        assert row.last_seq == newest_telemetry
        assert (row.temperature_c, row.fps) == (40.0 + index, 25.0)
        assert (row.agent_version, row.profile, row.runtimes) == ("9.9.9", "x86-64-avx2", ["onnxruntime"])
        assert (row.bundle_id, row.bundle_label) == (BUNDLE.id, "digits@1.2.0")
        assert row.reported["rev"] == index and row.reported["bundle"]["id"] == BUNDLE.id
        if device_id == devices[0]:
            assert (row.online, row.last_seen) == (False, pytest.approx(goodbye.ts))
        else:
            assert (row.online, row.last_seen) == (True, pytest.approx(base + per_device))


def test_two_ingest_processes_share_the_load(mosquitto, pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """Two ingest processes (separate MQTT 5 clients, one shared subscription) and one PostgreSQL: each gets a
    share, and every message, duplicates included, is stored exactly once."""
    url = database_url(pg_cluster.create_database(f"t{uuid.uuid4().hex[:12]}"), tmp_path)
    devices, per_device = [f"dev-{i:02d}" for i in range(10)], 80
    base = time.time() - 3600
    stream, duplicates, replay = telemetry_plan(devices, per_device, base)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen([sys.executable, __file__, mosquitto.url, url, "hubs"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # fmt: skip
    try:
        for process in processes:
            assert _read_line(process, TIMEOUT_S) == "ready"
        publish(mosquitto.url, stream + replay)
        engine, sessions = open_database(url)
        unique = len(devices) * per_device
        wait_until(lambda: len(stored_keys(sessions)) >= unique, TIMEOUT_S, f"{unique} rows")
        engine.dispose()
        reports = []
        for process in processes:
            process.stdin.close()  # the worker writes what it has, then prints its stats
            reports.append(json.loads(_read_line(process, TIMEOUT_S)))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
    engine, sessions = open_database(url)
    keys = stored_keys(sessions)
    engine.dispose()
    assert len(keys) == unique and set(keys) == {(d, s) for d in devices for s in range(1, per_device + 1)}
    assert all(report["stored"] > 0 for report in reports), f"one process got no share: {reports}"
    assert sum(report["stored"] for report in reports) == unique
    assert sum(report["duplicates"] for report in reports) == len(duplicates) + len(replay)
    assert sum(report["received"] for report in reports) == len(stream) + len(replay)


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next line the worker prints, or fail after `timeout` (a reader thread: pipes have no read timeout)."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert line and line[0], f"the ingest worker printed nothing in {timeout:g} s (exit code {process.poll()})"
    return line[0].strip()


def _worker(broker_url: str, url: str, share_group: str) -> None:
    client = IngestClient(broker_url, url, share_group).start()
    print("ready", flush=True)
    sys.stdin.read()
    client.stop()
    print(json.dumps(client.ingest.stats.as_dict()), flush=True)


# ---- malformed input ---------------------------------------------------------------------------------------------


def malformed(rng: random.Random, base: float) -> tuple[str, bytes, bool, str]:
    """One message that ingest must reject: (topic, payload, retain, what it is)."""
    good = json.loads(encode(Telemetry(seq=1, ts=base, fps=1.0)))
    kind = rng.choice(["bytes", "schema", "json", "topic", "oversized", "state", "state out of range", "health"])
    topic = device_topic(f"bad-{rng.randrange(5)}", rng.choice([Topic.TELEMETRY, Topic.RESULTS, Topic.EVENTS]))
    if kind == "bytes":
        return topic, rng.randbytes(rng.randint(1, 300)), False, kind
    if kind == "schema":
        broken = dict(good)
        change = rng.choice(["drop seq", "drop ts", "seq 0", "seq -3", "seq text", "seq 1.5", "ts text", "version 2",
                             "fps list"])  # fmt: skip
        field, _, value = change.partition(" ")
        if change.startswith("drop"):
            broken.pop(value)
        else:
            broken[{"version": "schema_version"}.get(field, field)] = {
                "0": 0, "-3": -3, "text": "abc", "1.5": 1.5, "2": 2, "list": [1, 2]}[value]  # fmt: skip
        return device_topic("bad-0", Topic.TELEMETRY), json.dumps(broken).encode(), False, kind
    if kind == "health":  # model-health blocks out of bounds; NaN or infinity would not even fit a JSON column
        bundle = {"bundle": "a" * 64, "since": base}
        health = rng.choice([{"model": {**bundle, "latency_p95_ms": math.inf}}, {"drift": {"score": math.nan,
                             "samples": 200, "feature": "image.mean[0]"}}, {"model": {**bundle, "classes":
                             {str(i): 1 for i in range(100)}}}, {"shadow": {**bundle, "active": "b" * 64,
                             "metric": "top1", "agreement": 2.0}}])  # fmt: skip
        return device_topic("bad-2", Topic.TELEMETRY), json.dumps({**good, **health}).encode(), False, kind
    if kind == "json":
        payload = rng.choice([b"", b"null", b"[]", b"42", b'"text"', b"{", b"[" * 5000, b'{"seq": 1,}', b"\xff\xfe"])
        return device_topic("bad-1", Topic.EVENTS), payload, False, kind
    if kind == "topic":
        device = rng.choice(["-leading-dash", "x" * 65, "white space", "semi;colon", "ümlaut"])
        return device_topic(device, Topic.TELEMETRY), encode(Telemetry(seq=1, ts=base)), False, kind
    if kind == "oversized":
        return topic, json.dumps({**good, "bundle": "x" * MAX_PAYLOAD}).encode(), False, kind
    if kind == "state out of range":  # valid for the model, but an infinite ts would pin last_seen forever
        return device_topic("bad-4", Topic.STATUS), b'{"state": "online", "ts": Infinity}', False, kind
    revs = [b'{"rev": "x"}', b'{"rev": 9223372036854775808}', b'{"rev": "5"}', b'{"rev": -2}']
    payload = rng.choice([b'{"state": "sleeping"}', rng.choice(revs), rng.randbytes(40)])
    return device_topic("bad-3", rng.choice([Topic.STATUS, Topic.REPORTED])), payload, False, kind


def edge_valid(device: str, seq: int, base: float) -> tuple[str, bytes, bool]:
    """Valid payloads with values that only fit after ingest fits them to the columns."""
    if seq % 2:
        payload = Telemetry(seq=seq, ts=base + seq, inferences=2**40, dropped_frames=-(2**40), bundle="b" * 500)
        return device_topic(device, Topic.TELEMETRY), encode(payload), False
    payload = Event(seq=seq, ts=base + seq, type="inference.error", level="error", message="nul \x00 inside" * 500)
    return device_topic(device, Topic.EVENTS), encode(payload), False


def test_malformed_payloads_do_not_stop_ingest(mosquitto, db_url: str, ingest_client) -> None:
    rng = random.Random(20240611)
    base = time.time() - 60
    hub = ingest_client(mosquitto.url, db_url)
    bad = [malformed(rng, base) for _ in range(1000)]
    good = [sequenced(f"ok-{i % 5}", i % 5, seq, base) for i, seq in enumerate(range(1, 301))]
    good += [edge_valid("edge-0", seq, base) for seq in range(1, 11)]
    messages: list[tuple[str, bytes, bool]] = []
    for index, (topic, payload, retain, _) in enumerate(bad):
        messages.append((topic, payload, retain))
        if index % 3 == 0 and good:
            messages.append(good.pop())
    messages += good
    publish(mosquitto.url, messages)
    hub.wait_received(len(messages))

    stats = hub.ingest.stats
    assert hub.ingest.running and hub.client.is_connected(), "ingest must keep running"
    assert sum(stats.invalid.values()) == 1000, dict(stats.invalid)
    expected = {"unknown topic", "telemetry: invalid", "events: invalid", "status: seq or ts out of range"}
    assert expected <= set(stats.invalid), dict(stats.invalid)
    assert (stats.stored, stats.failed) == (310, 0)
    assert len(set(stored_keys(hub.sessions))) == 310
    with hub.sessions() as session:
        assert set(session.scalars(select(Device.id))) == {f"ok-{i}" for i in range(5)} | {"edge-0"}
        sample = session.scalars(select(TelemetrySample).where(TelemetrySample.device_id == "edge-0")).first()
        event = session.scalars(select(EventRecord).where(EventRecord.device_id == "edge-0")).first()
    # 64-bit counters keep what the device sent; the over-long bundle label is cut to its column.
    assert sample.inferences == 2**40 and sample.dropped_frames == -(2**40) and sample.bundle == "b" * 160
    assert "\x00" not in event.message and len(event.message) <= 4000


# ---- acknowledged only once stored -------------------------------------------------------------------------------


class AckWatch:
    """A real MQTT 5 client with manual acks on a persistent session, as the hub's link has: its messages' receipts
    (`InOrderAcks`) and the PUBACKs paho sends, read from paho's own log."""

    def __init__(self, broker_url: str, client_id: str) -> None:
        self.client = BulkClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.manual_ack_set(True)
        self.acks = InOrderAcks(self.client)
        self.received: list[tuple[bytes, Receipt | None]] = []
        self.pubacks: list[int] = []
        self.client.on_log = self._on_log
        self.client.on_message = lambda client, userdata, message: self.received.append(
            (message.payload, self.acks.receive(message))
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda client, *_: client.subscribe("acks/#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(*host_port(broker_url), clean_start=False, properties=connect_properties(600))
        self.client.loop_start()
        assert subscribed.wait(TIMEOUT_S), "not subscribed"

    def _on_log(self, client, userdata, level, text: str) -> None:
        if text.startswith("Sending PUBACK (Mids: "):
            self.pubacks += json.loads(text.removeprefix("Sending PUBACK (Mids: ").removesuffix(")"))

    def wait_received(self, count: int) -> list[Receipt | None]:
        wait_until(lambda: len(self.received) >= count, TIMEOUT_S, f"{count} messages")
        return [receipt for _, receipt in self.received]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_pubacks_go_out_in_receive_order_once_each_message_is_done(mosquitto) -> None:
    """InOrderAcks on a real client: a message done early waits for the ones before it; what was never
    acknowledged comes again on the next connection, what was comes never again; a receipt of a lost connection
    sends nothing (its packet id may belong to another message by then); QoS 0 needs no ack."""
    client_id = f"acks-{uuid.uuid4().hex[:8]}"
    watch = AckWatch(mosquitto.url, client_id)
    try:
        publish(mosquitto.url, [(f"acks/{i}", str(i).encode(), False) for i in range(4)])
        first, second, third, fourth = watch.wait_received(4)
        watch.acks.done([third])
        time.sleep(0.2)
        held_back = list(watch.pubacks)
        watch.acks.done([first])
        wait_until(lambda: len(watch.pubacks) >= 1, TIMEOUT_S, "the first PUBACK")
        watch.acks.done([second])
        wait_until(lambda: len(watch.pubacks) >= 3, TIMEOUT_S, "three PUBACKs")
        watch.acks.reset()  # as when the connection is lost
        watch.acks.done([fourth])
        time.sleep(0.2)
    finally:
        watch.close()
    assert held_back == []
    assert watch.pubacks == [first.mid, second.mid, third.mid]
    again = AckWatch(mosquitto.url, client_id)
    try:
        qos0 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        qos0.connect(*host_port(mosquitto.url))
        qos0.loop_start()
        qos0.publish("acks/qos0", b"q0", qos=0).wait_for_publish(TIMEOUT_S)
        qos0.disconnect()
        qos0.loop_stop()
        received = again.wait_received(2)
    finally:
        again.close()
    assert [payload for payload, _ in again.received] == [b"3", b"q0"]
    assert received[1] is None and again.pubacks == []


def test_a_batch_is_acknowledged_only_after_it_is_stored_or_dropped(mosquitto, make_hub, tmp_path: Path) -> None:
    """A hub on an external broker takes valid and invalid messages, is stopped and started again: its session is
    resumed and nothing comes again (all was acknowledged once stored, the invalid ones once dropped)."""
    data = tmp_path / "acked-hub"
    hub = make_hub(broker=mosquitto.url, data_dir=data)
    base = time.time() - 60
    valid = [sequenced("ack-1", 1, seq, base) for seq in range(1, 101)]
    invalid = [(device_topic("ack-1", Topic.TELEMETRY), b"{not json", False)] * 20
    publish(mosquitto.url, valid + invalid)
    wait_until(lambda: hub.ingest.stats.received >= 120, TIMEOUT_S, "120 messages")
    assert hub.ingest.flush(TIMEOUT_S)
    first = hub.ingest.stats
    hub.stop()
    again = make_hub(broker=mosquitto.url, data_dir=data)
    marker = sequenced("ack-1", 1, 101, base)
    publish(mosquitto.url, [marker])
    wait_until(lambda: again.ingest.stats.stored >= 1, TIMEOUT_S, "the marker stored")
    assert (first.stored, sum(first.invalid.values())) == (100, 20)
    assert again.link.session_resumed
    assert again.ingest.stats.received == 1, "messages acknowledged before the restart came again"
    assert len(set(stored_keys(again.sessions))) == 101


def _block_connections(cluster: PostgresCluster, database: str, blocked: bool) -> None:
    """A database outage for one database: new connections refused, open ones ended (or the end of it)."""
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=cluster.port, user="postgres", dbname="postgres",
                         autocommit=True) as connection:  # fmt: skip
        connection.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(not blocked).lower()}')
        if blocked:
            connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                               (database,))  # fmt: skip


def test_a_database_outage_loses_nothing(mosquitto, pg_cluster: PostgresCluster, make_hub) -> None:
    """PostgreSQL refuses the hub's database while devices keep sending: the batches it fails on are not
    acknowledged, the hub reconnects and the broker delivers them again; once the database is back, every message
    is stored."""
    scenario = "hub database outage (PostgreSQL)"
    name = f"t{uuid.uuid4().hex[:12]}"
    hub = make_hub(broker=mosquitto.url, db=pg_cluster.create_database(name))
    base = time.time() - 60
    before = [sequenced("dbo-1", 1, seq, base) for seq in range(1, 201)]
    during = [sequenced("dbo-1", 1, seq, base) for seq in range(201, 601)]
    publish(mosquitto.url, before)
    wait_until(lambda: hub.ingest.stats.stored >= 200, TIMEOUT_S, "200 messages stored")
    _block_connections(pg_cluster, name, blocked=True)
    try:
        publish(mosquitto.url, during)
        wait_until(lambda: hub.ingest.stats.failed > 0, TIMEOUT_S, "ingest to fail on the database")
        time.sleep(1)  # batches fail and come again a few times
    finally:
        _block_connections(pg_cluster, name, blocked=False)
    wait_until(lambda: len(set(stored_keys(hub.sessions))) >= 600, TIMEOUT_S, "all 600 stored")
    stats = hub.ingest.stats
    stored = len(set(stored_keys(hub.sessions)))
    record(scenario, "messages sent", 600)
    record(scenario, "messages in batches the database failed on", stats.failed)
    record(scenario, "messages stored", stored)
    record(scenario, "messages lost", 600 - stored, 0)
    assert stats.failed > 0 and stored == 600 and hub.link.session_resumed


# ---- a real fleet ------------------------------------------------------------------------------------------------


def test_real_agents_fill_the_device_rows(make_hub, tmp_path: Path) -> None:
    from hub_helpers import device_urls

    from edgekit.agents.fleet import Fleet, FleetSettings, device_ids

    hub = make_hub()
    brokers = device_urls(hub, device_ids("sim", 3))
    fleet = Fleet(FleetSettings(count=3, broker="", data_dir=tmp_path / "fleet", telemetry_s=0.2, brokers=brokers))
    fleet.start()
    try:
        assert fleet.wait_connected(TIMEOUT_S) == 3

        def all_reporting() -> bool:
            with hub.sessions() as session:
                rows = session.scalars(select(Device)).all()
                telemetry = session.scalar(select(func.count(func.distinct(TelemetrySample.device_id))))
            return len(rows) == 3 and all(r.online and r.reported for r in rows) and telemetry == 3

        wait_until(all_reporting, TIMEOUT_S, "3 online devices with reported state and telemetry")
    finally:
        fleet.stop()
    wait_until(lambda: _online(hub.sessions) == 0, TIMEOUT_S, "the stopped agents to show offline")
    with hub.sessions() as session:
        rows = session.scalars(select(Device).order_by(Device.id)).all()
        types = set(session.scalars(select(EventRecord.type)))
    assert [r.id for r in rows] == [agent.device_id for agent in fleet.agents]
    assert all(r.reported["rev"] == -1 and r.agent_version and r.last_seq > 0 for r in rows)
    assert {"agent.started", "agent.stopping"} <= types
    assert sum(hub.ingest.stats.invalid.values()) == 0


def _online(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True)))


# ---- retention ---------------------------------------------------------------------------------------------------


def _sample(device: str, seq: int, ts: float, p50: float | None, temperature: float) -> TelemetrySample:
    return TelemetrySample(device_id=device, seq=seq, ts=ts, latency_p50_ms=p50, fps=10.0 + seq % 2,
                           cpu_percent=50.0, temperature_c=temperature)  # fmt: skip


def test_retention_rolls_old_telemetry_into_minutes(db_url: str) -> None:
    engine, sessions = open_database(db_url)
    now = 1_800_000_000.0  # a whole minute
    day = 86400.0
    old = now - 3 * day  # also a whole minute
    with sessions.begin() as session:
        for device, offset in (("a", 0.0), ("b", 7.0)):
            for seq in range(1, 13):  # 12 samples 10 s apart: two minutes of 6 each
                p50 = None if seq == 5 else float(seq)
                session.add(_sample(device, seq, old + offset + (seq - 1) * 10, p50, 30.0 + seq + offset))
            session.add(_sample(device, 100, now - 60, 1.0, 20.0))  # recent: stays raw
    assert downsample(sessions, older_than_s=day, now=now) == 24
    with sessions() as session:
        rollups = {(r.device_id, r.minute): r for r in session.scalars(select(TelemetryRollup))}
        raw = session.execute(select(TelemetrySample.device_id, TelemetrySample.seq)).all()
    assert sorted(raw) == [("a", 100), ("b", 100)]
    minute = int(old // 60)
    assert sorted(rollups) == [("a", minute), ("a", minute + 1), ("b", minute), ("b", minute + 1)]
    first = rollups[("a", minute)]  # seq 1-6, seq 5 without a latency
    assert first.samples == 6
    assert first.latency_p50_ms == pytest.approx((1 + 2 + 3 + 4 + 6) / 5)
    assert first.fps == pytest.approx(10.5) and first.cpu_percent == pytest.approx(50.0)
    assert first.temperature_c == pytest.approx(36.0)
    assert rollups[("b", minute + 1)].temperature_c == pytest.approx(30.0 + 12 + 7.0)

    assert downsample(sessions, older_than_s=day, now=now) == 0, "a second pass must change nothing"
    # A late replay of old samples for a minute already rolled up: merged into it, weighted by sample count.
    with sessions.begin() as session:
        session.add(_sample("a", 50, old + 1, 20.0, 99.0))
    assert downsample(sessions, older_than_s=day, now=now) == 1
    with sessions() as session:
        merged = session.get(TelemetryRollup, ("a", minute))
        assert session.scalar(select(func.count()).select_from(TelemetryRollup)) == 4
    assert merged.samples == 7 and merged.temperature_c == pytest.approx(99.0)
    assert merged.latency_p50_ms == pytest.approx((3.2 * 6 + 20.0) / 7)
    engine.dispose()


def test_retention_runner_works_in_the_background(tmp_path: Path) -> None:
    engine, sessions = open_database(database_url(None, tmp_path))
    with sessions.begin() as session:
        session.add_all(_sample("a", seq, time.time() - 7200 + seq, 1.0, 30.0) for seq in range(1, 4))
        session.add(TelemetryRollup(device_id="a", minute=1000, samples=1))  # far past any rollup horizon
    retention = Retention(sessions, raw_s=3600, keep_rollups_s=86400, interval_s=0.05).start()
    try:
        wait_until(lambda: retention.passes >= 2, TIMEOUT_S, "two retention passes")
    finally:
        retention.stop()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(TelemetrySample)) == 0
        minutes = [r.minute for r in session.scalars(select(TelemetryRollup))]
        assert session.scalar(select(func.sum(TelemetryRollup.samples))) == 3
    assert minutes and 1000 not in minutes, "the raw samples rolled up, the ancient rollup pruned"
    engine.dispose()


def test_replicas_writing_the_same_devices_at_once_never_deadlock(pg_cluster: PostgresCluster) -> None:
    """Hub replicas all take every state message and each its share of telemetry, so two batches update the same
    device rows at once: one telemetry first for the high ids and states for the low, the other the other way round.
    Locked in their own passes' orders, such batches deadlocked in PostgreSQL (seen in the 100-device scale test);
    ingest locks a batch's rows up front, in id order."""
    _, sessions = open_database(pg_cluster.create_database(f"d{uuid.uuid4().hex[:12]}"))
    ids = [f"dev-{n:02}" for n in range(40)]
    low, high = ids[:20], ids[20:]
    writers = [Ingest(sessions), Ingest(sessions)]
    rounds, deadlocks, start = 30, [], threading.Barrier(2)

    def write(index: int) -> None:
        telemetry_to, states_to = (high, low) if index == 0 else (low, high)
        for round_ in range(rounds):
            seq = 2 * round_ + index + 1
            batch = [(d, Topic.TELEMETRY, Telemetry(seq=seq, ts=time.time(), fps=1.0)) for d in telemetry_to]
            batch += [(d, Topic.STATUS, Status(state="online", ts=time.time())) for d in states_to]
            start.wait()
            try:
                writers[index]._write(batch)
            except OperationalError as error:
                deadlocks.append(str(error).splitlines()[0])

    threads = [threading.Thread(target=write, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    record("ingest: two replicas on one PostgreSQL", f"deadlocks in {rounds} rounds of crossed batches", len(deadlocks),
           0)  # fmt: skip
    assert deadlocks == []
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(TelemetrySample)) == rounds * len(ids)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
