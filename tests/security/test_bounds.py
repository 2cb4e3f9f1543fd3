"""Bounded everything (#14 item 4): nothing a device reports or a desired state claims can make the update channel
wait forever, or make one device hold up the others.

- A device reports the highest rev there is on its own `config/reported` (its ACL allows that topic): the hub
  cannot send it a newer desired state, so that member fails at once and its wave goes on; revs beyond the bound
  are refused by ingest and counted like any malformed payload.
- A rollout member that never answers is timed out after the wave timeout, and the wave goes on.
- A desired state with a wrong `size`: the download ends at the update's deadline (spent across a kill -9, so a
  restart does not reset it) or when its retry budget is spent, with `update.failed` saying why, and the agent
  takes the next desired state.

Real parts throughout: a hub with its embedded Mosquitto, real agents (in-process, or a separate process to kill),
the attacking device a plain paho client, signed bundles.
"""

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import MemoryHubClient, MqttServedBundles, ServedBundles, desired_for, shared_signer, signed
from brokers import Subscriber, publish_many
from hub_helpers import deployment_members, device_url, fleet, fleet_ids, wait_devices_reported, wait_until
from reliability import record

from edgekit.agents.agent import Agent, AgentSettings
from edgekit.agents.memory import MemoryLink
from edgekit.bundle import sha256_file
from edgekit.hub.db import Deployment, Device
from edgekit.mqtt import Backoff
from edgekit.protocol import MAX_REV, BundleRef, Event, ReportedState, Status, Topic, device_topic, encode

SCENARIO = "attack: bounds"
TIMEOUT_S = 90.0
SOURCE = "synthetic:?fps=5"
DEVICE = "dev-1"
EVENTS = device_topic(DEVICE, Topic.EVENTS)
OUTCOMES = {"update.failed", "update.refused", "update.rolled_back", "update.healthy"}
# Run as a separate process so that it can be killed -9: the agent with settings the CLI does not expose.
AGENT_PROCESS = "import sys; from edgekit.agents.agent import Agent, AgentSettings; " \
                "Agent(AgentSettings.model_validate_json(sys.argv[1])).run_forever()"  # fmt: skip


# ---- revs and silent members: a whole hub, real agents, devices played by paho clients --------------------------


def _pose_as_device(hub, device_id: str, reports: list[bytes]) -> None:
    """Publish, with the device's own login, what its ACL allows: `online`, then each `config/reported` payload
    (retained, as an agent does)."""
    status = (device_topic(device_id, Topic.STATUS), encode(Status(state="online")))
    reported = [(device_topic(device_id, Topic.REPORTED), payload) for payload in reports]
    publish_many(device_url(hub, device_id), [status, *reported], retain=True)


def _reported_json(bundle: Path, rev: object) -> bytes:
    """A device's reported state naming `bundle` with any JSON value as its rev."""
    ref = BundleRef(id=sha256_file(bundle), name="cnn", version="1.0.0", size=bundle.stat().st_size)
    fields = json.loads(encode(ReportedState(rev=0, bundle=ref)))
    return json.dumps({**fields, "rev": rev}).encode()


def _finished(hub, deployment_id: int) -> Deployment | None:
    with hub.sessions() as session:
        deployment = session.get(Deployment, deployment_id)
    return deployment if deployment.state != "running" else None


def test_revs_out_of_bounds_are_refused_on_ingest(make_hub, cnn_bundles):
    """2^63, 10^30, a string, a float and -2 as a device's reported rev: each refused and counted, none stored."""
    hub = make_hub()
    hostile = [2**63, 10**30, "5", 1.5, -2]
    _pose_as_device(hub, "evil", [_reported_json(cnn_bundles["v1"], rev) for rev in hostile])
    assert hub.ingest.flush(TIMEOUT_S)
    wait_until(lambda: hub.ingest.stats.invalid["config/reported: invalid"] >= len(hostile), TIMEOUT_S,
               "ingest to count every hostile reported state")  # fmt: skip
    with hub.sessions() as session:
        stored = session.get(Device, "evil")
    assert stored is not None and stored.online, "the device's status was stored: only its bad reports were not"
    stored_revs = 0 if stored.reported is None else 1
    record(SCENARIO, "reported rev out of bounds (2^63, 10^30, string, float, -2): stored", stored_revs, 0)
    assert stored_revs == 0, stored.reported
    assert hub.ingest.stats.invalid["config/reported: invalid"] == len(hostile), dict(hub.ingest.stats.invalid)


def test_the_highest_rev_and_a_silent_member_fail_alone_and_the_wave_goes_on(
    make_hub,
    cnn_bundles,
    tmp_path,
    caplog,
):
    """Wave 1 holds three real agents, `evil` (reports rev 2^63-1, the highest there is) and `quiet` (online, then
    never answers). evil fails at once ("cannot send"), quiet times out after the wave timeout, the three agents
    take 2.0.0, and the rollout completes (2 of 5 failed, under the 50 % threshold) with no step aborted."""
    caplog.set_level(logging.ERROR, logger="edgekit.hub.rollouts")
    hub = make_hub()
    v2 = sha256_file(cnn_bundles["v2"])
    bundle, _ = hub.registry.add(cnn_bundles["v2"], "test")
    honest = fleet_ids("dev", 4)
    with fleet(hub, 4, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="dev") as agents:
        _pose_as_device(hub, "evil", [_reported_json(cnn_bundles["v1"], MAX_REV)])
        _pose_as_device(hub, "quiet", [_reported_json(cnn_bundles["v1"], 0)])
        wait_devices_reported(hub, [*honest, "evil", "quiet"])
        timeout_s = 4.0
        # Waves in device-id order: dev-0 | dev-1, dev-2, dev-3, evil, quiet.
        deployment = hub.rollouts.create(bundle.id, "all", canary_percent=10, wave_percent=100, failure_threshold=0.5,
                                         wave_timeout_s=timeout_s, actor="test", health_checks=3)  # fmt: skip
        assert deployment.waves == 2
        done = wait_until(lambda: _finished(hub, deployment.id), TIMEOUT_S, f"deployment #{deployment.id} to end")
        members = deployment_members(hub, deployment.id)
        assert done.state == "completed", (done.reason, {d: (m.state, m.detail) for d, m in members.items()})

        evil, quiet = members["evil"], members["quiet"]
        assert evil.state == "failed" and evil.detail.startswith("cannot send: it reports rev 9223372036854775807")
        assert evil.rev is None, "no desired state was sent to evil"
        assert quiet.state == "timed_out" and f"not healthy within {timeout_s:g} s" in quiet.detail, quiet.detail
        left_behind = [d for d in honest if members[d].state != "healthy"]
        left_behind += [a.device_id for a in agents.agents if a.runner.model.bundle.id != v2]
        aborted = [r.getMessage() for r in caplog.records if "step failed" in r.getMessage()]
        overrun = quiet.resolved_at - quiet.sent_at - timeout_s

    record(SCENARIO, "device reports rev 2^63-1: honest devices of its wave left without the update",
           len(left_behind), 0)  # fmt: skip
    record(SCENARIO, "device reports rev 2^63-1: rollout steps aborted", len(aborted), 0)
    record(SCENARIO, "member never answers: seconds its wave waited past the wave timeout", round(overrun, 2), 1.5)
    assert not left_behind and not aborted, (left_behind, aborted)
    assert 0 <= overrun <= 1.5, overrun


# ---- the download deadline and retry budget: real agents, a wrong size --------------------------------------------


def _events(messages: list[tuple[str, bytes]]) -> list[Event]:
    return [Event.model_validate_json(payload) for _, payload in messages]


def _wait_outcome(source, after_seq: int = 0) -> Event:
    """The first update outcome event above `after_seq` that `source` (a Subscriber or a MemoryLink) saw."""

    def outcomes(messages: list[tuple[str, bytes]]) -> list[Event]:
        return [e for e in _events(messages) if e.type in OUTCOMES and e.seq > after_seq]

    return outcomes(source.wait_for(lambda m: bool(outcomes(m)), TIMEOUT_S, EVENTS))[0]


def _agent_settings(data_dir: Path, bundles: dict, broker: str, **fields) -> AgentSettings:
    """An agent starting on 1.0.0 with a synthetic source, taking desired states signed by the test hub key
    (`signed`); `fields` set the update's limits."""
    return AgentSettings(device_id=DEVICE, broker=broker, data_dir=data_dir, trust_key=bundles["public"],
                         hub_key=shared_signer().public, bundle=bundles["v1"], source=SOURCE, telemetry_s=0.5,
                         threads=1, backoff=Backoff(initial_s=0.2, max_s=1.0), **fields)  # fmt: skip


@pytest.fixture
def agent_process() -> Iterator:
    """start(settings) → a running agent process (SIGKILL-able); every one still running is killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(settings: AgentSettings, log: Path) -> subprocess.Popen:
        with open(log, "ab") as output:
            process = subprocess.Popen([sys.executable, "-c", AGENT_PROCESS, settings.model_dump_json()],
                                       stdout=output, stderr=output)  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def _wrong_size(bundle: Path, rev: int, **fields):
    desired = desired_for(bundle, rev=rev, version="2.0.0", name="cnn", **fields)
    return desired.model_copy(update={"bundle": desired.bundle.model_copy(update={"size": desired.bundle.size + 1})})


def _spent_seconds(meta: Path) -> float:
    try:
        return json.loads(meta.read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return 0.0


def test_a_wrong_size_ends_at_the_deadline_across_a_kill_and_the_next_desired_state_is_taken(
    mosquitto,
    cnn_bundles,
    agent_process,
    tmp_path,
):
    """deadline 8 s, retries unlimited in practice: the download runs ≥ 4 s, the agent is killed -9 and restarted,
    and the rest of the deadline is all it gets; update.failed says why; rev 2 with the right size then installs."""
    deadline_s = 8.0
    served = MqttServedBundles(mosquitto)
    v2 = served.add(cnn_bundles["v2"])
    settings = _agent_settings(tmp_path / DEVICE, cnn_bundles, mosquitto.url, update_deadline_s=deadline_s,
                               update_retries=1_000_000)  # fmt: skip
    meta = settings.data_dir / "downloads" / f"{v2}.json"
    desired_topic = device_topic(DEVICE, Topic.DESIRED)
    log = tmp_path / "agent.log"
    try:
        with Subscriber(mosquitto.url, EVENTS) as events:
            first = agent_process(settings, log)
            events.wait_for(lambda m: any(e.type == "agent.started" for e in _events(m)), TIMEOUT_S, EVENTS)
            publish_many(mosquitto.url, [(desired_topic, signed(_wrong_size(cnn_bundles["v2"], rev=1)))], retain=True)
            wait_until(lambda: _spent_seconds(meta) >= 4, TIMEOUT_S, "4 s spent on the wrong-size download")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            before_kill = _spent_seconds(meta)
            seen = max(e.seq for e in _events(events.messages(EVENTS)))

            agent_process(settings, log)
            failed = _wait_outcome(events, seen)
            restarted = [e for e in _events(events.messages(EVENTS)) if e.seq > seen]
            started = next(e for e in restarted if e.type == "update.started")
            after_restart = failed.ts - started.ts
            assert failed.type == "update.failed", failed
            assert f"within the update's deadline of {deadline_s:g} s" in failed.message, failed.message
            assert "last problem: chunk 0:" in failed.message, failed.message
            # A restart that reset the deadline would download for the whole deadline again.
            outlived = int(before_kill + after_restart > deadline_s + 2 or after_restart >= deadline_s - 1)
            record(SCENARIO, "desired state with a wrong size: download outlived its deadline (over a kill -9)",
                   outlived, 0)  # fmt: skip
            assert not outlived, (before_kill, after_restart, log.read_text()[-3000:])

            right_size = desired_for(cnn_bundles["v2"], rev=2, version="2.0.0", name="cnn", health_checks=3)
            publish_many(mosquitto.url, [(desired_topic, signed(right_size))], retain=True)
            healthy = _wait_outcome(events, failed.seq)
            refused_next = int(healthy.type != "update.healthy" or healthy.data.get("bundle") != v2)
            record(SCENARIO, "desired state with a wrong size: next desired state not taken after the deadline",
                   refused_next, 0)  # fmt: skip
            assert not refused_next, healthy
    finally:
        served.close()


def test_a_wrong_size_ends_when_the_retry_budget_is_spent(cnn_bundles, tmp_path):
    """retries 3, the default deadline (minutes): every chunk the server sends is rejected for its size, so the
    fourth retry without a good chunk ends the update, seconds after it started; rev 2 then installs."""
    link = MemoryLink()
    served = ServedBundles(MemoryHubClient(link))
    v2 = served.add(cnn_bundles["v2"])
    served.server.start()
    agent = Agent(_agent_settings(tmp_path / DEVICE, cnn_bundles, "memory:", update_retries=3), link=link)
    agent.start()
    try:
        link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(_wrong_size(cnn_bundles["v2"], rev=1)))
        failed = _wait_outcome(link)
        assert failed.type == "update.failed", failed
        assert failed.message.startswith("gave up after 3 retries without a good chunk: 0 of"), failed.message
        assert agent.runner.model.bundle.id == sha256_file(cnn_bundles["v1"])
        spent = json.loads((tmp_path / DEVICE / "downloads" / f"{v2}.json").read_text())["seconds"]
        record(SCENARIO, "desired state with a wrong size, retries 3: seconds downloading before giving up", spent,
               10)  # fmt: skip
        assert spent <= 10, spent

        right_size = desired_for(cnn_bundles["v2"], rev=2, version="2.0.0", name="cnn", health_checks=3)
        link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(right_size))
        healthy = _wait_outcome(link, failed.seq)
        assert healthy.type == "update.healthy" and healthy.data["bundle"] == v2, healthy
    finally:
        agent.stop()
        served.close()
