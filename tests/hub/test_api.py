"""The hub's REST API over real HTTP: a started hub (embedded Mosquitto, SQLite, uvicorn), real signed bundles of the
digits model, real agents for the device and deployment endpoints. No mocks: every request goes through httpx."""

import io
import tarfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import compile_bundle
from hub_helpers import fleet, fleet_ids, signing_keys, wait_devices_reported, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edgekit.hub.auth import COOKIE, create_token, revoke_token
from edgekit.hub.db import Device, TelemetryRollup, TelemetrySample
from edgekit.hub.routes.bundles import max_bundle_bytes

TIMEOUT_S = 60.0
PROTECTED = ["/", "/api/devices", "/api/devices/x/telemetry", "/api/events", "/api/bundles", "/api/deployments",
             "/api/audit", "/metrics", "/api/devices/x/results", "/api/bundles/x/report"]  # fmt: skip
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def bundles(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits 1.0.0 and 2.0.0 signed by the trusted key, 1.0.0 signed by another key, and the trusted public key."""
    folder = tmp_path_factory.mktemp("api-bundles")
    key, public = signing_keys(folder / "trusted")
    other_key, _ = signing_keys(folder / "other")
    calibration = digits / "calibration.npz"
    names = folder / "labels.txt"
    names.write_text("\n".join(DIGIT_NAMES))
    labelled = compile_bundle(digits, calibration, key, "3.0.0", folder / "digits-3.ekb", "digits", "--labels",
                              str(names))  # fmt: skip
    return {
        "public": public,
        "labelled": labelled,
        "v1": compile_bundle(digits, calibration, key, "1.0.0", folder / "digits-1.ekb"),
        "v2": compile_bundle(digits, calibration, key, "2.0.0", folder / "digits-2.ekb"),
        "other": compile_bundle(digits, calibration, other_key, "1.0.0", folder / "digits-other.ekb"),
    }


def _client(hub, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.http_url, headers=headers, timeout=30, trust_env=False)


@pytest.fixture
def api(hub):
    """(hub, client authenticated as the token 'ops')."""
    token = create_token(hub.sessions, "ops", "test")
    with _client(hub, token) as client:
        yield hub, client


def _field_errors(response: httpx.Response) -> dict[str, str]:
    """422 body → {"body.field": message}."""
    assert response.status_code == 422, response.text
    return {".".join(str(p) for p in item["loc"]): item["msg"] for item in response.json()["detail"]}


def _tampered(bundle: Path, out: Path) -> Path:
    """The same bundle with one byte of the model artifact flipped (same size, so only the hash can tell)."""
    with tarfile.open(bundle) as source, tarfile.open(out, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".onnx"):
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            target.addfile(member, io.BytesIO(data))
    return out


def _push(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post("/api/bundles", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})


def test_unauthenticated_requests_get_401_and_health_and_docs_are_public(hub) -> None:
    token = create_token(hub.sessions, "short-lived", "test")
    with _client(hub) as anonymous, _client(hub, "not-a-token") as wrong, _client(hub, token) as valid:
        for path in PROTECTED:
            assert anonymous.get(path).status_code == 401, path
            assert wrong.get(path).status_code == 401, path
        assert anonymous.post("/api/bundles", content=b"x" * 10).status_code == 401
        assert anonymous.post("/api/deployments", json={}).status_code == 401
        assert anonymous.get("/api/devices").headers["www-authenticate"] == "Bearer"
        for path in ("/", "/api/devices", "/metrics"):
            assert valid.get(path).status_code == 200, path
        revoke_token(hub.sessions, "short-lived", "test")
        assert valid.get("/api/devices").status_code == 401, "a revoked token still works"

        health = anonymous.get("/healthz")
        assert health.status_code == 200
        assert health.json() | {"version": None} == {"ok": True, "broker": True, "db": True, "version": None}
        docs = anonymous.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text, "the docs page loads Swagger UI from a CDN"
        script = next(part.split('"')[0] for part in docs.text.split('src="')[1:] if "swagger-ui-bundle" in part)
        assert anonymous.get(script).status_code == 200, f"{script} is not served by the hub"
        schema = anonymous.get("/openapi.json").json()
        assert {"/api/devices", "/api/bundles", "/api/deployments", "/api/deployments/{deployment_id}/halt"} <= set(
            schema["paths"]
        )


def test_login_sets_a_strict_httponly_cookie_that_dies_with_its_token(hub) -> None:
    token = create_token(hub.sessions, "browser", "test")
    # A browser on the dashboard's own page sends its origin; cross-site posts are tests/security/test_hub_web.py's.
    with _client(hub) as browser:
        browser.headers["Origin"] = hub.http_url
        assert not (hub.settings.data_dir / "secret").exists(), "the cookie key is kept in the database, not a file"
        refused = browser.post("/login", data={"token": "wrong"})
        assert refused.status_code == 401
        assert COOKIE not in browser.cookies
        missing = browser.post("/login", data={})
        assert _field_errors(missing) == {"body.token": "field required"}

        response = browser.post("/login", data={"token": token, "next": "//evil.example/"})
        assert response.status_code == 303
        assert response.headers["location"] == "/", "an off-site redirect was followed"
        set_cookie = response.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        assert browser.get("/api/me").json() == {"actor": "browser", "scope": "operate"}
        assert browser.get("/").status_code == 200

        cookie = browser.cookies[COOKIE]
        forged = cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB")
        with _client(hub) as attacker:
            attacker.cookies.set(COOKIE, forged)
            assert attacker.get("/api/me").status_code == 401, "a cookie with a bad signature was accepted"

        logout = browser.post("/logout")
        assert logout.status_code == 303
        assert browser.get("/api/me").status_code == 401, "still signed in after logout"

        browser.post("/login", data={"token": token})
        assert browser.get("/api/me").status_code == 200
        revoke_token(hub.sessions, "browser", "test")
        assert browser.get("/api/me").status_code == 401, "revoking the token left its dashboard session open"

    with _client(hub, create_token(hub.sessions, "auditor", "test")) as client:
        logins = client.get("/api/audit", params={"action": "login"}).json()
    assert [entry["actor"] for entry in logins] == ["browser", "browser"]


def test_malformed_bodies_and_queries_get_422_naming_the_field(api) -> None:
    _, client = api
    assert "body.labels" in _field_errors(client.put("/api/devices/dev-1/labels", json={"labels": "site=a"}))
    errors = _field_errors(client.put("/api/devices/dev-1/labels", json={"labels": {"bad key": "x"}}))
    assert "bad key" in errors["body.labels"]
    assert "body.tags" in _field_errors(client.put("/api/devices/dev-1/labels", json={"labels": {}, "tags": 1}))

    errors = _field_errors(client.post("/api/deployments", json={"bundle_id": "abcd1234"}))
    assert list(errors) == ["body.target"]
    errors = _field_errors(client.post("/api/deployments", json={"bundle_id": "xyz", "target": "all",
                                                                 "canary_percent": 150}))  # fmt: skip
    assert set(errors) == {"body.bundle_id", "body.canary_percent"}
    errors = _field_errors(client.post("/api/deployments", json={"bundle_id": "abcd1234", "target": "two words"}))
    assert "group:KEY" in errors["body.target"]
    errors = _field_errors(client.post("/api/deployments", json={"bundle_id": "abcd1234", "target": "all"}))
    assert "no bundles match" in errors["body.bundle_id"]

    invalid_json = client.post("/api/deployments", content=b"{not json", headers={"Content-Type": "application/json"})
    assert invalid_json.status_code == 422
    assert _field_errors(client.get("/api/events", params={"limit": 0})).keys() == {"query.limit"}
    assert "query.label" in _field_errors(client.get("/api/devices", params={"label": "=x"}))

    assert client.get("/api/devices/nobody").status_code == 404
    assert client.put("/api/devices/nobody/labels", json={"labels": {}}).status_code == 404
    assert client.get("/api/deployments/999").status_code == 404
    assert client.post("/api/deployments/999/halt").status_code == 404
    assert client.get("/api/bundles/0123456789abcdef").status_code == 404


def test_telemetry_series_raw_and_downsampled(api) -> None:
    """Raw samples newest-N oldest-first after `since`; minute rollups (what retention keeps) on request."""
    hub, client = api
    with hub.sessions.begin() as session:
        session.add(Device(id="dev-t", labels={}, runtimes=[]))
        session.add_all(TelemetrySample(device_id="dev-t", seq=i, ts=1000.0 + i, fps=float(i)) for i in range(1, 11))
        session.add_all(TelemetryRollup(device_id="dev-t", minute=m, samples=60, fps=1.0 * m) for m in (10, 11, 12))
    raw = client.get("/api/devices/dev-t/telemetry", params={"since": 1003, "limit": 4}).json()
    assert [(s["seq"], s["fps"]) for s in raw] == [(7, 7.0), (8, 8.0), (9, 9.0), (10, 10.0)]
    assert len(client.get("/api/devices/dev-t/telemetry", params={"since": 1003}).json()) == 7
    minutes = client.get("/api/devices/dev-t/telemetry", params={"resolution": "minute", "since": 600}).json()
    assert [(m["ts"], m["samples"], m["fps"]) for m in minutes] == [(660.0, 60, 11.0), (720.0, 60, 12.0)]
    assert "query.resolution" in _field_errors(client.get("/api/devices/dev-t/telemetry", params={"resolution": "h"}))


def test_push_verifies_signed_bundles_and_names_the_problem(make_hub, bundles, tmp_path: Path) -> None:
    hub = make_hub(trust_key=bundles["public"])
    with _client(hub, create_token(hub.sessions, "release-bot", "test")) as client:
        created = _push(client, bundles["v1"])
        assert created.status_code == 201, created.text
        record = created.json()
        assert (record["name"], record["version"], record["created"]) == ("digits", "1.0.0", True)
        assert record["uploaded_by"] == "release-bot"
        assert record["size"] == bundles["v1"].stat().st_size
        again = _push(client, bundles["v1"])
        assert again.status_code == 200 and again.json()["created"] is False

        listed = client.get("/api/bundles").json()
        assert [b["id"] for b in listed] == [record["id"]]
        detail = client.get(f"/api/bundles/{record['id'][:10]}").json()
        assert detail["manifest"]["name"] == "digits" and detail["id"] == record["id"]

        tampered = _field_errors(_push(client, _tampered(bundles["v1"], tmp_path / "tampered.ekb")))
        assert "sha256 does not match" in tampered["body"] and "onnx" in tampered["body"]
        assert str(tmp_path) not in tampered["body"] and ".incoming-" not in tampered["body"]
        untrusted = _field_errors(_push(client, bundles["other"]))
        assert "signature" in untrusted["body"] or "key" in untrusted["body"], untrusted
        truncated = tmp_path / "truncated.ekb"
        truncated.write_bytes(bundles["v2"].read_bytes()[:5000])
        assert "truncated" in _field_errors(_push(client, truncated))["body"]
        assert "empty" in _field_errors(client.post("/api/bundles", content=b""))["body"]
        wrong_type = client.post("/api/bundles", files={"file": ("b.ekb", bundles["v2"].read_bytes())})
        assert wrong_type.status_code == 415

        hub.app.dependency_overrides[max_bundle_bytes] = lambda: 10_000  # the real limit is 512 MiB; same check
        assert _push(client, bundles["v2"]).status_code == 413
        chunked = client.post("/api/bundles", content=iter([b"\0" * 8000, b"\0" * 8000]))
        assert chunked.status_code == 413, "an upload without Content-Length passed the size limit"

        assert len(client.get("/api/bundles").json()) == 1, "a rejected bundle was stored"
        assert sorted(p.name for p in (hub.settings.data_dir / "bundles").iterdir()) == [f"{record['id']}.ekb"]
        pushes = client.get("/api/audit", params={"action": "push"}).json()
    assert [(p["actor"], p["detail"]["created"]) for p in pushes] == [("release-bot", False), ("release-bot", True)]


def test_fleet_deployments_metrics_and_audit(make_hub, bundles, tmp_path: Path) -> None:
    """Devices, labels, telemetry, a rollout created then halted, /metrics and the audit trail, on 2 real agents."""
    hub = make_hub(trust_key=bundles["public"])
    ids = fleet_ids("api", 2)
    with (
        fleet(hub, 2, tmp_path, bundles["public"], bundles["v1"], prefix="api") as _,
        _client(hub, create_token(hub.sessions, "alice", "test")) as alice,
        _client(hub, create_token(hub.sessions, "bob", "test")) as bob,
    ):
        wait_devices_reported(hub, ids)
        devices = alice.get("/api/devices").json()
        assert [d["id"] for d in devices] == ids
        assert all(d["online"] and d["bundle_label"] == "digits@1.0.0" for d in devices)
        detail = alice.get(f"/api/devices/{ids[0]}").json()
        assert detail["reported"]["bundle"]["version"] == "1.0.0"

        labelled = alice.put(f"/api/devices/{ids[0]}/labels", json={"labels": {"site": "north", "tier": "canary"}})
        assert labelled.status_code == 200 and labelled.json()["labels"] == {"site": "north", "tier": "canary"}
        assert [d["id"] for d in alice.get("/api/devices", params={"label": "site=north"}).json()] == [ids[0]]
        both = alice.get("/api/devices", params=[("label", "site=north"), ("label", "tier")]).json()
        assert [d["id"] for d in both] == [ids[0]]
        assert alice.get("/api/devices", params={"label": "site=south"}).json() == []
        assert len(alice.get("/api/devices", params={"online": "true"}).json()) == 2
        assert alice.get("/api/devices", params={"online": "false"}).json() == []

        samples = wait_until(lambda: alice.get(f"/api/devices/{ids[1]}/telemetry").json(), TIMEOUT_S, "telemetry")
        assert all(s["ts"] > 0 and s["fps"] is not None for s in samples)
        assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples), "telemetry is not oldest first"
        newest = alice.get(f"/api/devices/{ids[1]}/telemetry", params={"limit": 1}).json()
        assert len(newest) == 1 and newest[0]["ts"] >= samples[-1]["ts"]
        assert alice.get(f"/api/devices/{ids[1]}/telemetry", params={"since": time.time() + 60}).json() == []

        events = wait_until(lambda: alice.get("/api/events").json(), TIMEOUT_S, "device events")
        first = events[0]
        by_device = alice.get("/api/events", params={"device": first["device_id"], "type": first["type"]}).json()
        assert by_device and all((e["device_id"], e["type"]) == (first["device_id"], first["type"]) for e in by_device)
        assert len(alice.get("/api/events", params={"limit": 1}).json()) == 1
        assert alice.get("/api/events", params={"level": "no-such-level"}).json() == []

        v2 = _push(alice, bundles["v2"]).json()
        created = alice.post("/api/deployments", json={"bundle_id": v2["id"][:12], "target": "all",
                                                       "canary_percent": 50, "wave_percent": 50})  # fmt: skip
        assert created.status_code == 201, created.text
        deployment = created.json()
        assert (deployment["bundle_id"], deployment["target"], deployment["state"]) == (v2["id"], "all", "running")
        assert deployment["devices_total"] == 2 and deployment["created_by"] == "alice"
        assert [w["total"] for w in deployment["wave_progress"]] == [1, 1]
        assert {d["device_id"] for d in deployment["devices"]} == set(ids)
        busy = alice.post("/api/deployments", json={"bundle_id": v2["id"], "target": ids[0]})
        assert "already in running deployment" in _field_errors(busy)["body.target"]

        halted = bob.post(f"/api/deployments/{deployment['id']}/halt", json={"reason": "wrong build"})
        assert halted.status_code == 200, halted.text
        assert halted.json()["state"] == "halted" and "wrong build" in halted.json()["reason"]
        assert bob.post(f"/api/deployments/{deployment['id']}/halt").status_code == 409
        listed = alice.get("/api/deployments").json()
        assert [(d["id"], d["state"]) for d in listed] == [(deployment["id"], "halted")]

        # A device's latest telemetry may carry no latency (no inference in that window, e.g. during the halt's
        # switch back); the per-device gauge then has no sample for it, so wait until both report one.
        wait_until(lambda: all(d["latency_p50_ms"] is not None for d in alice.get("/api/devices").json()), 20,
                   "latency in both devices' latest telemetry")  # fmt: skip
        families = {f.name: f for f in text_string_to_metric_families(alice.get("/metrics").text)}
        expected = {"edgekit_devices", "edgekit_devices_online", "edgekit_ingest_received", "edgekit_ingest_stored",
                    "edgekit_ingest_duplicates", "edgekit_ingest_invalid", "edgekit_deployments",
                    "edgekit_device_latency_p50_ms", "edgekit_device_online", "edgekit_bundles"}  # fmt: skip
        assert expected <= set(families), expected - set(families)
        value = {f.name: {tuple(s.labels.items()): s.value for s in f.samples} for f in families.values()}
        assert value["edgekit_devices"][()] == 2 and value["edgekit_devices_online"][()] == 2
        assert value["edgekit_deployments"][(("state", "halted"),)] == 1
        assert value["edgekit_ingest_stored"][()] > 0
        assert {labels[0][1] for labels in value["edgekit_device_latency_p50_ms"]} == set(ids)

        trail = alice.get("/api/audit").json()
    actions = [(entry["actor"], entry["action"]) for entry in reversed(trail)]
    assert [a for a in actions if a[1] in ("push", "deploy", "halt", "labels")] == [
        ("alice", "labels"), ("alice", "push"), ("alice", "deploy"), ("bob", "halt")]  # fmt: skip
    assert ("test", "token.create") in actions


def test_fields_from_a_newer_agent_are_stored_around_and_counted_in_metrics(hub):
    """Telemetry and an event with fields this hub does not know, from a device's own login: stored (their known
    fields), and the unknown ones counted by name in /metrics."""
    import json

    from brokers import publish_many
    from hub_helpers import device_url

    from edgekit.hub.db import EventRecord
    from edgekit.protocol import Event, Telemetry, Topic, device_topic, encode

    def newer(model, **extra) -> bytes:
        return json.dumps({**json.loads(encode(model)), **extra}).encode()

    base = time.time()
    messages = [(device_topic("cam-new", Topic.TELEMETRY), newer(Telemetry(seq=s, ts=base + s, fps=4.0),
                                                                 battery_mv=3300)) for s in range(1, 6)]  # fmt: skip
    event = Event(seq=6, ts=base + 6, type="agent.started", message="newer agent")
    messages.append((device_topic("cam-new", Topic.EVENTS), newer(event, severity_score=0.2)))
    publish_many(device_url(hub, "cam-new"), messages)

    def stored() -> int | None:
        with hub.sessions() as session:
            rows = session.query(TelemetrySample).filter(TelemetrySample.device_id == "cam-new").count()
            events = session.query(EventRecord).filter(EventRecord.device_id == "cam-new").count()
        return rows if rows == 5 and events == 1 else None

    wait_until(stored, TIMEOUT_S, "5 telemetry samples and the event stored")
    token = create_token(hub.sessions, "metrics-reader", "test", scope="read")
    with _client(hub, token) as client:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    counted = {s.labels["field"]: s.value for s in families["edgekit_unknown_fields"].samples}
    assert counted.get("Telemetry.battery_mv", 0) >= 5 and counted.get("Event.severity_score", 0) >= 1, counted


def test_a_bundles_compile_report_and_a_devices_results_by_class_name(make_hub, bundles, tmp_path: Path) -> None:
    """A read-scope token reads the report packed in a labelled bundle, and a real agent's results, named."""
    hub = make_hub(trust_key=bundles["public"])
    device = fleet_ids("named", 1)[0]
    with (
        fleet(hub, 1, tmp_path, bundles["public"], bundles["labelled"], prefix="named") as _,
        _client(hub, create_token(hub.sessions, "viewer", "test", scope="read")) as viewer,
        _client(hub, create_token(hub.sessions, "release-bot", "test")) as operator,
    ):
        bundle_id = _push(operator, bundles["labelled"]).json()["id"]
        assert viewer.get(f"/api/bundles/{bundle_id}").json()["manifest"]["labels"] == DIGIT_NAMES
        report = viewer.get(f"/api/bundles/{bundle_id[:12]}/report")
        assert report.status_code == 200, report.text
        chosen = report.json()["candidates"][0]
        assert (chosen["backend"], chosen["precision"], chosen["status"]) == ("onnxruntime", "fp32", "chosen")
        assert chosen["metrics"]["top1_agreement"] == 1.0 and chosen["metrics"]["model_bytes"] > 0
        assert report.json()["reference"]["latency_p50_ms"] > 0
        missing = viewer.get("/api/bundles/0123456789/report")
        assert missing.status_code == 404 and "no bundles match" in missing.json()["detail"]

        def stored_results() -> list | None:
            response = viewer.get(f"/api/devices/{device}/results")
            return response.json() if response.status_code == 200 and response.json() else None

        results = wait_until(stored_results, TIMEOUT_S, "results")
        for result in results:
            assert result["bundle"] == "digits@3.0.0" and result["summary"]["task"] == "classifier"
            assert [s["name"] for s in result["summary"]["top"]] == [DIGIT_NAMES[s["label"]]
                                                                    for s in result["summary"]["top"]]  # fmt: skip
        assert [r["seq"] for r in results] == sorted((r["seq"] for r in results), reverse=True)
        assert len(viewer.get(f"/api/devices/{device}/results", params={"limit": 1}).json()) == 1
        assert viewer.get("/api/devices/nobody/results").status_code == 404
