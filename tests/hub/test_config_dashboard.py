"""Device configuration and deploys from the dashboard, in headless Chromium against a real hub and real agents: a
group's configuration set on a device page reaches every device in the group, survives a deploy started from the
rollouts page, and a bad one is refused by the devices and shown on the device page; refusals of the hub (422) are
shown under the forms, and a read-only token sees neither form."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import chromium, open_logged_in, until
from hub_helpers import devices, fleet, fleet_ids, wait_devices_reported, wait_until
from sqlalchemy import update

from edgekit.hub.auth import create_token
from edgekit.hub.db import Deployment, Device

TIMEOUT_S = 90.0
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with chromium() as launched:
        yield launched


def _reported(hub, device_id: str) -> dict:
    return devices(hub)[device_id].reported or {}


def _apply(page, fields: dict[str, str]) -> None:
    for selector, value in fields.items():
        if selector == "#config-target":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)
    page.click("#config-apply")


def test_group_config_and_deploy_from_the_dashboard(make_hub, cnn_bundles, tmp_path: Path, browser) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"])
    hub.registry.add(cnn_bundles["v1"], "test")
    v2, _ = hub.registry.add(cnn_bundles["v2"], "test")
    ids = fleet_ids("web", 3)
    lab, outside = ids[:2], ids[2]
    admin = create_token(hub.sessions, "web-admin", "test")
    reader = create_token(hub.sessions, "web-reader", "test", scope="read")
    with fleet(hub, 3, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="web"):
        wait_devices_reported(hub, ids)
        with hub.sessions.begin() as session:
            session.execute(update(Device).where(Device.id.in_(lab)).values(labels={"site": "lab"}))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("dialog", lambda dialog: dialog.accept())  # the deploy form's confirm()
        violations: list[str] = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

        # A group change from a member's page: every member gets it, the device outside does not.
        open_logged_in(page, f"{hub.http_url}/devices/{lab[0]}", admin, "device")
        until(page, "document.querySelector('#config-form') !== null")
        _apply(page, {"#config-target": "group:site=lab", "#config-top-k": "3", "#config-telemetry": "2"})
        until(page, "document.querySelector('#config-sent').textContent.includes('sent to 2 device(s)')")
        for device_id in lab:
            wait_until(lambda d=device_id: _reported(hub, d)["thresholds"]["top_k"] == 3, TIMEOUT_S, "top_k 3")
        assert _reported(hub, outside)["thresholds"]["top_k"] == 5
        until(page, "document.querySelector('#config-state').dataset.state === 'applied'")
        assert '"top_k":3' in page.text_content('#config tr[data-field="thresholds"]').replace(" ", "")

        # A refusal of the hub is shown under the form, naming the field.
        _apply(page, {"#config-target": "device", "#config-top-k": "", "#config-telemetry": "", "#config-score": "2"})
        until(page, "!document.querySelector('#config-errors').hidden")
        assert "thresholds" in page.text_content("#config-errors")
        page.fill("#config-score", "")

        # Deploy from the rollouts page: a target that matches nothing is refused, then the group's rollout runs.
        page.click("nav a[data-page=rollouts]")
        until(page, "document.body?.dataset.ready === 'rollouts' && document.querySelector('#deploy-open') !== null")
        page.click("#deploy-open")
        page.select_option("#deploy-bundle", v2.id)
        page.fill("#deploy-target", "group:site=nowhere")
        page.click("#deploy-start")
        until(page, "!document.querySelector('#deploy-errors').hidden")
        assert "no devices match" in page.text_content("#deploy-errors")
        page.fill("#deploy-target", "group:site=lab")
        page.fill("#deploy-canary", "50")
        page.fill("#deploy-wave", "50")
        page.click("#deploy-start")
        until(page, "document.querySelector('.rollout[data-id] code')?.textContent === 'group:site=lab'")
        with hub.sessions() as session:
            (deployment,) = session.query(Deployment).all()
        assert deployment.created_by == "web-admin" and deployment.bundle_id == v2.id
        wait_until(lambda: _state(hub, deployment.id) != "running", TIMEOUT_S, "the rollout to end")
        assert _state(hub, deployment.id) == "completed"
        for device_id in lab:  # the configuration survived the deploy
            reported = _reported(hub, device_id)
            assert reported["bundle"]["id"] == v2.id and reported["thresholds"]["top_k"] == 3, reported

        # A source the devices do not have: refused by each, shown on the device page; they keep their config.
        page.goto(f"{hub.http_url}/devices/{lab[1]}")
        until(page, "document.querySelector('#config-form') !== null")
        _apply(page, {"#config-target": "group:site=lab", "#config-source": "camera:7", "#config-top-k": "1"})
        until(page, "document.querySelector('#config-state')?.dataset.state === 'refused'")
        assert "camera 7" in page.text_content("#config-state")
        for device_id in lab:
            wait_until(lambda d=device_id: (_reported(hub, d).get("config") or {}).get("state") == "refused",
                       TIMEOUT_S, f"{device_id} refused")  # fmt: skip
            assert _reported(hub, device_id)["thresholds"]["top_k"] == 3
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-device-config.png"), full_page=True)
        assert violations == []

        # A read-only token: no deploy button, no configuration form (the panel itself is shown).
        viewer = browser.new_page()
        open_logged_in(viewer, f"{hub.http_url}/rollouts", reader, "rollouts")
        assert viewer.query_selector("#deploy-open") is None
        viewer.goto(f"{hub.http_url}/devices/{lab[0]}")
        until(viewer, "document.querySelector('#config-state') !== null")
        assert viewer.query_selector("#config-form") is None


def _state(hub, deployment_id: int) -> str:
    with hub.sessions() as session:
        return session.get(Deployment, deployment_id).state
