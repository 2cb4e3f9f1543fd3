"""Bundle downloads over HTTP: signed links any replica honours, range requests, bundle bytes in the database
(edgekit.hub.downloads, edgekit.hub.store), and the agent's HTTP fetcher with its fallback to chunks over MQTT.
Real hubs, a real agent, real HTTP."""

import hashlib
import os
import threading
import time

import httpx
import pytest
from brokers import Subscriber, wait_until
from hub_helpers import desired_of, fleet, fleet_ids, wait_devices_reported, watcher_url
from reliability import record
from sqlalchemy import delete, select, update

from edgekit.agents.http_fetch import HttpFetcher
from edgekit.agents.transfer import Fetched, FetchFailed, FetchLimits
from edgekit.bundle import sha256_file
from edgekit.hub.broker import free_port
from edgekit.hub.db import BundlePart, Deployment, EventRecord
from edgekit.hub.store import PART_SIZE
from edgekit.protocol import DesiredBundle, DesiredState

TIMEOUT_S = 60.0
ATTACK = "attack: download links forged or reused"


def _get(url: str, **headers: str) -> httpx.Response:
    return httpx.get(url, headers=headers, timeout=10)


def test_a_link_opens_its_bundle_in_ranges_for_its_device_until_it_expires(make_hub, cnn_bundles) -> None:
    hub = make_hub()
    pushed, _ = hub.registry.add(cnn_bundles["v1"], "test")
    data = cnn_bundles["v1"].read_bytes()
    (url,) = hub.links.urls(pushed.id, "cam-1", time.time() + 60)
    assert url.startswith(hub.http_url + f"/dl/{pushed.id}?")

    whole = _get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    tail = _get(url, Range="bytes=1000-")
    assert tail.status_code == 206 and tail.content == data[1000:]
    assert tail.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"

    refused = {
        "another device": url.replace("device=cam-1", "device=cam-2"),
        "a flipped signature": url[:-1] + ("0" if url[-1] != "0" else "1"),
        "another bundle": url.replace(pushed.id, "0" * 64),
        "an expiry moved later": url.replace("expires=", "expires=9"),
    }
    (expired,) = hub.links.urls(pushed.id, "cam-1", time.time() - 1)
    answers = {what: _get(bad) for what, bad in refused.items()} | {"an expired link": _get(expired)}
    for what, answer in answers.items():
        record(ATTACK, f"bundle bytes served for {what}", int(answer.status_code != 403), 0)
    for what in refused:
        assert (answers[what].status_code, answers[what].json()["detail"]) == (403, "download link: bad signature")
    assert "expired" in answers["an expired link"].json()["detail"]
    (unknown,) = hub.links.urls("ab" * 32, "cam-1", time.time() + 60)
    assert _get(unknown).status_code == 404
    assert _get(url.replace("device=cam-1", "device=..%2Fx")).status_code == 422  # not a device id


def test_a_bundle_pushed_to_one_replica_is_served_by_another_from_the_database(make_hub, cnn_bundles, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    a, b = make_hub(db=db), make_hub(db=db)
    pushed, _ = a.registry.add(cnn_bundles["v1"], "test")
    assert not (b.registry.dir / f"{pushed.id}.ekb").exists()
    (url,) = b.links.urls(pushed.id, "cam-1", time.time() + 60)  # signed by B, checked by A: one shared key
    assert _get(url.replace(b.http_url, a.http_url)).content == cnn_bundles["v1"].read_bytes()
    from_b = _get(url)
    assert from_b.status_code == 200 and hashlib.sha256(from_b.content).hexdigest() == pushed.id
    assert sha256_file(b.registry.dir / f"{pushed.id}.ekb") == pushed.id  # B's copy, checked before it served it

    other, _ = a.registry.add(cnn_bundles["v2"], "test")
    with a.sessions.begin() as session:  # a bad disk under the database: one byte of the stored bytes changed
        part = session.scalar(select(BundlePart).where(BundlePart.bundle_id == other.id, BundlePart.part == 0))
        damaged = bytes([part.data[0] ^ 1]) + part.data[1:]
        session.execute(update(BundlePart).where(BundlePart.bundle_id == other.id).values(data=damaged))
    (url,) = b.links.urls(other.id, "cam-1", time.time() + 60)
    assert _get(url).status_code == 404  # never bytes that do not hash to the id
    assert not (b.registry.dir / f"{other.id}.ekb").exists()


def test_bundles_that_an_older_hub_kept_only_as_files_move_into_the_database(make_hub, cnn_bundles, tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    old = make_hub(db=db, data_dir=tmp_path / "old")
    pushed, _ = old.registry.add(cnn_bundles["v1"], "test")
    with old.sessions.begin() as session:  # as a hub from before shared storage left it: a row and a file
        session.execute(delete(BundlePart))
    old.stop()
    upgraded = make_hub(db=db, data_dir=tmp_path / "old")  # the same data dir, started by this hub
    assert upgraded.registry.store.has(pushed.id)
    with upgraded.sessions() as session:
        parts = session.scalars(select(BundlePart.part).where(BundlePart.bundle_id == pushed.id)).all()
    assert parts == list(range(-(-pushed.size // PART_SIZE)))
    other = make_hub(db=db)
    assert sha256_file(other.registry.path(pushed.id)) == pushed.id


class _Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    def __call__(self, type: str, message: str, **data) -> None:
        self.seen.append((type, message, data))

    def messages(self, type: str, containing: str = "") -> list[str]:
        return [message for kind, message, _ in self.seen if kind == type and containing in message]


class _NoChunks:
    """The fallback fetcher when a test expects HTTP to suffice: asked, it fails the download (and the test)."""

    asked = 0

    def fetch(self, target, report, stopping, limits, base) -> Fetched:
        self.asked += 1
        raise FetchFailed("no MQTT fallback in this test")


def test_a_cut_download_resumes_with_a_range_request(make_hub, tmp_path) -> None:
    """1.5 MiB of bytes served as a bundle (the fetcher checks only the sha256; the updater then checks the
    signature), 600 kB of it already on disk from a cut download."""
    hub = make_hub()
    data = os.urandom(1536 * 1024)
    bundle_id = hashlib.sha256(data).hexdigest()
    (hub.registry.dir / f"{bundle_id}.ekb").write_bytes(data)
    (url,) = hub.links.urls(bundle_id, "cam-1", time.time() + 60)
    target = DesiredBundle(id=bundle_id, name="blob", version="1", size=len(data), urls=[url])
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / f"{bundle_id}.part").write_bytes(data[:600_000])  # cut mid-chunk: resumes at the chunk boundary
    events, chunks = _Events(), _NoChunks()
    fetched = HttpFetcher(chunks, folder).fetch(target, events, threading.Event(),
                                                FetchLimits(attempt=1, deadline_s=60, retries=3), None)  # fmt: skip
    resumed_at = 2 * 256 * 1024
    assert (fetched.via, fetched.transport, fetched.received) == ("full", "http", len(data) - resumed_at)
    assert fetched.path.read_bytes() == data
    assert events.messages("update.progress")[0] == f"resuming download at byte {resumed_at} of {len(data)}"
    assert chunks.asked == 0 and not (folder / f"{bundle_id}.part").exists()


def test_bad_links_are_reported_and_the_next_one_or_chunks_over_mqtt_are_used(make_hub, tmp_path) -> None:
    hub = make_hub()
    data = os.urandom(300_000)
    bundle_id = hashlib.sha256(data).hexdigest()
    (hub.registry.dir / f"{bundle_id}.ekb").write_bytes(data)
    (good,) = hub.links.urls(bundle_id, "cam-1", time.time() + 60)
    (expired,) = hub.links.urls(bundle_id, "cam-1", time.time() - 1)
    closed = f"http://127.0.0.1:{free_port()}/dl/{bundle_id}?device=cam-1&expires=1&sig=00"
    limits = FetchLimits(attempt=1, deadline_s=60, retries=3)

    events, chunks = _Events(), _NoChunks()
    target = DesiredBundle(id=bundle_id, name="blob", version="1", size=len(data), urls=[closed, expired, good])
    fetched = HttpFetcher(chunks, tmp_path / "a").fetch(target, events, threading.Event(), limits, None)
    assert fetched.path.read_bytes() == data and chunks.asked == 0
    refused, expiry = events.messages("update.progress", " failed (")
    assert refused.startswith(f"download from http://127.0.0.1:{closed.split(':')[2].split('/')[0]}/dl/{bundle_id} "
                              "failed (") and refused.endswith("trying the next link")  # fmt: skip
    assert "HTTP 403" in expiry and "expired" in expiry and "sig=" not in expiry + refused

    wrong_size = DesiredBundle(id=bundle_id, name="blob", version="1", size=len(data) + 1, urls=[good])
    events = _Events()
    with pytest.raises(FetchFailed, match="no MQTT fallback"):
        HttpFetcher(chunks, tmp_path / "b").fetch(wrong_size, events, threading.Event(), limits, None)
    (problem,) = events.messages("update.progress", " failed (")
    assert f"sends {len(data)} bytes, the desired bundle has {len(data) + 1}" in problem
    assert problem.endswith("trying chunks over MQTT") and chunks.asked == 1


def test_devices_that_cannot_reach_the_links_update_over_mqtt(make_hub, cnn_bundles, tmp_path) -> None:
    hub = make_hub(public_urls=(f"http://127.0.0.1:{free_port()}",))  # an address nothing listens on
    hub.registry.add(cnn_bundles["v1"], "test")
    pushed, _ = hub.registry.add(cnn_bundles["v2"], "test")
    with fleet(hub, 2, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="far"):
        ids = fleet_ids("far", 2)
        wait_devices_reported(hub, ids)
        deployment = hub.rollouts.create(pushed.id, "all", wave_timeout_s=90, actor="test", health_checks=3)

        def ended() -> Deployment | None:
            with hub.sessions() as session:
                row = session.get(Deployment, deployment.id)
            return row if row.state in ("completed", "halted") else None

        assert wait_until(ended, TIMEOUT_S, "the rollout to end").state == "completed"
        with hub.sessions() as session:
            events = session.scalars(select(EventRecord).where(EventRecord.device_id.in_(ids))).all()
    downloaded = [e for e in events if e.type == "update.downloaded"]
    assert sorted(e.device_id for e in downloaded) == ids
    assert {e.data["transport"] for e in downloaded} == {"mqtt"}
    fallbacks = [e for e in events if e.type == "update.progress" and "trying chunks over MQTT" in e.message]
    assert sorted(e.device_id for e in fallbacks) == ids


def test_links_go_only_to_agents_that_take_them(make_hub, cnn_bundles) -> None:
    """Agents before 0.2 refuse fields they do not know: their desired states carry no links (chunks over MQTT)."""
    hub = make_hub()
    pushed, _ = hub.registry.add(cnn_bundles["v1"], "test")
    ref = DesiredBundle(id=pushed.id, name="cnn", version="1.0.0", size=pushed.size)
    versions = {"cam-old": "0.1.0", "cam-new": "0.2.0", "cam-silent": None}  # as their statuses said
    with Subscriber(watcher_url(hub), "edgekit/v1/+/config/desired") as watcher:
        for device_id, version in versions.items():
            hub.send_desired(device_id, DesiredState(rev=1, bundle=ref), version)
        received = watcher.wait_count(3, "edgekit/v1/+/config/desired")
    urls = {topic.split("/")[2]: desired_of(payload).desired.bundle.urls for topic, payload in received}
    assert urls["cam-old"] is None and urls["cam-silent"] is None  # not even an empty list: a 0.1 agent refuses it
    assert [url.split("?")[0] for url in urls["cam-new"]] == [f"{hub.http_url}/dl/{pushed.id}"]
