"""Broker stopped for 30 s while the agent produces 10 msgs/s, then restarted: every seq arrives, none twice after
de-duplication; in order on Mosquitto. amqtt handles a client's publishes concurrently and delivered a few out of
order, across topics and once on one topic, in clean-clone runs: for amqtt the reordering is reported, not
limited (the hub de-duplicates by seq and does not depend on order; docs/protocol.md)."""

import itertools
import logging
import time

from brokers import Subscriber, wait_until
from reliability import record

from edgekit.mqtt import Backoff
from edgekit.protocol import Event, Result, Telemetry

DEVICE = "edgekit/v1/dev-1"
TOPICS = f"{DEVICE}/#"
SEQUENCED = {f"{DEVICE}/results": Result, f"{DEVICE}/telemetry": Telemetry, f"{DEVICE}/events": Event}
BEFORE_OUTAGE = 30  # messages through the broker before it stops (3 s at 10 results/s)
START_TIMEOUT_S = 30.0
OUTAGE_S = 30.0  # the number: keep it
REPLAY_TIMEOUT_S = 60.0


def _sequenced(subscribers: list[Subscriber]) -> list[tuple[int, float]]:
    """(seq, ts) of every telemetry/results/events message, in arrival order across the subscribers used in turn."""
    found = []
    for sub in subscribers:
        for topic, payload in sub.messages(TOPICS):
            if topic in SEQUENCED:
                message = SEQUENCED[topic].model_validate_json(payload)
                found.append((message.seq, message.ts))
    return found


def _stop_amqtt_between_messages(broker, agent, sub: Subscriber) -> None:
    """Stop amqtt when nothing is on its way: it acknowledges a publish before delivering it, and drops what it has
    not delivered yet when it stops ("N messages not broadcasted"), a loss no client can see. So stop just after a
    result arrived with the outbox empty (all acknowledged) and the last telemetry recent: the next result is
    ~100 ms away (10 fps), the next telemetry ~500 ms, and stop() drops amqtt's connections within a few ms.
    Mosquitto needs none of this: it delivers what it acknowledged after its restart, so there the outage starts at
    any moment, in-flight messages included."""
    counts = {"results": len(sub.messages(f"{DEVICE}/results")), "telemetry": len(sub.messages(f"{DEVICE}/telemetry"))}
    telemetry_at = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = time.monotonic()
        arrived = {kind: len(sub.messages(f"{DEVICE}/{kind}")) > count for kind, count in counts.items()}
        counts = {kind: len(sub.messages(f"{DEVICE}/{kind}")) for kind in counts}
        if arrived["telemetry"]:
            telemetry_at = now
        if arrived["results"] and telemetry_at and now - telemetry_at < 0.3 and agent.outbox.depth() == 0:
            broker.stop()
            return
        time.sleep(0.002)
    raise AssertionError("no quiet moment to stop amqtt in 10 s")


def _unreachable_logged(caplog) -> int:
    return sum(1 for r in caplog.records if r.name == "edgekit.mqtt" and "unreachable" in r.getMessage())


def test_broker_outage_loses_nothing_and_keeps_order(broker, start_agent, digits_bundle, caplog):
    amqtt = broker.kind == "amqtt"
    settings = {}
    if amqtt:
        # amqtt forgets every session and subscription when it stops, so whatever the agent replays before a
        # subscriber is back is lost to that subscriber (Mosquitto persists the subscriber's session and queues
        # for it instead). So here the agent backs off 2-4 s between attempts, and the broker is started right
        # after a failed attempt (seen in the link's log) with a fresh subscriber subscribed at once: the agent's
        # next attempt is then at least 2 s away, while the subscriber is back within milliseconds.
        settings["backoff"] = Backoff(initial_s=2.0, max_s=4.0)
        caplog.set_level(logging.INFO, logger="edgekit.mqtt")
    subscribers = [Subscriber(broker.url, TOPICS, client_id="outage-sub", clean_session=False)]
    try:
        agent = start_agent(broker, bundle=digits_bundle("1.0.0"), source="synthetic:?fps=10", **settings)
        wait_until(lambda: len(_sequenced(subscribers)) >= BEFORE_OUTAGE, START_TIMEOUT_S,
                   f"{BEFORE_OUTAGE} messages before the outage")  # fmt: skip

        if amqtt:
            _stop_amqtt_between_messages(broker, agent, subscribers[0])
        else:
            broker.stop()
        stopped = time.monotonic()
        before = max((seq for seq, _ in _sequenced(subscribers)), default=0)
        time.sleep(OUTAGE_S)  # deliberate: the outage itself, as long as the issue asks for
        queued = agent.outbox.depth()
        assert not agent.link.connected
        connects = agent.link.connects

        if amqtt:
            attempts = _unreachable_logged(caplog)
            wait_until(lambda: _unreachable_logged(caplog) > attempts, 10, "the agent's next failed connect attempt")
            broker.start()
            subscribers[0].close()
            subscribers.append(Subscriber(broker.url, TOPICS))
            # Holds unless the agent got in before the subscriber, which the backoff above rules out.
            assert agent.link.connects == connects, "the agent reconnected before the subscriber re-subscribed"
        else:
            broker.start()
        restarted = time.monotonic()
        assert queued > 250, f"only {queued} messages queued during a {OUTAGE_S:g} s outage at ~12 msgs/s"

        wait_until(lambda: agent.outbox.depth() == 0, REPLAY_TIMEOUT_S, "the outbox to drain after the restart")
        drained_at, drained = time.time(), time.monotonic()
        # The subscriber has everything up to "now" once a message created after the drain arrived: delivery is
        # in seq order, so anything missing before it is a gap.
        wait_until(lambda: any(ts > drained_at for _, ts in _sequenced(subscribers)), 10,
                   "a message produced after the outbox drained")  # fmt: skip
        received = _sequenced(subscribers)
    finally:
        for sub in subscribers:
            sub.close()

    seqs = [seq for seq, _ in received]
    unique = list(dict.fromkeys(seqs))  # first occurrence of each seq, in arrival order
    duplicates = len(seqs) - len(unique)
    print(f"\n{broker.kind}: {len(unique)} messages (seq {unique[0]}..{unique[-1]}), {duplicates} duplicates; "
          f"{queued} queued during the {restarted - stopped:.1f} s outage; outbox drained "
          f"{drained - restarted:.1f} s after the restart; agent connected {agent.link.connects} times")  # fmt: skip
    assert agent.link.connects == connects + 1
    # The subscriber was there before the agent started, so the agent's very first message (seq 1) is in.
    assert min(unique) == 1, f"first seq received is {min(unique)}"
    out_of_order = sum(a > b for a, b in itertools.pairwise(unique))
    record(f"broker outage ({broker.kind}, {OUTAGE_S:g} s)", "messages after a higher seq (out of order)",
           out_of_order, None if broker.kind == "amqtt" else 0)  # fmt: skip
    if broker.kind != "amqtt":
        assert out_of_order == 0, "seqs arrived out of order"
    missing = sorted(set(range(1, max(unique) + 1)) - set(unique))
    assert not missing, f"{len(missing)} seqs never arrived, e.g. {missing[:20]}"
    assert sorted(unique) == list(range(1, max(unique) + 1))
    assert max(unique) - before > queued, "fewer messages after the outage began than were queued during it"
