"""Drift on the hub: the `drift` alert from each device's newest health block (SQLite and PostgreSQL), the threshold
setting, drift scores in the telemetry history, and the dashboard showing both (a real Chromium)."""

import time
from collections.abc import Iterator

import httpx
import pytest
from browser import chromium, open_logged_in, until

from edgekit.errors import BadInput
from edgekit.hub.auth import create_token
from edgekit.hub.db import Device, TelemetrySample
from edgekit.hub.service import HubSettings

# id: the newest telemetry's drift block, or None for a device whose bundle has no drift reference
DEVICES = {
    "cam-moved": {"score": 1.7, "samples": 200, "feature": "image.mean[0]"},
    "cam-shifting": {"score": 0.31, "samples": 200, "feature": "confidence"},
    "cam-moderate": {"score": 0.12, "samples": 200, "feature": "image.std[1]"},
    "cam-calm": {"score": 0.03, "samples": 200, "feature": "image.mean[2]"},
    "cam-no-reference": None,
}
HISTORY = [0.02, 0.04, 0.3, 0.9, 1.7]  # cam-moved's scores, oldest first, one per telemetry


def seed(hub) -> float:
    """The devices above, as the LEAD's ingest leaves them: devices.health from the newest telemetry, and
    telemetry rows with drift_score. Returns the newest telemetry's time."""
    now = time.time()
    with hub.sessions.begin() as session:
        for device_id, drift in DEVICES.items():
            health = {"drift": drift} if drift else {"model": {"inferences": 10}}
            session.add(Device(id=device_id, online=True, last_seen=now, labels={}, runtimes=[], health=health,
                               bundle_label="digits@1.0.0"))  # fmt: skip
        for seq, score in enumerate(HISTORY, start=1):
            session.add(TelemetrySample(device_id="cam-moved", seq=seq, ts=now - 10 * (len(HISTORY) - seq),
                                        latency_p50_ms=1.0, drift_score=score))  # fmt: skip
        session.add(TelemetrySample(device_id="cam-no-reference", seq=1, ts=now, latency_p50_ms=1.0))
    return now


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """None: the hub's own SQLite; else a fresh PostgreSQL database (the JSON path differs between the two)."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


def api(hub, path: str) -> httpx.Response:
    """GET `path` from the hub's REST API with a fresh read token."""
    token = create_token(hub.sessions, f"drift-{time.monotonic_ns()}", "test")
    return httpx.get(f"{hub.http_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def alerts_of(hub) -> dict:
    response = api(hub, "/api/alerts")
    assert response.status_code == 200, response.text
    return response.json()


def test_devices_whose_newest_drift_is_over_the_threshold_are_alerts_worst_first(make_hub, database):
    hub = make_hub(**({"db": database} if database else {}))
    seed(hub)
    alerts = alerts_of(hub)
    drift = alerts["drift"]
    assert [(a["device_id"], a["score"], a["feature"]) for a in drift] == [
        ("cam-moved", 1.7, "image.mean[0]"),
        ("cam-shifting", 0.31, "confidence"),
    ]
    assert drift[0]["message"] == "input drift 1.70 (PSI of image.mean[0] over the last 200 inputs) is above 0.25"
    assert all(a["kind"] == "drift" and a["level"] == "warning" and a["threshold"] == 0.25 for a in drift)
    assert alerts["count"] == len(drift)  # nothing else is wrong with these devices


def test_the_threshold_is_the_hub_setting(make_hub):
    hub = make_hub(drift_threshold=0.1)
    seed(hub)
    assert [a["device_id"] for a in alerts_of(hub)["drift"]] == ["cam-moved", "cam-shifting", "cam-moderate"]


@pytest.mark.parametrize("value", [0.0, -0.25, float("nan")])
def test_a_threshold_that_is_not_a_positive_score_is_refused(value, tmp_path):
    with pytest.raises(BadInput, match=r"--drift-threshold .*: expected a drift score \(PSI\) above 0, e.g. 0.25"):
        HubSettings(data_dir=tmp_path, drift_threshold=value)


def test_the_cli_refuses_a_bad_threshold_in_one_line(cli, tmp_path):
    result = cli("hub", "--data", tmp_path / "hub", "--drift-threshold", "-1")
    assert result.exit_code == 2
    assert "--drift-threshold -1.0: expected a drift score (PSI) above 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_telemetry_history_carries_drift_scores(make_hub):
    hub = make_hub()
    now = seed(hub)
    history = api(hub, f"/api/devices/cam-moved/telemetry?since={now - 3600}")
    assert history.status_code == 200, history.text
    assert [row["drift_score"] for row in history.json()] == HISTORY
    assert [row["drift_score"] for row in api(hub, "/api/devices/cam-no-reference/telemetry").json()] == [None]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as launched:
        yield launched


def test_the_dashboard_charts_drift_and_lists_the_alert(make_hub, browser):
    hub = make_hub()
    seed(hub)
    token = create_token(hub.sessions, "drift-page", "test")
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        open_logged_in(page, hub.http_url + "/devices/cam-moved", token, "device")
        until(page, f"Number(document.querySelector('#chart-drift').dataset.points) === {len(HISTORY)}")
        assert page.evaluate("window.__driftChart.data[1]") == HISTORY
        assert page.text_content("#drift-now") == "now 1.700: large shift"
        page.goto(hub.http_url + "/events")
        until(page, "document.body?.dataset.ready === 'events'")
        until(page, "document.querySelectorAll('#alerts-drift li a').length === 2")
        listed = page.text_content("#alerts-drift ul")
        assert "cam-moved" in listed and "input drift 1.70" in listed and "cam-calm" not in listed
        assert violations == [], violations
    finally:
        page.close()
