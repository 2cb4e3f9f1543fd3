"""MQTT plumbing both ends share: broker URLs, TLS files, client construction and the one reconnect strategy
(exponential backoff with full jitter) that agents and hubs use."""

import logging
import random
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.client import CleanStartOption
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from edgekit.errors import BadInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    # Further nodes of the same clustered broker (a comma-separated URL list): `Connection` moves on to the next
    # when one is unreachable or drops.
    others: tuple["BrokerAddress", ...] = ()

    def nodes(self) -> tuple["BrokerAddress", ...]:
        return (self, *self.others)


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:1883]` or `mqtts://…[:8883]`, or several such URLs separated by commas (the nodes of
    a clustered broker: an entry without a login takes the first's); BadInput names the entry that is wrong."""
    entries = url.split(",")
    if len(entries) == 1:
        return _parse_one(url, f"broker URL '{redact_url(url)}'")
    nodes = [_parse_one(entry, f"broker URL entry {n} of {len(entries)} '{redact_url(entry)}'")
             for n, entry in enumerate(entries, 1)]  # fmt: skip
    first = nodes[0]
    if any(node.tls != first.tls for node in nodes):
        raise BadInput(f"broker URLs '{redact_url(url)}': use mqtt:// for every entry or mqtts:// for every entry")
    nodes = [node if node.username else replace(node, username=first.username, password=first.password)
             for node in nodes]  # fmt: skip
    return replace(nodes[0], others=tuple(nodes[1:]))


def _parse_one(url: str, shown: str) -> BrokerAddress:
    """One URL; `shown` names it in errors (printed and logged: never the password)."""
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise BadInput(f"{shown}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise BadInput(f"{shown}: the port must be a number from 1 to 65535") from None
    user = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return BrokerAddress(parsed.hostname, port, tls, user, password)


def with_login(url: str, username: str, password: str) -> str:
    """`url` (without a login) with `username` and `password` in it, quoted as `parse_broker_url` unquotes them; in
    the first entry of a list, which the others take it from."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{rest}"


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, for logs and messages: `mqtt://cam-1:***@hub:1883`; each entry of a
    comma-separated list."""
    if "," in url:
        return ",".join(map(redact_url, url.split(",")))
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


@dataclass(frozen=True)
class TlsFiles:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 1.0
    max_s: float = 30.0

    def delays(self) -> Iterator[float]:
        """Exponential with full jitter, so a fleet that lost the broker together does not return together."""
        ceiling = self.initial_s
        while True:
            yield random.uniform(ceiling / 2, ceiling)
            ceiling = min(ceiling * 2, self.max_s)


def new_client(
    address: BrokerAddress,
    client_id: str,
    tls_files: TlsFiles | None = None,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
    clean_session: bool | None = None,
    client_type: type[mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    """A paho client (`client_type`: paho's or a subclass) with the address's credentials and TLS applied; callbacks
    are the caller's."""
    client = client_type(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, clean_session=clean_session
    )
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        files = tls_files or TlsFiles()
        client.tls_set(ca_certs=files.ca, certfile=files.cert, keyfile=files.key)
    return client


class Connection:
    """Keeps one client connected from a thread of its own: connect, run paho's loop until the connection drops,
    wait the next backoff delay, reconnect; until stop(). With several broker nodes (`BrokerAddress.others`) it moves
    to the next node when one is unreachable (at once, until every node failed in a row: then it waits) or drops."""

    def __init__(
        self,
        client: mqtt.Client,
        address: BrokerAddress,
        backoff: Backoff,
        keepalive: int = 30,
        on_lost: Callable[[], None] | None = None,
        name: str = "mqtt-network",
        clean_start: CleanStartOption = mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties: Properties | None = None,
    ) -> None:
        """`clean_start` and `properties` (MQTT 5 only) go with the first connect; paho reuses them on reconnect."""
        self.client = client
        self.address = address
        self.backoff = backoff
        self.keepalive = keepalive
        self._on_lost = on_lost or (lambda: None)
        self._clean_start = clean_start
        self._properties = properties
        self._nodes = address.nodes()
        self._node = 0  # index of the node in use or tried last
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.client.disconnect()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        delays = self.backoff.delays()
        connected_to: BrokerAddress | None = None  # the node paho's reconnect() goes back to
        failures = 0
        while not self._stop.is_set():
            node = self._nodes[self._node]
            try:
                self._connect(node, reconnect=node is connected_to)
            except (OSError, ssl.SSLError) as error:
                log.info("broker %s:%s unreachable: %s", node.host, node.port, error)
                failures += 1
                self._node = (self._node + 1) % len(self._nodes)
                if failures % len(self._nodes) == 0:  # every node failed in a row: wait before the next round
                    self._stop.wait(next(delays))
                continue
            connected_to, failures, delays = node, 0, self.backoff.delays()
            while not self._stop.is_set() and self.client.loop(timeout=0.2) == mqtt.MQTT_ERR_SUCCESS:
                pass
            self._on_lost()
            self._node = (self._node + 1) % len(self._nodes)  # the node that dropped us may be the one in trouble
            if not self._stop.is_set():
                self._stop.wait(next(delays))
        self._on_lost()

    def _connect(self, node: BrokerAddress, reconnect: bool) -> None:
        if reconnect:
            self.client.reconnect()
            return
        if node.username:
            self.client.username_pw_set(node.username, node.password)
        self.client.connect(node.host, node.port, self.keepalive, clean_start=self._clean_start,
                            properties=self._properties)  # fmt: skip
