"""Staged rollouts end to end: a real hub (embedded Mosquitto, SQLite), real agents (Fleet) and real signed bundles.

How "30 % of the devices fail" is made honest: a device cannot be made to fail the self-test of a correct bundle
without tampering with the agent, so the 6 failing devices trust a different signing key than the one the new
bundle is signed with (their old bundle is signed with their key). They download the new bundle, refuse it
(`update.refused`, "verification failed") and keep running their old one — exactly the device-side outcome of a
failed self-test (the agent refuses before activating, config/reported says `refused`), which is all the hub sees.
"""

import sqlite3
import time
from pathlib import Path

import pytest
from brokers import Subscriber, publish_many
from helpers import compile_bundle
from hub_helpers import (
    deployment_members,
    desired_of,
    device_url,
    devices,
    fleet,
    fleet_ids,
    signing_keys,
    wait_devices_reported,
    wait_until,
    watcher_url,
)
from reliability import record as record_figure

from edgekit.bundle import sha256_file
from edgekit.errors import BadInput
from edgekit.hub.db import Deployment, DeploymentDevice, Device, open_database
from edgekit.hub.rollouts import IN_PROGRESS_PHASES, NoRevLeft, outcome, take_rev, wave_sizes
from edgekit.protocol import MAX_REV, BundleRef, DesiredState, ReportedState, Status, Topic, device_topic, encode

TIMEOUT_S = 90.0
DESIRED = "edgekit/v1/+/config/desired"
MARKER = "marker"  # a device id no agent has: an unsigned desired state published to it is only a marker


@pytest.fixture(scope="module")
def bundles(
    small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """cnn 1.0.0 signed by key A and by key B, cnn 2.0.0 signed by key A; and both public keys.

    The small generated CNN, not the trained digits model: what the bundle computes does not matter to a
    rollout, and it needs no training run (tens of seconds per xdist worker)."""
    folder = tmp_path_factory.mktemp("rollout-bundles")
    key_a, public_a = signing_keys(folder / "key-a")
    key_b, public_b = signing_keys(folder / "key-b")

    def build(key: Path, version: str, name: str) -> Path:
        return compile_bundle(small_cnn_model, small_cnn_calibration, key, version, folder / name, name="cnn")

    return {
        "public_a": public_a,
        "public_b": public_b,
        "v1_a": build(key_a, "1.0.0", "cnn-1-a.ekb"),
        "v1_b": build(key_b, "1.0.0", "cnn-1-b.ekb"),
        "v2_a": build(key_a, "2.0.0", "cnn-2-a.ekb"),
    }


def _deployment(hub, deployment_id: int) -> Deployment:
    with hub.sessions() as session:
        return session.get(Deployment, deployment_id)


def _wait_state(hub, deployment_id: int, states: set[str], timeout: float = TIMEOUT_S) -> Deployment:
    def reached() -> Deployment | None:
        deployment = _deployment(hub, deployment_id)
        return deployment if deployment.state in states else None

    try:
        return wait_until(reached, timeout, f"deployment #{deployment_id} to be {'/'.join(sorted(states))}")
    except AssertionError as error:
        members = {d: (m.wave, m.state, m.detail) for d, m in deployment_members(hub, deployment_id).items()}
        raise AssertionError(f"{error}; deployment: {_deployment(hub, deployment_id).__dict__}; {members}") from None


def _reported_bundle(hub, device_id: str) -> str | None:
    with hub.sessions() as session:
        device = session.get(Device, device_id)
    return ((device.reported or {}).get("bundle") or {}).get("id") if device else None


def _converged_to(hub, device_id: str, bundle_id: str, rev: int) -> bool:
    """The device reports that it converged to desired rev `rev` (or a later one), runs `bundle_id` and is not
    mid-update. The bundle alone is not enough: a report from before the device took an earlier desired state can
    name the same bundle (a device still on its old bundle when it is asked to go back to it)."""
    with hub.sessions() as session:
        device = session.get(Device, device_id)
    reported = (device.reported or {}) if device else {}
    reported_rev, phase = reported.get("rev"), (reported.get("update") or {}).get("state", "idle")
    return (
        type(reported_rev) is int
        and reported_rev >= rev
        and ((reported.get("bundle") or {}).get("id")) == bundle_id
        and phase not in IN_PROGRESS_PHASES
    )


def _desired_sent(sub: Subscriber) -> dict[str, list[DesiredState]]:
    """Every desired state published during the test, by device, in order. A QoS 1 message may arrive twice (the
    broker resends one whose PUBACK was late, as on a loaded CI machine): one revision is one publication."""
    sent: dict[str, list[DesiredState]] = {}
    for topic, payload in sub.messages(DESIRED):
        device_id = topic.split("/")[2]
        states = sent.setdefault(device_id, [])
        if device_id == MARKER:  # the raw marker below: it only has to get through the broker, nothing reads it
            continue
        statement = desired_of(payload)
        assert statement.device == device_id, (topic, statement)
        state = statement.desired
        if not states or states[-1].rev != state.rev:
            states.append(state)
    return sent


def test_wave_plan_and_target_errors(hub, bundles):
    """Canary ceil(10 % of N), then waves of ceil(30 % of N); unknown bundles and empty targets are refused."""
    assert wave_sizes(20, 10, 30) == [2, 6, 6, 6]
    assert wave_sizes(10, 10, 30) == [1, 3, 3, 3]
    assert wave_sizes(1, 10, 30) == [1]
    assert wave_sizes(5, 100, 30) == [5]
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    with pytest.raises(BadInput, match="group:site=mars"):
        hub.rollouts.create(record.id, "group:site=mars")
    with pytest.raises(BadInput, match="not in the registry"):
        hub.rollouts.create("0" * 64, "all")
    with pytest.raises(BadInput, match="canary percent 0"):
        hub.rollouts.create(record.id, "all", canary_percent=0)


def test_outcome_waits_for_the_devices_rev():
    """A refusal on record from an earlier attempt at the same bundle is not taken for this attempt's outcome."""
    bundle = "b" * 64
    member = DeploymentDevice(device_id="d", rev=7)
    refused = {"state": "refused", "bundle": bundle, "detail": "self-test failed"}
    stale = Device(id="d", reported={"rev": 5, "bundle": {"id": "a" * 64}, "update": refused})
    assert outcome(member, stale, bundle) is None
    stale.reported["rev"] = 7
    assert outcome(member, stale, bundle) == ("failed", "refused: self-test failed")
    running = Device(id="d", reported={"rev": 7, "bundle": {"id": bundle}, "update": {"state": "idle"}})
    assert outcome(member, running, bundle) == ("healthy", "already running it")


def test_take_rev_comes_only_from_bounded_revs(tmp_path):
    """The next rev is above the hub's last (as the database has it) and the device's reported rev, but a stored rev
    that is not a bounded integer (a row from before revs were bounded) is ignored, no rev above MAX_REV is ever
    taken, and taking one twice gives two revs."""
    engine, sessions = open_database(f"sqlite:///{tmp_path / 'revs.sqlite'}")

    def take(reported_rev) -> int:
        with sessions.begin() as session:
            session.merge(Device(id="d", desired_rev=3, reported={"rev": reported_rev}))
        with sessions.begin() as session:
            return take_rev(session, Device(id="d", reported={"rev": reported_rev}))

    try:
        assert take(9) == 10
        for unbounded in (2**70, "9", 9.0, True, -5, None):
            assert take(unbounded) == 4, unbounded
        assert take(MAX_REV - 1) == MAX_REV
        with pytest.raises(NoRevLeft, match=f"reports rev {MAX_REV}, the highest there is"):
            take(MAX_REV)
        with sessions.begin() as session:
            first, second = (take_rev(session, Device(id="d", reported={})) for _ in range(2))
        assert (first, second) == (4, 5)
    finally:
        engine.dispose()


def test_canary_failures_halt_and_roll_back(hub, bundles, tmp_path):
    """20 devices, 6 of which refuse the new bundle; the canary (a-0 healthy, b-0 refusing) fails 1 of 2 > 20 %:
    the rollout halts after wave 0, a-0 goes back to 1.0.0, and no device outside the canary is ever asked."""
    v1_a, v1_b, v2 = (sha256_file(bundles[k]) for k in ("v1_a", "v1_b", "v2_a"))
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    # Waves are assigned in device-id order: a-0, b-0 | b-1 … b-5, c-00 … — the canary holds one of each kind.
    good_first, failing, good_rest = fleet_ids("a", 1), fleet_ids("b", 6), fleet_ids("c", 13)
    with (
        fleet(hub, 1, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="a") as first,
        fleet(hub, 6, tmp_path, bundles["public_b"], bundles["v1_b"], prefix="b") as refusers,
        fleet(hub, 13, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="c"),
        Subscriber(watcher_url(hub), DESIRED) as sub,
    ):
        wait_devices_reported(hub, good_first + failing + good_rest)
        deployment = hub.rollouts.create(
            record.id, "all", canary_percent=10, wave_percent=30, failure_threshold=0.2, wave_timeout_s=60,
            actor="test", health_checks=3,
        )  # fmt: skip
        assert (deployment.waves, deployment.state) == (4, "running")
        halted = _wait_state(hub, deployment.id, {"halted", "completed"})
        assert halted.state == "halted" and halted.current_wave == 0, halted.reason
        assert "1 of 2 devices in the canary failed" in halted.reason, halted.reason
        assert "b-0 failed: refused: verification failed" in halted.reason, halted.reason

        members = deployment_members(hub, deployment.id)
        assert sorted(d for d, m in members.items() if m.wave == 0) == ["a-0", "b-0"]
        assert members["a-0"].state == "rolled_back" and "rolled back to cnn@1.0.0" in members["a-0"].detail
        assert members["b-0"].state == "failed" and "verification failed" in members["b-0"].detail
        assert all(m.state == "pending" and m.rev is None for d, m in members.items() if m.wave > 0)

        # The healthy canary device had really switched to 2.0.0, and is back on 1.0.0 after the rollback.
        wait_until(lambda: _reported_bundle(hub, "a-0") == v1_a, TIMEOUT_S, "a-0 to report 1.0.0 again")
        wait_until(lambda: first.agents[0].store.record().active == v1_a, TIMEOUT_S, "a-0 to run 1.0.0 again")
        assert first.agents[0].runner.model.bundle.manifest.version == "1.0.0"
        # The refusing canary device never left its own 1.0.0.
        assert refusers.agents[0].runner.model.bundle.id == v1_b and _reported_bundle(hub, "b-0") == v1_b

        sent = _desired_sent(sub)
        assert set(sent) == {"a-0", "b-0"}, f"desired states went to {sorted(sent)}"
        assert [(s.bundle.id, s.bundle.allow_downgrade) for s in sent["a-0"]] == [(v2, False), (v1_a, True)]
        assert [s.bundle.id for s in sent["b-0"]] == [v2, v1_b]
        assert sent["a-0"][0].health_checks == 3 and sent["a-0"][1].rev > sent["a-0"][0].rev
        with hub.sessions() as session:
            a0 = session.get(Device, "a-0")
        assert a0.desired["bundle"]["id"] == v1_a and a0.desired_rev == sent["a-0"][-1].rev
        assert all(_reported_bundle(hub, d) in (v1_a, v1_b) for d in good_first + failing + good_rest)


def test_all_healthy_completes_wave_by_wave(hub, bundles, tmp_path):
    """20 devices that all take 2.0.0: waves of 2, 6, 6, 6, each sent only after the one before resolved."""
    v2 = sha256_file(bundles["v2_a"])
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    ids = fleet_ids("dev", 20)
    with fleet(hub, 20, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="dev") as agents:
        wait_devices_reported(hub, ids)
        started = time.time()
        deployment = hub.rollouts.create(record.id, "all", wave_timeout_s=60, actor="test", health_checks=3)
        done = _wait_state(hub, deployment.id, {"halted", "completed"})
        took = time.time() - started
        assert done.state == "completed", done.reason
        assert "20 of 20 devices healthy" in done.reason, done.reason

        members = deployment_members(hub, deployment.id)
        assert all(m.state == "healthy" for m in members.values()), {d: m.state for d, m in members.items()}
        by_wave = {w: [m for m in members.values() if m.wave == w] for w in range(4)}
        assert [len(by_wave[w]) for w in range(4)] == [2, 6, 6, 6]
        assert sorted(m.device_id for m in by_wave[0]) == ids[:2]  # the canary: the first ids
        for wave in range(1, 4):
            previous_done = max(m.resolved_at for m in by_wave[wave - 1])
            first_sent = min(m.sent_at for m in by_wave[wave])
            assert first_sent >= previous_done, f"wave {wave} was sent before wave {wave - 1} resolved"
        for device_id in ids:
            assert _reported_bundle(hub, device_id) == v2, device_id
        assert all(agent.runner.model.bundle.id == v2 for agent in agents.agents)
        print(f"rollout of 20 devices in 4 waves: {took:.1f} s")


def test_manual_halt_rolls_back_healthy_and_in_flight_devices(hub, bundles, tmp_path):
    """halt() while wave 1 is in flight: the healthy canary device and the in-flight one both end on 1.0.0 again;
    waves 2 and 3 are never sent; halting twice is refused."""
    v1, v2 = sha256_file(bundles["v1_a"]), sha256_file(bundles["v2_a"])
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    ids = fleet_ids("dev", 4)
    with (
        fleet(hub, 4, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="dev") as agents,
        Subscriber(watcher_url(hub), DESIRED) as sub,
    ):
        wait_devices_reported(hub, ids)
        deployment = hub.rollouts.create(record.id, "all", canary_percent=25, wave_percent=25, wave_timeout_s=60,
                                         actor="test", health_checks=10)  # fmt: skip
        assert deployment.waves == 4
        wait_until(lambda: _deployment(hub, deployment.id).current_wave >= 1, TIMEOUT_S, "wave 1 to start")
        halted = hub.rollouts.halt(deployment.id, "operator", "latency regression")
        assert halted.state == "halted" and halted.reason == "halted by operator: latency regression"
        with pytest.raises(BadInput, match="is halted"):
            hub.rollouts.halt(deployment.id, "operator", "again")

        members = deployment_members(hub, deployment.id)
        assert members["dev-0"].state == members["dev-1"].state == "rolled_back", members
        assert members["dev-2"].state == members["dev-3"].state == "pending"
        # The rev of the rollback desired state each device was sent, above that of the 2.0.0 one. dev-1 was in
        # flight: it may not have taken 2.0.0 yet, so its report from before (1.0.0, an older rev) already names
        # the bundle it goes back to; it takes 2.0.0 first and only then the rollback. Waiting for the bundle alone
        # would pass on that stale report; the rev it converged to tells.
        rollback_revs = {d: devices(hub)[d].desired_rev for d in ("dev-0", "dev-1")}
        assert all(rollback_revs[d] > members[d].rev for d in rollback_revs), (rollback_revs, members)
        for device_id, rev in rollback_revs.items():
            wait_until(lambda d=device_id, r=rev: _converged_to(hub, d, v1, r), TIMEOUT_S,
                       f"{device_id} to converge to rev {rev} on 1.0.0")  # fmt: skip
        assert all(agent.runner.model.bundle.id == v1 for agent in agents.agents)
        sent = _desired_sent(sub)
        assert set(sent) == {"dev-0", "dev-1"}, sorted(sent)
        assert [s.bundle.id for s in sent["dev-1"]] == [v2, v1]
        assert {d: sent[d][-1].rev for d in rollback_revs} == rollback_revs
        # A halted deployment stays halted and sends nothing more: two more ticks of the driver, then a marker
        # through the hub's own connection, after which whatever those ticks published has arrived.
        ticks = hub.driver.ticks
        wait_until(lambda: hub.driver.ticks >= ticks + 2, TIMEOUT_S, "two more driver ticks")
        hub.publish(device_topic(MARKER, Topic.DESIRED), encode(DesiredState(rev=1)))
        sub.wait_for(lambda messages: any(f"/{MARKER}/" in topic for topic, _ in messages), topic_filter=DESIRED)
        assert _deployment(hub, deployment.id).state == "halted"
        assert set(_desired_sent(sub)) == {"dev-0", "dev-1", MARKER}


def test_restarted_hub_resumes_the_rollout(make_hub, bundles, tmp_path):
    """The hub (and its embedded Mosquitto) stops while wave 1 is in flight; a new hub on the same data dir and
    broker port picks the deployment up from the database and completes it."""
    hub = make_hub()
    v2 = sha256_file(bundles["v2_a"])
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    ids = fleet_ids("dev", 10)
    with fleet(hub, 10, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="dev") as agents:
        wait_devices_reported(hub, ids)
        # 10 health checks at 5 fps: each device takes ≥ 2 s on the new bundle, so a wave is in flight for a while.
        deployment = hub.rollouts.create(record.id, "all", wave_timeout_s=60, actor="test", health_checks=10)
        wait_until(lambda: _deployment(hub, deployment.id).current_wave >= 1, TIMEOUT_S, "wave 1 to start")
        # Hub.stop() stops the driver too, once the HTTP server has answered what is open: stopping it first keeps
        # a slow shutdown on a loaded machine from letting the rollout run on to its end before the restart.
        hub.driver.stop()
        hub.stop()
        stopped = time.time()
        before = _members_from_disk(hub.settings.data_dir, deployment.id)
        assert _deployment_state_on_disk(hub.settings.data_dir, deployment.id) == "running"
        assert any(state != "healthy" for state in before.values()), before

        again = make_hub(data_dir=hub.settings.data_dir, broker_port=hub.settings.broker_port)
        assert again.broker_url == hub.broker_url
        done = _wait_state(again, deployment.id, {"halted", "completed"})
        assert done.state == "completed", done.reason
        members = deployment_members(again, deployment.id)
        assert all(m.state == "healthy" for m in members.values()), {d: m.state for d, m in members.items()}
        resumed = [d for d, m in members.items() if m.sent_at > stopped]
        assert resumed, "the restarted hub sent nothing: the rollout had finished before the restart"
        assert all(before[d] == "pending" for d in resumed), (resumed, before)
        scenario = "hub restart mid-rollout (10 devices)"
        record_figure(scenario, "members resumed by the new hub", len(resumed))
        on_v2 = sum(_reported_bundle(again, device_id) == v2 for device_id in ids)
        record_figure(scenario, "devices not on the new bundle", len(ids) - on_v2, 0)
        record_figure(scenario, "devices without a model", sum(a.runner.model is None for a in agents.agents), 0)
        for device_id in ids:
            assert _reported_bundle(again, device_id) == v2, device_id
        assert all(agent.runner.model.bundle.id == v2 for agent in agents.agents)


def _members_from_disk(data_dir: Path, deployment_id: int) -> dict[str, str]:
    """Member states straight from the stopped hub's SQLite file."""
    with sqlite3.connect(data_dir / "hub.sqlite") as db:
        rows = db.execute("SELECT device_id, state FROM deployment_devices WHERE deployment_id = ?", (deployment_id,))
        return dict(rows.fetchall())


def _deployment_state_on_disk(data_dir: Path, deployment_id: int) -> str:
    with sqlite3.connect(data_dir / "hub.sqlite") as db:
        return db.execute("SELECT state FROM deployments WHERE id = ?", (deployment_id,)).fetchone()[0]


def test_a_desired_state_the_device_shows_no_sign_of_is_sent_again(hub, bundles):
    """A desired state lost past the hub (a broker cluster electing a new leader, a broker restarted without its
    retained messages): the device keeps reporting its old rev and no update, so the driver sends the same rev
    again every `resend_s`, and stops once the device's report shows it is on it."""
    hub.driver.resend_s = 1.0
    old = hub.registry.add(bundles["v1_a"], "test")[0]
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    running = BundleRef(id=old.id, name=old.name, version=old.version, size=old.size)
    url = device_url(hub, "deaf-1")
    status = (device_topic("deaf-1", Topic.STATUS), encode(Status(state="online", agent_version="0.2.0")))
    publish_many(url, [status, (device_topic("deaf-1", Topic.REPORTED), encode(ReportedState(rev=0, bundle=running)))],
                 retain=True)  # fmt: skip
    wait_devices_reported(hub, ["deaf-1"])
    with Subscriber(watcher_url(hub), DESIRED) as sub:
        deployment = hub.rollouts.create(record.id, "all", wave_timeout_s=60, actor="test", health_checks=3)
        copies = lambda: [desired_of(payload).desired.rev for _, payload in sub.messages(DESIRED)]  # noqa: E731
        wait_until(lambda: len(copies()) >= 3, TIMEOUT_S, "the desired state sent three times")
        (rev,) = set(copies())  # one rev, sent again: nothing new for a device that has it
        downloading = {"state": "downloading", "bundle": record.id, "detail": ""}
        on_it = ReportedState(rev=0, bundle=running, update=downloading)
        publish_many(url, [(device_topic("deaf-1", Topic.REPORTED), encode(on_it))], retain=True)
        wait_until(lambda: devices(hub)["deaf-1"].reported.get("update", {}).get("state") == "downloading",
                   TIMEOUT_S, "the device's report of its download")  # fmt: skip
        seen = len(copies())
        ticks = hub.driver.ticks
        wait_until(lambda: hub.driver.ticks >= ticks + 6, TIMEOUT_S, "3 s of driver ticks")
        assert len(copies()) == seen  # the device shows it is on it: nothing more sent
    assert deployment_members(hub, deployment.id)["deaf-1"].rev == rev


def test_a_device_gets_its_desired_state_signed_again_once_per_connection(hub, bundles, tmp_path):
    """The hub signs a device's desired state again when it comes online (so a device away past the expiry still
    takes it), once per connection. A device says `online` with every state it reports, and a device that gets its
    rev again reports again: answering every `online` made a loop (about 200 copies per device in the 100-device
    scale test)."""
    record, _ = hub.registry.add(bundles["v2_a"], "test")
    (device,) = fleet_ids("once", 1)
    statements = lambda: [desired_of(payload) for _, payload in sub.messages(DESIRED)]  # noqa: E731
    with Subscriber(watcher_url(hub), DESIRED) as sub:
        with fleet(hub, 1, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="once"):
            wait_devices_reported(hub, [device])
            deployment = hub.rollouts.create(record.id, "all", wave_timeout_s=60, actor="test", health_checks=1)
            _wait_state(hub, deployment.id, {"completed"})
            time.sleep(1)  # the last copy on its way to the watcher
            settled = len(statements())
            time.sleep(5)
            assert len(statements()) == settled, [(s.desired.rev, s.issued) for s in statements()[settled - 1 :]]
        with fleet(hub, 1, tmp_path, bundles["public_a"], bundles["v1_a"], prefix="once"):  # back online
            wait_until(lambda: len(statements()) > settled, TIMEOUT_S, "the desired state signed again")
            time.sleep(3)
            *_, before, again = statements()
            assert len(statements()) == settled + 1
            assert again.desired.rev == before.desired.rev and again.issued > before.issued
