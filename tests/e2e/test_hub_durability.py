"""Hub restarts and crashes lose nothing (docs/hub.md, "Durability"): the broker keeps the hub's MQTT session while
the hub is away, and the hub acknowledges a message only once it is in the database.

Real Mosquitto (embedded in the hub, or external), real agents (`Fleet`) or a paho client publishing as a device
does, the hub in-process or as an `edgekit hub` process killed with SIGKILL. Every scenario reports what was sent,
stored and lost in the reliability table, recorded before the assertions.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from brokers import host_port
from helpers import assert_user_error
from hub_helpers import broker_acknowledged, fleet, lost_messages, stored_seqs, wait_until
from reliability import record

from edgekit.agents.fleet import Fleet, FleetSettings
from edgekit.enrollment import Enrollment
from edgekit.hub.broker import free_port
from edgekit.hub.db import database_url, open_database
from edgekit.hub.service import Hub, HubSettings
from edgekit.mqtt import parse_broker_url
from edgekit.protocol import Telemetry, Topic, device_topic, encode

TIMEOUT_S = 60.0
DEVICES = 10
TELEMETRY_S = 0.1  # 10 messages/s per device
BURST = 30_000


def steady(hub: Hub, count: int) -> None:
    """Until the hub stored `count` more messages than it has now: the fleet is flowing into it."""
    start = sum(map(len, stored_seqs(hub.sessions).values()))
    wait_until(lambda: sum(map(len, stored_seqs(hub.sessions).values())) >= start + count, TIMEOUT_S,
               f"{count} more messages stored")  # fmt: skip


# ---- restart and long outage, hub in-process -------------------------------------------------------------------


RESTARTS = [
    pytest.param("embedded", 4, "5", id="embedded-mosquitto-4s"),
    pytest.param("external", 4, "5", id="external-mosquitto-4s"),
    pytest.param("external", 4, "3.1.1", id="external-mosquitto-mqtt311-4s"),
    pytest.param("external", 60, "5", id="external-mosquitto-60s", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("broker_kind", "down_s", "version"), RESTARTS)
def test_hub_restart_during_steady_telemetry_loses_nothing(broker_kind, down_s, version, make_hub, tmp_path, request):
    """10 agents at 10 messages/s each; the hub stops (SIGTERM's path, `Hub.stop`) for `down_s` and starts again on
    the same data dir. External Mosquitto: it holds the hub's session and queues for it meanwhile. Embedded: the
    broker stops and starts with the hub, keeping the session on disk; the agents queue in their outboxes."""
    scenario = f"hub restart ({broker_kind} Mosquitto, MQTT {version}, down {down_s} s, {DEVICES} devices x 10 msg/s)"
    data = tmp_path / "hub"
    if broker_kind == "embedded":
        settings = {"data_dir": data, "broker_port": free_port()}
        hub = make_hub(**settings)
        agents_running = fleet(hub, DEVICES, tmp_path, None, None, prefix="rs", source=None, telemetry_s=TELEMETRY_S)
    else:
        broker = request.getfixturevalue("mosquitto")
        settings = {"data_dir": data, "broker": broker.url, "mqtt_version": version}
        hub = make_hub(**settings)
        agents_running = anonymous_fleet(broker.url, tmp_path)
    with agents_running as agents:
        steady(hub, 200)
        hub.stop()
        time.sleep(down_s)
        hub = make_hub(**settings)
        resumed = hub.link.session_resumed
        steady(hub, 200)
    acknowledged = broker_acknowledged(agents)
    lost = lost_messages(acknowledged, hub.sessions)
    sent = sum(map(len, acknowledged.values()))
    record(scenario, "messages sent (acknowledged by the broker)", sent)
    record(scenario, "messages stored", sent - lost)
    record(scenario, "messages lost", lost, 0)
    record(scenario, "hub session not resumed after the restart", int(not resumed), 0)
    assert sent > DEVICES * 10 * down_s, f"only {sent} messages sent"
    assert lost == 0 and resumed


@contextmanager
def anonymous_fleet(url: str, work_dir: Path) -> Iterator[Fleet]:
    """Agents on an open external broker (no enrollment), as the `fleet` helper gives them on the hub's own."""
    agents = Fleet(FleetSettings(count=DEVICES, broker=url, data_dir=work_dir / "rs", prefix="rs",
                                 telemetry_s=TELEMETRY_S))  # fmt: skip
    agents.start()
    try:
        assert agents.wait_connected(TIMEOUT_S) == DEVICES, "not every agent connected"
        yield agents
    finally:
        agents.stop()


def test_more_than_mosquittos_default_queue_waits_for_the_hub(mosquitto, make_hub, tmp_path):
    """5,000 messages while the hub is stopped, five times Mosquitto's default per-client queue (1000, beyond which it
    drops): the embedded config's queue limits keep them all for the hub's session."""
    scenario = "hub away while 5,000 messages come (external Mosquitto)"
    settings = {"broker": mosquitto.url, "data_dir": tmp_path / "hub"}
    make_hub(**settings).stop()
    publish_telemetry(mosquitto.url, "queue-1", range(1, 5001), time.time() - 60)
    hub = make_hub(**settings)
    with suppress(AssertionError):  # counted below
        wait_until(lambda: len(stored_seqs(hub.sessions).get("queue-1", ())) >= 5000, TIMEOUT_S, "5,000 stored")
    stored = len(stored_seqs(hub.sessions).get("queue-1", ()))
    record(scenario, "messages sent", 5000)
    record(scenario, "messages stored", stored)
    record(scenario, "messages lost", 5000 - stored, 0)
    assert stored == 5000


def test_session_expiry_out_of_mqtts_range_is_refused(cli, tmp_path):
    """`--session-expiry` takes 0 to 2^32 - 1 seconds (MQTT 5's field); anything else is a one-line usage error."""
    for value in ("-1", str(2**32)):
        http = f"127.0.0.1:{free_port()}"
        refused = cli("hub", "--data", tmp_path / "hub", "--http", http, "--session-expiry", value)
        assert_user_error(refused, f"--session-expiry {value}", "4294967295")
    assert not (tmp_path / "hub").exists(), "a refused start must leave nothing behind"


# ---- SIGKILL during a burst, hub as a process ------------------------------------------------------------------


class HubProcess:
    """`python -m edgekit hub` on a data dir and an embedded broker port that stay the same across starts."""

    def __init__(self, data: Path, broker_port: int) -> None:
        self.data = data
        self.broker_port = broker_port
        self.process: subprocess.Popen | None = None

    def start(self) -> "HubProcess":
        http = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "edgekit", "hub", "--data", str(self.data), "--http", http, "--broker-port",
                   str(self.broker_port), "--session-expiry", "3600"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        ready = threading.Event()
        output: list[str] = []

        def read(process: subprocess.Popen) -> None:
            for line in process.stdout:
                output.append(line)
                if "dashboard:" in line:
                    ready.set()

        threading.Thread(target=read, args=(self.process,), daemon=True).start()
        assert ready.wait(TIMEOUT_S), f"edgekit hub did not start: {''.join(output)}"
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(TIMEOUT_S)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class BurstDevice:
    """A paho client publishing Telemetry seq 1..n at QoS 1 with a device's login, as fast as the broker takes it.
    Like an agent's outbox, it keeps what the broker has not acknowledged and sends it again after a reconnect."""

    def __init__(self, url: str, device_id: str) -> None:
        address = parse_broker_url(url)
        self.topic = device_topic(device_id, Topic.TELEMETRY)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=False)
        self.client.username_pw_set(address.username, address.password)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, count: int) -> None:
        base = time.time()
        for seq in range(1, count + 1):
            payload = encode(Telemetry(seq=seq, ts=base + seq / 1000, fps=25.0, inferences=seq))
            self.infos.append(self.client.publish(self.topic, payload, qos=1))

    def acknowledged(self) -> int:
        return sum(info.is_published() for info in self.infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_hub_sigkill_during_a_burst_loses_nothing(tmp_path, cli):
    """A device sends 30,000 telemetry messages at QoS 1; `kill -9` of the `edgekit hub` process once part of them
    is stored (its embedded Mosquitto goes down with it, saving its sessions), then the hub starts again on the same
    data dir and port. Every message the broker acknowledged to the device is stored, once."""
    scenario = f"hub SIGKILL during a {BURST:,}-message burst (embedded Mosquitto)"
    data, broker_port = tmp_path / "hub", free_port()
    hub = HubProcess(data, broker_port).start()
    device: BurstDevice | None = None
    engine, sessions = None, None
    try:
        enrolled = cli("hub", "enroll", "burst-1", "--data", data, "--out", tmp_path / "burst-1.json")
        assert enrolled.exit_code == 0, enrolled.stderr
        enrollment = Enrollment.model_validate_json((tmp_path / "burst-1.json").read_text())
        engine, sessions = open_database(database_url(None, data))
        device = BurstDevice(enrollment.broker_url(), "burst-1")
        device.send(BURST)

        def stored() -> int:
            return len(stored_seqs(sessions).get("burst-1", set()))

        wait_until(lambda: stored() >= BURST // 5, TIMEOUT_S, f"{BURST // 5} messages stored before the kill")
        hub.kill()
        stored_at_kill = stored()
        hub = HubProcess(data, broker_port).start()
        wait_until(lambda: device.acknowledged() == BURST, TIMEOUT_S * 2, "the broker to acknowledge every message")
        with suppress(AssertionError):  # counted below
            wait_until(lambda: stored() >= BURST, TIMEOUT_S, "every message stored")
        final = stored()
    finally:
        if device is not None:
            device.close()
        hub.stop()
        if engine is not None:
            engine.dispose()
    sent = device.acknowledged()
    record(scenario, "messages sent (acknowledged by the broker)", sent)
    record(scenario, "messages stored before the kill", stored_at_kill)
    record(scenario, "messages stored", final)
    record(scenario, "messages lost", sent - final, 0)
    assert stored_at_kill < BURST, "the kill came after the burst was stored: it proved nothing"
    assert sent == BURST and final == BURST


# ---- a shared subscription with a member away -----------------------------------------------------------------


def test_an_absent_share_group_member_gets_its_share_when_it_returns(mosquitto, make_hub, tmp_path):
    """Two hub processes on one `--share-group`, each with its own database; one stops and 200 messages come: Mosquitto
    (2.0) still gives it its round-robin share, held in its session (the other member does not take it over), and
    delivers it when that member starts again on its data dir. Nothing is lost; the share waits for its member."""
    scenario = "share group member away (external Mosquitto)"
    group = "hubs-0d1f6a2b9c3e4f5a"
    settings = [{"broker": mosquitto.url, "share_group": group, "data_dir": tmp_path / f"hub-{i}"} for i in (0, 1)]
    staying, leaving = make_hub(**settings[0]), make_hub(**settings[1])
    leaving.stop()
    base = time.time() - 60
    publish_telemetry(mosquitto.url, "share-1", range(1, 201), base)
    wait_until(lambda: staying.ingest.stats.received >= 90, TIMEOUT_S, "the staying member's share")
    time.sleep(1)  # anything more it would get comes meanwhile
    stayed = stored_seqs(staying.sessions).get("share-1", set())
    returned = make_hub(**settings[1])
    wait_until(lambda: len(stayed | stored_seqs(returned.sessions).get("share-1", set())) >= 200, TIMEOUT_S,
               "the returning member's share")  # fmt: skip
    held = stored_seqs(returned.sessions).get("share-1", set())
    lost = 200 - len(stayed | held)
    record(scenario, "messages sent", 200)
    record(scenario, "stored by the member that stayed", len(stayed))
    record(scenario, "held for the absent member, stored when it returned", len(held))
    record(scenario, "messages lost", lost, 0)
    assert lost == 0 and len(stayed) < 200 and held and not stayed & held


def publish_telemetry(url: str, device_id: str, seqs: range, base: float) -> None:
    """Telemetry with these seqs from an open broker's anonymous client, each acknowledged by the broker."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(*host_port(url))
    client.loop_start()
    try:
        topic = device_topic(device_id, Topic.TELEMETRY)
        infos = [client.publish(topic, encode(Telemetry(seq=s, ts=base + s, fps=1.0)), qos=1) for s in seqs]
        for info in infos:
            info.wait_for_publish(TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()


# ---- amqtt ---------------------------------------------------------------------------------------------------------


def test_a_hub_on_amqtt_speaks_mqtt_311_and_a_restart_loses_nothing(tmp_path):
    """amqtt (the fallback broker when Mosquitto is missing) speaks MQTT 3.1.1 only, so the hub's link does too, and
    ingests. The embedded amqtt runs in the hub's process and keeps its sessions in memory: a restart of the hub is a
    restart of the broker. What the agents send while it is down waits in their outboxes, but what amqtt accepted
    between the hub's link closing and amqtt stopping is gone with it (a message or a few: reported, not limited),
    and no session survives — docs/hub.md: use Mosquitto for a hub that loses nothing."""
    scenario = f"hub restart (embedded amqtt, down 4 s, {DEVICES} devices x 10 msg/s)"
    settings = HubSettings(data_dir=tmp_path / "hub", prefer_broker="amqtt", insecure_broker=True,
                           broker_port=free_port(), http_port=free_port())  # fmt: skip

    def started() -> Hub:
        hub = Hub(settings)
        hub.start()
        assert hub.wait_connected(TIMEOUT_S) and hub.wait_http(TIMEOUT_S), "the hub did not start on amqtt"
        return hub

    hub = started()
    try:
        assert hub.embedded.kind == "amqtt" and hub.link.version == "3.1.1"
        with anonymous_fleet(hub.embedded.url, tmp_path) as agents:
            steady(hub, 200)
            hub.stop()
            time.sleep(4)
            hub = started()
            resumed = hub.link.session_resumed
            steady(hub, 200)
        acknowledged = broker_acknowledged(agents)
        lost = lost_messages(acknowledged, hub.sessions)
    finally:
        hub.stop()
    sent = sum(map(len, acknowledged.values()))
    record(scenario, "messages sent (acknowledged by the broker)", sent)
    record(scenario, "messages lost (amqtt drops what it held for the hub when it stops)", lost)
    record(scenario, "hub session resumed (amqtt keeps none across its restart)", int(resumed))
    assert sent > DEVICES * 10 * 4 and not resumed
    assert lost <= DEVICES * 10, f"{lost} lost: more than a second's traffic (the hub's link closing, amqtt stopping)"
