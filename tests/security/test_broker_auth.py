"""An attacker on the network against the hub's embedded Mosquitto (#14 item 1): a real hub with its default,
authenticated broker, real agents enrolled on it, and plain paho clients as the attacker.

Each attack is measured (what got through) and counted in the reliability table with a limit of 0.
"""

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokers import NO_MOSQUITTO, Probe
from hub_helpers import device_url, devices, wait_until, watcher_url
from paho.mqtt.client import MQTTv311
from reliability import record
from sqlalchemy import func, select

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.enrollment import write_enrollment
from edgekit.errors import BadInput, OperationFailed
from edgekit.hub.acl import BrokerUsers
from edgekit.hub.broker import MosquittoBroker, accepts_connections, free_port, mosquitto_available, running_broker_pid
from edgekit.hub.db import TelemetrySample
from edgekit.hub.service import Hub, HubSettings
from edgekit.mqtt import Backoff, parse_broker_url
from edgekit.protocol import DesiredState, ReportedState, Telemetry, Topic, device_topic, encode
from edgekit.signing import generate_keypair

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason=NO_MOSQUITTO)

AREA = "attack: broker auth"
FORGED_REV = 666  # the rev an attacker's desired state carries
MARKER_REV = 7  # the hub's own desired state, sent after each attack: once the device reports it, the attack is over
SHARE_GROUP = "hubs-5f0c2a9e7d41b3c8"  # the hubs' group: a secret of 16+ characters
TELEMETRY_COUNT = 200


def start_agent(hub, url: str, data_dir: Path, device_id: str) -> Agent:
    """A real agent on its enrolled login, trusting the hub's key (so it takes the hub's signed desired states)."""
    agent = Agent(AgentSettings(device_id=device_id, broker=url, data_dir=data_dir, telemetry_s=0.5, threads=1,
                                backoff=Backoff(initial_s=0.2, max_s=1.0), hub_key=hub.trust.public_key_file,
                                trust_version=hub.trust.root.version))  # fmt: skip
    agent.start()
    assert agent.link.wait_connected(15), f"{device_id} did not connect with its enrolled login"
    return agent


def anonymous(url: str) -> str:
    """`url` without its login: what an attacker who reaches the broker but has no password uses."""
    address = parse_broker_url(url)
    return f"mqtt://{address.host}:{address.port}"


def reported_revs(watcher: Probe, device_id: str) -> list[int]:
    return [
        ReportedState.model_validate_json(p).rev
        for _, p in watcher.messages(device_topic(device_id, "config/reported"))
    ]


def converge_to_marker(hub, watcher: Probe, device_id: str) -> None:
    """The hub's own (signed) desired state, and until the device reported converging to it: anything an attacker
    sent before was routed (and applied, had it got through) by then, since Mosquitto routes in arrival order."""
    hub.send_desired(device_id, DesiredState(rev=MARKER_REV), None)
    watcher.wait(lambda: MARKER_REV in reported_revs(watcher, device_id), 15, f"{device_id} reporting rev {MARKER_REV}")


def test_anonymous_clients_cannot_connect_steer_or_read(make_hub, tmp_path):
    """Without a login: the CONNACK refuses the client, so its retained desired state and its `#` subscription
    never happen; the enrolled device converges only to the hub's desired state."""
    hub = make_hub()
    agent = start_agent(hub, device_url(hub, "cam-2"), tmp_path / "cam-2", "cam-2")
    watcher = Probe(watcher_url(hub))
    watcher.subscribe("edgekit/#")
    try:
        intruder = Probe(anonymous(hub.broker_url))
        if intruder.accepted:  # only when the broker let it in: try what the attacker came for
            intruder.subscribe("#")
            # Unsigned on purpose: this tests the broker's CONNACK, not signatures. The agent would refuse it anyway
            # (tests/security/test_signed_desired.py); here it must not even reach the broker.
            forged = DesiredState(rev=FORGED_REV, source="synthetic:?fps=1")
            intruder.publish(device_topic("cam-2", Topic.DESIRED), encode(forged), retain=True)
        converge_to_marker(hub, watcher, "cam-2")
        read = len(intruder.messages()) if intruder.accepted else 0
        applied = reported_revs(watcher, "cam-2").count(FORGED_REV)
        intruder.close()
    finally:
        watcher.close()
        agent.stop()
    record(AREA, "anonymous client connected", int(intruder.accepted), 0)
    record(AREA, "anonymous desired state applied", applied, 0)
    record(AREA, "anonymous subscriber: messages read", read, 0)
    assert not intruder.accepted and intruder.connacks[0].getName() == "Not authorized"
    assert applied == 0 and read == 0


def test_a_device_cannot_steer_or_read_another_device(make_hub, tmp_path):
    """cam-1's own login: it publishes a retained desired state and telemetry for cam-2 and subscribes to cam-2's
    topics and to `#`; cam-2 (a real agent) never sees the desired state, the hub never stores the telemetry, and
    cam-1 reads nothing of cam-2's."""
    hub = make_hub()
    agent = start_agent(hub, device_url(hub, "cam-2"), tmp_path / "cam-2", "cam-2")
    watcher = Probe(watcher_url(hub))
    watcher.subscribe("edgekit/#")
    attacker = Probe(device_url(hub, "cam-1"))
    try:
        attacker.subscribe("edgekit/v1/cam-2/#", "#", "edgekit/v1/cam-1/config/desired")
        # Unsigned on purpose: this tests the broker's ACL (the forged state must not be delivered at all), not
        # signatures. The agent would refuse it anyway (tests/security/test_signed_desired.py).
        forged = DesiredState(rev=FORGED_REV, source="synthetic:?fps=1")
        attacker.publish(device_topic("cam-2", Topic.DESIRED), encode(forged), retain=True)
        impostor = Telemetry(seq=10_000, ts=time.time(), latency_p50_ms=999.0)
        attacker.publish(device_topic("cam-2", Topic.TELEMETRY), encode(impostor))
        converge_to_marker(hub, watcher, "cam-2")
        # And one on cam-1's own topic: once it arrives, what cam-2 published before reached cam-1 too, if it could.
        hub.publish(device_topic("cam-1", Topic.DESIRED), b"marker")
        attacker.wait_for(device_topic("cam-1", Topic.DESIRED), b"marker")
        applied = reported_revs(watcher, "cam-2").count(FORGED_REV)
        delivered = sum(payload == encode(forged) for _, payload in watcher.messages("edgekit/v1/cam-2/#"))
        with hub.sessions() as session:
            stored = session.scalar(select(func.count()).select_from(TelemetrySample).where(
                TelemetrySample.device_id == "cam-2", TelemetrySample.seq == impostor.seq))  # fmt: skip
        read = len(attacker.messages("edgekit/v1/cam-2/#"))
    finally:
        for client in (attacker, watcher):
            client.close()
        agent.stop()
    record(AREA, "another device's desired state: forged state delivered or applied", delivered + applied, 0)
    record(AREA, "another device's telemetry: forged samples stored", stored, 0)
    record(AREA, "another device's topics: messages read", read, 0)
    assert (delivered, applied, stored, read) == (0, 0, 0, 0)
    assert reported_revs(watcher, "cam-2")[-1] == MARKER_REV  # the device is there and did hear the hub


def test_a_device_cannot_take_over_another_devices_session(make_hub):
    """cam-1 connects with cam-2's client ids while cam-2 is connected: the broker binds the client id to the
    username, so cam-2 is not disconnected and its messages keep flowing."""
    hub = make_hub()
    victim = Probe(device_url(hub, "cam-2"), client_id="edgekit-cam-2")
    watcher = Probe(watcher_url(hub))
    watcher.subscribe("edgekit/#")
    cam_1 = device_url(hub, "cam-1")
    attackers = [Probe(cam_1, client_id=client_id) for client_id in ("edgekit-cam-2", "cam-2")]
    try:
        assert all(a.accepted for a in attackers)  # logged in, as themselves: the attack needs no more
        with contextlib.suppress(RuntimeError):  # paho's answer when the victim is no longer connected
            victim.publish(device_topic("cam-2", Topic.STATUS), b"still here")
        heard = (device_topic("cam-2", Topic.STATUS), b"still here")
        wait_until(lambda: victim.disconnects or heard in watcher.messages(), 5, "cam-2's message or its drop")
        taken = victim.disconnects
    finally:
        for client in (*attackers, victim, watcher):
            client.close()
    record(AREA, "client-id takeover: victim sessions dropped", taken, 0)
    assert taken == 0


def test_a_device_cannot_take_a_share_of_the_hubs_messages(make_hub):
    """Hubs on a shared subscription: cam-1 subscribes to `$share/<group>/…` for the usual names; cam-2 sends 200
    telemetry messages and the hub stores all 200. (Mosquitto 2.0's ACL file does not check subscriptions: what
    protects the hubs' group is its secret name, and a guessable one is refused.)"""
    with pytest.raises(BadInput, match="--share-group 'hubs'"):
        HubSettings(data_dir=Path("unused"), share_group="hubs")
    hub = make_hub(share_group=SHARE_GROUP)
    attacker = Probe(device_url(hub, "cam-1"))
    sender = Probe(device_url(hub, "cam-2"))
    try:
        for group in ("hubs", "edgekit", "hub", "edgekit-hub", "$share"):
            attacker.subscribe(f"$share/{group}/edgekit/v1/+/telemetry")
        base = time.time()
        for seq in range(1, TELEMETRY_COUNT + 1):
            sender.publish(device_topic("cam-2", Topic.TELEMETRY), encode(Telemetry(seq=seq, ts=base + seq)))

        def stored() -> int:
            with hub.sessions() as session:
                return session.scalar(select(func.count()).select_from(TelemetrySample).where(
                    TelemetrySample.device_id == "cam-2"))  # fmt: skip

        with contextlib.suppress(AssertionError):  # a shortfall is measured and recorded below
            wait_until(lambda: stored() == TELEMETRY_COUNT, 20, f"the hub to store {TELEMETRY_COUNT} messages")
        lost = TELEMETRY_COUNT - stored()
    finally:
        attacker.close()
        sender.close()
    record(AREA, f"$share subscription: of {TELEMETRY_COUNT} telemetry messages, lost by the hub", lost, 0)
    assert lost == 0


# ---- the device's secrets -----------------------------------------------------------------------------------------


def others_can_read(paths: list[Path]) -> list[str]:
    return [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in paths if p.stat().st_mode & 0o077]


def run_agent_until(enrollment: Path, data: Path, done, what: str) -> str:
    """`edgekit agent --enrollment FILE` as a process until `done()`; everything it printed."""
    command = [sys.executable, "-m", "edgekit", "agent", "--enrollment", str(enrollment), "--data", str(data),
               "--source", "synthetic:?fps=5", "--telemetry-s", "0.5"]  # fmt: skip
    agent = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(done, 30, what)
    finally:
        agent.terminate()
        output = agent.communicate(timeout=30)[0]
    return output


def test_the_device_password_stays_out_of_logs_units_and_other_users_reach(make_hub, cli, tmp_path):
    """A real agent process on its enrollment, then one with a wrong password (refused, and says so): neither
    prints the password; `agent install` puts it only in a 0600 EnvironmentFile; the agent's data folder and the
    hub's broker files are readable by their owner only."""
    _, public = generate_keypair(tmp_path / "keys")
    hub = make_hub(trust_key=public)
    enrollment = hub.enroll(["cam-5"])[0]
    good, bad = tmp_path / "cam-5.json", tmp_path / "wrong.json"
    write_enrollment(good, enrollment)
    write_enrollment(bad, enrollment.model_copy(update={"password": "not-the-password-" + "x" * 16}))
    data = tmp_path / "agent"
    joined = run_agent_until(good, data, lambda: devices(hub).get("cam-5") and devices(hub)["cam-5"].online, "cam-5")
    refusals = hub.embedded.log_path.read_text().count("not authorised")
    refused = run_agent_until(bad, tmp_path / "wrong", lambda: hub.embedded.log_path.read_text().count(
        "not authorised") > refusals, "the broker to refuse the wrong password")  # fmt: skip
    output = joined + refused
    result = cli("agent", "install", "--enrollment", good, "--unit-dir", tmp_path / "unit")
    assert result.exit_code == 0, result.output
    unit, env = tmp_path / "unit" / "edgekit-agent.service", tmp_path / "unit" / "edgekit-agent.env"
    leaked = output.count(enrollment.password) + output.count("not-the-password") + unit.read_text().count(
        enrollment.password)  # fmt: skip
    agent_files = others_can_read([data, *data.rglob("*")])
    hub_files = others_can_read([hub.users.folder, *hub.users.folder.iterdir()])
    hub_secrets = [hub.users.folder / name for name in ("passwd", "acl", "hub.password")]
    record(AREA, "device password printed by the agent or written into its systemd unit", leaked, 0)
    record(AREA, "agent data files readable by other users (outbox, state, trust key)", len(agent_files), 0)
    record(AREA, "hub broker secrets readable by other users (passwd, acl, hub password)",
           len(others_can_read(hub_secrets)), 0)  # fmt: skip
    assert leaked == 0 and "cam-5:***@" in output, output
    assert f'EDGEKIT_BROKER="{enrollment.broker_url()}"' in env.read_text() and env.stat().st_mode & 0o777 == 0o600
    assert f"EnvironmentFile={env}" in unit.read_text()
    assert not agent_files and (data / "outbox.sqlite").is_file()
    assert not others_can_read(hub_secrets), hub_files


# ---- the broker dies with the hub ----------------------------------------------------------------------------------


def test_the_embedded_broker_dies_with_the_hub(tmp_path):
    """`kill -9` of a real `edgekit hub` process: its Mosquitto goes too (parent-death signal), and a hub started
    again on the same folder and broker port gets that port. A broker left behind anyway (started here as a killed
    hub would have left it) is found by its pidfile and stopped by the next start."""
    data, broker_port = tmp_path / "hub", free_port()
    command = [sys.executable, "-m", "edgekit", "hub", "--data", str(data), "--broker-port", str(broker_port)]

    def start_hub() -> subprocess.Popen:
        hub = subprocess.Popen([*command, "--http", f"127.0.0.1:{free_port()}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_until(lambda: hub.poll() is not None or accepts_connections("127.0.0.1", broker_port), 30, "the broker")
        return hub

    hub = start_hub()
    broker = running_broker_pid(data / "broker")
    assert hub.poll() is None and broker is not None
    hub.kill()
    hub.wait()
    with contextlib.suppress(AssertionError):  # measured below
        wait_until(lambda: running_broker_pid(data / "broker") is None, 10, "the broker to go with the hub")
    orphaned = int(running_broker_pid(data / "broker") is not None)
    again = start_hub()
    restarted = again.poll() is None and running_broker_pid(data / "broker") not in (None, broker)
    again.kill()
    again.wait()
    wait_until(lambda: running_broker_pid(data / "broker") is None, 10, "the second broker to go")

    # A broker that outlived its hub (no parent-death signal reached it): the next start stops it first.
    stale = MosquittoBroker(data / "broker", port=broker_port, users=BrokerUsers(data / "broker").ensure())
    stale.start()
    stale._process = None  # forgotten, as by a killed hub: only its pidfile is left
    replaced = MosquittoBroker(data / "broker", port=broker_port, users=BrokerUsers(data / "broker"))
    try:
        replaced.start()
        stale_left = int(running_broker_pid(data / "broker") != replaced._process.pid)
    finally:
        replaced.stop()
    record(AREA, "hub kill -9: embedded broker left running", orphaned, 0)
    record(AREA, "hub kill -9: restart on the same broker port failed", int(not restarted), 0)
    record(AREA, "broker left by a killed hub: still running after the next start", stale_left, 0)
    assert (orphaned, restarted, stale_left) == (0, True, 0)


def test_the_amqtt_fallback_is_never_open_by_default(tmp_path):
    """amqtt cannot enforce the logins and the ACL: a hub asked to run it refuses to start, unless the open broker
    is asked for (--insecure-broker), and then anonymous clients do get in."""
    refused = Hub(HubSettings(data_dir=tmp_path / "refused", prefer_broker="amqtt", broker_port=free_port()))
    with pytest.raises(OperationFailed, match="cannot enforce device passwords"):
        refused.start()
    refused.stop()
    started_open = int(refused.embedded is not None)
    insecure = Hub(HubSettings(data_dir=tmp_path / "open", prefer_broker="amqtt", insecure_broker=True,
                               broker_port=free_port(), http_port=free_port()))  # fmt: skip
    insecure.start()
    try:
        anonymous_client = Probe(f"mqtt://127.0.0.1:{insecure.embedded.port}", protocol=MQTTv311)  # amqtt: 3.1.1
        anonymous_client.close()
    finally:
        insecure.stop()
    record(AREA, "amqtt fallback started open without --insecure-broker", started_open, 0)
    assert started_open == 0 and insecure.embedded.kind == "amqtt" and anonymous_client.accepted
