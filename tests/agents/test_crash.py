"""kill -9 of the agent at random moments during download/verify/switch: after a restart it runs either the old or
the new bundle and reports which; its store is never left unusable; in the end it converges to the new bundle.

Each round starts a fresh agent process (own data dir, own device id) on the old digits bundle with a retained
desired state naming a ~9.5 MB bundle, kills it with SIGKILL at a random moment, checks what it left on disk,
restarts it and watches it come back and converge. The kill moments are stratified so that every phase gets hit:
one round in five anywhere from process start to the update starting (imports, installing --bundle, connecting),
the others at a random moment within the download, verify, self-test or health-check phase, as long as that phase
lasted in one undisturbed update measured beforehand, counted from the moment the phase begins. Phases are read
from the data dir, which is exact: the messages saying the same arrive a few ms later, and on a fast machine the
verify phase lasts ~20 ms. The "hit" printed for each round is the phase the data dir shows after the kill.
"""

import json
import random
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from agent_helpers import HubSigner, agent_command, desired_for
from brokers import Subscriber, publish_many, wait_until
from reliability import record as record_figure

from edgekit.agents.bundles import ActiveRecord
from edgekit.bundle import sha256_file
from edgekit.protocol import Event, ReportedState, Status, Telemetry, device_topic

OLD, NEW = "1.0.0", "2.0.0"  # NEW: the big_bundle fixture's version (conftest.py)
NEW_LABEL = f"digits@{NEW}"
MODES = ("startup", "downloading", "verifying", "testing", "trial")
# How far each message says the update got; a kill is attributed to the furthest one received before it.
RANK = ["starting", "running", "downloading", "verifying", "testing", "switching", "trial", "healthy"]
DISK_PHASES = ["starting", "running", "downloading", "verifying", "testing", "trial", "healthy"]
UPDATE_PHASES = {"downloading", "verifying", "testing", "switching", "trial"}
EVENT_PHASE = {"agent.started": "running", "update.started": "downloading", "update.downloaded": "verifying",
               "update.selftest": "switching", "update.activated": "trial", "update.healthy": "healthy"}  # fmt: skip
TIMEOUT_S = 60.0
# MQTT lets a broker drop a silent client only after 1.5 x its keepalive (the agent's is 30 s): 45 s, plus margin.
LAST_WILL_S = 60.0


def _phase(messages: list[tuple[str, bytes]]) -> str:
    """The furthest phase the status, reported state and events received so far show."""
    reached = 0
    for topic, payload in messages:
        name = topic.rsplit("/", 1)[-1]
        phase = None
        if name == "status" and Status.model_validate_json(payload).state == "online":
            phase = "running"
        elif name == "reported":
            phase = ReportedState.model_validate_json(payload).update.state
        elif name == "events":
            phase = EVENT_PHASE.get(Event.model_validate_json(payload).type)
        if phase in RANK:
            reached = max(reached, RANK.index(phase))
    return RANK[reached]


def _disk_phase(data: Path, new_id: str) -> str:
    """How far the update got, from the data dir alone (exact, unlike messages, which arrive a little later)."""
    record = _read_record(data)
    if record is None:
        return "starting"  # --bundle not installed yet
    if record.active == new_id:
        return "trial" if record.trial else "healthy"
    if (data / "bundles" / new_id / "manifest.json").is_file():
        return "testing"  # installed, being loaded and self-tested
    downloads = data / "downloads"
    if (downloads / f"{new_id}.ekb").exists() or any((data / "bundles").glob(f".{new_id[:12]}-*")):
        return "verifying"  # downloaded; signature and hashes checked while unpacking into a staging folder
    if (downloads / f"{new_id}.json").exists() or (downloads / f"{new_id}.part").exists():
        return "downloading"
    return "running"


def _integrity(database: Path) -> str:
    connection = sqlite3.connect(database, timeout=10)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()


def _read_record(data: Path) -> ActiveRecord | None:
    path = data / "active.json"
    return ActiveRecord.model_validate_json(path.read_bytes()) if path.exists() else None


def _check_left_behind(data: Path, copy_to: Path) -> ActiveRecord | None:
    """What a SIGKILL left on disk must be usable: active.json parses and names complete bundles, and the outbox
    (checked on a copy, so that this check does not recover the WAL in the agent's place) is intact."""
    record = _read_record(data)
    if record is not None:
        for bundle_id in (record.active, record.previous):
            if bundle_id:
                assert (data / "bundles" / bundle_id / "manifest.json").is_file(), f"{record} names a missing bundle"
    if (data / "outbox.sqlite").exists():
        copy_to.mkdir()
        for suffix in ("", "-wal"):
            if (data / f"outbox.sqlite{suffix}").exists():
                shutil.copy(data / f"outbox.sqlite{suffix}", copy_to / f"outbox.sqlite{suffix}")
        assert _integrity(copy_to / "outbox.sqlite") == "ok"
    return record


def _online_since(sub: Subscriber, device: str, since: float) -> Status | None:
    for _, payload in sub.messages(device_topic(device, "status")):
        status = Status.model_validate_json(payload)
        if status.state == "online" and status.ts >= since:
            return status
    return None


def _telemetry_since(sub: Subscriber, device: str, since: float) -> list[Telemetry]:
    telemetry = [Telemetry.model_validate_json(p) for _, p in sub.messages(device_topic(device, "telemetry"))]
    return [t for t in telemetry if t.ts >= since]


def _reported_since(sub: Subscriber, device: str, since: float) -> list[ReportedState]:
    topic = device_topic(device, "config/reported")
    reported = [ReportedState.model_validate_json(p) for _, p in sub.messages(topic)]
    return [r for r in reported if r.ts >= since]


# Not the bundle chunks: megabytes the subscriber would have to read before the state messages behind them; nor
# results, thousands of them: telemetry (every 0.5 s) says how many inferences ran.
WATCHED = [device_topic("+", name) for name in ("status", "config/reported", "events", "telemetry")]


def _log_tail(log: Path) -> str:
    return "agent log:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])


class Rounds:
    """One subscriber and one retained desired state per device for the whole test, set up before any agent runs.

    amqtt (0.12) iterates its table of subscriptions with awaits in between when a client connects and when it
    broadcasts; a client that subscribes or leaves meanwhile makes that iteration fail, and the connection or the
    message is dropped. Clients coming and going between rounds (a subscriber per round, a publisher per desired
    state) hit that now and then, so only the agents connect during the rounds.
    """

    def __init__(self, broker, served, old: Path, new: Path, trust_key: Path, hub: HubSigner, work: Path,
                 devices: list[str]) -> None:  # fmt: skip
        self.broker, self.old, self.new, self.trust_key, self.work = broker, old, new, trust_key, work
        self.hub_key = hub.public
        self.new_id = served.add(new)
        self.old_id = sha256_file(old)
        self.processes: list[subprocess.Popen] = []
        desired = desired_for(new, rev=1, version=NEW, health_checks=3)
        publish_many(broker.url, [(device_topic(d, "config/desired"), hub.sign(desired, d)) for d in devices],
                     retain=True)  # fmt: skip
        # Read back by device: amqtt also sends a connecting client the retained messages of every topic anyone
        # subscribed to.
        self.sub = Subscriber(broker.url, *WATCHED)

    def prepare(self, device: str) -> tuple[list[str], Path]:
        """The agent command line and data dir of a device."""
        data = self.work / device
        command = agent_command(self.broker.url, data, self.trust_key, self.hub_key, "--bundle", str(self.old),
                                "--source", "synthetic:?fps=20", device_id=device)  # fmt: skip
        return command, data

    def start(self, command: list[str], log: Path) -> subprocess.Popen:
        with log.open("ab") as handle:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self.sub.close()

    def measure(self) -> tuple[float, dict[str, float]]:
        """One undisturbed update, watched on disk: seconds from process start to the update starting, and how
        long each update phase lasts."""
        command, data = self.prepare("crash-measure")
        log = self.work / "crash-measure.log"
        started = time.monotonic()
        process = self.start(command, log)
        seen: dict[str, float] = {}
        while "healthy" not in seen:
            assert time.monotonic() < started + TIMEOUT_S, f"no healthy update in {TIMEOUT_S:g} s; {_log_tail(log)}"
            assert process.poll() is None, f"the agent exited; {_log_tail(log)}"
            phase = _disk_phase(data, self.new_id)
            for reached in DISK_PHASES[: DISK_PHASES.index(phase) + 1]:
                seen.setdefault(reached, time.monotonic() - started)
            time.sleep(0.001)
        process.terminate()
        process.wait(timeout=20)
        update = seen["downloading"]
        after = [seen[phase] - update for phase in DISK_PHASES[DISK_PHASES.index("downloading") :]]
        durations = {phase: after[i + 1] - after[i] for i, phase in enumerate(MODES[1:])}
        print(f"\n{self.broker.kind}: the update starts {update:.2f} s after the process; then "
              + ", ".join(f"{phase} {seconds * 1000:.0f} ms" for phase, seconds in durations.items()))  # fmt: skip
        return update, durations

    def kill_and_restart(self, index: int, mode: str, delay: float, last: bool) -> dict:
        device = f"crash-{index}"
        command, data = self.prepare(device)
        log = self.work / f"{device}.log"
        sub = self.sub
        started = time.monotonic()
        process = self.start(command, log)
        if mode != "startup":
            self._wait_for_phase(data, mode, process, log)
            started = time.monotonic()
        time.sleep(max(0.0, started + delay - time.monotonic()))  # deliberate: the kill moment drawn for this round
        told = _phase(sub.messages(f"edgekit/v1/{device}/#"))
        assert process.poll() is None, f"the agent exited before the kill; {_log_tail(log)}"
        process.kill()
        process.wait(timeout=10)
        hit = _disk_phase(data, self.new_id)
        part = data / "downloads" / f"{self.new_id}.part"
        # A kill between the download's sidecar and its first chunk leaves no .part yet: 0 bytes in.
        received = part.stat().st_size if part.exists() else 0
        detail = f" ({received} of {self.new.stat().st_size} bytes)" if hit == "downloading" else ""
        record = _check_left_behind(data, self.work / f"{device}-outbox-copy")
        # Once it was seen online, its Last Will says offline when the broker notices the dead connection; wait for
        # it, so that the broker is done with the old session before the same client id connects again. (An
        # "online" still on its way is harmless: only statuses stamped after the restart count below.)
        # amqtt, a Python broker sharing 2 loaded cores with the test, has taken over 15 s to notice; a broker that
        # misses the socket closing drops the client only at 1.5 x the 30 s keepalive, so wait past those 45 s.
        wait_until(lambda: _last_state(sub, device) in (None, "offline"), LAST_WILL_S, f"{device}'s Last Will")

        restarted = time.time()
        process = self.start(command, log)
        back = lambda: _online_since(sub, device, restarted) is not None or process.poll() is not None  # noqa: E731
        wait_until(back, TIMEOUT_S, f"the restarted {device} to come online")
        assert process.poll() is None, f"the restarted agent exited; {_log_tail(log)}"
        status = _online_since(sub, device, restarted)
        assert status.bundle is not None, "the restarted agent runs no bundle"
        running_id = status.bundle.id
        reported = lambda: _reported_since(sub, device, restarted)  # noqa: E731
        wait_until(lambda: any(r.bundle and r.bundle.id == running_id for r in reported()), TIMEOUT_S,
                   "config/reported naming the running bundle")  # fmt: skip
        running = status.bundle.version
        assert (status.bundle.id, running) in ((self.old_id, OLD), (self.new_id, NEW)), status.bundle
        if record is not None and record.active == self.new_id:
            assert status.bundle.id == self.new_id, f"killed after the switch ({record}), restarted on {running}"
        assert process.poll() is None, _log_tail(log)
        assert _integrity(data / "outbox.sqlite") == "ok"
        assert _read_record(data) is not None

        # Whatever the kill interrupted, it converges: rev 1 applied, the new bundle active and proven.
        def converged() -> bool:
            return _disk_phase(data, self.new_id) == "healthy" and any(
                r.rev == 1 and r.bundle and r.bundle.id == self.new_id for r in reported()
            )

        wait_until(lambda: converged() or process.poll() is not None, TIMEOUT_S, f"{device} to converge")
        assert process.poll() is None, f"the agent exited while converging; {_log_tail(log)}"
        events = [Event.model_validate_json(p).type for _, p in sub.messages(device_topic(device, "events"))]
        assert "update.rolled_back" not in events and "update.failed" not in events, events
        if last:
            self._check_clean_restart(process, command, log, sub, device)
        else:
            process.terminate()
            process.wait(timeout=20)
        return {"round": index, "aimed_at": mode, "delay_s": round(delay, 3), "hit": hit + detail,
                "messages_said": told, "restarted_on": running}  # fmt: skip

    def _wait_for_phase(self, data: Path, phase: str, process: subprocess.Popen, log: Path) -> None:
        """Until the data dir shows `phase` (or a later one: a phase can be over between two looks)."""
        deadline = time.monotonic() + TIMEOUT_S
        while DISK_PHASES.index(_disk_phase(data, self.new_id)) < DISK_PHASES.index(phase):
            assert process.poll() is None, f"the agent exited; {_log_tail(log)}"
            assert time.monotonic() < deadline, f"no {phase} phase in {TIMEOUT_S:g} s; {_log_tail(log)}"
            time.sleep(0.001)

    def _check_clean_restart(self, process, command, log, sub: Subscriber, device: str) -> None:
        """After the update, a plain restart (same command line, --bundle old included) stays on the new bundle."""
        process.terminate()
        assert process.wait(timeout=20) == 0, _log_tail(log)
        restarted = time.time()
        process = self.start(command, log)
        back = lambda: _online_since(sub, device, restarted) is not None or process.poll() is not None  # noqa: E731
        wait_until(back, TIMEOUT_S, "the agent to come back after a clean restart")
        status = _online_since(sub, device, restarted)
        assert status is not None and status.bundle is not None, _log_tail(log)
        assert status.bundle.version == NEW, f"a restart after the update came back on {status.bundle.version}"

        def inferred() -> int:
            return sum(t.inferences for t in _telemetry_since(sub, device, restarted) if t.bundle == NEW_LABEL)

        wait_until(lambda: inferred() >= 5 or process.poll() is not None, TIMEOUT_S, "inferences on the new bundle")
        assert process.poll() is None, _log_tail(log)
        assert _read_record(self.work / device) == ActiveRecord(active=self.new_id, previous=self.old_id, trial=False)
        process.terminate()
        assert process.wait(timeout=20) == 0, _log_tail(log)


def _last_state(sub: Subscriber, device: str) -> str | None:
    statuses = sub.messages(device_topic(device, "status"))
    return Status.model_validate_json(statuses[-1][1]).state if statuses else None


@pytest.mark.parametrize("rounds", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_9_during_update_never_breaks_the_device(
    rounds, broker, served, digits_bundle, big_bundle, signing_keys, hub_signer, tmp_path
):
    devices = ["crash-measure", *(f"crash-{index}" for index in range(rounds))]
    plan = Rounds(broker, served, digits_bundle(OLD), big_bundle, signing_keys[1], hub_signer, tmp_path, devices)
    rng = random.Random(20240 + rounds)
    try:
        update_at, durations = plan.measure()
        outcomes = []
        for index in range(rounds):
            mode = MODES[index % len(MODES)]
            delay = rng.uniform(0.0, update_at if mode == "startup" else durations[mode])
            outcome = plan.kill_and_restart(index, mode, delay, last=index == rounds - 1)
            print(json.dumps(outcome))
            outcomes.append(outcome)
    finally:
        plan.close()
    hit = {o["hit"].split(" ")[0] for o in outcomes}
    scenario = f"agent kill -9 mid-update ({broker.kind}, {rounds} rounds)"
    record_figure(scenario, "kills (random moments)", rounds)
    record_figure(scenario, "update phases hit", len(hit & UPDATE_PHASES))
    record_figure(
        scenario,
        "updates leaving a device without a model",
        sum(o["restarted_on"] not in (OLD, NEW) for o in outcomes),
        0,
    )
    print(f"{broker.kind}: kills hit {sorted(hit, key=DISK_PHASES.index)}; restarted on "
          f"{sorted({o['restarted_on'] for o in outcomes})}")  # fmt: skip
    # The kills reached into the update, not only the start-up.
    assert len(hit & UPDATE_PHASES) >= 2, outcomes
