"""edgekit/hub/broker.py with real paho clients: delivery, retained messages, Last Will, sessions, restarts."""

import itertools
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from brokers import NO_MOSQUITTO, Subscriber, host_port, publish, publish_many, wait_until
from paho.mqtt.client import CallbackAPIVersion, Client

import edgekit.hub.broker
from edgekit.errors import OperationFailed
from edgekit.hub.broker import (
    AmqttBroker,
    EmbeddedBroker,
    MosquittoBroker,
    accepts_connections,
    mosquitto_available,
    start_embedded_broker,
)

needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason=NO_MOSQUITTO)


def test_starts_listening_on_a_free_loopback_port(broker: EmbeddedBroker) -> None:
    host, port = host_port(broker.url)
    assert broker.running and broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert (host, port) == ("127.0.0.1", broker.port) and accepts_connections(host, port)
    broker.stop()
    assert not broker.running and not accepts_connections(host, port)
    broker.stop()  # stopping twice is harmless, as the fixture's teardown does


def test_qos1_messages_arrive_in_order(broker: EmbeddedBroker) -> None:
    sent = [(f"fleet/dev{i % 3}/telemetry", f"{i}".encode()) for i in range(30)]
    with Subscriber(broker.url, "fleet/+/telemetry") as subscriber:
        publish_many(broker.url, [*sent, ("other/topic", b"ignored")])
        assert subscriber.wait_count(len(sent)) == sent
        assert subscriber.messages("fleet/dev1/#") == sent[1::3]


def test_retained_message_reaches_later_subscribers(broker: EmbeddedBroker) -> None:
    publish(broker.url, "fleet/dev1/status", b"online", retain=True)
    with Subscriber(broker.url, "fleet/+/status") as subscriber:
        assert subscriber.wait_count(1) == [("fleet/dev1/status", b"online")]
        publish(broker.url, "fleet/dev2/status", b"online")
        subscriber.wait_count(2)
        assert subscriber.messages(retained=True) == [("fleet/dev1/status", b"online")]


DOOMED_CLIENT = """
    import sys
    from paho.mqtt.client import CallbackAPIVersion, Client

    client = Client(CallbackAPIVersion.VERSION2, client_id="doomed")
    client.will_set("fleet/doomed/status", b"offline", qos=1)
    client.on_connect = lambda *args: print("connected", flush=True)
    client.connect(sys.argv[1], int(sys.argv[2]), keepalive=10)
    client.loop_forever()
"""


@pytest.fixture
def doomed_client(broker: EmbeddedBroker) -> Iterator[subprocess.Popen[str]]:
    """A client process with a Last Will, connected to `broker`; the test kills it."""
    host, port = host_port(broker.url)
    command = [sys.executable, "-c", textwrap.dedent(DOOMED_CLIENT), host, str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready and process.stdout.readline().strip() == "connected", "the will client did not connect"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_last_will_is_published_when_a_client_dies(broker: EmbeddedBroker, doomed_client: subprocess.Popen) -> None:
    with Subscriber(broker.url, "fleet/+/status") as watcher:
        # SIGKILL: the socket is closed by the kernel without an MQTT DISCONNECT, as when a device loses power.
        doomed_client.send_signal(signal.SIGKILL)
        assert watcher.wait_count(1) == [("fleet/doomed/status", b"offline")]


def test_persistent_session_receives_what_was_published_while_away(broker: EmbeddedBroker) -> None:
    Subscriber(broker.url, "jobs/#", client_id="hub-persistent", clean_session=False).close()
    sent = [(f"jobs/{i}", f"job {i}".encode()) for i in range(20)]
    publish_many(broker.url, sent)
    with Subscriber(broker.url, "jobs/#", client_id="hub-persistent", clean_session=False) as back:
        assert back.wait_count(len(sent)) == sent


def test_broker_restarts_on_the_same_port_and_subscribers_reconnect(broker: EmbeddedBroker) -> None:
    port = broker.port
    with Subscriber(broker.url, "fleet/#") as subscriber:
        broker.restart()
        assert broker.port == port and broker.running
        subscriber.wait_subscribed(2)
        publish(broker.url, "fleet/dev1/telemetry", b"after restart")
        assert subscriber.wait_count(1) == [("fleet/dev1/telemetry", b"after restart")]


@needs_mosquitto
def test_mosquitto_keeps_sessions_and_retained_messages_across_restart(mosquitto: MosquittoBroker) -> None:
    publish(mosquitto.url, "config/dev1", b"v1", retain=True)
    Subscriber(mosquitto.url, "jobs/#", client_id="away", clean_session=False).close()
    with Subscriber(mosquitto.url, "jobs/#", client_id="present", clean_session=False) as present:
        mosquitto.restart()
        # Published before `present` is back for sure: it gets them live or queued, depending on the race.
        sent = [(f"jobs/{i}", f"job {i}".encode()) for i in range(50)]
        publish_many(mosquitto.url, sent)
        assert present.wait_count(len(sent)) == sent
        assert present.connections == 2
    with Subscriber(mosquitto.url, "jobs/#", client_id="away", clean_session=False) as away:
        assert away.wait_count(len(sent)) == sent
    with Subscriber(mosquitto.url, "config/#") as fresh:
        assert fresh.wait_count(1) == [("config/dev1", b"v1")]


def test_amqtt_forgets_everything_on_restart(amqtt_broker: AmqttBroker) -> None:
    """The documented gap of AmqttBroker; if this fails, amqtt grew persistence and the docstring needs updating."""
    publish(amqtt_broker.url, "config/dev1", b"v1", retain=True)
    Subscriber(amqtt_broker.url, "jobs/#", client_id="away", clean_session=False).close()
    amqtt_broker.restart()
    publish(amqtt_broker.url, "jobs/1", b"lost")
    with Subscriber(amqtt_broker.url, "jobs/#", "config/#", client_id="away", clean_session=False) as away:
        publish(amqtt_broker.url, "jobs/2", b"live")
        assert away.wait_count(1) == [("jobs/2", b"live")]


def test_amqtt_serves_clients_that_connect_while_others_subscribe(amqtt_broker: AmqttBroker) -> None:
    """amqtt walks its subscription table across awaits on every connect; a subscribe to a new topic meanwhile left
    the connecting client with a CONNACK but no message loop, so its own SUBACK never came (CI: an agent never up)."""
    url = amqtt_broker.url
    publish_many(url, [(f"retained/{i}", b"x") for i in range(100)], retain=True)
    holders = [Subscriber(url, *(f"retained/{i * 10 + j}" for j in range(10))) for i in range(10)]

    joined_all = threading.Event()

    def churn(holder: Subscriber) -> None:
        for j in itertools.count():
            if joined_all.is_set():
                return
            holder.client.subscribe(f"new/{id(holder)}/{j}", 0)
            time.sleep(0.002)

    def connect_and_subscribe(i: int) -> int:
        Subscriber(url, f"own/{i}", timeout=15).close()
        return i

    try:
        with ThreadPoolExecutor(max_workers=50) as pool:
            churns = [pool.submit(churn, holder) for holder in holders]
            joined = [pool.submit(connect_and_subscribe, i) for i in range(20)]
            wait(joined)
            joined_all.set()
            failures = [str(future.exception()) for future in joined if future.exception() is not None]
            assert not failures, f"{len(failures)} of 20 clients connected but were never served: {failures[0]}"
            assert all(future.exception() is None for future in churns)
    finally:
        joined_all.set()
        for holder in holders:
            holder.close()


@needs_mosquitto
def test_mosquitto_drops_clients_that_exceed_max_packet_size(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path, max_packet_size=1024) as limited, Subscriber(limited.url, "big/#") as subscriber:
        client = Client(CallbackAPIVersion.VERSION2)
        client.connect(*host_port(limited.url))
        client.loop_start()
        try:
            client.publish("big/1", b"x" * 2048, qos=1)
            wait_until(lambda: not client.is_connected(), 5, "mosquitto to disconnect the oversized publisher")
        finally:
            client.loop_stop()
        publish(limited.url, "big/2", b"x" * 512)
        assert subscriber.wait_count(1) == [("big/2", b"x" * 512)]


@needs_mosquitto
def test_start_embedded_broker_prefers_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with start_embedded_broker(tmp_path / "preferred") as preferred:
        assert preferred.kind == "mosquitto" and preferred.running
    with start_embedded_broker(tmp_path / "asked", prefer="amqtt") as asked:
        assert asked.kind == "amqtt" and asked.running
    monkeypatch.setattr(edgekit.hub.broker, "mosquitto_available", lambda: False)
    with start_embedded_broker(tmp_path / "fallback") as fallback:
        assert fallback.kind == "amqtt" and fallback.running


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
def test_port_in_use_is_reported(kind: str, tmp_path: Path) -> None:
    if kind == "mosquitto" and not mosquitto_available():
        pytest.skip(NO_MOSQUITTO)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        broker = MosquittoBroker(tmp_path, port=port) if kind == "mosquitto" else AmqttBroker(port=port)
        with pytest.raises(OperationFailed, match=f"127.0.0.1:{port}: the port is already in use"):
            broker.start()
        assert not broker.running


@needs_mosquitto
def test_mosquitto_start_failure_quotes_its_log(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path, acl_file=tmp_path / "missing.acl")
    with pytest.raises(OperationFailed, match=r"(?s)mosquitto exited with code \d+ at start.*missing\.acl"):
        broker.start()
    assert not broker.running


def test_importing_the_module_does_not_import_amqtt() -> None:
    code = "import sys, edgekit.hub.broker; print(sorted(m for m in sys.modules if m.split('.')[0] == 'amqtt'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == "[]"
