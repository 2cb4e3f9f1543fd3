"""Helpers for agent tests (importable because pytest.ini puts tests/ on the path)."""

import functools
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
from brokers import host_port

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.memory import MemoryLink
from edgekit.bundle import sha256_file
from edgekit.hub.broker import EmbeddedBroker
from edgekit.hub.transfer import BundleServer
from edgekit.mqtt import Backoff
from edgekit.protocol import DesiredBundle, DesiredState, Sequenced, encode
from edgekit.trust import sign_desired


class HubSigner:
    """The hub's side of signed desired states, for tests that play the hub: its key, and its public key as the
    file agents take (`--hub-key`)."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from edgekit.trust import public_pem

        self.key = Ed25519PrivateKey.generate()
        folder.mkdir(parents=True, exist_ok=True)
        self.public = folder / "hub.pub"
        self.public.write_text(public_pem(self.key))

    def sign(self, desired: DesiredState, device_id: str = "dev-1", ttl_s: float = 3600.0,
             now: float | None = None) -> bytes:  # fmt: skip
        """The `config/desired` payload the hub would publish for `device_id`."""
        return encode(sign_desired(self.key, device_id, desired, ttl_s, now))


@functools.cache
def shared_signer() -> HubSigner:
    """One hub key per test process (the `hub_signer` fixture), so helpers can sign without a fixture at hand."""
    return HubSigner(Path(tempfile.mkdtemp(prefix="edgekit-test-hub-")))


def signed(desired: DesiredState, device_id: str = "dev-1") -> bytes:
    """`desired` as `shared_signer()` would publish it to `device_id`."""
    return shared_signer().sign(desired, device_id)


def desired_for(bundle: Path, rev: int, version: str, name: str = "digits", **fields) -> DesiredState:
    """A desired state that asks for `bundle`; extra fields (source, health_checks, rates …) pass through."""
    allow = fields.pop("allow_downgrade", False)
    ref = DesiredBundle(id=sha256_file(bundle), name=name, version=version, size=bundle.stat().st_size,
                        allow_downgrade=allow)  # fmt: skip
    return DesiredState(rev=rev, bundle=ref, **fields)


class ServedBundles:
    """The hub's BundleServer answering chunk requests from `files`; `add(path)` makes a bundle downloadable by its
    sha256."""

    def __init__(self, client, workers: int = 2, resolve: Callable[[str], Path | None] | None = None) -> None:
        """`resolve`: instead of looking in `files` (a test's slow or failing disk)."""
        self.files: dict[str, Path] = {}
        self.server = BundleServer(client, resolve or self.files.get, workers)

    def add(self, path: Path) -> str:
        bundle_id = sha256_file(path)
        self.files[bundle_id] = path
        return bundle_id

    def close(self) -> None:
        self.server.stop()


class MqttServedBundles(ServedBundles):
    """On its own MQTT connection to `broker`, as one of `share_group`'s members when given."""

    def __init__(self, broker: EmbeddedBroker, client_id: str = "test-bundle-server", share_group: str | None = None,
                 **server: Any) -> None:  # fmt: skip
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        super().__init__(self.client, **server)
        self.client.on_connect = lambda *args: self.server.start(share_group=share_group)
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

    def publish(self, topic: str, payload: bytes, qos: int) -> SimpleNamespace:
        """Delivered at once: the PUBACK BundleServer waits for has come already."""
        self.link.deliver(topic, payload)
        return SimpleNamespace(wait_for_publish=lambda timeout: True)


def agent_command(broker_url: str, data_dir: Path, trust_key: Path, hub_key: Path, *extra: str,
                  device_id: str = "dev-1") -> list:  # fmt: skip
    """`edgekit agent …` as a separate process (for kill -9 and restart tests)."""
    return [sys.executable, "-m", "edgekit", "agent", "--broker", broker_url, "--device-id", device_id,
            "--data", str(data_dir), "--trust-key", str(trust_key), "--hub-key", str(hub_key), "--telemetry-s", "0.5",
            *extra]  # fmt: skip


def sequenced(messages: list[tuple[str, bytes]], model: type[Sequenced]) -> list:
    """Payloads in seq order, each once: a reconnect may deliver a seq twice (the hub de-duplicates the same way)."""
    seen: dict = {}
    for _, payload in messages:
        item = model.model_validate_json(payload)
        seen.setdefault(item.seq, item)
    return [seen[seq] for seq in sorted(seen)]


@contextmanager
def started_agents(data_root: Path, **defaults: Any) -> Iterator[Callable[..., Agent]]:
    """start(broker, device_id="dev-1", link=None, **settings) → a started in-process Agent; all stopped on exit.

    `broker` is an EmbeddedBroker, or None with `link` (a MemoryLink). Defaults: trusts `shared_signer()` as the
    hub, data under data_root/<device_id>, telemetry every 0.5 s, fast backoff; then `defaults`, then `settings`."""
    agents: list[Agent] = []

    def start(broker: EmbeddedBroker | None, device_id: str = "dev-1", link: MemoryLink | None = None,
              **settings: Any) -> Agent:  # fmt: skip
        fields = {"device_id": device_id, "broker": broker.url if broker else "memory:",
                  "data_dir": data_root / device_id, "hub_key": shared_signer().public, "telemetry_s": 0.5,
                  "threads": 1, "backoff": Backoff(initial_s=0.2, max_s=1.0), **defaults, **settings}  # fmt: skip
        agent = Agent(AgentSettings(**fields), link=link)
        agent.start()
        agents.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            agent.stop()
