"""Datasets in the hub (edgekit.hub.datasets, /api/datasets): sample chunks through the real ingest into the
database, refusals of bad input (nothing stored, ingest keeps running), chunks kept across a hub restart, the
retention limit, labels (operate scope, audited), the .npz export `edgekit compile --calibration` takes, purge."""

import hashlib
import io
import json
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from hub_helpers import wait_until
from sqlalchemy import func, select

from edgekit.agents.capture import Spooled, chunks_of
from edgekit.compile.calibration import load_samples
from edgekit.hub.auth import create_token
from edgekit.hub.db import AuditEntry, Dataset, DatasetSample, Device, SampleChunk
from edgekit.manifest import Manifest
from edgekit.profiles import Preprocessing
from edgekit.protocol import SAMPLE_CHUNK_BYTES, SampleMeta, Topic, device_topic, encode_sample

DEVICE = "cam-1"
TOPIC = device_topic(DEVICE, Topic.SAMPLES)


@pytest.fixture
def cnn_hub(make_hub, cnn_bundles):
    """A hub with the cnn 1.0.0 bundle pushed and one known device."""
    hub = make_hub(trust_key=cnn_bundles["public"])
    record, _ = hub.registry.add(cnn_bundles["v1"], "test")
    with hub.sessions.begin() as session:
        session.add(Device(id=DEVICE, labels={}, runtimes=[], first_seen=time.time(), last_seen=time.time()))
    hub.cnn = record
    return hub


def image_sample(hub, seed: int, size: int = 32, bundle: str = "cnn@1.0.0") -> Spooled:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = cv2.imencode(".png", image)[1].tobytes()
    meta = SampleMeta(ts=time.time(), bundle=bundle, bundle_id=hub.cnn.id, input="input", format="png",
                      reason="low_confidence", output={"top": [{"label": 3, "score": 0.31}]})  # fmt: skip
    return Spooled(hashlib.sha256(data).hexdigest(), meta, data)


def send(hub, payloads: list[bytes], topic: str = TOPIC) -> None:
    for payload in payloads:
        hub.ingest.receive(topic, payload)
    assert hub.ingest.flush(30)


def stored(hub) -> dict[str, DatasetSample]:
    with hub.sessions() as session:
        return {row.sha256: row for row in session.scalars(select(DatasetSample))}


def api(hub, method: str, path: str, scope: str = "operate", **kwargs) -> httpx.Response:
    token = create_token(hub.sessions, f"t-{time.monotonic_ns()}", "tester", scope)
    return httpx.request(method, f"{hub.http_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=30,
                         **kwargs)  # fmt: skip


def test_bad_sample_chunks_are_refused_counted_and_never_stored_and_ingest_keeps_running(cnn_hub) -> None:
    hub = cnn_hub
    good = image_sample(hub, 1)
    chunk = next(chunks_of(good))
    header_end = 8 + int.from_bytes(chunk[4:8], "big")
    tampered = chunk[:header_end] + bytes([chunk[header_end] ^ 1]) + chunk[header_end + 1 :]
    lie = Spooled("0" * 64, good.meta, good.data)  # a whole-sample hash that does not match its bytes
    path_like = image_sample(hub, 2, bundle="../../etc@1.0")
    oversized = encode_sample(_header(good, size=64 * 1024**2), b"x")
    send(hub, [b"", b"not a chunk", b"EKS1\x00\x00\xff\xffjunk", b"EKS1\x00\x00\x00\x02{}", tampered,
               *chunks_of(lie), *chunks_of(path_like), oversized, chunk[:-1]])  # fmt: skip
    send(hub, list(chunks_of(good)), topic=device_topic("stranger", Topic.SAMPLES))
    invalid = hub.ingest.stats.invalid
    assert invalid["samples: invalid"] == 5, invalid  # empty, no magic, bad header length, bad header, oversized
    assert invalid["samples: bad hash"] == 3  # a flipped byte, a chunk cut short, a whole that is not its sha256
    assert invalid["samples: bad dataset name"] == 1
    assert invalid["samples: unknown device"] == 1
    assert stored(hub) == {}
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(SampleChunk)) == 0, "no chunk of a refused sample kept"

    send(hub, list(chunks_of(good)))  # ingest is still running, and takes the good one
    assert set(stored(hub)) == {good.sha256}
    assert stored(hub)[good.sha256].device_id == DEVICE and stored(hub)[good.sha256].reason == "low_confidence"


def _header(sample: Spooled, size: int):
    from edgekit.protocol import SampleHeader

    return SampleHeader.model_construct(schema_version=1, sample=sample.sha256, index=0, total=1, size=size,
                                        sha256=hashlib.sha256(b"x").hexdigest(), meta=sample.meta)  # fmt: skip


def test_chunks_survive_a_hub_restart_and_a_sample_is_stored_once(make_hub, cnn_bundles, tmp_path: Path) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"], data_dir=tmp_path / "hub")
    hub.cnn, _ = hub.registry.add(cnn_bundles["v1"], "test")
    with hub.sessions.begin() as session:
        session.add(Device(id=DEVICE, labels={}, runtimes=[], first_seen=time.time(), last_seen=time.time()))
    big = image_sample(hub, 3, size=256)  # incompressible noise: several chunks
    chunks = list(chunks_of(big))
    assert len(big.data) > 2 * SAMPLE_CHUNK_BYTES and len(chunks) >= 3
    send(hub, chunks[:2])
    hub.stop()

    hub = make_hub(trust_key=cnn_bundles["public"], data_dir=tmp_path / "hub")
    send(hub, chunks[1:])  # the device sends the whole sample again; the hub kept the first chunks
    send(hub, chunks)
    rows = stored(hub)
    assert list(rows) == [big.sha256] and rows[big.sha256].size == len(big.data)
    with hub.sessions() as session:
        dataset = session.get(Dataset, "cnn")
        assert dataset.samples == 1 and dataset.stored_bytes == len(big.data)
        assert session.get(DatasetSample, ("cnn", big.sha256)).data == big.data


def test_retention_drops_the_oldest_samples_and_counts_them(cnn_hub) -> None:
    hub = cnn_hub
    send(hub, list(chunks_of(image_sample(hub, 10))))
    with hub.sessions.begin() as session:
        session.get(Dataset, "cnn").max_samples = 3
    samples = [image_sample(hub, seed) for seed in range(11, 16)]
    for sample in samples:
        send(hub, list(chunks_of(sample)))
    assert set(stored(hub)) == {sample.sha256 for sample in samples[-3:]}
    with hub.sessions() as session:
        dataset = session.get(Dataset, "cnn")
        assert (dataset.samples, dataset.dropped) == (3, 3)


def test_list_label_export_and_purge_through_the_api(cnn_hub, tmp_path: Path) -> None:
    hub = cnn_hub
    samples = [image_sample(hub, seed) for seed in range(20, 24)]
    for sample in samples:
        send(hub, list(chunks_of(sample)))
    [listed] = api(hub, "GET", "/api/datasets", "read").json()
    assert listed["name"] == "cnn" and listed["samples"] == 4 and listed["labelled"] == 0
    rows = api(hub, "GET", "/api/datasets/cnn/samples", "read").json()
    assert {row["sha256"] for row in rows} == {sample.sha256 for sample in samples}
    image = api(hub, "GET", f"/api/datasets/cnn/samples/{samples[0].sha256}/data", "read")
    assert image.headers["content-type"] == "image/png" and image.content == samples[0].data

    # Labels need the operate scope, and are audited.
    path = f"/api/datasets/cnn/samples/{samples[0].sha256}/label"
    assert api(hub, "PUT", path, "read", json={"label": 1}).status_code == 403
    assert api(hub, "PUT", path, json={"label": -1}).status_code == 422
    unlabelled = np.load(io.BytesIO(api(hub, "GET", "/api/datasets/cnn/export", "read").content))
    assert "labels" not in unlabelled.files, "labels only when every sample has one"
    for index, sample in enumerate(samples):
        answer = api(hub, "PUT", f"/api/datasets/cnn/samples/{sample.sha256}/label", json={"label": index % 2})
        assert answer.status_code == 200 and answer.json()["labelled_by"].startswith("t-")

    export = api(hub, "GET", "/api/datasets/cnn/export", "read")
    assert export.status_code == 200 and export.headers["x-edgekit-samples"] == "4"
    exported = tmp_path / "cnn.npz"
    exported.write_bytes(export.content)
    manifest = Manifest.model_validate(hub.cnn.manifest)
    loaded = load_samples(exported, manifest.inputs, Preprocessing())
    assert len(loaded) == 4 and list(loaded.labels) == [0, 1, 0, 1]
    assert "hub dataset cnn: 4 field samples of cnn@1.0.0" in loaded.origin
    assert loaded.inputs[manifest.inputs[0].name].shape == (4, 3, 32, 32)

    # Refusals: a path-like name, a dataset that does not exist.
    assert api(hub, "GET", "/api/datasets/..%2Fetc/samples", "read").status_code in (404, 422)
    assert api(hub, "GET", "/api/datasets/a..b/samples", "read").status_code == 422
    assert api(hub, "DELETE", "/api/datasets/nope").status_code == 404

    # Purge: operate scope, audited, the bytes gone.
    assert api(hub, "DELETE", "/api/datasets/cnn", "read").status_code == 403
    purged = api(hub, "DELETE", "/api/datasets/cnn")
    assert purged.status_code == 200 and purged.json() == {"dataset": "cnn", "samples": 4}
    assert stored(hub) == {} and api(hub, "GET", "/api/datasets", "read").json() == []
    with hub.sessions() as session:
        actions = [entry.action for entry in session.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions.count("dataset.label") == 4 and actions.count("dataset.purge") == 1
    wait_until(lambda: hub.ingest.running, 5, "ingest to keep running")


def test_the_dashboard_shows_a_gallery_and_labels_a_sample(cnn_hub) -> None:
    from browser import chromium, open_logged_in, until

    hub = cnn_hub
    image = image_sample(hub, 30)
    buffer = io.BytesIO()
    np.save(buffer, np.sin(np.linspace(0, 6, 3 * 32 * 32, dtype=np.float32)).reshape(1, 3, 32, 32))
    meta = image.meta.model_copy(update={"format": "npy", "reason": "random"})
    window = Spooled(hashlib.sha256(buffer.getvalue()).hexdigest(), meta, buffer.getvalue())
    for sample in (image, window):
        send(hub, list(chunks_of(sample)))
    token = create_token(hub.sessions, "labeller", "test", "operate")
    with chromium() as browser:
        page = browser.new_page()
        open_logged_in(page, f"{hub.http_url}/datasets", token, "datasets")
        assert page.inner_text("#datasets tbody").split()[:3] == ["cnn", "2", "0"]
        page.click("#datasets a")
        until(page, "document.body?.dataset.ready === 'dataset'")
        until(page, "[...document.querySelectorAll('img.thumb')].every((img) => img.complete && img.naturalWidth > 0)")
        assert page.eval_on_selector("img.thumb", "img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
        points = page.get_attribute(f"svg[data-sample='{window.sha256}'] polyline", "points")
        assert points and len(points.split()) == 256, "a sensor window is drawn from its (picked) values"
        form = f"figure[data-sample='{image.sha256}'] form.label"
        page.fill(f"{form} input", "7")
        page.click(f"{form} button")
        until(page, f"document.querySelector(\"{form}\").dataset.saved === '7'")
    assert stored(hub)[image.sha256].label == 7 and stored(hub)[image.sha256].labelled_by == "labeller"
    with hub.sessions() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.action == "dataset.label")).one()
    assert entry.actor == "labeller" and entry.detail == {"dataset": "cnn", "sample": image.sha256, "label": 7}


def test_the_cli_lists_exports_and_purges_and_refuses_bad_input(cnn_hub, cli, tmp_path: Path) -> None:
    hub = cnn_hub
    send(hub, list(chunks_of(image_sample(hub, 40))))
    token = create_token(hub.sessions, "cli", "test", "operate")
    at = ("--hub", hub.http_url, "--token", token)
    listed = cli("dataset", "list", "--json", *at)
    assert listed.exit_code == 0 and [row["name"] for row in json.loads(listed.stdout)] == ["cnn"]
    assert cli("dataset", "export", "cnn", "-o", tmp_path / "cnn.txt", *at).exit_code == 2
    exported = cli("dataset", "export", "cnn", "-o", tmp_path / "cnn.npz", *at)
    assert exported.exit_code == 0 and np.load(tmp_path / "cnn.npz")["input"].shape == (1, 3, 32, 32)
    for bad in ("../etc", "a..b", "nope"):
        refused = cli("dataset", "purge", bad, "--yes", *at)
        assert refused.exit_code == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert cli("dataset", "purge", "cnn", *at).exit_code == 2, "purge asks for --yes"
    assert stored(hub), "nothing purged without --yes"
    purged = cli("dataset", "purge", "cnn", "--yes", *at)
    assert purged.exit_code == 0 and "1 samples deleted" in purged.stdout and stored(hub) == {}
