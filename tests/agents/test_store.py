"""The agent's outbox on a real SQLite file: seqs, order, acks, the bound and its drop order, surviving kill -9."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgekit.agents.store import Outbox, StoreClosed

KINDS = {"E": "events", "R": "results", "T": "telemetry"}


def put(outbox: Outbox, kind: str, qos: int = 1) -> tuple[int, int]:
    """Append one message whose payload names its kind and seq, so what comes back can be checked."""
    return outbox.append(kind, f"edgekit/v1/dev-1/{kind}", qos, lambda seq: json.dumps([kind, seq]).encode())


def queued(outbox: Outbox) -> list[tuple[int, str]]:
    """(seq, kind) of everything queued, in seq order; every payload must match its row."""
    messages = outbox.peek(after=0, limit=1_000_000)
    for message in messages:
        kind, seq = json.loads(message.payload)
        assert seq == message.seq and message.topic == f"edgekit/v1/dev-1/{kind}"
    return [(m.seq, json.loads(m.payload)[0]) for m in messages]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "outbox.sqlite"


def test_seqs_increase_and_survive_reopen_even_when_all_were_acked(path):
    outbox = Outbox(path)
    assert [put(outbox, "results")[0] for _ in range(3)] == [1, 2, 3]
    outbox.close()

    outbox = Outbox(path)
    assert [s for s, _ in queued(outbox)] == [1, 2, 3]  # queued messages survive too
    assert put(outbox, "events") == (4, 0)
    outbox.ack([1, 2, 3, 4])
    assert outbox.depth() == 0
    outbox.close()

    outbox = Outbox(path)  # empty queue: the next seq still comes from the persisted counter, not MAX(seq)
    assert put(outbox, "telemetry")[0] == 5
    outbox.close()


def test_an_append_after_close_is_refused_by_name_and_uses_no_seq(path):
    """A thread still finishing a job while the agent stops gets StoreClosed (the agent logs it), not sqlite's error."""
    outbox = Outbox(path)
    put(outbox, "events")
    outbox.close()
    with pytest.raises(StoreClosed, match="closed, events message not queued"):
        put(outbox, "events")
    outbox = Outbox(path)
    assert put(outbox, "events")[0] == 2
    outbox.close()


def test_peek_returns_the_oldest_after_a_seq_in_order(path):
    outbox = Outbox(path)
    for kind in ["telemetry", "results", "events"] * 4:
        put(outbox, kind, qos=0 if kind == "telemetry" else 1)
    assert [m.seq for m in outbox.peek(after=0, limit=5)] == [1, 2, 3, 4, 5]
    assert [m.seq for m in outbox.peek(after=5, limit=3)] == [6, 7, 8]
    assert [m.seq for m in outbox.peek(after=10, limit=100)] == [11, 12]
    assert outbox.peek(after=12, limit=100) == []
    first = outbox.peek(after=0, limit=1)[0]
    assert (first.topic, first.qos, json.loads(first.payload)) == ("edgekit/v1/dev-1/telemetry", 0, ["telemetry", 1])
    assert outbox.peek(after=1, limit=1)[0].qos == 1
    outbox.close()


def test_ack_removes_exactly_the_acked_seqs(path):
    outbox = Outbox(path)
    for _ in range(6):
        put(outbox, "results")
    outbox.ack([2, 4])
    outbox.ack([4, 99])  # an ack repeated after a reconnect, or for a seq never queued, is harmless
    assert [s for s, _ in queued(outbox)] == [1, 3, 5, 6]
    assert [m.seq for m in outbox.peek(after=1, limit=2)] == [3, 5]
    assert outbox.depth() == 4
    outbox.close()
    reopened = Outbox(path)
    assert [s for s, _ in queued(reopened)] == [1, 3, 5, 6]  # acks are durable
    reopened.close()


def test_bound_drops_telemetry_first_then_results_events_last(path):
    outbox = Outbox(path, max_messages=10)
    order = "ERTRETRERTERERE"  # 6 events, 6 results, 3 telemetry
    returned = [put(outbox, KINDS[k]) for k in order]
    assert [seq for seq, _ in returned] == list(range(1, 16))
    assert [dropped for _, dropped in returned] == [0] * 10 + [1] * 5
    # Appends 11-13 drop the three telemetry messages (3, 6, 10); with none left, 14-15 drop the oldest results.
    remaining = queued(outbox)
    assert [s for s, _ in remaining] == [1, 5, 7, 8, 9, 11, 12, 13, 14, 15]
    assert sorted(k for _, k in remaining).count("events") == 6  # no event was dropped
    assert outbox.depth() == 10 and outbox.dropped == 5
    outbox.close()


def test_bound_drops_events_only_when_nothing_else_is_left(path):
    outbox = Outbox(path, max_messages=10)
    for _ in range(12):
        put(outbox, "events")
    assert [s for s, _ in queued(outbox)] == list(range(3, 13))  # still bounded, oldest first
    assert outbox.dropped == 2
    outbox.close()


def test_one_append_over_a_lowered_bound_drops_across_kinds_in_order(path):
    outbox = Outbox(path, max_messages=100)
    for k in "TRETRETRE":
        put(outbox, KINDS[k])
    outbox.close()

    outbox = Outbox(path, max_messages=5)  # e.g. the operator lowered --outbox-max
    assert put(outbox, "telemetry") == (10, 5)
    # All four telemetry messages go (the new one too: telemetry is superseded by the next), then the oldest result.
    assert queued(outbox) == [(3, "events"), (5, "results"), (6, "events"), (8, "results"), (9, "events")]
    assert outbox.dropped == 5
    outbox.close()


def test_dropped_count_persists_across_reopen(path):
    outbox = Outbox(path, max_messages=10)
    for _ in range(13):
        put(outbox, "telemetry")
    assert outbox.dropped == 3
    outbox.close()

    outbox = Outbox(path, max_messages=10)
    assert outbox.dropped == 3
    put(outbox, "telemetry")
    assert outbox.dropped == 4
    outbox.close()
    outbox = Outbox(path, max_messages=10)
    assert outbox.dropped == 4
    outbox.close()


def test_failed_payload_builder_queues_nothing_and_uses_no_seq(path):
    outbox = Outbox(path)
    put(outbox, "results")

    def broken(seq: int) -> bytes:
        raise ValueError("cannot encode")

    with pytest.raises(ValueError, match="cannot encode"):
        outbox.append("results", "edgekit/v1/dev-1/results", 1, broken)
    assert put(outbox, "results")[0] == 2  # never published, so its seq is free: no gap for the hub
    assert [s for s, _ in queued(outbox)] == [1, 2]
    outbox.close()


def test_concurrent_appends_get_unique_contiguous_seqs(path):
    outbox = Outbox(path)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(kind: str) -> None:
        for _ in range(50):
            seq, _ = put(outbox, kind)
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker, args=(kind,)) for kind in ("telemetry", "results", "events")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(seqs) == list(range(1, 151))
    assert [s for s, _ in queued(outbox)] == list(range(1, 151))
    outbox.close()


# Appends mixed kinds as fast as it can, acking the oldest now and then as the link would, and prints each
# committed seq; it is killed with SIGKILL somewhere in the middle of a write.
WRITER = """
import json, sys
from pathlib import Path
from edgekit.agents.store import Outbox

outbox = Outbox(Path(sys.argv[1]))
kinds = ("telemetry", "results", "events")
n = 0
while True:
    kind = kinds[n % 3]
    seq, _ = outbox.append(kind, "edgekit/v1/dev-1/" + kind, 1, lambda s: json.dumps([kind, s]).encode() + b"x" * 200)
    n += 1
    if n % 50 == 0:
        outbox.ack([m.seq for m in outbox.peek(after=0, limit=20)])
    print(seq, flush=True)
"""


def test_kill_9_mid_write_leaves_a_store_that_opens_with_contiguous_seqs(path):
    path.parent.mkdir(parents=True)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    printed: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(printed) < 500 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            printed.append(int(line))
        assert len(printed) >= 500, f"writer wrote {len(printed)} messages: {writer.stderr.read()}"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        writer.stdout.close()
        writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL

    outbox = Outbox(path)
    messages = outbox.peek(after=0, limit=1_000_000)
    seqs = [m.seq for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seqs must be contiguous, increasing, unique"
    for message in messages:  # every surviving row is whole
        kind, seq = json.loads(message.payload[:-200])
        assert seq == message.seq and message.topic.endswith(kind) and message.payload.endswith(b"x" * 200)
    # Every seq the writer saw committed is still there (only acked ones are gone): kill -9 loses no commit.
    assert seqs[-1] >= printed[-1]
    assert set(range(seqs[0], printed[-1] + 1)) <= set(seqs)
    next_seq, _ = put(outbox, "events")
    assert next_seq == seqs[-1] + 1  # never reused
    outbox.close()
