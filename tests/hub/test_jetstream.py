"""Hub replicas on a 3-node NATS cluster: devices speak MQTT 3.1.1 to any node, the hubs take telemetry, results,
events and chunk requests from JetStream's shared durable consumers (`edgekit hub --jetstream`), on one PostgreSQL.

Real parts throughout: three `nats-server` processes with logins (tests/nats_cluster.py), real hubs, real agents,
a real PostgreSQL; one node and one hub are killed with SIGKILL.
"""

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from brokers import Probe
from hub_helpers import broker_acknowledged, fleet, lost_messages, stored_seqs, wait_until
from nats_cluster import NatsCluster, started_nats_cluster
from paho.mqtt.client import MQTTv311
from reliability import record
from sqlalchemy import func, select

from edgekit.enrollment import Enrollment
from edgekit.hub.broker import free_port
from edgekit.hub.db import Device, TelemetrySample
from edgekit.hub.jetstream import MQTT_STREAM, consumer_name, ensure_consumers, parse_nats_urls
from edgekit.hub.service import Hub
from edgekit.protocol import (
    ChunkRequest,
    ReportedState,
    Result,
    Telemetry,
    Topic,
    decode_chunk,
    device_topic,
    encode,
)

SCENARIO = "hub replicas on a 3-node NATS cluster (JetStream)"
TIMEOUT_S = 30.0
MQTT_ACK_WAIT_S = 5  # longer than the hub's reconnect, so a message sent again would come after newer ones


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    return nats_cluster


def replicas(make_hub, cluster: NatsCluster, db: str, folder: Path, count: int = 2) -> list[Hub]:
    """`count` hubs on `db`, consuming from the cluster's JetStream; the later ones with the first's trust keys."""
    hubs = [make_hub(data_dir=folder / "hub-a", db=db, broker=cluster.hub_mqtt_url(), jetstream=cluster.nats_url())]
    for name in ("hub-b", "hub-c")[: count - 1]:
        shutil.copytree(hubs[0].settings.data_dir / "trust", folder / name / "trust")
        hubs.append(make_hub(data_dir=folder / name, db=db, broker=cluster.hub_mqtt_url(),
                             jetstream=cluster.nats_url()))  # fmt: skip
    return hubs


class OnCluster:
    """What `hub_helpers.fleet` asks of a hub, for devices on the NATS cluster: a login there for each (allowed only
    its own subjects) with every node's address, the list of device i starting at node i mod 3 so the fleet spreads
    over the nodes; and the hub's trust keys."""

    def __init__(self, hub: Hub, cluster: NatsCluster) -> None:
        self.trust = hub.trust
        self._cluster = cluster

    def enroll(self, device_ids: list[str]) -> list[Enrollment]:
        passwords = self._cluster.add_devices(device_ids)
        nodes = len(self._cluster.nodes)
        return [Enrollment(device_id=d, broker=self._cluster.mqtt_urls(first=i % nodes), username=d,
                           password=passwords[d]) for i, d in enumerate(device_ids)]  # fmt: skip


def telemetry_rows(hub: Hub) -> int:
    with hub.sessions() as session:
        return session.scalar(select(func.count()).select_from(TelemetrySample)) or 0


def ask_jetstream(cluster: NatsCluster, question: Callable[[Any], Awaitable[Any]]) -> Any:
    """`await question(jetstream)` over a connection of the hub's login, closed afterwards."""

    async def ask() -> Any:
        import nats

        servers = parse_nats_urls(cluster.nats_url())
        client = await nats.connect(servers=list(servers.urls), user=servers.user, password=servers.password)
        try:
            return await question(client.jetstream())
        finally:
            await client.close()

    return asyncio.run(ask())


def consumer_info(cluster: NatsCluster, kind: str) -> Any:
    """The state of the hubs' shared consumer of `kind` as JetStream reports it (delivered, pending, acked)."""
    return ask_jetstream(cluster, lambda js: js.consumer_info(MQTT_STREAM, consumer_name(kind)))


def replicas_current(cluster: NatsCluster) -> bool:
    """Whether every follower of nats-server's MQTT stream has caught up with its leader."""
    info = ask_jetstream(cluster, lambda js: js.stream_info(MQTT_STREAM))
    followers = info.cluster.replicas or []
    return len(followers) == len(cluster.nodes) - 1 and all(peer.current for peer in followers)


def test_replicas_share_the_stream_and_a_dead_nats_node_loses_no_telemetry(cluster, pg_url, make_hub, tmp_path):
    """Nine agents over three nodes, two hubs: the hubs split the messages, each stored once; kill -9 of node 1 mid-
    stream: its agents reconnect to another node, and every seq is in the database or still in its device's outbox."""
    a, b = replicas(make_hub, cluster, pg_url, tmp_path)
    with fleet(OnCluster(a, cluster), 9, tmp_path, None, None, prefix="js", source=None, telemetry_s=0.2) as agents:
        wait_until(lambda: telemetry_rows(a) >= 45, TIMEOUT_S, "telemetry from the fleet")
        on_node_1 = agents.agents[1::3]
        connects = {agent.settings.device_id: agent.link.connects for agent in on_node_1}
        cluster.kill(1)
        killed = time.monotonic()
        wait_until(lambda: all(agent.link.connected and agent.link.connects > connects[agent.settings.device_id]
                               for agent in on_node_1), TIMEOUT_S, "the agents of node 1 on another node")  # fmt: skip
        moved_s = time.monotonic() - killed
        flowing = telemetry_rows(a)
        wait_until(lambda: telemetry_rows(a) >= flowing + 45, TIMEOUT_S, "telemetry after the node was lost")
    acknowledged = broker_acknowledged(agents)
    cluster.restart(1)
    wait_until(lambda: replicas_current(cluster), TIMEOUT_S, "the restarted node to catch up with the stream")
    lost = lost_messages(acknowledged, a.sessions, TIMEOUT_S)
    sent = sum(len(seqs) for seqs in acknowledged.values())
    rows = sum(len(seqs) for seqs in stored_seqs(a.sessions).values())
    newly = [hub.ingest.stats.stored for hub in (a, b)]
    record(SCENARIO, "sequenced messages the broker acknowledged", sent)
    record(SCENARIO, "of them lost (kill -9 of a NATS node mid-stream)", lost, 0)
    record(SCENARIO, "agents moved to another node", len(on_node_1))
    record(SCENARIO, "s from the kill to every moved agent connected", round(moved_s, 2))
    record(SCENARIO, "messages stored by replica A", newly[0])
    record(SCENARIO, "messages stored by replica B", newly[1])
    record(SCENARIO, "redeliveries absorbed as duplicates", sum(hub.ingest.stats.duplicates for hub in (a, b)))
    assert lost == 0, (f"{lost} of {sent} acknowledged messages are neither in the database nor in an outbox; "
                       f"telemetry consumer {consumer_info(cluster, Topic.TELEMETRY)}")  # fmt: skip
    assert all(newly), f"the two replicas did not share the stream: each stored {newly}"
    assert sum(newly) == rows, "a message was stored by both replicas"


def test_a_chunk_request_is_answered_by_exactly_one_replica(cluster, pg_url, make_hub, tmp_path) -> None:
    """A device asks for chunks through the NATS node of its choice; each request reaches one of the two hubs, whose
    chunk comes back over MQTT: one chunk message per request, none twice."""
    a, b = replicas(make_hub, cluster, pg_url, tmp_path)
    data = os.urandom(40_000)
    bundle = hashlib.sha256(data).hexdigest()
    for hub in (a, b):  # each replica's own copy: what it serves does not depend on how bundles are shared
        (hub.settings.data_dir / "bundles" / f"{bundle}.ekb").write_bytes(data)
    cluster.add_devices(["cam-1"])
    device = Probe(cluster.device_url("cam-1", first=2), client_id="cam-1", protocol=MQTTv311)
    try:
        chunks = device_topic("cam-1", Topic.TRANSFER_CHUNK)
        assert not device.subscribe(chunks)[0].is_failure
        asked = list(range(12))  # distinct requests: a server drops a request that repeats one it still has queued
        for index in asked:
            request = ChunkRequest(bundle=bundle, index=index, count=1, chunk_size=2048)
            device.publish(device_topic("cam-1", Topic.TRANSFER_REQUEST), encode(request))
        served = lambda: a.link.transfer.chunks_sent + b.link.transfer.chunks_sent  # noqa: E731
        wait_until(lambda: served() >= len(asked), TIMEOUT_S, "the hubs to serve every request")
        wait_until(lambda: consumer_info(cluster, Topic.TRANSFER_REQUEST).num_ack_pending == 0, TIMEOUT_S, "every ack")
        device.wait(lambda: len(device.messages(chunks)) >= len(asked), TIMEOUT_S, "every chunk")
        received = sorted(decode_chunk(payload, 1 << 20)[0].index for _, payload in device.messages(chunks))
    finally:
        device.close()
    per_replica = (a.link.transfer.chunks_sent, b.link.transfer.chunks_sent)
    record(SCENARIO, "chunk messages per chunk request", len(received) / len(asked), 1)
    record(SCENARIO, "chunk requests answered by replica A", per_replica[0])
    record(SCENARIO, "chunk requests answered by replica B", per_replica[1])
    assert served() == len(asked), f"{served()} chunks sent for {len(asked)} requests"
    assert received == asked


def test_results_sent_at_qos_0_reach_one_replica_too(cluster, pg_url, make_hub, tmp_path) -> None:
    """nats-server stores only QoS 1 messages: QoS 0 results (a desired state may ask for them) come through a core
    NATS queue group instead, each to one replica; the QoS 1 ones are not taken twice."""
    a, b = replicas(make_hub, cluster, pg_url, tmp_path)
    cluster.add_devices(["cam-3"])
    device = Probe(cluster.device_url("cam-3", first=1), client_id="cam-3", protocol=MQTTv311)
    try:
        for seq in range(1, 21):
            result = Result(seq=seq, ts=time.time(), frame_ts=time.time(), bundle="m@1", latency_ms=1.0, task="raw")
            device.client.publish(device_topic("cam-3", Topic.RESULTS), encode(result), qos=seq % 2)
        wait_until(lambda: len(stored_seqs(a.sessions).get("cam-3", ())) == 20, TIMEOUT_S, "the 20 results stored")
    finally:
        device.close()
    received = sum(hub.ingest.stats.received for hub in (a, b))
    record(SCENARIO, "results at QoS 0 and 1 taken by the replicas, of 20 sent", received, 20)
    assert stored_seqs(a.sessions)["cam-3"] == set(range(1, 21))
    assert received == 20, f"the replicas took {received} messages for 20 results"


@pytest.fixture
def quick_redelivery() -> Iterator[NatsCluster]:
    """A cluster whose MQTT side sends a message again 5 s after an unanswered delivery (30 s by default)."""
    yield from started_nats_cluster(3, mqtt_ack_wait=f"{MQTT_ACK_WAIT_S}s")


def test_a_state_the_hub_had_not_acknowledged_when_its_node_died_never_overwrites_a_newer_one(
    quick_redelivery, pg_url, make_hub, tmp_path
) -> None:
    """The hub took reported state rev 1 but could not commit it (the devices table locked) when its NATS node died;
    rev 2 came after it reconnected. nats-server would send rev 1 again after its ack wait (5 s here), after rev 2:
    the hub takes state topics at QoS 0, so nothing is sent again and rev 2 stays."""
    cluster = quick_redelivery
    hub = make_hub(data_dir=tmp_path / "hub", db=pg_url, broker=cluster.hub_mqtt_url(), jetstream=cluster.nats_url())
    cluster.add_devices(["cam-5"])
    device = Probe(cluster.device_url("cam-5", first=1), client_id="cam-5", protocol=MQTTv311)
    topic = device_topic("cam-5", Topic.REPORTED)
    try:
        device.publish(topic, encode(ReportedState(rev=0)), retain=True)
        wait_until(lambda: reported_rev(hub, "cam-5") == 0, TIMEOUT_S, "the first state stored")
        with psycopg.connect(pg_url) as lock:
            lock.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
            device.publish(topic, encode(ReportedState(rev=1)), retain=True)
            wait_until(lambda: hub.ingest.stats.received >= 2, TIMEOUT_S, "the hub to take rev 1")
            cluster.kill(0)  # the hub's node (its address lists start there): its connections move on
            # Subscribed again on another node, which sends the retained rev 1: a state published from now on reaches
            # the hub live. (One published while it reconnects is covered by that retained copy.)
            wait_until(lambda: hub.ingest.stats.received >= 3, TIMEOUT_S, "the hub subscribed on another node")
            lock.rollback()
        device.publish(topic, encode(ReportedState(rev=2)), retain=True)
        wait_until(lambda: reported_rev(hub, "cam-5") == 2, TIMEOUT_S, "rev 2 stored")
        time.sleep(2 * MQTT_ACK_WAIT_S)  # past the server's ack wait: anything it would send again has come by now
        final = reported_rev(hub, "cam-5")
    finally:
        device.close()
    record(SCENARIO, "older reported states stored over a newer one after a node kill", int(final != 2), 0)
    assert final == 2


def reported_rev(hub: Hub, device_id: str) -> int | None:
    with hub.sessions() as session:
        reported = session.scalar(select(Device.reported).where(Device.id == device_id))
    return None if not reported else reported["rev"]


def test_a_device_may_use_only_its_own_topics_on_the_cluster(cluster: NatsCluster) -> None:
    """cam-1's login: its own topics over MQTT, nothing of cam-2's, and no plain NATS connection (which would reach
    JetStream's API)."""
    cluster.add_devices(["cam-1", "cam-2"])
    watcher = Probe(cluster.hub_mqtt_url(), client_id="watcher", protocol=MQTTv311)
    attacker = Probe(cluster.device_url("cam-1"), client_id="cam-1", protocol=MQTTv311)
    try:
        assert not watcher.subscribe("edgekit/v1/#")[0].is_failure
        # $MQTT/sub/#: where the server delivers every client's QoS 1 messages (devices hold $MQTT.sub.> to receive)
        granted = attacker.subscribe(device_topic("cam-2", Topic.DESIRED), "edgekit/v1/+/telemetry", "$MQTT/sub/#")
        attacker.publish(device_topic("cam-2", Topic.TELEMETRY), b"spoofed")
        attacker.publish(device_topic("cam-1", Topic.TELEMETRY), b"own")
        # One client's messages arrive in order: once its second is here, its first would have been.
        watcher.wait_for(device_topic("cam-1", Topic.TELEMETRY), b"own")
        spoofed = watcher.messages(device_topic("cam-2", "#"))
    finally:
        attacker.close()
        watcher.close()
    nats_login = asyncio.run(_nats_login_works(cluster, "cam-1", cluster.devices["cam-1"]))
    attack = "attack: a device's login on another device's NATS subjects"
    record(attack, "foreign subscriptions granted", sum(not reason.is_failure for reason in granted), 0)
    record(attack, "foreign publishes delivered", len(spoofed), 0)
    record(attack, "plain NATS connections accepted", int(nats_login), 0)
    assert [reason.is_failure for reason in granted] == [True, True, True]
    assert spoofed == [] and not nats_login


async def _nats_login_works(cluster: NatsCluster, user: str, password: str) -> bool:
    import nats

    servers = parse_nats_urls(cluster.nats_url())
    try:
        client = await nats.connect(servers=list(servers.urls), user=user, password=password,
                                    max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)  # fmt: skip
    except Exception:  # refused: nats-py raises what the server said (an authorization violation)
        return False
    await client.close()
    return True


def hub_process(data_dir: Path, db: str, cluster: NatsCluster, port: int) -> subprocess.Popen:
    """`edgekit hub --jetstream` as a user runs a replica, its log beside its data folder."""
    command = [sys.executable, "-m", "edgekit", "hub", "--data", str(data_dir), "--db", db, "--broker",
               cluster.hub_mqtt_url(), "--jetstream", cluster.nats_url(), "--http", f"127.0.0.1:{port}"]  # fmt: skip
    log = (data_dir.parent / f"{data_dir.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def test_what_a_killed_hub_held_unacked_goes_to_the_other_replica_and_is_stored_once(
    cluster, pg_url, make_hub, tmp_path
) -> None:
    """A hub process fetched 50 telemetry messages but could not commit them (the table locked), then died (kill -9):
    JetStream delivers them again, after the consumer's ack wait, to the other replica, which stores each once."""
    cluster.add_devices(["cam-7"])
    # The device's connection makes nats-server create its MQTT stream, on which the consumers are made before any
    # hub starts, with a short ack wait, as an operator may tune them: hubs keep consumers that exist.
    device = Probe(cluster.device_url("cam-7", first=1), client_id="cam-7", protocol=MQTTv311)
    ask_jetstream(cluster, lambda js: ensure_consumers(js, ack_wait_s=3.0))
    doomed = hub_process(tmp_path / "doomed", pg_url, cluster, free_port())
    try:
        wait_until(lambda: consumer_info(cluster, Topic.TELEMETRY).num_waiting > 0, 60, "the hub process to pull")
        with psycopg.connect(pg_url) as lock:
            lock.execute(f"LOCK TABLE {TelemetrySample.__tablename__} IN ACCESS EXCLUSIVE MODE")
            for seq in range(1, 51):
                device.publish(device_topic("cam-7", Topic.TELEMETRY), encode(Telemetry(seq=seq, ts=time.time())))
            wait_until(lambda: consumer_info(cluster, Topic.TELEMETRY).num_ack_pending == 50, TIMEOUT_S,
                       "the hub process to hold the 50 messages unacked")  # fmt: skip
            doomed.kill()
            doomed.wait()
            lock.rollback()
    finally:
        device.close()
        if doomed.poll() is None:
            doomed.kill()
    other = make_hub(data_dir=tmp_path / "other", db=pg_url, broker=cluster.hub_mqtt_url(),
                     jetstream=cluster.nats_url())  # fmt: skip
    wait_until(lambda: telemetry_rows(other) >= 50, TIMEOUT_S, "the other replica to store the 50 messages")
    info = consumer_info(cluster, Topic.TELEMETRY)
    record(SCENARIO, "messages a killed hub held unacked, stored by the other replica", other.ingest.stats.stored)
    record(SCENARIO, "of them lost", 50 - telemetry_rows(other), 0)
    assert telemetry_rows(other) == 50 == other.ingest.stats.stored
    assert info.delivered.consumer_seq >= 100, "the messages were not delivered a second time"
