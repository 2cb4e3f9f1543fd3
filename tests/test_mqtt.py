"""Broker address lists (the nodes of a clustered broker) and the NATS subject mapping, with a real broker for the
failover of `edgekit.mqtt.Connection`."""

import threading

import pytest
from brokers import wait_until

from edgekit.errors import BadInput
from edgekit.hub.broker import free_port
from edgekit.hub.jetstream import check_jetstream, parse_nats_urls, subject_of, topic_of
from edgekit.mqtt import Backoff, Connection, new_client, parse_broker_url, redact_url, with_login


def test_a_broker_list_is_every_node_and_an_entry_without_a_login_takes_the_first_ones() -> None:
    address = parse_broker_url("mqtt://cam-1:s%40cret@n1:1884,mqtt://n2,mqtt://other:pw@n3:1886")
    nodes = [(n.host, n.port, n.username, n.password) for n in address.nodes()]
    assert nodes == [("n1", 1884, "cam-1", "s@cret"), ("n2", 1883, "cam-1", "s@cret"), ("n3", 1886, "other", "pw")]
    assert parse_broker_url("mqtt://n1").nodes() == (parse_broker_url("mqtt://n1"),)


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ("mqtt://n1,http://n2", "broker URL entry 2 of 2 'http://n2': expected mqtt://HOST[:PORT]"),
        ("mqtt://n1,mqtt://n2,mqtt://n3:99999", "broker URL entry 3 of 3 'mqtt://n3:99999': the port must be"),
        ("mqtt://n1,", "broker URL entry 2 of 2 '': expected mqtt://"),
        ("mqtt://u:secret@n1,mqtts://n2", "broker URLs 'mqtt://u:***@n1,mqtts://n2': use mqtt:// for every entry"),
    ],
)
def test_a_malformed_broker_list_names_the_entry(urls: str, expected: str) -> None:
    with pytest.raises(BadInput) as error:
        parse_broker_url(urls)
    assert str(error.value).startswith(expected)
    assert "secret" not in str(error.value)


def test_a_login_goes_into_the_first_entry_and_every_password_is_redacted() -> None:
    url = with_login("mqtt://n1:1883,mqtt://n2:1883", "cam-1", "pa:ss")
    assert url == "mqtt://cam-1:pa%3Ass@n1:1883,mqtt://n2:1883"
    assert [n.password for n in parse_broker_url(url).nodes()] == ["pa:ss", "pa:ss"]
    assert redact_url("mqtt://a:one@n1,mqtt://b:two@n2") == "mqtt://a:***@n1,mqtt://b:***@n2"


def test_the_agent_refuses_a_malformed_broker_list(cli) -> None:
    result = cli("agent", "--broker", "mqtt://n1,mqtt//n2", "--device-id", "cam-1")
    assert result.exit_code == 2
    assert "broker URL entry 2 of 2 'mqtt//n2'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("topic", "subject"),
    [
        ("edgekit/v1/cam-1/telemetry", "edgekit.v1.cam-1.telemetry"),
        ("edgekit/v1/cam.1/transfer/request", "edgekit.v1.cam//1.transfer.request"),
        ("edgekit/v1/a.b.c/config/desired", "edgekit.v1.a//b//c.config.desired"),
    ],
)
def test_topics_map_to_nats_subjects_and_back_exactly(topic: str, subject: str) -> None:
    assert subject_of(topic) == subject
    assert topic_of(subject) == topic


def test_nats_urls_log_in_with_the_first_login_and_name_a_bad_entry() -> None:
    servers = parse_nats_urls("nats://hub:p%40ss@h1:4300,nats://h2,tls://h3:4400")
    assert servers.urls == ("nats://h1:4300", "nats://h2:4222", "tls://h3:4400")
    assert (servers.user, servers.password) == ("hub", "p@ss")
    with pytest.raises(BadInput, match=r"--jetstream entry 2 of 2 'mqtt://h2': expected nats://"):
        parse_nats_urls("nats://h1,mqtt://h2")
    with pytest.raises(BadInput, match=r"entry 1 of 1 'nats://hub:\*\*\*@h1:99999': the port must be") as error:
        parse_nats_urls("nats://hub:secret@h1:99999")
    assert "secret" not in str(error.value)
    with pytest.raises(BadInput, match="--jetstream needs --broker"):
        check_jetstream("nats://h1", None)


def test_a_connection_moves_on_to_the_next_node_when_one_is_unreachable(mosquitto) -> None:
    """The first node listens nowhere: the client connects to the second (a real Mosquitto) without waiting for a
    backoff round, since not every node has failed yet."""
    address = parse_broker_url(f"mqtt://127.0.0.1:{free_port()},mqtt://127.0.0.1:{mosquitto.port}")
    client = new_client(address, "failover-probe")
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    connection = Connection(client, address, Backoff(initial_s=30.0, max_s=30.0))
    connection.start()
    try:
        wait_until(connected.is_set, 5.0, "a connection through the second node")
    finally:
        connection.stop()
