"""Hub replicas on one PostgreSQL and one broker (shared subscriptions): real hubs, real Mosquitto, real agents.

Replica A hosts the embedded Mosquitto the devices are enrolled on; replica B connects to it with a hub login of
its own, in the same share group, with a copy of A's `<data>/trust` (devices accept desired states signed by the
key they were enrolled with: replicas share it as files, see docs/hub.md "Replicas"). The slow test runs the
controller replica as an `edgekit hub` process and kills it (-9) mid-rollout.
"""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from brokers import Probe, Subscriber
from hub_helpers import (
    bundle_revs,
    device_url,
    fleet,
    fleet_ids,
    wait_devices_reported,
    wait_until,
    watcher_url,
)
from reliability import record
from sqlalchemy import select

from edgekit.errors import BadInput
from edgekit.hub.auth import COOKIE, cookie_name, create_token, hub_secret, session_cookie
from edgekit.hub.broker import free_port
from edgekit.hub.db import (
    BundleRecord,
    Deployment,
    DeploymentDevice,
    Device,
    Lease,
    TelemetrySample,
    database_url,
    open_database,
)
from edgekit.hub.leases import Lease as HubLease
from edgekit.hub.leases import LostLease
from edgekit.hub.registry import Registry
from edgekit.hub.retention import Retention
from edgekit.hub.rollouts import CONTROLLER_LEASE_S, Deployments
from edgekit.hub.service import Hub
from edgekit.protocol import Event, Topic, device_topic, encode

GROUP = "hubs-7c1e9a3f5b2d8e40"
SCENARIO = "hub replicas on one PostgreSQL (shared subscriptions)"
TIMEOUT_S = 30.0


def second_replica(make_hub, first: Hub, data_dir: Path, **fields) -> Hub:
    """A replica of `first`: same database, `first`'s broker with a hub login of its own, its trust keys."""
    shutil.copytree(first.settings.data_dir / "trust", data_dir / "trust")
    return make_hub(data_dir=data_dir, db=first.settings.db, broker=first.add_hub_user(data_dir.name),
                    share_group=GROUP, **fields)  # fmt: skip


def metrics(hub: Hub, token: str) -> str:
    answer = httpx.get(f"{hub.http_url}/metrics", headers={"Authorization": f"Bearer {token}"}, trust_env=False)
    assert answer.status_code == 200, answer.text
    return answer.text


def controllers(hubs: list[Hub], token: str) -> list[bool]:
    return ["edgekit_hub_rollout_controller 1.0" in metrics(hub, token) for hub in hubs]


def live_events(hub: Hub, token: str, wanted: set[str], timeout: float, shown: set[str],
                subscribed: threading.Event) -> None:  # fmt: skip
    """Adds to `shown` the messages of the events the hub's live feed (SSE) shows within `timeout`; returns early
    once it showed every one in `wanted`. Sets `subscribed` once the stream said hello."""
    deadline = time.monotonic() + timeout
    client = httpx.Client(base_url=hub.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=5,
                          trust_env=False)  # fmt: skip
    with client, client.stream("GET", "/api/stream") as stream:
        for line in stream.iter_lines():
            if line == "event: hello":
                subscribed.set()
            if line.startswith("data:"):
                shown |= {event["message"] for event in json.loads(line.removeprefix("data:")).get("events", [])}
            if shown >= wanted or time.monotonic() > deadline:
                break


# ---- leases (SQLite and PostgreSQL) -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_lease_has_one_holder_and_passes_on_when_it_expires_or_is_released(kind, tmp_path, request) -> None:
    url = database_url(None, tmp_path) if kind == "sqlite" else request.getfixturevalue("pg_url")
    engine, sessions = open_database(database_url(url, tmp_path))
    try:
        a, b = (HubLease(sessions, "controller", holder, ttl_s=0.5) for holder in ("replica-a", "replica-b"))
        assert a.acquire() and a.acquire(), "the holder renews"
        assert not b.acquire(), "a held lease was taken"
        time.sleep(0.6)  # a stopped renewing (it died): b takes over once the lease expired
        assert b.acquire() and not a.acquire()
        with pytest.raises(LostLease, match="held by another hub process"), sessions.begin() as session:
            a.fence(session)
        b.release()  # a clean stop: a takes over at once
        assert a.acquire()
        with sessions() as session:
            assert session.scalar(select(Lease.holder).where(Lease.name == "controller")) == "replica-a"
    finally:
        engine.dispose()


def test_retention_runs_in_one_replica_at_a_time(tmp_path: Path) -> None:
    engine, sessions = open_database(database_url(None, tmp_path))
    old = time.time() - 7200

    def age(first_seq: int) -> None:  # ten raw samples two hours old
        with sessions.begin() as session:
            session.add_all(
                TelemetrySample(device_id="cam-1", seq=seq, ts=old + seq) for seq in range(first_seq, first_seq + 10)
            )

    try:
        a, b = (Retention(sessions, raw_s=3600, replica=name) for name in ("replica-a", "replica-b"))
        age(1)
        assert a.run_once() == 10
        age(11)
        assert b.run_once() == 0, "a second replica ran retention while the first held its lease"
        a.stop()  # releases the lease
        assert b.run_once() == 10
    finally:
        engine.dispose()


# ---- deployments created at once through two replicas -----------------------------------------------------------


def at_once(calls: list) -> list:
    """Run the calls in threads released together; each one's result, or the BadInput it raised."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except BadInput as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_two_deployments_created_at_once_for_the_same_devices_one_wins(pg_url: str, tmp_path: Path) -> None:
    """Two hub processes' Deployments (two engines) create deployments for the same 10 devices at the same moment,
    20 times over: each time exactly one succeeds, and the other is refused naming a busy device and the winner."""
    opened = [open_database(database_url(pg_url, tmp_path)) for _ in range(2)]
    sessions = [s for _, s in opened]
    ids = [f"cam-{i:02d}" for i in range(10)]
    with sessions[0].begin() as session:
        session.add_all(Device(id=device_id) for device_id in ids)
        session.add(BundleRecord(id="b" * 64, name="cnn", version="2.0.0", size=1, profile="x86-64", backend="ort",
                                 precision="fp32", signing_key_id="k", uploaded_by="test", manifest={}))  # fmt: skip
    sides = [Deployments(s, lambda *_: None, Registry(tmp_path / f"hub-{n}", s, lambda: []), None)
             for n, s in enumerate(sessions)]  # fmt: skip
    both, neither = 0, 0
    try:
        for _ in range(20):
            results = at_once(
                [lambda side=side: sides[side].create("b" * 64, "all", actor=f"r{side}") for side in (0, 1)]
            )
            won = [r for r in results if not isinstance(r, BadInput)]
            refused = [r for r in results if isinstance(r, BadInput)]
            both += len(won) == 2
            neither += len(won) == 0
            if len(won) == 1:
                assert f"is already in running deployment #{won[0].id}; halt it first" in str(refused[0])
                sides[0].halt(won[0].id, "test", "next round")
        with sessions[0]() as session:
            active = session.scalars(select(DeploymentDevice.device_id).where(DeploymentDevice.active.is_(True)))
            assert list(active) == [], "a halted deployment still holds its devices"
    finally:
        for engine, _ in opened:
            engine.dispose()
    record(SCENARIO, "rounds of 20 where both deployments were created", both, 0)
    record(SCENARIO, "rounds of 20 where neither was created", neither, 0)
    assert (both, neither) == (0, 0)


# ---- what a user sees: logins, /metrics, the live view -----------------------------------------------------------


def test_replicas_share_logins_name_themselves_in_metrics_and_each_live_view_shows_the_whole_fleet(
    make_hub, pg_url: str, tmp_path: Path
) -> None:
    a = make_hub(db=pg_url, share_group=GROUP)
    b = second_replica(make_hub, a, tmp_path / "replica-b")
    token = create_token(a.sessions, "ops", "test", scope="admin")

    # A dashboard login on A is a login on B.
    with httpx.Client(base_url=a.http_url, trust_env=False, headers={"Origin": a.http_url}) as browser:
        assert browser.post("/login", data={"token": token}).status_code in (200, 303)
        cookie = browser.cookies[COOKIE]
    me = httpx.get(f"{b.http_url}/api/me", cookies={COOKIE: cookie}, trust_env=False)
    assert me.status_code == 200 and me.json()["actor"] == "ops", me.text

    # /metrics names the replica; exactly one of them is the rollout controller.
    for hub in (a, b):
        assert f'edgekit_hub_info{{replica="{hub.replica}"' in metrics(hub, token)
    assert a.replica != b.replica
    wait_until(lambda: controllers([a, b], token).count(True) == 1 or None, TIMEOUT_S, "one controller")

    # Each replica stores part of a device's messages (the broker shares them out); each live view shows them all.
    notes = {f"note {seq}" for seq in range(1, 21)}
    shown: dict[str, set[str]] = {"A": set(), "B": set()}
    subscribed = {"A": threading.Event(), "B": threading.Event()}
    readers = [threading.Thread(target=live_events, args=(hub, token, notes, 20, shown[name], subscribed[name]))
               for name, hub in (("A", a), ("B", b))]  # fmt: skip
    for reader in readers:
        reader.start()
    assert all(event.wait(TIMEOUT_S) for event in subscribed.values()), "a live stream did not start"
    device = Probe(device_url(a, "cam-1"))
    try:
        for seq in range(1, 21):
            event = Event(seq=seq, ts=time.time(), type="agent.started", message=f"note {seq}")
            device.publish(device_topic("cam-1", Topic.EVENTS), encode(event))
    finally:
        device.close()
    for reader in readers:
        reader.join(30)
    stored = {"A": a.ingest.stats.stored, "B": b.ingest.stats.stored}
    for name in shown:
        record(SCENARIO, f"events of 20 in replica {name}'s live view", len(shown[name]))
        record(SCENARIO, f"events of 20 replica {name} stored itself", stored[name])
    assert shown == {"A": notes, "B": notes}
    assert all(count > 0 for count in stored.values()) and sum(stored.values()) == 20, stored


def test_an_old_hub_secret_file_moves_into_the_database_and_its_cookies_still_work(tmp_path: Path) -> None:
    data = tmp_path / "hub"
    data.mkdir()
    old = bytes(range(32))
    (data / "secret").write_bytes(old)
    engine, sessions = open_database(database_url(None, data))
    try:
        assert hub_secret(sessions, data) == old
        assert not (data / "secret").exists()
        assert hub_secret(sessions, tmp_path / "another-replica") == old, "a second replica made a key of its own"
        assert cookie_name(hub_secret(sessions, data), session_cookie(old, "ops")) == "ops", "an old cookie is refused"
    finally:
        engine.dispose()


# ---- the rollout controller killed mid-rollout ---------------------------------------------------------------------


def hub_process(data_dir: Path, db: str, broker: str, port: int) -> subprocess.Popen:
    """`edgekit hub` as a user runs a replica, its log in `data_dir`/../<name>.log."""
    command = [sys.executable, "-m", "edgekit", "hub", "--data", str(data_dir), "--db", db, "--broker", broker,
               "--share-group", GROUP, "--http", f"127.0.0.1:{port}"]  # fmt: skip
    log = (data_dir.parent / f"{data_dir.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def lease_holder(hub: Hub) -> str | None:
    with hub.sessions() as session:
        return session.scalar(select(Lease.holder).where(Lease.name == "controller", Lease.expires > time.time()))


@pytest.mark.slow
def test_the_controller_killed_mid_rollout_another_replica_finishes_it(
    make_hub, pg_url: str, cnn_bundles: dict, tmp_path: Path
) -> None:
    """Three replicas on one PostgreSQL and one Mosquitto (C hosts the broker and never drives; A and B may), 20
    real agents. A bundle pushed to A; two deployments of it created at once through A and B (one wins); A, the
    controller, killed -9 mid-rollout: B takes over within the lease period, the rollout completes, and no device
    gets two revs of the bundle."""
    c = make_hub(db=pg_url, share_group=GROUP, controller=False)
    token = create_token(c.sessions, "ops", "test", scope="admin")
    a_dir = tmp_path / "replica-a"
    shutil.copytree(c.settings.data_dir / "trust", a_dir / "trust")
    a_port = free_port()
    a = hub_process(a_dir, pg_url, c.add_hub_user("replica-a"), a_port)
    a_url = f"http://127.0.0.1:{a_port}"
    api = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                              trust_env=False) for name, url in (("A", a_url), ("C", c.http_url))}  # fmt: skip
    try:
        wait_until(lambda: _up(api["A"]), TIMEOUT_S, "replica A (edgekit hub) to answer")
        a_replica = (a_dir / "mqtt-client-id").read_text().strip()
        wait_until(lambda: lease_holder(c) == a_replica or None, TIMEOUT_S, "A to be the rollout controller")
        b = second_replica(make_hub, c, tmp_path / "replica-b")
        api["B"] = httpx.Client(base_url=b.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                                trust_env=False)  # fmt: skip
        pushed = api["A"].post("/api/bundles", content=cnn_bundles["v2"].read_bytes(),
                               headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert pushed.status_code in (200, 201), pushed.text
        bundle_id = pushed.json()["id"]
        ids = fleet_ids("sim", 20)
        with (
            fleet(c, 20, tmp_path, cnn_bundles["public"], cnn_bundles["v1"]),
            Subscriber(watcher_url(c), "edgekit/v1/+/config/desired") as sub,
        ):
            wait_devices_reported(c, ids)
            body = {"bundle_id": bundle_id, "target": "all", "canary_percent": 10, "wave_percent": 30,
                    "wave_timeout_s": 90}  # fmt: skip
            answers = at_once([lambda side=side: api[side].post("/api/deployments", json=body) for side in "AB"])
            codes = sorted(answer.status_code for answer in answers)
            record(SCENARIO, "deployments created of 2 sent at once through A and B", codes.count(201), 1)
            assert codes == [201, 422], [answer.text for answer in answers]
            refused = next(answer for answer in answers if answer.status_code != 201).json()["detail"]
            winner = next(side for side, answer in zip("AB", answers, strict=True) if answer.status_code == 201)
            deployment_id = answers["AB".index(winner)].json()["id"]
            record(SCENARIO, f"deployment of the bundle pushed to A created through {winner}", 1)
            assert api["B"].get(f"/api/deployments/{deployment_id}").json()["bundle_id"] == bundle_id
            assert f"already in running deployment #{deployment_id}; halt it first" in str(refused), refused

            wait_until(lambda: _healthy(c, deployment_id) >= 2 or None, 120, "the canary to be healthy")
            a.kill()  # -9: no lease released, no clean stop
            killed = time.monotonic()
            a.wait(10)
            wait_until(lambda: b.driver.leading or None, TIMEOUT_S, "B to take over the rollouts")
            takeover_s = time.monotonic() - killed
            healthy_at_kill = _healthy(c, deployment_id)
            wait_until(lambda: _state(c, deployment_id) != "running" or None, 180, "the rollout to finish")
            time.sleep(1)  # the last desired states reach the watcher
            revs = bundle_revs(sub, bundle_id)
        members = {m.device_id: m for m in _members(c, deployment_id)}
        twice = sorted(device for device, seen in revs.items() if len(seen) > 1)
        record(SCENARIO, "seconds from kill -9 of the controller to the takeover", round(takeover_s, 2),
               CONTROLLER_LEASE_S + 2)  # fmt: skip
        record(SCENARIO, "devices healthy when the controller was killed", healthy_at_kill)
        record(SCENARIO, "devices healthy on the bundle after the takeover (of 20)", _healthy(c, deployment_id), None)
        record(SCENARIO, "devices that got two revs for the deployment", len(twice), 0)
        assert _state(c, deployment_id) == "completed", [(m.device_id, m.state, m.detail) for m in members.values()]
        assert healthy_at_kill < 20, "the rollout was over before the kill"
        assert sorted(members) == ids and all(m.state == "healthy" for m in members.values())
        assert twice == [], {device: revs[device] for device in twice}
        assert {device: {members[device].rev} for device in ids} == {device: revs.get(device) for device in ids}
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(10)
        for client in api.values():
            client.close()


def _up(client: httpx.Client) -> bool | None:
    try:
        return client.get("/healthz").status_code == 200 or None
    except httpx.HTTPError:
        return None


def _members(hub: Hub, deployment_id: int) -> list[DeploymentDevice]:
    with hub.sessions() as session:
        return list(session.scalars(select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)))


def _healthy(hub: Hub, deployment_id: int) -> int:
    return sum(member.state == "healthy" for member in _members(hub, deployment_id))


def _state(hub: Hub, deployment_id: int) -> str:
    with hub.sessions() as session:
        return session.get(Deployment, deployment_id).state
