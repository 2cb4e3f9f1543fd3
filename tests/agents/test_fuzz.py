"""Malformed payloads on the agent's command topics, on both brokers: every one is rejected and reported, none
takes the agent down.

Hypothesis generates 500 payloads for `config/desired` and 500 for `transfer/chunk` (random bytes, random JSON,
wrong types, unknown fields, huge numbers, deep nesting, invalid UTF-8, unsigned desired states, malformed and
truncated signed envelopes, truncated and forged chunk frames). They are published to a running agent; afterwards it
must still produce results, and it must have sent exactly one `payload.rejected` event per payload (and counted them
in telemetry).
"""

import base64
import json
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from agent_helpers import desired_for, sequenced, signed
from brokers import Subscriber, host_port, publish
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from edgekit.agents.agent import Agent
from edgekit.hub.broker import EmbeddedBroker
from edgekit.protocol import (
    CHUNK_MAGIC,
    MAX_BUNDLE_SIZE,
    ChunkHeader,
    DesiredState,
    Event,
    PayloadRejected,
    Result,
    Status,
    Telemetry,
    decode,
    device_topic,
    encode,
    encode_chunk,
)
from edgekit.trust import DesiredStatement, Envelope

DEVICE = "dev-1"
TOPICS = f"edgekit/v1/{DEVICE}/#"
EVENTS = f"edgekit/v1/{DEVICE}/events"
RESULTS = f"edgekit/v1/{DEVICE}/results"
TELEMETRY = f"edgekit/v1/{DEVICE}/telemetry"
STATUS = f"edgekit/v1/{DEVICE}/status"
DESIRED_TOPIC = device_topic(DEVICE, "config/desired")
CHUNK_TOPIC = device_topic(DEVICE, "transfer/chunk")
MAX_PAYLOAD = 2048
EXAMPLES_PER_TOPIC = 500
TIMEOUT_S = 30.0
REJECTED = b'"type":"payload.rejected"'

# ---- strategies -----------------------------------------------------------------------------------------------

huge_ints = st.integers(min_value=10**19, max_value=10**400) | st.integers(min_value=-(10**400), max_value=-(10**19))
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats(allow_nan=True, allow_infinity=True)  # json.dumps writes NaN/Infinity: not JSON
    | st.text(max_size=40)
)
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)  # fmt: skip


@st.composite
def dumped(draw, values: st.SearchStrategy) -> bytes:
    """A value as JSON text, ASCII-escaped or raw UTF-8."""
    return json.dumps(draw(values), ensure_ascii=draw(st.booleans())).encode()


invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80",
                                b"\xe2\x82", b"\xc0\xaf"])  # fmt: skip

with_invalid_utf8 = st.builds(
    lambda text, bad, at: text[:at] + bad + text[at:],
    dumped(json_values)
    | st.just(b'{"rev": 3, "source": "synthetic:"}')
    | st.builds(lambda: signed(DesiredState(rev=3, source="synthetic:"), DEVICE)),
    invalid_utf8,
    st.integers(min_value=0, max_value=60),
)

deep_nesting = st.builds(
    lambda n, kind, closed: (
        (b"[" * n + (b"]" * n if closed else b""))
        if kind == "list"
        else (b'{"a":' * n + b"1" + (b"}" * n if closed else b""))
    ),
    st.integers(min_value=1, max_value=1500),
    st.sampled_from(["list", "dict"]),
    st.booleans(),
)

desired_fields = sorted(DesiredState.model_fields)
# rev values of a type or range a DesiredState cannot take.
bad_revs = (
    st.none()
    | st.integers(max_value=-1)
    | st.floats().filter(lambda x: not x.is_integer())
    | st.text(alphabet="abcxyz -_", min_size=1, max_size=10)
    | st.lists(st.integers(), max_size=3)
    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
)
wrong_types = st.fixed_dictionaries(
    {"rev": bad_revs}, optional={name: json_values for name in desired_fields if name != "rev"}
).map(lambda d: json.dumps(d).encode())
# A believable desired state, but without `rev`, which is required.
without_rev = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(["synthetic:?fps=5", "mqtt:", "camera:0"]),
        "task": st.sampled_from(["auto", "classifier", "detector", "raw"]),
        "health_checks": st.integers(1, 100),
        "rates": st.fixed_dictionaries({"telemetry_s": st.floats(0.1, 10)}),
    },
).map(lambda d: json.dumps(d).encode())
unknown_fields = st.builds(
    lambda rev, extra: json.dumps({"rev": rev, **extra}).encode(),
    st.integers(0, 10**6),
    st.dictionaries(st.text(max_size=12).filter(lambda k: k not in desired_fields), json_values, min_size=1,
                    max_size=4),
)  # fmt: skip
huge_numbers = (
    st.builds(lambda n: json.dumps({"rev": n}).encode(), st.integers(min_value=-(10**400), max_value=-1))
    | st.builds(lambda n: json.dumps({"rev": 1, "health_checks": n}).encode(), huge_ints)
    | st.sampled_from([b'{"rev": 1e400}', b'{"rev": -1e400}', b'{"rev": 1, "thresholds": {"score": 1e999}}'])
    | st.integers(min_value=1, max_value=2500).map(lambda n: b"9" * n)
)
# A valid desired state as the hub signs it for this device.
signed_desired = st.builds(lambda rev, fps: signed(DesiredState(rev=rev, source=f"synthetic:?fps={fps}"), DEVICE),
                           st.integers(0, 99), st.integers(1, 30))  # fmt: skip
# The same cut short: never a complete JSON object (nor empty: an empty payload clears a retained desired state).
truncated_desired = st.builds(
    lambda text, keep: text[: max(1, min(keep, len(text) - 1))], signed_desired, st.integers(min_value=1, max_value=900)
)
# A valid desired state without its envelope: what agents took before desired states were signed.
unsigned_desired = st.builds(
    lambda rev, fps: encode(DesiredState(rev=rev, source=f"synthetic:?fps={fps}")), st.integers(0, 99),
    st.integers(1, 30),
)  # fmt: skip
# A signed envelope with one of its fields missing, of a wrong type or out of bounds.
envelope_fields = ("payloadType", "payload", "signatures")
bad_envelope_values = {
    "payloadType": st.none()
    | st.integers()
    | st.lists(st.text(max_size=5), max_size=2)
    | st.text(min_size=101, max_size=150),
    "payload": st.none()
    | st.integers()
    | st.booleans()
    | st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    "signatures": st.none()
    | st.just([])
    | st.text(max_size=20)
    | st.lists(st.dictionaries(st.sampled_from(["keyid", "sig", "key"]), json_values, max_size=3), min_size=1,
               max_size=3)
    | st.lists(st.fixed_dictionaries({"keyid": st.text(max_size=8), "sig": st.text(max_size=8)}), min_size=9,
               max_size=10),
}  # fmt: skip


@st.composite
def broken_envelopes(draw) -> bytes:
    envelope = json.loads(draw(signed_desired))
    field = draw(st.sampled_from(envelope_fields))
    if draw(st.booleans()):
        del envelope[field]
    else:
        envelope[field] = draw(bad_envelope_values[field])
    if draw(st.booleans()):
        envelope[draw(st.text(max_size=10).filter(lambda k: k not in envelope))] = draw(json_values)
    return json.dumps(envelope).encode()


desired_payloads = st.one_of(
    st.binary(max_size=3000),
    dumped(json_values),
    wrong_types,
    without_rev,
    unknown_fields,
    huge_numbers,
    deep_nesting,
    with_invalid_utf8,
    truncated_desired,
    unsigned_desired,
    broken_envelopes(),
)

sha256_hex = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
chunk_headers = st.builds(
    ChunkHeader,
    bundle=sha256_hex,
    index=st.integers(0, 2**40),
    total=st.integers(1, 2**40),
    size=st.integers(1, MAX_BUNDLE_SIZE),
    sha256=sha256_hex,
    error=st.none() | st.text(max_size=20),
)
well_formed_chunks = st.builds(encode_chunk, chunk_headers, st.binary(max_size=512))
truncated_chunks = st.builds(lambda frame, keep: frame[:keep], well_formed_chunks, st.integers(0, 600))


def _frame(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return CHUNK_MAGIC + struct.pack(">I", len(header) if length is None else length) + header + data


chunk_payloads = st.one_of(
    st.binary(max_size=2000),
    st.builds(lambda rest: CHUNK_MAGIC + rest, st.binary(max_size=600)),  # the magic, then garbage
    st.builds(_frame, st.binary(max_size=300), st.binary(max_size=300), st.integers(0, 2**32 - 1)),  # any length
    st.builds(_frame, dumped(json_values) | wrong_types | deep_nesting, st.binary(max_size=64)),  # wrong header
    st.builds(_frame, with_invalid_utf8, st.binary(max_size=64)),
    truncated_chunks,
    well_formed_chunks,  # valid, but for a transfer that is not running
    dumped(json_values),
)


def _not_malformed(payload: bytes) -> bool:
    """Guard: the strategies are built not to produce a well-formed envelope (the agent would check its signature
    and answer config.rejected, or apply it) nor an empty payload (it clears a retained desired state, and is
    ignored); this makes sure none slips through."""
    if not payload:
        return True
    try:
        decode(Envelope, payload, MAX_PAYLOAD)
    except PayloadRejected:
        return False
    return True


# ---- helpers --------------------------------------------------------------------------------------------------


def _events(sub: Subscriber) -> list[Event]:
    return sequenced(sub.messages(EVENTS), Event)


def _rejections(sub: Subscriber) -> list[Event]:
    return [e for e in _events(sub) if e.type == "payload.rejected"]


def _results_after(sub: Subscriber, seq: int) -> list[Result]:
    results = (Result.model_validate_json(p) for _, p in sub.messages(RESULTS))
    return [r for r in results if r.seq > seq]


def _online_agent(sub: Subscriber, start_agent: Callable[..., Agent], broker: EmbeddedBroker, bundle: Path) -> Agent:
    agent = start_agent(broker, bundle=bundle, source="synthetic:?fps=5", max_payload=MAX_PAYLOAD)
    sub.wait_for(lambda ms: any(Status.model_validate_json(p).state == "online" for _, p in ms), TIMEOUT_S, STATUS)
    sub.wait_for(lambda ms: len(ms) >= 1, TIMEOUT_S, RESULTS)
    return agent


def _fuzz(client: mqtt.Client, topic: str, payloads: st.SearchStrategy, sent: list, guard=None) -> None:
    """Publish EXAMPLES_PER_TOPIC generated payloads on `topic` (QoS 1, not retained); record what was sent."""

    @settings(max_examples=EXAMPLES_PER_TOPIC, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(payloads)
    def send(payload: bytes) -> None:
        if guard is not None:
            assume(not guard(payload))
        sent.append((topic, payload, client.publish(topic, payload, qos=1, retain=False)))

    send()


def _assert_alive(sub: Subscriber, agent: Agent, after_seq: int) -> None:
    sub.wait_for(lambda _: len(_results_after(sub, after_seq)) >= 3, TIMEOUT_S, RESULTS)
    assert {r.bundle for r in _results_after(sub, after_seq)} == {"digits@1.0.0"}
    assert agent.link.connected
    assert all(thread.is_alive() for thread in agent._threads), agent._threads


# ---- tests ----------------------------------------------------------------------------------------------------


def test_malformed_payloads_are_rejected_and_reported(broker, start_agent, digits_bundle):
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _online_agent(sub, start_agent, broker, digits_bundle("1.0.0"))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.max_inflight_messages_set(100)
        client.connect(*host_port(broker.url))
        client.loop_start()
        sent: list[tuple[str, bytes, mqtt.MQTTMessageInfo]] = []
        try:
            _fuzz(client, DESIRED_TOPIC, desired_payloads, sent, guard=_not_malformed)
            _fuzz(client, CHUNK_TOPIC, chunk_payloads, sent)
            deadline = time.monotonic() + TIMEOUT_S
            for _, _, info in sent:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                assert info.is_published(), "the broker did not acknowledge every fuzz payload"
        finally:
            client.disconnect()
            client.loop_stop()
        by_topic = Counter(topic for topic, _, _ in sent)
        assert by_topic == {DESIRED_TOPIC: EXAMPLES_PER_TOPIC, CHUNK_TOPIC: EXAMPLES_PER_TOPIC}, by_topic
        total = len(sent)

        # Counted on the raw payloads: parsing them all on every arrival would be quadratic.
        sub.wait_for(lambda ms: sum(REJECTED in p for _, p in ms) >= total, TIMEOUT_S, EVENTS)
        rejections = _rejections(sub)
        # One event per payload, naming its topic and its size.
        reported = Counter((e.data["topic"], e.data["bytes"]) for e in rejections)
        expected = Counter((topic, len(payload)) for topic, payload, _ in sent)
        assert reported == expected, (
            f"missing {list((expected - reported).items())[:10]}, unexpected {list((reported - expected).items())[:10]}"
        )
        assert all(e.level == "warning" and e.message.startswith(e.data["topic"]) for e in rejections)
        oversize = [e for e in rejections if e.data["bytes"] > MAX_PAYLOAD and e.data["topic"] == DESIRED_TOPIC]
        assert oversize and all("not read" in e.message for e in oversize)

        sub.wait_for(lambda ms: any(Telemetry.model_validate_json(p).rejected_payloads == total for _, p in ms),
                     TIMEOUT_S, TELEMETRY)  # fmt: skip
        assert agent.rejected_payloads == total
        # Nothing was applied, and nothing else went wrong.
        kinds = Counter(e.type for e in _events(sub))
        assert set(kinds) <= {"agent.started", "payload.rejected"}, kinds
        assert len(_rejections(sub)) == total
        _assert_alive(sub, agent, rejections[-1].seq)


def test_oversized_desired_state_is_refused_unread(broker, start_agent, digits_bundle):
    """A desired state over `max_payload` is refused before parsing, even though it is valid; at the maximum it
    is read and applied."""
    bundle = digits_bundle("1.0.0")

    def padded(rev: int, size: int) -> bytes:
        """The signed desired state, with blanks before its closing brace (outside what the signature covers)."""
        text = signed(desired_for(bundle, rev=rev, version="1.0.0", source="synthetic:?fps=5"), DEVICE)
        payload = text[:-1] + b" " * (size - len(text)) + b"}"
        statement = base64.b64decode(Envelope.model_validate_json(payload).payload)
        assert len(payload) == size and DesiredStatement.model_validate_json(statement).desired.rev == rev
        return payload

    with Subscriber(broker.url, TOPICS) as sub:
        agent = _online_agent(sub, start_agent, broker, bundle)
        publish(broker.url, DESIRED_TOPIC, padded(7, 3000))
        sub.wait_for(lambda _: bool(_rejections(sub)), TIMEOUT_S, EVENTS)
        [event] = _rejections(sub)
        assert event.message == (
            f"{DESIRED_TOPIC}: not a signed desired state (a DSSE envelope): payload of 3000 bytes is over the "
            f"{MAX_PAYLOAD}-byte maximum; not read"
        )
        assert event.data == {"topic": DESIRED_TOPIC, "bytes": 3000}
        _assert_alive(sub, agent, event.seq)
        assert agent.rejected_payloads == 1
        assert "config.applied" not in [e.type for e in _events(sub)]

        # Exactly at the maximum: read, and applied (the same bundle is already running).
        publish(broker.url, DESIRED_TOPIC, padded(8, MAX_PAYLOAD))
        sub.wait_for(lambda _: any(e.type == "config.applied" for e in _events(sub)), TIMEOUT_S, EVENTS)
        applied = next(e for e in _events(sub) if e.type == "config.applied")
        assert applied.data == {"rev": 8} and len(_rejections(sub)) == 1
