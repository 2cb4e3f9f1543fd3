"""Input drift end to end: a bundle compiled from real images (the digits training split as PNGs), a real hub
(embedded Mosquitto, SQLite) and real agents playing folders of images at 20 fps, side by side:

- agents on held-out digits (the test split, never calibrated on) raise no drift alert over a 40 s run (~800
  inferences each, four windows of 200);
- an agent on the same digits inverted raises the drift alert within 30 s of starting (the window fills in 10 s at
  20 fps; then one telemetry interval and one ingest batch).
"""

import time
from pathlib import Path

import httpx
import pytest
from drift_helpers import digit_folders
from helpers import compile_bundle
from hub_helpers import fleet, fleet_ids, signing_keys
from reliability import record
from sqlalchemy import select

from edgekit.drift import LARGE
from edgekit.hub.auth import create_token
from edgekit.hub.db import TelemetrySample

FPS = 20
RUN_S = 40.0
ALERT_WITHIN_S = 30.0
CALM_DEVICES = 2
SCENARIO = "input drift (real digit images)"


@pytest.fixture(scope="module")
def images(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digit_folders(digits, tmp_path_factory.mktemp("digit-images"))


@pytest.fixture(scope="module")
def signed(digits: Path, images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits 1.0.0 calibrated on the training split's PNGs, and the public key that verifies it."""
    folder = tmp_path_factory.mktemp("drift-bundle")
    key, public = signing_keys(folder / "key")
    bundle = compile_bundle(digits, images["calibration"], key, "1.0.0", folder / "digits.ekb", "digits",
                            "--color", "gray")  # fmt: skip
    return {"bundle": bundle, "public": public}


def drift_alerts(hub, token: str) -> dict[str, dict]:
    """The hub's drift alerts, by device, as the dashboard reads them."""
    response = httpx.get(f"{hub.http_url}/api/alerts", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert response.status_code == 200, response.text
    return {alert["device_id"]: alert for alert in response.json()["drift"]}


def stored(hub, column, device_id: str) -> list:
    """One telemetry column's stored values for a device, where set."""
    with hub.sessions() as session:
        where = (TelemetrySample.device_id == device_id, column.is_not(None))
        return list(session.scalars(select(column).where(*where).order_by(TelemetrySample.seq)))


def test_held_out_images_raise_no_alert_and_inverted_ones_do(make_hub, signed, images, tmp_path):
    hub = make_hub(trust_key=signed["public"])
    token = create_token(hub.sessions, "drift-e2e", "test")
    calm = fleet_ids("calm", CALM_DEVICES)
    (drifted,) = fleet_ids("drifted", 1)
    source = lambda folder: f"folder:{folder}?fps={FPS}"  # noqa: E731
    with (
        fleet(hub, CALM_DEVICES, tmp_path, signed["public"], signed["bundle"], "calm", source(images["held_out"])),
        fleet(hub, 1, tmp_path, signed["public"], signed["bundle"], "drifted", source(images["inverted"])),
    ):
        started = time.monotonic()
        alerted_after = None
        false_alerts: set[str] = set()
        while time.monotonic() - started < RUN_S:
            alerts = drift_alerts(hub, token)
            false_alerts |= set(alerts) & set(calm)
            if alerted_after is None and drifted in alerts:
                alerted_after = time.monotonic() - started
                alert = alerts[drifted]
            time.sleep(1.0)
    scores = {device: stored(hub, TelemetrySample.drift_score, device) for device in [*calm, drifted]}
    inferences = {device: sum(stored(hub, TelemetrySample.inferences, device)) for device in calm}
    calm_max = max(max(scores[device]) for device in calm)
    print(f"calm: {inferences} inferences, drift max {calm_max:.3f} over {sum(len(scores[d]) for d in calm)} "
          f"telemetry; drifted: alert after {alerted_after} s, scores {min(scores[drifted]):.2f}..")  # fmt: skip
    record(SCENARIO, f"held-out digits: highest drift score, {CALM_DEVICES} devices x {RUN_S:.0f} s", calm_max, LARGE)
    record(SCENARIO, "inverted digits: seconds to the drift alert", alerted_after or RUN_S, ALERT_WITHIN_S)

    assert all(total >= 4 * 200 * 0.75 for total in inferences.values()), f"too few inferences to judge: {inferences}"
    assert false_alerts == set(), f"held-out images raised a drift alert on {false_alerts}"
    assert calm_max < LARGE
    assert alerted_after is not None and alerted_after <= ALERT_WITHIN_S, f"no drift alert within {ALERT_WITHIN_S} s"
    assert alert["feature"] in ("image.mean[0]", "image.std[0]") and alert["samples"] == 200
    assert min(scores[drifted]) > LARGE  # from the first full window on
