"""Model health in the field, end to end: a real hub (embedded Mosquitto, SQLite), real agents on a live synthetic
camera, real signed bundles. Health gates decide on what the devices measured, not on install success:

- a shadow that agrees with the active bundle is promoted on the canary without a second download, then wave by wave;
- a damaged bundle (its classes rolled by one: it installs, runs as fast and passes its own self-test) is stopped at
  the canary by the agreement gate while only a shadow: no device ever activates it;
- a slower bundle is stopped by the latency gate, in the shadow phase and after a switch (then rolled back).
"""

from pathlib import Path

import numpy as np
import pytest
from browser import chromium, open_logged_in, until
from helpers import compile_bundle, with_extra_work, with_permuted_classes
from hub_helpers import deployment_members, fleet, fleet_ids, signing_keys, wait_until
from reliability import record

from edgekit.bundle import sha256_file
from edgekit.hub.auth import create_token
from edgekit.hub.db import AuditEntry, Deployment, Device, EventRecord
from edgekit.hub.service import Hub

TIMEOUT_S = 90.0
SOURCE = "synthetic:?fps=25"
MIN_SAMPLES = 20
SCENARIO = "health-gated rollouts (shadow, gates)"


@pytest.fixture(scope="module")
def bundles(small_cnn_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The small CNN as cnn 1.0.0 and 2.0.0 (the same model, so it agrees), a damaged 2.0.0 (classes rolled) and a
    slow 2.0.0 (the same outputs after ~5 ms of extra matmuls), all signed with one key; calibrated on enough
    samples (120) for a drift reference."""
    folder = tmp_path_factory.mktemp("health-bundles")
    small_cnn_calibration = folder / "calibration.npz"
    np.savez(small_cnn_calibration, input=np.random.default_rng(3).random((120, 3, 32, 32), dtype=np.float32))
    key, public = signing_keys(folder / "key")
    damaged = with_permuted_classes(small_cnn_model, folder / "damaged.onnx", classes=10)
    slow = with_extra_work(small_cnn_model, folder / "slow.onnx")

    def build(model: Path, version: str, name: str) -> Path:
        return compile_bundle(model, small_cnn_calibration, key, version, folder / name, name="cnn")

    return {"public": public, "v1": build(small_cnn_model, "1.0.0", "cnn-1.ekb"),
            "v2": build(small_cnn_model, "2.0.0", "cnn-2.ekb"), "damaged": build(damaged, "2.0.0", "damaged.ekb"),
            "slow": build(slow, "2.0.0", "slow.ekb")}  # fmt: skip


@pytest.fixture
def hub(make_hub) -> Hub:
    return make_hub()


def _wait_done(hub: Hub, deployment_id: int) -> Deployment:
    def done() -> Deployment | None:
        with hub.sessions() as session:
            deployment = session.get(Deployment, deployment_id)
        return deployment if deployment.state != "running" else None

    try:
        return wait_until(done, TIMEOUT_S, f"deployment #{deployment_id} to end")
    except AssertionError as error:
        members = {d: (m.wave, m.state, m.detail) for d, m in deployment_members(hub, deployment_id).items()}
        raise AssertionError(f"{error}; members: {members}") from None


def _wait_measured(hub: Hub, ids: list[str], bundle_id: str) -> None:
    """Every device has sent ModelStats of `bundle_id` over MIN_SAMPLES inferences: the gates' baseline."""

    def measured() -> bool:
        with hub.sessions() as session:
            rows = [session.get(Device, d) for d in ids]
        health = [((row.health if row else None) or {}).get("model") or {} for row in rows]
        return all(h.get("bundle") == bundle_id and h.get("inferences", 0) >= MIN_SAMPLES for h in health)

    wait_until(measured, TIMEOUT_S, "every device to report model stats of its bundle")


def _events(hub: Hub, device_id: str, kind: str) -> list[EventRecord]:
    with hub.sessions() as session:
        rows = session.query(EventRecord).filter_by(device_id=device_id, type=kind)
        return list(rows.order_by(EventRecord.seq))


def _audited(hub: Hub, action: str, deployment_id: int) -> list[dict]:
    with hub.sessions() as session:
        entries = session.query(AuditEntry).filter_by(actor="hub", action=action).all()
    return [e.detail for e in entries if e.detail.get("deployment_id") == deployment_id]


def _gates(deployment: Deployment, phase: str) -> dict[str, dict]:
    return {r["gate"]: r for r in deployment.gate_results if r["phase"] == phase}


def test_an_agreeing_shadow_is_promoted_on_the_canary_without_a_download_then_wave_by_wave(hub, bundles, tmp_path):
    v1, v2 = sha256_file(bundles["v1"]), sha256_file(bundles["v2"])
    record_v2, _ = hub.registry.add(bundles["v2"], "test")
    ids = fleet_ids("cam", 5)
    with fleet(hub, 5, tmp_path, bundles["public"], bundles["v1"], prefix="cam", source=SOURCE) as agents:
        _wait_measured(hub, ids, v1)
        deployment = hub.rollouts.create(record_v2.id, "all", canary_percent=20, wave_percent=50, wave_timeout_s=60,
                                         actor="test", shadow=True, min_samples=MIN_SAMPLES)  # fmt: skip
        assert deployment.phase == "shadow" and len(deployment.gates) == 4
        done = _wait_done(hub, deployment.id)
        assert done.state == "completed", done.reason
        shadow = _gates(done, "shadow")
        assert shadow["agreement>=0.95"]["value"] == 1.0 and shadow["agreement>=0.95"]["passed"], shadow
        assert all(r["passed"] for r in done.gate_results), done.gate_results
        assert len(_audited(hub, "promote", deployment.id)) == 1
        assert {r["wave"] for r in done.gate_results if r["phase"] == "waves"} == {0, 1, 2}
        assert all(agent.runner.model.bundle.id == v2 for agent in agents.agents)
        # The canary downloaded 2.0.0 once, as its shadow; promoting it switched to the copy it had verified.
        canary = ids[0]
        assert len(_events(hub, canary, "update.downloaded")) == 1
        assert len(_events(hub, canary, "update.activated")) == 1
        assert all(len(_events(hub, d, "update.downloaded")) == 1 for d in ids[1:])
        members = deployment_members(hub, deployment.id)
        assert members[canary].health["samples"] >= MIN_SAMPLES and members[canary].state == "healthy"
        record(
            SCENARIO, "agreeing shadow: devices promoted (of 5)", sum(m.state == "healthy" for m in members.values())
        )


def test_a_damaged_bundle_is_stopped_at_the_canary_by_the_agreement_gate(hub, bundles, tmp_path):
    v1, damaged = sha256_file(bundles["v1"]), sha256_file(bundles["damaged"])
    record_damaged, _ = hub.registry.add(bundles["damaged"], "test")
    ids = fleet_ids("cam", 5)
    with fleet(hub, 5, tmp_path, bundles["public"], bundles["v1"], prefix="cam", source=SOURCE) as agents:
        _wait_measured(hub, ids, v1)
        deployment = hub.rollouts.create(record_damaged.id, "all", canary_percent=20, wave_percent=50,
                                         wave_timeout_s=60, actor="test", shadow=True,
                                         min_samples=MIN_SAMPLES)  # fmt: skip
        done = _wait_done(hub, deployment.id)
        assert done.state == "halted" and done.phase == "shadow", done.reason
        assert "agreement>=0.95 failed" in done.reason, done.reason
        assert [a["reason"] for a in _audited(hub, "halt", deployment.id)] == [done.reason]
        agreement = _gates(done, "shadow")["agreement>=0.95"]
        assert agreement["value"] < 0.5 and not agreement["passed"], agreement
        # The canary downloaded and verified it as a shadow, and kept serving 1.0.0 throughout.
        assert len(_events(hub, ids[0], "update.downloaded")) == 1
        assert all(agent.runner.model.bundle.id == v1 for agent in agents.agents)
        assert all(not _events(hub, d, "update.activated") for d in ids), "a device activated the damaged bundle"
        members = deployment_members(hub, deployment.id)
        assert all(m.state == "pending" and m.rev is None for d, m in members.items() if d != ids[0])
        wait_until(lambda: agents.agents[0].runner.shadow is None, TIMEOUT_S, "the canary to drop the shadow")
        assert damaged not in {agent.store.record().active for agent in agents.agents}
        record(SCENARIO, "damaged shadow: devices that activated it", 0, limit=0)


@pytest.mark.parametrize("shadow", [True, False], ids=["shadow-phase", "after-switch"])
def test_a_slower_bundle_is_stopped_by_the_latency_gate(hub, bundles, tmp_path, shadow: bool):
    """In the shadow phase (budget 4x, so a slow shadow still gets samples) it never activates; after a switch
    (no shadow, `p95<=1.5x` against the device's own 1.0.0 figures) the canary is rolled back."""
    v1 = sha256_file(bundles["v1"])
    hub.registry.add(bundles["v1"], "test")  # its compile report is what the slow one's is compared with
    record_slow, _ = hub.registry.add(bundles["slow"], "test")
    ids = fleet_ids("cam", 3)
    with fleet(hub, 3, tmp_path, bundles["public"], bundles["v1"], prefix="cam", source=SOURCE) as agents:
        _wait_measured(hub, ids, v1)
        deployment = hub.rollouts.create(record_slow.id, "all", canary_percent=30, wave_percent=50, wave_timeout_s=60,
                                         actor="test", shadow=shadow, gates=["p95<=1.5x"], min_samples=MIN_SAMPLES,
                                         shadow_budget=4)  # fmt: skip
        done = _wait_done(hub, deployment.id)
        assert done.state == "halted" and "p95<=1.5x failed" in done.reason, done.reason
        latency = _gates(done, "shadow" if shadow else "waves")["p95<=1.5x"]
        assert latency["value"] > 1.5 and not latency["passed"], latency
        assert latency["expected"] > 1.5 and "the compile reports expected" in latency["note"], latency
        members = deployment_members(hub, deployment.id)
        assert members[ids[0]].state == "rolled_back", members[ids[0]].detail
        wait_until(lambda: agents.agents[0].runner.model.bundle.id == v1, TIMEOUT_S, "the canary to run 1.0.0")
        assert all(m.rev is None for d, m in members.items() if d != ids[0])
        record(SCENARIO, f"slower bundle ({'shadow' if shadow else 'installed'}): p95 ratio measured",
               round(latency["value"], 1))  # fmt: skip


def test_the_dashboard_shows_a_halted_gate_and_a_running_shadow(hub, bundles, tmp_path):
    """In headless Chromium: the rollouts page shows the agreement gate that halted a rollout, with the value it
    measured; the device page of a canary still shadowing shows its agreement and its drift figure."""
    record_damaged, _ = hub.registry.add(bundles["damaged"], "test")
    token = create_token(hub.sessions, "health-viewer", "test", scope="read")
    ids = fleet_ids("cam", 2)
    with fleet(hub, 2, tmp_path, bundles["public"], bundles["v1"], prefix="cam", source=SOURCE) as agents:
        _wait_measured(hub, ids, sha256_file(bundles["v1"]))
        halted = hub.rollouts.create(record_damaged.id, "all", canary_percent=50, wave_timeout_s=60, actor="test",
                                     shadow=True, min_samples=MIN_SAMPLES)  # fmt: skip
        halted = _wait_done(hub, halted.id)
        assert halted.state == "halted", halted.reason
        measured = _gates(halted, "shadow")["agreement>=0.95"]["value"]
        # Shadowing until halted: the canary compares for as long as the test looks.
        shadowing = hub.rollouts.create(record_damaged.id, ids[1], wave_timeout_s=600, actor="test", shadow=True,
                                        min_samples=10**6)  # fmt: skip
        wait_until(lambda: agents.agents[1].runner.shadow is not None, TIMEOUT_S, "the canary to run the shadow")
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            try:
                open_logged_in(page, f"{hub.http_url}/rollouts", token, "rollouts")
                row = f'.rollout[data-id="{halted.id}"] tr.failed[data-gate="agreement>=0.95"]'
                until(page, f"document.querySelector('{row}') !== null")
                assert float(page.text_content(f"{row} .value")) == measured
                assert "agreement>=0.95 failed" in page.text_content(f'.rollout[data-id="{halted.id}"]')

                page.goto(f"{hub.http_url}/devices/{ids[1]}")
                until(page, "document.querySelector('#agreement') !== null && document.querySelector('#drift')")
                assert page.text_content("#agreement").endswith("%")
                assert float(page.text_content("#agreement").rstrip("%")) < 50
                assert float(page.text_content("#drift")) >= 0
                assert "damaged" not in page.text_content("#facts") and "cnn@2.0.0" in page.text_content("#facts")
            finally:
                page.close()
        hub.rollouts.halt(shadowing.id, "test", "done looking")
