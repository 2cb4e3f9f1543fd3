"""Helpers for agent tests (importable because pytest.ini puts tests/ on the path)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
from brokers import host_port

from edgekit.agents.memory import MemoryLink
from edgekit.bundle import sha256_file
from edgekit.hub.broker import EmbeddedBroker
from edgekit.hub.transfer import BundleServer
from edgekit.protocol import DesiredBundle, DesiredState, Sequenced


def desired_for(bundle: Path, rev: int, version: str, name: str = "digits", **fields) -> DesiredState:
    """A desired state that asks for `bundle`; extra fields (source, health_checks, rates …) pass through."""
    allow = fields.pop("allow_downgrade", False)
    ref = DesiredBundle(id=sha256_file(bundle), name=name, version=version, size=bundle.stat().st_size,
                        allow_downgrade=allow)  # fmt: skip
    return DesiredState(rev=rev, bundle=ref, **fields)


class ServedBundles:
    """The hub's BundleServer answering chunk requests from `files`; `add(path)` makes a bundle downloadable by its
    sha256."""

    def __init__(self, client) -> None:
        self.files: dict[str, Path] = {}
        self.server = BundleServer(client, self.files.get)

    def add(self, path: Path) -> str:
        bundle_id = sha256_file(path)
        self.files[bundle_id] = path
        return bundle_id

    def close(self) -> None:
        self.server.stop()


class MqttServedBundles(ServedBundles):
    """On its own MQTT connection to `broker`."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-bundle-server")
        super().__init__(self.client)
        self.client.on_connect = lambda *args: self.server.start()
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(*host_port(broker.url))
        self.client.loop_start()

    def close(self) -> None:
        super().close()
        self.client.disconnect()
        self.client.loop_stop()


class MemoryHubClient:
    """The hub's end of a MemoryLink, with the three methods of a paho client that BundleServer uses."""

    def __init__(self, link: MemoryLink) -> None:
        self.link = link

    def message_callback_add(self, topic_filter: str, callback) -> None:
        def as_paho_message(topic: str, payload: bytes) -> None:
            callback(self, None, SimpleNamespace(topic=topic, payload=payload))

        self.link.on_send(topic_filter, as_paho_message)

    def subscribe(self, topic_filter: str, qos: int) -> None:
        """Nothing to do: message_callback_add routes."""

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        self.link.deliver(topic, payload)


def agent_command(broker_url: str, data_dir: Path, trust_key: Path, *extra: str, device_id: str = "dev-1") -> list:
    """`edgekit agent …` as a separate process (for kill -9 and restart tests)."""
    return [sys.executable, "-m", "edgekit", "agent", "--broker", broker_url, "--device-id", device_id,
            "--data", str(data_dir), "--trust-key", str(trust_key), "--telemetry-s", "0.5", *extra]  # fmt: skip


def sequenced(messages: list[tuple[str, bytes]], model: type[Sequenced]) -> list:
    """Payloads in seq order, each once: a reconnect may deliver a seq twice (the hub de-duplicates the same way)."""
    seen: dict = {}
    for _, payload in messages:
        item = model.model_validate_json(payload)
        seen.setdefault(item.seq, item)
    return [seen[seq] for seq in sorted(seen)]
