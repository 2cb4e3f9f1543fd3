"""The web dashboard against a real hub, real agents and a real browser (Debian chromium via Playwright).

Screenshots of the fleet and device pages go to `tests/artifacts/` (dashboard-fleet.png, dashboard-device.png).
"""

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import chromium, open_bundle_report, open_logged_in, until
from helpers import compile_bundle
from hub_helpers import fleet, fleet_ids, signing_keys, wait_until
from sqlalchemy import update

from edgekit.hub.auth import create_token
from edgekit.hub.db import Device, EventRecord, TelemetrySample

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLEET_SIZE = 20
WAIT_MS = 15_000
ROWS = "#fleet tbody tr[data-id]"  # the table's device rows (spacer rows have no id)


def get(url: str, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of a GET, 4xx/5xx included (stdlib: the test needs no HTTP client package)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def shown_ids(page) -> list[str]:
    return page.eval_on_selector_all(ROWS, "rows => rows.map(r => r.dataset.id)")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as launched:
        yield launched


def test_dashboard_live_fleet_and_device_pages(make_hub, digits: Path, tmp_path: Path, browser) -> None:
    private, public = signing_keys(tmp_path / "keys")
    bundle = compile_bundle(digits, digits / "calibration.npz", private, "1.0.0", tmp_path / "digits-1.0.0.ekb")
    newer = compile_bundle(digits, digits / "calibration.npz", private, "1.1.0", tmp_path / "digits-1.1.0.ekb")
    hub = make_hub(trust_key=public)
    hub.registry.add(bundle, "test")
    newer_record, _ = hub.registry.add(newer, "test")
    token = create_token(hub.sessions, "dashboard-test", "test")
    ids = fleet_ids("sim", FLEET_SIZE)

    with fleet(hub, FLEET_SIZE, tmp_path, public, bundle, telemetry_s=0.5):

        def all_reporting() -> bool:
            with hub.sessions() as session:
                rows = session.query(Device).filter(Device.id.in_(ids), Device.fps.is_not(None)).count()
            return rows == FLEET_SIZE

        wait_until(all_reporting, 30, f"telemetry from all {FLEET_SIZE} agents")
        with hub.sessions.begin() as session:  # half the fleet at one site, to filter by label
            session.execute(update(Device).where(Device.id.in_(ids[::2])).values(labels={"site": "lab"}))

        # The API and the dashboard's own endpoints: 401 without a token, the fleet with one.
        status, body, _ = get(f"{hub.http_url}/api/devices", token)
        assert status == 200, body
        assert sorted(d["id"] for d in json.loads(body)) == ids
        status, body, _ = get(f"{hub.http_url}/")
        assert status == 401 and 'name="token"' in body, "an unauthenticated page must be a 401 with the login form"
        assert get(f"{hub.http_url}/devices/{ids[0]}")[0] == 401
        assert get(f"{hub.http_url}/api/alerts")[0] == 401
        assert get(f"{hub.http_url}/api/stream")[0] == 401
        status, _, headers = get(f"{hub.http_url}/static/vendor/uplot/uPlot.iife.min.js")
        assert status == 200 and "javascript" in headers["content-type"]
        assert get(f"{hub.http_url}/static/../dashboard.py")[0] == 404

        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # Every page must run under the hub's CSP (no inline styles or unhashed scripts): the browser says when not.
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        try:
            # Log in as a person would: the 401 page is the form; after it, the same URL shows the fleet.
            response = page.goto(hub.http_url + "/")
            assert response.status == 401
            page.fill("#token", token)
            page.click("button[type=submit]")
            until(page, f"document.querySelectorAll('{ROWS}').length === {FLEET_SIZE}")
            assert shown_ids(page) == ids
            assert page.eval_on_selector(f'tr[data-id="{ids[0]}"] .c-online', "c => c.textContent") == "online"
            assert "20 devices · 20 online" in page.text_content("#summary")

            # Live: the last-seen timestamp of a device changes from the SSE feed, in the same document.
            page.evaluate("window.__marker = 'no reload'")
            cell = f'tr[data-id="{ids[0]}"] .c-last_seen'
            before = float(page.get_attribute(cell, "data-ts"))
            until(page, f"Number(document.querySelector('{cell}').dataset.ts) > {before}")
            assert page.evaluate("window.__marker") == "no reload", "the page reloaded instead of updating in place"
            assert page.evaluate("window.__liveMessages") > 0
            assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
            fps = float(page.text_content(f'tr[data-id="{ids[0]}"] .c-fps'))
            assert fps > 0, "a device running the synthetic 5 fps source shows no frames"

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-fleet.png"), full_page=True)

            # Filter by label: half the fleet is at site=lab.
            page.fill("#filter", "site=lab")
            until(page, f"document.querySelectorAll('{ROWS}').length === {FLEET_SIZE // 2}")
            assert shown_ids(page) == ids[::2]
            page.fill("#filter", "")

            # Device page: click a row; its charts hold telemetry and grow while the page stays open.
            page.click(f'tr[data-id="{ids[3]}"] .c-fps')
            page.wait_for_url(f"**/devices/{ids[3]}", timeout=WAIT_MS)
            until(page, "document.body?.dataset.ready === 'device'")
            chart = "#chart-latency"
            until(page, f"Number(document.querySelector('{chart}').dataset.points) > 0")
            page.evaluate("window.__marker = 'no reload'")
            points = int(page.get_attribute(chart, "data-points"))
            until(page, f"Number(document.querySelector('{chart}').dataset.points) > {points}")
            assert page.evaluate("window.__marker") == "no reload"
            assert page.evaluate("window.__charts.length") == 4
            # uPlot drew the series on its canvas: the data it holds is the page's, not an empty chart.
            assert page.evaluate("window.__charts[0].data[0].length") >= points + 1
            assert page.evaluate("window.__charts[1].data[1].filter(v => v > 0).length") > 0, "no fps on the chart"
            page.screenshot(path=str(ARTIFACTS / "dashboard-device.png"), full_page=True)

            # The other pages render from the API.
            for path, ready, selector in (("/bundles", "bundles", "#bundles tbody tr[data-id]"),
                                          ("/events", "events", "#alerts-offline"),
                                          ("/rollouts", "rollouts", "#rollouts"),
                                          ("/audit", "audit", "#audit tbody tr")):  # fmt: skip
                page.goto(hub.http_url + path)
                until(page, f"document.body?.dataset.ready === '{ready}'")
                assert page.query_selector(selector) is not None, f"{path}: nothing at {selector}"
            assert page.text_content("#audit tbody").count("token.create") >= 1
            page.goto(hub.http_url + "/bundles")
            until(page, "document.body?.dataset.ready === 'bundles'")
            assert f"Trust root v{hub.trust.root.version}" in page.text_content("#trust")
            assert page.query_selector("#bundles .state.failed") is None  # every bundle's key is trusted

            # Rollouts: a running one shows per-wave progress and halts from its button. Each device must run 10,000
            # inferences on the new bundle before it counts as healthy, so the rollout is still on its canary.
            deployment = hub.rollouts.create(newer_record.id, "all", canary_percent=10, health_checks=10_000,
                                             actor="test")  # fmt: skip
            page.goto(hub.http_url + "/rollouts")
            card = f'.rollout[data-id="{deployment.id}"]'
            page.wait_for_selector(f"{card} button[data-halt]", timeout=WAIT_MS)
            waves = page.eval_on_selector_all(f"{card} .wave", "ws => ws.map(w => [w.children[0].textContent, "
                                                               "w.children[2].textContent])")  # fmt: skip
            assert len(waves) == deployment.waves, waves
            assert waves[0] == ["canary ◀", "2 sent"], waves  # 10% of 20, waiting on their health checks
            assert sum(int(text.removesuffix(" pending")) for _, text in waves[1:]) == FLEET_SIZE - 2, waves
            page.once("dialog", lambda dialog: dialog.accept())
            page.click(f"{card} button[data-halt]")
            page.wait_for_selector(f"{card} .state.halted", timeout=WAIT_MS)
            assert page.query_selector(f"{card} button[data-halt]") is None
            assert hub.rollouts.get(deployment.id).state == "halted"
            status, body, _ = get(f"{hub.http_url}/api/audit?action=halt", token)
            assert [(e["actor"], e["detail"]["deployment_id"]) for e in json.loads(body)] == [
                ("dashboard-test", deployment.id)
            ]
            assert violations == [], violations
        finally:
            page.close()


def test_alerts_offline_failed_updates_and_latency_regressions(make_hub) -> None:
    hub = make_hub()
    token = create_token(hub.sessions, "alerts-test", "test")
    now = time.time()
    devices = {  # id: (online, last_seen, current p50, the hour's typical p50)
        "cam-slow": (True, now, 30.0, 10.0),  # 3× its hour median: a regression
        "cam-steady": (True, now, 11.0, 10.0),  # 1.1×: not one
        "cam-new": (True, now, 50.0, 10.0),  # too few samples to call it
        "cam-jitter": (True, now, 0.09, 0.05),  # 1.8×, but by 0.04 ms: scheduling noise, not a regression
        "cam-off": (False, now - 30, 10.0, 10.0),  # said offline (Last Will)
        "cam-quiet": (True, now - 900, 10.0, 10.0),  # online but silent for 15 minutes
    }
    with hub.sessions.begin() as session:
        for device_id, (online, last_seen, p50, typical) in devices.items():
            session.add(Device(id=device_id, online=online, last_seen=last_seen, latency_p50_ms=p50, labels={},
                               runtimes=[]))  # fmt: skip
            samples = 3 if device_id == "cam-new" else 40
            for seq in range(1, samples + 1):
                session.add(TelemetrySample(device_id=device_id, seq=seq, ts=now - 3000 + seq * 60,
                                            latency_p50_ms=typical + (seq % 3) * typical / 100))  # fmt: skip
            # A sample older than the hour must not count towards the median.
            session.add(TelemetrySample(device_id=device_id, seq=1000, ts=now - 7200, latency_p50_ms=1000.0))
        events = [("cam-steady", "update.refused", "error", "signature does not verify"),
                  ("cam-slow", "update.rolled_back", "warning", "self-test failed"),
                  ("cam-off", "inference.error", "error", "runtime crashed"),
                  ("cam-slow", "update.healthy", "info", "all good")]  # fmt: skip
        for seq, (device_id, kind, level, message) in enumerate(events, start=2000):
            session.add(EventRecord(device_id=device_id, seq=seq, ts=now - 60, type=kind, level=level,
                                    message=message, data={}))  # fmt: skip

    assert get(f"{hub.http_url}/api/alerts")[0] == 401
    status, body, _ = get(f"{hub.http_url}/api/alerts", token)
    assert status == 200, body
    alerts = json.loads(body)
    assert {a["device_id"]: a["level"] for a in alerts["offline"]} == {"cam-off": "error", "cam-quiet": "warning"}
    failed = {(a["device_id"], a["type"]) for a in alerts["failed_updates"]}
    assert failed == {("cam-steady", "update.refused"), ("cam-slow", "update.rolled_back"),
                      ("cam-off", "inference.error")}  # fmt: skip
    regressions = alerts["latency_regressions"]
    assert [a["device_id"] for a in regressions] == ["cam-slow"]
    assert regressions[0]["median_ms"] == pytest.approx(10.1, abs=0.01)
    assert regressions[0]["samples"] == 40
    assert alerts["count"] == 2 + 3 + 1


def test_bundle_report_with_class_names_and_named_results(make_hub, digits: Path, tmp_path: Path, browser) -> None:
    """The bundles page opens a labelled bundle's compile report (every candidate, its class names), for a read-only
    token too; the device page lists results by class name."""
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    private, public = signing_keys(tmp_path / "keys")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(names) + "\n")
    bundle = compile_bundle(digits, digits / "calibration.npz", private, "2.0.0", tmp_path / "digits-2.0.0.ekb",
                            "digits", "--labels", str(labels))  # fmt: skip
    hub = make_hub(trust_key=public)
    record, _ = hub.registry.add(bundle, "test")
    device = fleet_ids("named", 1)[0]
    with fleet(hub, 1, tmp_path, public, bundle, prefix="named"):
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        try:
            token = create_token(hub.sessions, "report-reader", "test", scope="read")
            open_logged_in(page, hub.http_url + "/bundles", token, "bundles")
            open_bundle_report(page, record.id)
            cells = page.eval_on_selector_all("#candidates tbody tr:first-child td", "ts => ts.map(t => t.textContent)")
            assert cells[:3] == ["onnxruntime", "fp32", "chosen"], cells
            assert cells[4] == "100.0%" and cells[8].endswith("KiB"), cells  # top-1 agreement with fp32, size
            shown = page.eval_on_selector_all("#class-names li", "items => items.map(i => i.textContent)")
            assert shown == names
            assert "Class names (10)" in page.text_content("#bundle-report")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-bundle-report.png"), full_page=True)

            page.goto(f"{hub.http_url}/bundles#{record.id}")  # a link to the report opens it
            until(page, f"document.querySelector('#bundle-report')?.dataset.ready === '{record.id}'")
            assert page.eval_on_selector_all("#class-names li", "items => items.length") == len(names)

            page.goto(f"{hub.http_url}/devices/{device}")
            until(page, "document.querySelector('#results tbody tr[data-seq]') !== null")
            first = page.text_content("#results tbody tr[data-seq] td:last-child")
            assert any(name in first for name in names) and "class " not in first, first
            assert violations == [], violations
        finally:
            page.close()
