"""ACL files from `edgekit hub acl` on a real Mosquitto: device A cannot read or write device B's topics."""

import json

import paho.mqtt.client as mqtt
import pytest
from brokers import NO_MOSQUITTO, wait_until

from edgekit.hub.acl import HUB_USER, mosquitto_password_hash, write_acl_files
from edgekit.hub.broker import MosquittoBroker, mosquitto_available

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason=NO_MOSQUITTO)


class Client:
    def __init__(self, port: int, user: str, password: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.results: list = []
        self.subscribed = 0  # SUBACKs received
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-test-{user}")
        self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, u, f, reason, p: self.results.append(reason)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *_: setattr(self, "subscribed", self.subscribed + 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(lambda: self.results, 5, f"CONNACK for {user}")

    @property
    def accepted(self) -> bool:
        return not self.results[0].is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_a_cannot_read_or_write_device_b(tmp_path):
    files = write_acl_files(tmp_path / "acl", ["dev-a", "dev-b"])
    passwords = json.loads(files.credentials.read_text())
    assert oct(files.credentials.stat().st_mode & 0o777) == "0o600"
    with MosquittoBroker(tmp_path / "broker", password_file=files.password_file, acl_file=files.acl_file) as broker:
        hub = Client(broker.port, HUB_USER, passwords[HUB_USER])
        a = Client(broker.port, "dev-a", passwords["dev-a"])
        b = Client(broker.port, "dev-b", passwords["dev-b"])
        assert hub.accepted and a.accepted and b.accepted
        hub.client.subscribe("edgekit/#", qos=1)
        for topic in (
            "edgekit/v1/dev-b/config/desired",
            "edgekit/v1/dev-b/#",
            "edgekit/#",
            "edgekit/v1/dev-a/config/desired",
        ):
            a.client.subscribe(topic, qos=1)
        b.client.subscribe("edgekit/v1/dev-b/config/desired", qos=1)
        wait_until(lambda: (hub.subscribed, a.subscribed, b.subscribed) == (1, 4, 1), 5, "every SUBACK")
        hub.client.publish("edgekit/v1/dev-b/config/desired", b"for b", qos=1)
        hub.client.publish("edgekit/v1/dev-a/config/desired", b"for a", qos=1)
        a.client.publish("edgekit/v1/dev-b/telemetry", b"a pretending to be b", qos=1)
        a.client.publish("edgekit/v1/dev-b/config/desired", b"a steering b", qos=1)
        a.client.publish("edgekit/v1/dev-a/telemetry", b"a's own", qos=1)
        wait_until(lambda: ("edgekit/v1/dev-a/telemetry", b"a's own") in hub.messages, 5, "a's own telemetry")
        # Mosquitto routes messages in the order they come in: A's publishes were routed before its own telemetry
        # reached the hub, so a marker the hub sends now reaches A and B after anything (wrongly) routed to them.
        desired_a, desired_b = "edgekit/v1/dev-a/config/desired", "edgekit/v1/dev-b/config/desired"
        for topic, client in ((desired_a, a), (desired_b, b)):
            hub.client.publish(topic, b"marker", qos=1)
            wait_until(lambda c=client, t=topic: (t, b"marker") in c.messages, 5, f"the marker on {topic}")
        assert a.messages == [(desired_a, b"for a"), (desired_a, b"marker")]
        assert b.messages == [(desired_b, b"for b"), (desired_b, b"marker")]
        assert ("edgekit/v1/dev-b/telemetry", b"a pretending to be b") not in hub.messages
        assert ("edgekit/v1/dev-b/config/desired", b"a steering b") not in hub.messages
        intruder = Client(broker.port, "dev-a", "wrong password")
        assert not intruder.accepted
        for client in (hub, a, b, intruder):
            client.close()


def test_password_hash_matches_the_mosquitto_format():
    hashed = mosquitto_password_hash("secret", salt=b"0123456789ab")
    scheme, iterations, salt, digest = hashed.split("$")[1:]
    assert (scheme, iterations, salt) == ("7", "101", "MDEyMzQ1Njc4OWFi")
    assert len(digest) == 88  # base64 of a 64-byte SHA-512 digest


def test_bad_device_ids_are_refused(tmp_path):
    from edgekit.errors import BadInput

    with pytest.raises(BadInput, match="bad id"):
        write_acl_files(tmp_path, ["good", "bad id"])
    with pytest.raises(BadInput, match="no device ids"):
        write_acl_files(tmp_path, [])
