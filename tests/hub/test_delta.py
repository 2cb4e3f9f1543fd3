"""Delta updates through a real hub (embedded Mosquitto, SQLite) to real agents (Fleet): a rollout of a
re-calibrated build reaches the devices that run the same model as a delta the hub makes once and keeps in
`<data>/deltas`, and a device on another model downloads the whole bundle; the hub's stored events say which.
The cache itself keeps to its bound and remembers pairs that have no delta."""

from pathlib import Path

import numpy as np
import pytest
from helpers import compile_bundle
from hub_helpers import fleet, fleet_ids, signing_keys, wait_devices_reported, wait_until
from sqlalchemy import select

from edgekit.bundle import sha256_file
from edgekit.delta import DeltaError, apply_delta
from edgekit.hub.db import Deployment, EventRecord
from edgekit.hub.transfer import DeltaCache

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def bundles(small_cnn_model: Path, small_cnn_calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """cnn 1.0.0 and cnn 1.1.0 (the same network, quantized with another calibration set: a re-calibrated build), a
    model named "other", and the public key all three are signed with."""
    folder = tmp_path_factory.mktemp("delta-bundles")
    key, public = signing_keys(folder / "key")
    recalibration = folder / "recalibration.npz"
    np.savez(recalibration, input=np.random.default_rng(5).random((40, 3, 32, 32), dtype=np.float32))

    def build(calibration: Path, version: str, name: str) -> Path:
        return compile_bundle(small_cnn_model, calibration, key, version, folder / f"{name}-{version}.ekb", name=name)

    return {
        "public": public,
        "v1": build(small_cnn_calibration, "1.0.0", "cnn"),
        "v1_1": build(recalibration, "1.1.0", "cnn"),
        "other": build(small_cnn_calibration, "1.0.0", "other"),
    }


def _downloaded(hub, device_id: str) -> EventRecord:
    def stored() -> EventRecord | None:
        query = select(EventRecord).where(EventRecord.device_id == device_id, EventRecord.type == "update.downloaded")
        with hub.sessions() as session:
            return session.scalars(query).first()

    return wait_until(stored, TIMEOUT_S, f"{device_id}'s update.downloaded event in the hub's database")


def _completed(hub, deployment_id: int) -> Deployment:
    def done() -> Deployment | None:
        with hub.sessions() as session:
            deployment = session.get(Deployment, deployment_id)
        return deployment if deployment.state in ("completed", "halted") else None

    return wait_until(done, TIMEOUT_S, f"deployment #{deployment_id} to end")


def test_a_rollout_reaches_devices_of_the_same_model_as_a_delta(make_hub, bundles, tmp_path):
    """Over HTTP, the hub's download links (as the MQTT chunk path, tests/agents/test_delta.py)."""
    hub = make_hub()
    hub.registry.add(bundles["v1"], "test")  # the base too: the hub makes deltas between bundles it has
    record, _ = hub.registry.add(bundles["v1_1"], "test")
    target = bundles["v1_1"].read_bytes()
    with fleet(hub, 2, tmp_path, bundles["public"], bundles["v1"], prefix="same") as same, \
         fleet(hub, 1, tmp_path, bundles["public"], bundles["other"], prefix="other") as other:  # fmt: skip
        ids = fleet_ids("same", 2) + fleet_ids("other", 1)
        wait_devices_reported(hub, ids)
        deployment = hub.rollouts.create(record.id, "all", wave_timeout_s=90, actor="test", health_checks=3)
        done = _completed(hub, deployment.id)
        assert done.state == "completed", done.reason

        for device_id in fleet_ids("same", 2):
            event = _downloaded(hub, device_id)
            assert (event.data["via"], event.data["transport"]) == ("delta", "http"), (device_id, event.message)
            assert event.data["received"] < len(target) / 2, event.data
        (event,) = [_downloaded(hub, device_id) for device_id in fleet_ids("other", 1)]
        assert event.data == {"bundle": record.id, "via": "full", "received": len(target), "transport": "http"}, (
            event.data
        )

        for agent in same.agents + other.agents:
            installed = agent.runner.model.bundle
            assert installed.id == sha256_file(bundles["v1_1"])
            assert agent.store.repack(installed) == target  # the device's bundle is the target, byte for byte
    # One delta for the pair, made once for both devices and kept beside the registry.
    (delta,) = (hub.registry.dir.parent / "deltas").glob("*.zst")
    assert delta.name == f"{sha256_file(bundles['v1'])}-{record.id}.zst"


def _files(folder: Path, contents: dict[str, bytes]) -> tuple[dict[str, str], dict[str, Path]]:
    """Files named by the sha256 of their contents, as the registry keeps bundles: ({name: id}, {id: path})."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    ids = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    paths = {ids[name]: folder / f"{ids[name]}.ekb" for name in contents}
    for name, data in contents.items():
        paths[ids[name]].write_bytes(data)
    return ids, paths


def test_the_delta_cache_keeps_at_most_its_bound_and_remembers_pairs_without_a_delta(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.bytes(200_000)
    versions = {f"v{i}": base[: 50_000 * i] + rng.bytes(2_000) + base[50_000 * i :] for i in (1, 2, 3)}
    ids, paths = _files(tmp_path / "bundles", {"base": base, **versions, "unrelated": rng.bytes(200_000)})
    cache = DeltaCache(paths.get, max_bytes=5_000)  # room for two of these deltas (the 2,000 new bytes), not three
    made = {}
    for name in versions:
        made[name] = cache.get(ids["base"], ids[name])
        assert 2_000 < made[name].path.stat().st_size <= 2_500

    kept = sorted(p.name for p in (tmp_path / "deltas").glob("*.zst"))
    assert kept == sorted(made[name].path.name for name in ("v2", "v3")), kept  # the least recently served went
    again = cache.get(ids["base"], ids["v1"])  # made again on request
    assert apply_delta(base, again.path.read_bytes(), len(versions["v1"])) == versions["v1"]

    with pytest.raises(DeltaError, match=r"a delta would be \d+ bytes of the bundle's 200000"):
        cache.get(ids["base"], ids["unrelated"])
    paths[ids["unrelated"]].unlink()  # remembered: not looked for, not made again
    with pytest.raises(DeltaError, match="a delta would be"):
        cache.get(ids["base"], ids["unrelated"])
    with pytest.raises(DeltaError, match="is not here"):
        cache.get("0" * 64, ids["v1"])
