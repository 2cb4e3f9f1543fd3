"""Device messages through NATS JetStream (`edgekit hub --jetstream URLS`), for hubs on a NATS cluster.

Devices speak MQTT 3.1.1 to any node of the cluster; nats-server turns each topic into a subject (`subject_of`).
For a QoS 1 publish the server stores the message in its own MQTT stream, `$MQTT_msgs` (replicated by `mqtt
{ stream_replicas }`), as `$MQTT.msgs.<subject>`, and only then sends the PUBACK: once a device's message is
acknowledged, it is in the cluster. That stream keeps a message while a consumer interested in it has not acked it,
so the hub reads device messages from there, through one durable pull consumer per kind (telemetry, results,
events, chunk requests) that every hub replica pulls from: each message goes to one replica. (A stream of our own
capturing the subjects would not do: the server does not wait for it before the PUBACK, and messages a device sent
while that stream elected a new leader were lost, acknowledged.)

A device message is acknowledged only once ingest committed it (or dropped it as invalid): a hub that dies before
that has it delivered again, to another replica or to itself, after `ack_wait`; the database's primary key makes the
second delivery a duplicate, never a second row. A chunk request is acknowledged when it is handed to the hub's
bundle server (or skipped when older than `TRANSFER_MAX_AGE_S`), whose chunks go out through the hub's MQTT link.
QoS 0 messages (results a desired state sends at QoS 0) are never stored: a core NATS queue subscription shared by
the replicas takes those, at most once, as MQTT would.

nats-py is asyncio: the consumer runs its own event loop in a thread, and ingest's writer thread hands acks over.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from edgekit.errors import BadInput
from edgekit.hub.ingest import SEQUENCED, Acknowledger, Ingest
from edgekit.mqtt import redact_url
from edgekit.protocol import PREFIX, Topic

log = logging.getLogger(__name__)

MQTT_STREAM = "$MQTT_msgs"  # nats-server's own: every QoS 1 message an MQTT client publishes, stored before its PUBACK
MQTT_SUBJECT_PREFIX = "$MQTT.msgs."
CONSUMER_PREFIX = "edgekit-hub-"  # + the kind: one durable per kind, shared by every hub replica
QUEUE_GROUP = "edgekit-hubs"  # QoS 0 messages: one replica each
QOS_HEADER = "Nmqtt-Pub"  # nats-server's header on a message from an MQTT client: its QoS
KINDS = (*SEQUENCED, Topic.TRANSFER_REQUEST)
TRANSFER_MAX_AGE_S = 15.0  # chunk requests are worth answering for seconds; a stalled device asks again
ACK_WAIT_S = 30.0  # a message not acked this long after delivery (its hub died) goes out again
# Messages the hub replicas may hold unacked per consumer: what ingest batches from (its Acknowledger window).
MAX_ACK_PENDING = 10_000
FETCH_BATCH = 500
FETCH_WAIT_S = 1.0
RETRY_S = 0.5
STOP_S = 10.0


def subject_of(topic: str) -> str:
    """The NATS subject nats-server's MQTT listener gives an MQTT topic: '/' separates tokens ('.'), and a '.' inside
    a level becomes '//' (nats-server 2.10 and later; 2.9 refuses topics with a '.', see docs/brokers.md)."""
    return ".".join(level.replace(".", "//") for level in topic.split("/"))


def topic_of(subject: str) -> str:
    """The MQTT topic a subject came from: `subject_of` undone."""
    return "/".join(token.replace("//", ".") for token in subject.split("."))


def device_subjects(name: str) -> str:
    """Every device's subject for topic `name` (e.g. `edgekit.v1.*.telemetry`)."""
    return subject_of(f"{PREFIX}/*/{name}")


def consumer_name(kind: str) -> str:
    return CONSUMER_PREFIX + kind.replace("/", "-")


@dataclass(frozen=True)
class NatsServers:
    urls: tuple[str, ...]  # without logins
    user: str | None = None
    password: str | None = None


def parse_nats_urls(text: str) -> NatsServers:
    """`nats://[user:pass@]host[:4222],nats://host2[:port],…`: the cluster's nodes, the login from the first URL that
    has one (nats-py logs in to every node with it). BadInput names the entry that is wrong."""
    urls: list[str] = []
    login: tuple[str | None, str | None] = (None, None)
    entries = text.split(",")
    for number, entry in enumerate(entries, 1):
        where = f"--jetstream entry {number} of {len(entries)}"
        parsed = urlparse(entry.strip())
        if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
            raise BadInput(f"{where} '{redact_url(entry)}': expected nats://[USER:PASS@]HOST[:PORT] or tls://…")
        try:
            port = parsed.port or 4222
        except ValueError:
            raise BadInput(f"{where} '{redact_url(entry)}': the port must be a number from 1 to 65535") from None
        if parsed.username and login == (None, None):
            login = (unquote(parsed.username), unquote(parsed.password or ""))
        urls.append(f"{parsed.scheme}://{parsed.hostname}:{port}")
    return NatsServers(tuple(urls), *login)


def check_jetstream(url: str, broker: str | None) -> None:
    """BadInput unless `url` is a NATS URL list and the hub has the cluster's MQTT listener as its `--broker`."""
    parse_nats_urls(url)
    if not broker:
        raise BadInput("--jetstream needs --broker: the NATS cluster's MQTT listener(s), mqtt://HOST:PORT, which the "
                       "hub publishes desired states and bundle chunks to")  # fmt: skip


class SplitAcks:
    """Ingest's one acknowledger in JetStream mode: its receipts come from two sources, the JetStream consumer
    (nats-py messages) and the MQTT link's state topics (the link's own acknowledger): each goes back to its own."""

    window = MAX_ACK_PENDING

    def __init__(self, source: "JetStreamSource", mqtt: Acknowledger) -> None:
        self._source = source
        self._mqtt = mqtt

    def done(self, receipts: list[Any]) -> None:
        from nats.aio.msg import Msg

        jetstream = [receipt for receipt in receipts if isinstance(receipt, Msg)]
        if jetstream:
            self._source.ack(jetstream)
        if len(jetstream) < len(receipts):
            self._mqtt.done([receipt for receipt in receipts if not isinstance(receipt, Msg)])

    def redeliver(self) -> None:
        """JetStream delivers what was not acked again by itself (after ack_wait); the link's state topics need
        its reconnect."""
        self._mqtt.redeliver()


class JetStreamSource:
    """Pulls device messages into `ingest` and chunk requests into `handle_request(topic, payload)`, from the
    shared durable consumers (module docstring); `start()` returns at once, `wait_ready()` says when it pulls."""

    def __init__(
        self,
        url: str,
        ingest: Ingest,
        handle_request: Callable[[str, bytes], None],
        mqtt_acks: Acknowledger,
        ack_wait_s: float = ACK_WAIT_S,
        name: str = "edgekit-hub",
    ) -> None:
        self.servers = parse_nats_urls(url)
        self._ingest = ingest
        self._handle_request = handle_request
        self._ack_wait_s = ack_wait_s
        self._name = name
        ingest.acknowledge_with(SplitAcks(self, mqtt_acks))
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._ready = threading.Event()
        self._client: Any = None  # nats.aio.client.Client, once connected
        self._thread = threading.Thread(target=self._run, name="hub-jetstream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(STOP_S)

    def wait_ready(self, timeout: float) -> bool:
        """Until the consumers exist and pulling has begun."""
        return self._ready.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and self._client is not None and self._client.is_connected

    def ack(self, messages: list[Any]) -> None:
        """Acknowledge these JetStream messages (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop has ended (stopped): JetStream delivers them again
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(_ack_all(messages)))

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        import nats

        self._client = await self._connect(nats)
        if self._client is None:
            return
        try:
            js = self._client.jetstream()
            if not await self._retry(lambda: ensure_consumers(js, self._ack_wait_s), "creating the consumers"):
                return
            for kind in SEQUENCED:
                await self._client.subscribe(device_subjects(kind), queue=QUEUE_GROUP, cb=self._qos0_to_ingest)
            pulls = [asyncio.create_task(self._pull(js, kind)) for kind in KINDS]
            self._ready.set()
            log.info("consuming device messages from JetStream at %s", ", ".join(self.servers.urls))
            await self._stopping.wait()
            for task in pulls:
                task.cancel()
            await asyncio.gather(*pulls, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):  # a cluster already gone: what was not acked is delivered again
                await self._client.close()  # sends the acks still buffered

    async def _connect(self, nats: Any) -> Any:
        """Connected to one of the servers (nats-py moves to another when it drops), or None once stopping."""
        servers = self.servers

        async def connect() -> Any:
            return await nats.connect(servers=list(servers.urls), user=servers.user, password=servers.password,
                                      name=self._name, max_reconnect_attempts=-1, reconnect_time_wait=RETRY_S,
                                      connect_timeout=2, allow_reconnect=True)  # fmt: skip

        return await self._retry(connect, f"connecting to NATS at {', '.join(servers.urls)}")

    async def _retry(self, attempt: Callable[[], Any], what: str) -> Any:
        """`await attempt()` until it succeeds (its result) or the source stops (None): the cluster may still be
        electing a leader, or down for a while."""
        while not self._stopping.is_set():
            try:
                return (await attempt()) or True
            except Exception as error:  # nats-py raises many kinds; each means "not yet"
                log.warning("%s failed, retrying: %s", what, error)
                await _sleep_unless(self._stopping, RETRY_S)
        return None

    async def _pull(self, js: Any, kind: str) -> None:
        """Fetch the kind's messages from its shared consumer until stopped; nats-py resubscribes after a
        reconnect."""
        import nats.errors

        handle = self._to_transfer if kind == Topic.TRANSFER_REQUEST else self._to_ingest
        durable = consumer_name(kind)
        subscription = await self._retry(lambda: js.pull_subscribe_bind(durable=durable, stream=MQTT_STREAM),
                                         f"binding to the consumer {durable}")  # fmt: skip
        while subscription is not None and not self._stopping.is_set():
            try:
                messages = await subscription.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                continue  # nothing waiting
            except Exception as error:  # a node lost, a consumer leader being elected: fetch again shortly
                log.debug("fetching %s failed (%s), retrying: %s", kind, type(error).__name__, error)
                await _sleep_unless(self._stopping, RETRY_S)
                continue
            for message in messages:
                await handle(message)

    async def _to_ingest(self, message: Any) -> None:
        self._ingest.receive(mqtt_topic(message.subject), message.data, message)

    async def _qos0_to_ingest(self, message: Any) -> None:
        """A message published on a device subject: QoS 1 ones come through their consumer, so only the others."""
        if (message.headers or {}).get(QOS_HEADER, "0") == "0":
            self._ingest.receive(topic_of(message.subject), message.data)

    async def _to_transfer(self, message: Any) -> None:
        if time.time() - message.metadata.timestamp.timestamp() < TRANSFER_MAX_AGE_S:
            self._handle_request(mqtt_topic(message.subject), message.data)
        await _ack_all([message])  # a request lost later is asked again by the device: nothing to keep


def mqtt_topic(subject: str) -> str:
    """The MQTT topic of a message in nats-server's MQTT stream (`$MQTT.msgs.<subject>`)."""
    return topic_of(subject.removeprefix(MQTT_SUBJECT_PREFIX))


async def ensure_consumers(js: Any, ack_wait_s: float) -> None:
    """The shared consumers on nats-server's MQTT stream, created where missing; safe when several hub replicas do it
    at once (JetStream takes the same configuration again as a no-op). Ones that exist are kept as they are, so an
    operator may tune them with the `nats` tool (e.g. `nats consumer edit '$MQTT_msgs' edgekit-hub-telemetry
    --wait 10s`). The stream itself appears with the first MQTT connection to the account (the hub's own)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    await js.stream_info(MQTT_STREAM)  # NotFoundError until the server made it: retried
    for kind in KINDS:
        try:
            await js.consumer_info(MQTT_STREAM, consumer_name(kind))
        except NotFoundError:
            config = ConsumerConfig(durable_name=consumer_name(kind), filter_subject=MQTT_SUBJECT_PREFIX
                                    + device_subjects(kind), ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s,
                                    max_ack_pending=MAX_ACK_PENDING, max_deliver=-1,
                                    deliver_policy=DeliverPolicy.ALL)  # fmt: skip
            await js.add_consumer(MQTT_STREAM, config)


async def _ack_all(messages: Iterable[Any]) -> None:
    """Ack each message; one the server never hears of (the connection dropped) is delivered again later."""
    for message in messages:
        try:
            await message.ack()
        except Exception as error:  # already acked, or the connection closed: redelivery covers it
            log.debug("ack of %s not sent: %s", message.subject, error)


async def _sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
