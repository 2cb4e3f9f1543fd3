"""Key rotation end to end (#14): a hub with its embedded Mosquitto and a fleet of 10 real agents, enrolled on it.

The bundle-signing key and the hub key are rotated together with `edgekit hub rotate-keys` while the fleet runs
and one device is off. Every device moves to the new trust root without re-enrolment (the one that was off when
it comes back), keeps working — a bundle signed by the new key rolls out to all 10 — and refuses what the retired
keys sign: a bundle signed by the old bundle key (still in the registry from before) and a desired state signed by
the old hub key.
"""

from pathlib import Path

import pytest
from brokers import Subscriber, publish
from helpers import compile_bundle
from hub_helpers import fleet, fleet_ids, signing_keys, wait_devices_reported, wait_until, watcher_url
from reliability import record

from edgekit.agents.agent import Agent
from edgekit.bundle import sha256_file
from edgekit.hub.auth import create_token
from edgekit.hub.db import Deployment, Device
from edgekit.hub.keys import KEY_FILE
from edgekit.protocol import Event, Topic, device_topic, encode
from edgekit.signing import load_private_key
from edgekit.trust import sign_desired

AREA = "attack: retired keys"
N = 10
TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def rotation_bundles(small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory) -> dict[str, Path]:
    """cnn 1.0.0, 2.0.0 and 4.0.0 signed by the old bundle key; 3.0.0 by the new one; both public keys."""
    folder = tmp_path_factory.mktemp("rotation-bundles")
    old_key, old_pub = signing_keys(folder / "old")
    new_key, new_pub = signing_keys(folder / "new")

    def build(version: str, key: Path) -> Path:
        return compile_bundle(small_cnn_model, small_cnn_calibration, key, version, folder / f"cnn-{version}.ekb",
                              name="cnn")  # fmt: skip

    old = {"v1": build("1.0.0", old_key), "v2": build("2.0.0", old_key), "v4_old_key": build("4.0.0", old_key)}
    return {"old_public": old_pub, "new_public": new_pub, "v3": build("3.0.0", new_key), **old}


def _deploy(hub, bundle: Path) -> Deployment:
    """Push (a no-op for a bundle already in the registry) and roll out to every device; the finished deployment."""
    pushed, _ = hub.registry.add(bundle, "test")
    deployment = hub.rollouts.create(pushed.id, "all", canary_percent=10, wave_percent=100, failure_threshold=0.5,
                                     wave_timeout_s=60, actor="test", health_checks=3)  # fmt: skip

    def finished() -> Deployment | None:
        with hub.sessions() as session:
            row = session.get(Deployment, deployment.id)
        return row if row.state != "running" else None

    return wait_until(finished, 3 * TIMEOUT_S, f"deployment of {bundle.name} to finish")


def _versions(agents: list[Agent]) -> dict[str, str | None]:
    return {a.device_id: a.runner.model.bundle.manifest.version if a.runner.model else None for a in agents}


def test_rotating_both_keys_on_a_running_fleet(make_hub, rotation_bundles, tmp_path, cli):
    b = rotation_bundles
    hub = make_hub(trust_key=b["old_public"])
    ids = fleet_ids("rot", N)
    old_hub_key = load_private_key(hub.settings.data_dir / "trust" / KEY_FILE)
    hub.registry.add(b["v4_old_key"], "test")  # pushed before the rotation, deployed after it
    with fleet(hub, N, tmp_path, b["old_public"], b["v1"], prefix="rot") as agents:
        wait_devices_reported(hub, ids)
        before = _deploy(hub, b["v2"])
        assert before.state == "completed", before.reason
        assert set(_versions(agents.agents).values()) == {"2.0.0"}

        # One device is off during the rotation.
        away = agents.agents[-1]
        away.stop()
        admin = create_token(hub.sessions, "rotator", "test", scope="admin")
        result = cli("hub", "rotate-keys", "--hub-key", "--bundle-key", b["new_public"], "--hub", hub.http_url,
                     "--token", admin)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "trust root v2" in result.output

        online = agents.agents[:-1]
        wait_until(lambda: all(a.trust.root.version == 2 for a in online), TIMEOUT_S, "9 devices on trust root v2")
        back = Agent(away.settings)  # the same data folder and the keys it was enrolled with
        agents.agents[-1] = back
        back.start()
        wait_until(lambda: back.trust.root.version == 2, TIMEOUT_S, "the device that was off on trust root v2")
        record(AREA, "devices left on the retired root", sum(a.trust.root.version != 2 for a in agents.agents), 0)

        # The registry takes only the new key's bundles now (1.0.0 was never pushed: it came with the devices).
        refused = cli("push", b["v1"], "--hub", hub.http_url, "--token", admin)
        assert refused.exit_code == 1 and "signature check failed" in refused.output, refused.output

        _dashboard_marks_retired_keys(hub, admin, {sha256_file(b["v2"]), sha256_file(b["v4_old_key"])})

        # Every device keeps working: the new key's bundle reaches all 10.
        after = _deploy(hub, b["v3"])
        assert after.state == "completed", after.reason
        assert set(_versions(agents.agents).values()) == {"3.0.0"}

        # A bundle signed by the retired bundle key, though still in the registry: every device it reaches refuses.
        retired = _deploy(hub, b["v4_old_key"])
        assert retired.state == "halted", retired.reason
        versions = _versions(agents.agents)
        record(
            AREA, "devices that ran a bundle signed by the retired key", sum(v == "4.0.0" for v in versions.values()), 0
        )
        assert set(versions.values()) == {"3.0.0"}, versions
        with hub.sessions() as session:
            details = [session.get(Device, d).reported["update"]["detail"] for d in ids]
        assert any("signature check failed" in d for d in details), details

        # A desired state signed by the retired hub key, published with the hub's own rights: refused.
        target = agents.agents[0]
        forged = sign_desired(old_hub_key, target.device_id, _downgrade_to(b["v2"], rev=10_000), ttl_s=600)
        events = device_topic(target.device_id, Topic.EVENTS)
        with Subscriber(watcher_url(hub), events) as watch:
            publish(watcher_url(hub), device_topic(target.device_id, Topic.DESIRED), encode(forged))
            got = watch.wait_for(lambda m: any(b"not signed by a hub key of trust root v2" in p for _, p in m),
                                 TIMEOUT_S, events)  # fmt: skip
        assert target.runner.model.bundle.manifest.version == "3.0.0"
        record(AREA, "desired states signed by the retired hub key applied",
               int(target.runner.model.bundle.manifest.version != "3.0.0"), 0)  # fmt: skip
        assert any(Event.model_validate_json(p).type == "config.rejected" for _, p in got)


def _downgrade_to(bundle: Path, rev: int):
    from agent_helpers import desired_for

    return desired_for(bundle, rev=rev, version="2.0.0", name="cnn", allow_downgrade=True)


def _dashboard_marks_retired_keys(hub, token: str, retired: set[str]) -> None:
    """The bundles page (a real Chromium, logged in with `token`) names trust root v2 and marks exactly the bundles
    signed by the retired key."""
    from browser import chromium

    with chromium() as browser:
        page = browser.new_page()
        page.goto(hub.http_url + "/bundles")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_function("() => document.body?.dataset.ready === 'bundles'", timeout=30_000)
        assert "Trust root v2" in page.text_content("#trust")
        marked = page.eval_on_selector_all("#bundles tr:has(.state.failed)", "rows => rows.map(r => r.dataset.id)")
        page.close()
    assert set(marked) == retired, marked
