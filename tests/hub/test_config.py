"""Device configuration from the hub (edgekit.hub.config) over the real API: a real hub (embedded Mosquitto,
SQLite), real agents, real signed bundles. Group and device changes reach the devices, survive deploys in both
orders, follow devices into groups, are audited; bad input gets 422s naming the field and stores nothing."""

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_helpers import devices, fleet, fleet_ids, wait_devices_reported, wait_until
from reliability import record
from sqlalchemy import func, select

from edgekit.hub.auth import create_token
from edgekit.hub.config import Configs
from edgekit.hub.db import (
    AuditEntry,
    Device,
    GroupConfig,
    GroupConfigDevice,
    ResultRecord,
    open_database,
)
from edgekit.hub.rollouts import publish_desired
from edgekit.protocol import DesiredState

TIMEOUT_S = 90.0
SCENARIO = "hub: device configuration"


def _client(hub, token: str) -> httpx.Client:
    return httpx.Client(base_url=hub.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                        trust_env=False)  # fmt: skip


def _reported(hub, device_id: str) -> dict[str, Any]:
    return devices(hub)[device_id].reported or {}


def _wait_reported(hub, device_id: str, check, what: str) -> dict[str, Any]:
    return wait_until(lambda: (r := _reported(hub, device_id)) and check(r) and r, TIMEOUT_S, f"{device_id}: {what}")


def _results_since(hub, since: float) -> set[str]:
    with hub.sessions() as session:
        return set(session.scalars(select(ResultRecord.device_id).where(ResultRecord.ts > since).distinct()))


def _deploy(client: httpx.Client, hub, bundle_id: str, target: str) -> None:
    created = client.post("/api/deployments", json={"bundle_id": bundle_id, "target": target, "canary_percent": 100,
                                                    "wave_timeout_s": 60})  # fmt: skip
    assert created.status_code == 201, created.text
    number = created.json()["id"]
    done = wait_until(lambda: (d := client.get(f"/api/deployments/{number}").json())["state"] != "running" and d,
                      TIMEOUT_S, f"deployment #{number} to end")  # fmt: skip
    assert done["state"] == "completed", done["reason"]


def test_group_and_device_config_reach_agents_survive_deploys_and_follow_joins(make_hub, cnn_bundles, tmp_path) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"])
    ids = fleet_ids("cfg", 3)
    north, other = ids[:2], ids[2]
    v2, _ = hub.registry.add(cnn_bundles["v2"], "test")
    with (
        fleet(hub, 3, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="cfg") as agents,
        _client(hub, create_token(hub.sessions, "alice", "test")) as alice,
    ):
        wait_devices_reported(hub, ids)
        for device_id in north:
            assert alice.put(f"/api/devices/{device_id}/labels", json={"labels": {"site": "north"}}).status_code == 200

        # A group change: stored, and sent to every current member only.
        changed = alice.put(
            "/api/groups/site=north/config", json={"thresholds": {"top_k": 3}, "rates": {"telemetry_s": 2}}
        )
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert body["target"] == "group:site=north" and body["group"]["version"] == 1
        assert sorted(s["device"] for s in body["sent"]) == north and all(s["rev"] for s in body["sent"])
        for device_id in north:
            reported = _wait_reported(hub, device_id, lambda r: r["thresholds"]["top_k"] == 3, "top_k 3")
            assert reported["rates"]["telemetry_s"] == 2 and reported["config"]["state"] == "applied"
        assert _reported(hub, other)["thresholds"]["top_k"] == 5  # not in the group

        # Config, then deploy: the deploy keeps the configuration.
        _deploy(alice, hub, v2.id, "all")
        lost = [d for d in north if _reported(hub, d)["thresholds"]["top_k"] != 3]
        assert record(SCENARIO, "group members that lost the group's configuration in a deploy", len(lost), 0), lost
        for device_id in north:
            reported = _reported(hub, device_id)
            assert reported["bundle"]["id"] == v2.id and reported["thresholds"]["top_k"] == 3, reported
            assert devices(hub)[device_id].desired["thresholds"]["top_k"] == 3

        # Deploy, then config: the change keeps the bundle the deploy sent.
        own = alice.put(
            f"/api/devices/{other}/config", json={"source": "synthetic:?fps=7", "thresholds": {"score": 0.3}}
        )
        assert own.status_code == 200, own.text
        reported = _wait_reported(hub, other, lambda r: (r.get("source") or {}).get("fps") == 7, "source at 7 fps")
        assert reported["bundle"]["id"] == v2.id and reported["thresholds"]["score"] == 0.3
        assert devices(hub)[other].desired["bundle"]["id"] == v2.id

        # It joins the group later: it gets the group's configuration, and keeps what the group does not set.
        assert alice.put(f"/api/devices/{other}/labels", json={"labels": {"site": "north"}}).status_code == 200
        reported = _wait_reported(hub, other, lambda r: r["thresholds"]["top_k"] == 3, "the group's top_k")
        assert reported["thresholds"]["score"] == 0.3 and reported["source"]["fps"] == 7
        assert reported["bundle"]["id"] == v2.id
        shown = alice.get(f"/api/devices/{other}/config").json()
        assert [g["selector"] for g in shown["groups"]] == ["site=north"] and shown["desired"]["thresholds"][
            "top_k"
        ] == 3

        # A source the devices do not have: refused on each, which keeps its configuration and keeps running.
        bad = alice.put("/api/groups/site=north/config", json={"source": "camera:7", "thresholds": {"top_k": 1}})
        assert bad.status_code == 200 and len(bad.json()["sent"]) == 3
        for device_id in ids:
            rev = next(s["rev"] for s in bad.json()["sent"] if s["device"] == device_id)
            reported = _wait_reported(hub, device_id, lambda r, rev=rev: r.get("rev", -1) >= rev, f"rev {rev}")
            assert reported["config"]["state"] == "refused" and "camera 7" in reported["config"]["detail"]
            assert reported["thresholds"]["top_k"] == 3, reported["thresholds"]
        assert alice.get(f"/api/devices/{other}/config").json()["state"]["state"] == "refused"
        since = time.time()
        wait_until(lambda: _results_since(hub, since) == set(ids), TIMEOUT_S, "results from every device: running")
        assert all(a.runner.source_config is not None and a.runner.source_config.kind == "synthetic"
                   for a in agents.agents)  # fmt: skip

        with hub.sessions() as session:
            audit = [e for e in session.scalars(select(AuditEntry).where(AuditEntry.action == "config"))]
        assert [(e.actor, e.detail["target"]) for e in audit] == [
            ("alice", "group:site=north"),
            ("alice", other),
            ("hub", other),
            ("alice", "group:site=north"),
        ]
        assert audit[0].detail["change"] == {"thresholds": {"top_k": 3}, "rates": {"telemetry_s": 2}}
        assert audit[2].detail["why"] == "the device joined the group" and audit[2].detail["devices"][0]["rev"]


def test_bad_config_input_gets_422_naming_the_field_and_stores_nothing(hub) -> None:
    ops = create_token(hub.sessions, "ops", "test", scope="operate")
    reader = create_token(hub.sessions, "viewer", "test", scope="read")
    with hub.sessions.begin() as session:
        session.add(Device(id="dev-1", labels={}, runtimes=[]))
    cases = [
        ("/api/devices/dev-1/config", {"thresholds": {"score": 2}}, "body.thresholds", "less than or equal to 1"),
        ("/api/devices/dev-1/config", {"thresholds": {"topk": 2}}, "body.thresholds", "unknown topk"),
        ("/api/devices/dev-1/config", {"rates": {"telemetry_s": 0}}, "body.rates", "greater than 0"),
        ("/api/devices/dev-1/config", {"colour": "red"}, "body.colour", "Extra inputs"),
        ("/api/devices/dev-1/config", {"source": "no kind"}, "body.source", "expected KIND:TARGET"),
        ("/api/devices/dev-1/config", {"task": "segmenter"}, "body.task", "'classifier'"),
        ("/api/devices/dev-1/config", {"capture": {"random_rate": 3}}, "body.capture", "random_rate"),
        ("/api/groups/site=a b/config", {"task": "raw"}, "path.selector", "expected KEY=VALUE or KEY"),
    ]
    with _client(hub, ops) as client:
        for path, body, where, fragment in cases:
            response = client.put(path, json=body)
            assert response.status_code == 422, (body, response.text)
            errors = {".".join(map(str, e["loc"])): e["msg"] for e in response.json()["detail"]}
            assert where in errors and fragment in errors[where], (body, errors)
        assert client.put("/api/devices/nope/config", json={"task": "raw"}).status_code == 404
        assert client.get("/api/groups/site=a/config").status_code == 404
    with _client(hub, reader) as client:
        refused = client.put("/api/groups/site=a/config", json={"task": "raw"})
        assert refused.status_code == 403 and "operate" in refused.text
        assert client.get("/api/devices/dev-1/config").status_code == 200
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(GroupConfig)) == 0
        assert session.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "config")) == 0
        assert session.get(Device, "dev-1").desired is None


def test_a_deploy_from_a_stale_read_keeps_a_config_set_since_and_a_config_keeps_bundle_and_shadow(tmp_path) -> None:
    """The driver loads devices, then sends a tick later: a configuration set in between is kept (both orders)."""
    _engine, sessions = open_database(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    sent: list[DesiredState] = []
    send = lambda _device, desired, _version: sent.append(desired)  # noqa: E731
    bundle = {"id": "a" * 64, "name": "cnn", "version": "2.0.0", "size": 10}
    shadow = {"bundle": {**bundle, "id": "b" * 64, "version": "3.0.0"}, "budget": 0.5}
    with sessions.begin() as session:
        session.add(Device(id="dev-1", labels={}, runtimes=[], agent_version="0.4.0"))
    with sessions() as session:
        stale = session.get(Device, "dev-1")
    configs = Configs(sessions, send)
    configs.set_device("dev-1", {"thresholds": {"top_k": 2}, "source": "video:/data/clip.mp4"}, "alice")
    publish_desired(sessions, send, stale, bundle, False, None, lambda _s, _r: None, shadow)
    assert sent[-1].thresholds.top_k == 2 and sent[-1].source == "video:/data/clip.mp4"
    assert sent[-1].bundle is not None and sent[-1].bundle.id == bundle["id"]
    configs.set_device("dev-1", {"thresholds": {"score": 0.9}, "source": None}, "alice")
    last = sent[-1]
    assert last.bundle is not None and last.bundle.id == bundle["id"] and last.shadow is not None
    assert (last.thresholds.top_k, last.thresholds.score, last.source) == (2, 0.9, None)
    assert [d.rev for d in sent] == [1, 2, 3]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")


def test_group_versions_each_member_once_and_a_device_that_leaves_and_rejoins_gets_it_again(db_url: str) -> None:
    """The group bookkeeping on both databases: each change a new version merged into the group's configuration,
    each member given each version once (following a reconnect gives nothing twice), and leaving forgets it."""
    _engine, sessions = open_database(db_url)
    sent: list[tuple[str, DesiredState]] = []
    configs = Configs(sessions, lambda device, desired, _version: sent.append((device, desired)))
    with sessions.begin() as session:
        session.add_all([Device(id=f"d{i}", labels={"site": "a"} if i < 2 else {}, runtimes=[]) for i in range(3)])
    group, first = configs.set_group("site=a", {"thresholds": {"top_k": 2}}, "alice")
    assert group.version == 1 and [s.device for s in first] == ["d0", "d1"]
    group, second = configs.set_group("site=a", {"thresholds": {"score": 0.7}, "task": "classifier"}, "bob")
    assert group.version == 2 and group.config == {"thresholds": {"top_k": 2, "score": 0.7}, "task": "classifier"}
    assert group.updated_by == "bob" and [s.rev for s in second] == [2, 2]

    configs.follow_groups(["d0", "d1", "d2"])  # they reconnect: nothing new for anyone
    assert len(sent) == 4
    _relabel(sessions, "d2", {"site": "a"})
    configs.follow_groups(["d2"])
    assert [d for d, _ in sent[4:]] == ["d2"] and sent[-1][1].thresholds.top_k == 2 and sent[-1][1].task == "classifier"
    _relabel(sessions, "d0", {})
    configs.follow_groups(["d0"])  # left: forgotten, nothing sent
    _relabel(sessions, "d0", {"site": "a"})
    configs.follow_groups(["d0"])  # rejoined: given again
    assert [d for d, _ in sent[5:]] == ["d0"] and sent[-1][1].rev == 3
    with sessions() as session:
        given = {(r.device_id, r.version) for r in session.scalars(select(GroupConfigDevice))}
        actions = [(e.actor, e.detail["target"]) for e in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert given == {("d0", 2), ("d1", 2), ("d2", 2)}
    assert actions == [("alice", "group:site=a"), ("bob", "group:site=a"), ("hub", "d2"), ("hub", "d0")]


def _relabel(sessions, device_id: str, labels: dict[str, str]) -> None:
    with sessions.begin() as session:
        session.get(Device, device_id).labels = labels
