"""The hub's MQTT chunk path under load (edgekit.hub.transfer.BundleServer) on a real Mosquitto: hubs in a share
group answer each request exactly once, and a request still waiting behind a busy worker is not answered twice."""

import os
import threading
from collections import Counter
from pathlib import Path

from agent_helpers import MqttServedBundles
from brokers import Probe, wait_until
from paho.mqtt.client import MQTTv5

from edgekit.bundle import sha256_file
from edgekit.protocol import ChunkRequest, Topic, decode_chunk, device_topic, encode

TIMEOUT_S = 15.0
REQUESTS = 10
COUNT = 4


def _bundle(tmp_path: Path) -> Path:
    path = tmp_path / "blob.ekb"
    path.write_bytes(os.urandom(REQUESTS * COUNT * 1024 + 100))
    return path


def _chunks(probe: Probe) -> Counter:
    return Counter(decode_chunk(payload, 1 << 20)[0].index for _, payload in probe.messages("+/+/+/" + "#"))


def _ask_all(probe: Probe, bundle_id: str) -> None:
    for first in range(0, REQUESTS * COUNT, COUNT):
        request = ChunkRequest(bundle=bundle_id, index=first, count=COUNT, chunk_size=1024)
        probe.publish(device_topic("cam-1", Topic.TRANSFER_REQUEST), encode(request))


def _servers(mosquitto, path: Path, share_group: str | None) -> list[MqttServedBundles]:
    servers = [MqttServedBundles(mosquitto, client_id=f"hub-{n}", share_group=share_group) for n in range(2)]
    for served in servers:
        served.add(path)
        wait_until(lambda s=served: s.client.is_connected(), TIMEOUT_S, "the server's connection")
    return servers


def _answered(mosquitto, path: Path, group: str | None) -> Counter:
    """How often each chunk came when two servers (in `group`, if any) got every request of one device."""
    servers = _servers(mosquitto, path, group)
    probe = Probe(mosquitto.url, protocol=MQTTv5)
    try:
        probe.subscribe(device_topic("cam-1", Topic.TRANSFER_CHUNK))
        threading.Event().wait(0.3)  # the servers' SUBSCRIBEs, sent from their on_connect
        _ask_all(probe, sha256_file(path))
        expected = REQUESTS * COUNT * (1 if group else 2)
        wait_until(lambda: sum(_chunks(probe).values()) >= expected, TIMEOUT_S, f"{expected} chunks")
        threading.Event().wait(0.5)  # anything more would come now
        return _chunks(probe)
    finally:
        probe.close()
        for served in servers:
            served.close()


def test_hubs_in_a_share_group_answer_each_chunk_request_once(mosquitto, tmp_path) -> None:
    path = _bundle(tmp_path)
    total = REQUESTS * COUNT
    assert _answered(mosquitto, path, "hubs") == Counter(range(total))  # every chunk once, from one hub or the other
    assert _answered(mosquitto, path, None) == Counter({index: 2 for index in range(total)})  # what the group prevents


def test_a_request_repeated_while_it_waits_is_answered_once(mosquitto, tmp_path) -> None:
    path = _bundle(tmp_path)
    bundle_id = sha256_file(path)
    release = threading.Event()

    def slow(requested: str) -> Path | None:  # the one worker is busy with the first request until released
        release.wait(TIMEOUT_S)
        return served.files.get(requested)

    served = MqttServedBundles(mosquitto, client_id="hub-slow", workers=1, resolve=slow)
    served.add(path)
    probe = Probe(mosquitto.url, protocol=MQTTv5)
    try:
        wait_until(served.client.is_connected, TIMEOUT_S, "the server's connection")
        probe.subscribe(device_topic("cam-1", Topic.TRANSFER_CHUNK))
        threading.Event().wait(0.3)
        request = encode(ChunkRequest(bundle=bundle_id, index=0, count=COUNT, chunk_size=1024))
        for _ in range(5):  # the device's re-requests after stalls, while the hub is busy
            probe.publish(device_topic("cam-1", Topic.TRANSFER_REQUEST), request)
        wait_until(lambda: served.server.duplicates == 3, TIMEOUT_S, "3 requests dropped as duplicates")
        release.set()
        wait_until(lambda: sum(_chunks(probe).values()) >= 2 * COUNT, TIMEOUT_S, "the chunks")
        threading.Event().wait(0.5)
        # The first, taken by the worker before the others came, and one of the four that waited.
        assert _chunks(probe) == Counter({index: 2 for index in range(COUNT)})
    finally:
        probe.close()
        served.close()
