"""MQTT plumbing both ends share: broker URLs, TLS files, client construction and the one reconnect strategy
(exponential backoff with full jitter) that agents and hubs use."""

import logging
import random
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user:pass@]host[:1883]` or `mqtts://…[:8883]`; BadInput names what is wrong."""
    parsed = urlparse(url)
    shown = redact_url(url)  # errors are printed and logged: never the password
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise BadInput(f"broker URL '{shown}': expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise BadInput(f"broker URL '{shown}': the port must be a number from 1 to 65535") from None
    user = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return BrokerAddress(parsed.hostname, port, tls, user, password)


def with_login(url: str, username: str, password: str) -> str:
    """`url` (without a login) with `username` and `password` in it, quoted as `parse_broker_url` unquotes them."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{rest}"


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, for logs and messages: `mqtt://cam-1:***@hub:1883`."""
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
) -> mqtt.Client:
    """A paho client with the address's credentials and TLS applied; callbacks are the caller's."""
    client = mqtt.Client(
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
    wait the next backoff delay, reconnect; until stop()."""

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
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self.client.connect(self.address.host, self.address.port, self.keepalive,
                                        clean_start=self._clean_start, properties=self._properties)  # fmt: skip
                    first = False
                else:
                    self.client.reconnect()
            except (OSError, ssl.SSLError) as error:
                log.info("broker %s:%s unreachable: %s", self.address.host, self.address.port, error)
                self._stop.wait(next(delays))
                continue
            delays = self.backoff.delays()
            while not self._stop.is_set() and self.client.loop(timeout=0.2) == mqtt.MQTT_ERR_SUCCESS:
                pass
            self._on_lost()
            if not self._stop.is_set():
                self._stop.wait(next(delays))
        self._on_lost()
