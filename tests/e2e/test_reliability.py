"""End-to-end reliability scenarios, each with its figures in the summary table (tests/reliability.py).

Real Mosquitto, real agents (in-process `Agent`, `Fleet`, or an `edgekit agent` process), a real hub. Every figure
is recorded before the assertions, so a failing scenario still shows its numbers at the end of the run.
"""

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from brokers import Subscriber
from hub_helpers import device_url, fleet, fleet_ids, wait_devices_reported, wait_until, watcher_url
from reliability import record
from sqlalchemy import select

import edgekit.agents.agent as agent_module
from edgekit.agents.agent import Agent, AgentSettings
from edgekit.bundle import sha256_file
from edgekit.hub.db import Deployment, Device, EventRecord, ResultRecord, TelemetrySample
from edgekit.mqtt import Backoff
from edgekit.protocol import Event, Result, Telemetry

TIMEOUT_S = 60.0
KINDS = {"results": Result, "telemetry": Telemetry, "events": Event}


def _sequenced(sub: Subscriber, device: str) -> list[tuple[str, object]]:
    """(kind, message) of every sequenced message from `device`, in arrival order."""
    found = []
    for topic, payload in sub.messages(f"edgekit/v1/{device}/#"):
        kind = topic.rsplit("/", 1)[-1]
        if kind in KINDS:
            found.append((kind, KINDS[kind].model_validate_json(payload)))
    return found


def _gaps(seqs: list[int]) -> list[int]:
    return sorted(set(range(1, max(seqs) + 1)) - set(seqs)) if seqs else []


def _start_agent(broker_url: str, data_dir: Path, device_id: str, **settings) -> Agent:
    fields = {"device_id": device_id, "broker": broker_url, "data_dir": data_dir, "telemetry_s": 0.5, "threads": 1,
              "backoff": Backoff(initial_s=0.2, max_s=1.0), **settings}  # fmt: skip
    agent = Agent(AgentSettings(**fields))
    agent.start()
    return agent


# ---- broker restart under load ---------------------------------------------------------------------------------


def test_broker_restart_under_load(tmp_path, mosquitto, cnn_bundles):
    """Agent at 10 results/s (+ telemetry), Mosquitto stopped for ~5 s (until 50 messages queued) and restarted:
    nothing lost, order kept."""
    scenario = "broker restart (5 s, 10 msg/s)"
    broker = mosquitto
    sub = Subscriber(broker.url, "edgekit/v1/rb-1/#", client_id="reliability-sub", clean_session=False)
    agent = _start_agent(broker.url, tmp_path / "rb-1", "rb-1", trust_key=cnn_bundles["public"],
                         bundle=cnn_bundles["v1"], source="synthetic:?fps=10")  # fmt: skip
    try:
        wait_until(lambda: len(_sequenced(sub, "rb-1")) >= 20, 20, "20 messages before the outage")
        broker.stop()
        wait_until(lambda: agent.outbox.depth() >= 50, 30, "50 messages queued while the broker is down")
        queued = agent.outbox.depth()
        broker.start()
        wait_until(lambda: agent.outbox.depth() == 0, TIMEOUT_S, "the outbox to drain after the restart")
        drained_at = time.time()
        wait_until(lambda: any(m.ts > drained_at for _, m in _sequenced(sub, "rb-1")), 10, "a message after the drain")
        seqs = [m.seq for _, m in _sequenced(sub, "rb-1")]
    finally:
        agent.stop()
        sub.close()
        broker.stop()
    unique = list(dict.fromkeys(seqs))
    lost = len(_gaps(unique))
    ordered = all(a < b for a, b in itertools.pairwise(unique))
    record(scenario, "messages queued during outage", queued)
    record(scenario, "messages lost", lost, 0)
    record(scenario, "duplicates delivered (hub de-duplicates)", len(seqs) - len(unique))
    record(scenario, "out-of-order seqs", 0 if ordered else 1, 0)
    assert queued > 20, f"only {queued} messages queued in a 5 s outage at ~12 msgs/s"
    assert lost == 0 and ordered and unique[0] == 1


# ---- tampered bundle in the registry ---------------------------------------------------------------------------


def test_tampered_bundle_in_registry_is_refused(make_hub, cnn_bundles, tmp_path):
    """cnn 2.0.0 pushed, then its stored file overwritten with garbage; a rollout to 3 devices: each rejects it and
    keeps running 1.0.0. Any change to the bytes is caught when the download's sha256 differs from the bundle id,
    which docs/protocol.md reports as `update.failed` (before the signature check, whose failure is
    `update.refused`); either counts as rejecting it here."""
    scenario = "tampered bundle in registry"
    hub = make_hub()
    record_v2, _ = hub.registry.add(cnn_bundles["v2"], "test")
    stored = hub.registry.path(record_v2.id)
    size = stored.stat().st_size
    with open(stored, "r+b") as handle:  # same size, garbage from the middle on
        handle.seek(size // 2)
        handle.write(os.urandom(size - size // 2))
    ids = fleet_ids("tb", 3)
    v1 = sha256_file(cnn_bundles["v1"])
    with fleet(hub, 3, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="tb"):
        wait_devices_reported(hub, ids)
        deployment = hub.rollouts.create(record_v2.id, "all", canary_percent=100, failure_threshold=0.5,
                                         wave_timeout_s=60, actor="test")  # fmt: skip

        def finished():
            with hub.sessions() as session:
                found = session.get(Deployment, deployment.id)
            return found if found.state in ("halted", "completed") else None

        final = wait_until(finished, TIMEOUT_S, "the rollout to end")

        def refusals() -> dict[str, list[str]]:
            with hub.sessions() as session:
                kinds = ("update.refused", "update.failed")
                rows = session.scalars(select(EventRecord).where(EventRecord.type.in_(kinds)))
                found: dict[str, list[str]] = {}
                for row in rows:
                    found.setdefault(row.device_id, []).append(row.message)
                return found

        refused = wait_until(lambda: (r := refusals()) and len(r) == len(ids) and r, 30, "3 rejection events")

        def reported_after_refusal() -> list[Device] | None:
            with hub.sessions() as session:
                rows = list(session.scalars(select(Device).where(Device.id.in_(ids))))
            states = [((d.reported or {}).get("update") or {}).get("state") for d in rows]
            return rows if len(rows) == len(ids) and all(s in ("refused", "failed") for s in states) else None

        rows = wait_until(reported_after_refusal, 30, "each device's reported state after its refusal")
        running = {d.id: ((d.reported or {}).get("bundle") or {}).get("id") for d in rows}
    without_model = sum(1 for i in ids if running.get(i) is None)
    record(scenario, "devices rejecting it (of 3)", len(refused))
    record(scenario, "devices running the tampered bundle", sum(running.get(i) == record_v2.id for i in ids), 0)
    record(scenario, "updates leaving a device without a model", without_model, 0)
    assert final.state == "halted", final.reason
    assert all(running[i] == v1 for i in ids), running
    assert all(any("sha256" in m or "verif" in m or "hash" in m for m in refused[i]) for i in ids), refused


# ---- clock jumps -----------------------------------------------------------------------------------------------


class _JumpingClock:
    """Stands in for the `time` module inside edgekit.agents.agent: wall clock (time.time, used only for message
    timestamps there) shifted by `offset_s`; monotonic time (timing, deadlines) untouched, as on a real device
    whose NTP steps the clock."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def time(self) -> float:
        return time.time() + self.offset_s

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_clock_jumps_lose_nothing(make_hub, cnn_bundles, tmp_path, monkeypatch):
    """The agent's wall clock jumps 3 h forward, then 5 h back, while it produces ~12 msgs/s to a real hub: seqs
    stay contiguous and ordered, and the hub stores every one (its de-duplication is by seq, never by ts)."""
    scenario = "clock jump (+3 h, -5 h)"
    clock = _JumpingClock()
    monkeypatch.setattr(agent_module, "time", clock)
    hub = make_hub()
    sub = Subscriber(watcher_url(hub), "edgekit/v1/cj-1/#")
    agent = _start_agent(device_url(hub, "cj-1"), tmp_path / "cj-1", "cj-1", trust_key=cnn_bundles["public"],
                         bundle=cnn_bundles["v1"], source="synthetic:?fps=10")  # fmt: skip
    try:
        for offset in (0.0, 3 * 3600.0, -2 * 3600.0):
            clock.offset_s = offset
            stamped = clock.time()
            # ~2 s of messages stamped by the jumped clock (a backward jump stamps them before earlier ones).
            wait_until(lambda at=stamped: sum(abs(m.ts - at) < 60 for _, m in _sequenced(sub, "cj-1")) >= 20,
                       30, f"20 messages stamped at offset {offset:+g} s")  # fmt: skip
    finally:
        agent.stop()
        last = agent.outbox._last_seq
        wait_until(lambda: max((m.seq for _, m in _sequenced(sub, "cj-1")), default=0) >= last, 20,
                   "every message to reach the subscriber")  # fmt: skip
        sub.close()
    assert hub.ingest.flush(20)

    def stored() -> set[int]:
        seqs: set[int] = set()
        with hub.sessions() as session:
            for table in (ResultRecord, TelemetrySample, EventRecord):
                seqs |= set(session.scalars(select(table.seq).where(table.device_id == "cj-1")))
        return seqs

    in_hub = wait_until(lambda: (s := stored()) and max(s) >= last and s, 20, "the hub to store every seq")
    arrived = [m for _, m in _sequenced(sub, "cj-1")]
    unique = list(dict.fromkeys(m.seq for m in arrived))
    spread_h = (max(m.ts for m in arrived) - min(m.ts for m in arrived)) / 3600
    record(scenario, "messages sent", last)
    record(scenario, "messages lost (hub)", len(set(range(1, last + 1)) - in_hub), 0)
    record(scenario, "out-of-order seqs", sum(1 for a, b in itertools.pairwise(unique) if a > b), 0)
    record(scenario, "timestamp spread (h)", round(spread_h, 2))
    assert spread_h > 2.5, "the clock did not jump"
    assert in_hub >= set(range(1, last + 1))
    assert unique == sorted(unique)


# ---- disk full on the agent's queue ----------------------------------------------------------------------------

TMPFS_SIZE = "1m"


def _unshare_mount_works() -> bool:
    try:
        probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || exit 1"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_OUTBOX_SCRIPT = """
import json, sys
from pathlib import Path
from edgekit.agents.store import Outbox, StoreFull
outbox = Outbox(Path(sys.argv[1]) / "outbox.sqlite", max_messages=100_000)
queued = refused = 0
for i in range(3000):
    try:
        outbox.append("telemetry" if i % 5 == 0 else "results", "t", 1, lambda seq: b"x" * 300)
        queued += 1
    except StoreFull:
        refused += 1
held, dropped, overflows = outbox.depth(), outbox.dropped, outbox.overflows
seqs = []
while outbox.depth():
    batch = outbox.peek(0, 50)
    seqs += [m.seq for m in batch]
    outbox.ack([m.seq for m in batch])
after = [outbox.append("events", "t", 1, lambda seq: b"y")[0] for _ in range(20)]
print(json.dumps({"queued": queued, "refused": refused, "held": held, "dropped": dropped,
                  "overflows": overflows, "seqs": seqs, "after": after, "depth": outbox.depth()}))
"""


def test_outbox_on_a_full_disk():
    """The outbox alone on a 1 MiB tmpfs: 3,000 appends of 300 bytes. It drops the oldest by the drop order when
    the disk is full (never raising into the agent's threads), every message is either held or counted as dropped,
    and once drained it takes new messages with the next seqs."""
    if not _unshare_mount_works():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -rm)")
    scenario = "disk full: outbox alone (1 MiB tmpfs)"
    script = f'd=$(mktemp -d) && mount -t tmpfs -o size={TMPFS_SIZE} tmpfs "$d" && exec "$@" "$d"'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-c", _OUTBOX_SCRIPT],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    seqs = out["seqs"]
    record(scenario, "messages held when full", out["held"])
    record(scenario, "dropped by policy", out["dropped"])
    record(scenario, "appends refused (StoreFull)", out["refused"])
    record(scenario, "lost beyond the reported drops", 3000 - out["refused"] - out["dropped"] - len(seqs), 0)
    usable = out["after"][0] == out["queued"] + 1 and out["depth"] == 20
    record(scenario, "store unusable after draining", 0 if usable else 1, 0)
    assert out["overflows"] > 0, "the disk never filled: the tmpfs is too big for this test"
    assert out["queued"] + out["refused"] == 3000 and out["queued"] == out["dropped"] + len(seqs)
    assert out["after"] == list(range(out["queued"] + 1, out["queued"] + 21))


@pytest.mark.slow
def test_disk_full_queue(tmp_path, mosquitto, cnn_bundles):
    """An `edgekit agent` process whose data folder is a 1 MiB tmpfs (its own mount namespace), at ~50 results/s
    while the broker is down for long enough to fill it: the agent keeps running, drops the oldest messages by the
    documented order (telemetry, results, events last) and reports it; after the broker is back the store drains
    and new messages flow. Every gap in the seqs must be a drop the agent counted."""
    if not _unshare_mount_works():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -rm)")
    scenario = "disk full (1 MiB tmpfs outbox)"
    broker = mosquitto
    data = tmp_path / "df-data"
    data.mkdir()
    sub = Subscriber(broker.url, "edgekit/v1/df-1/#", client_id="reliability-df", clean_session=False)
    agent_cmd = [sys.executable, "-m", "edgekit", "agent", "--broker", broker.url, "--device-id", "df-1",
                 "--data", str(data), "--trust-key", str(cnn_bundles["public"]), "--telemetry-s", "0.2",
                 "--bundle", str(cnn_bundles["v1"]), "--source", "synthetic:?fps=50"]  # fmt: skip
    script = f'mount -t tmpfs -o size={TMPFS_SIZE} tmpfs "$1" && shift && exec "$@"'
    process = subprocess.Popen(["unshare", "-rm", "sh", "-c", script, "sh", str(data), *agent_cmd],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(_sequenced(sub, "df-1")) >= 20, 60, "20 messages before the outage")
        broker.stop()
        view = f"/proc/{process.pid}/root{data}"  # the agent's tmpfs, seen through its mount namespace

        def nearly_full() -> bool:
            stats = os.statvfs(view)
            return stats.f_bavail * stats.f_frsize < 64 * 1024

        wait_until(nearly_full, 90, "the agent's tmpfs to fill up", interval=0.2)
        wait_until(lambda: b"outbox full: dropped" in b"".join(output), 90, "the agent to drop its oldest messages")
        alive_during = process.poll() is None
        broker.start()
        restarted_at = time.time()

        def fresh_telemetry():
            found = [m for k, m in _sequenced(sub, "df-1") if k == "telemetry" and m.ts > restarted_at + 3]
            return found[-1] if found else None

        telemetry = wait_until(fresh_telemetry, 90, "telemetry from after the outbox drained")
        arrived = _sequenced(sub, "df-1")
        alive_after = process.poll() is None
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        sub.close()
        broker.stop()
        reader.join(5)
        log = b"".join(output).decode(errors="replace")
        print(f"agent output (last 4000 characters):\n{log[-4000:]}")  # shown by pytest when the test fails
    seqs = sorted({m.seq for _, m in arrived})
    gaps = _gaps(seqs)
    dropped = telemetry.store_dropped or 0
    overflow_events = [m for k, m in arrived if k == "events" and m.type == "store.overflow"]
    not_queued = max((m.data.get("not_queued", 0) for m in overflow_events), default=0)
    event_seqs = {m.seq for k, m in arrived if k == "events"}
    record(scenario, "seq gaps seen by the subscriber", len(gaps))
    record(scenario, "messages dropped by policy (reported)", dropped)
    record(scenario, "messages never queued (disk full)", not_queued)
    record(scenario, "messages lost beyond the reported drops", max(0, len(gaps) - dropped), 0)
    record(scenario, "store.overflow events", len(overflow_events))
    record(scenario, "agent crashed", 0 if alive_during and alive_after else 1, 0)
    record(scenario, "store unusable after", 0 if telemetry else 1, 0)
    assert alive_during and alive_after, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert overflow_events, "no store.overflow event reported"
    assert len(gaps) <= dropped, f"{len(gaps)} seqs missing, only {dropped} reported dropped"
    assert not (set(gaps) & event_seqs)
