"""The update state machine (agents/updater.py) in a whole agent on an in-memory link: real signed bundles, real
runtimes, the hub's own BundleServer answering chunk requests; only the transport is in memory (MemoryLink).

Each bad update fails exactly one check, and its outcome is what docs/protocol.md says: an event naming the cause
(`update.failed`, `update.refused` or `update.rolled_back`), `config/reported` showing it, and the device on a bundle
it can run. The bad bundles are real: a flipped byte (hash or signature), another signing key, a bundle other than
the desired one, a model the runtime cannot load, self-test vectors that disagree with the model, a model that
cannot take the device's real input (health check after the switch).
"""

import itertools
import json
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import MemoryHubClient, ServedBundles, desired_for, signed
from brokers import wait_until
from helpers import compile_bundle

from edgekit.agents.agent import Agent
from edgekit.agents.bundles import ActiveRecord, BundleStore
from edgekit.agents.memory import MemoryLink
from edgekit.agents.transfer import CHUNK_SIZE, WINDOW
from edgekit.bundle import open_bundle, sha256_file, write_bundle
from edgekit.manifest import FileEntry, Manifest
from edgekit.protocol import DesiredState, Event, ReportedState, Result, Topic, device_topic
from edgekit.signing import generate_keypair, load_private_key, load_public_key

DEVICE = "dev-1"
EVENTS = device_topic(DEVICE, Topic.EVENTS)
RESULTS = device_topic(DEVICE, Topic.RESULTS)
REPORTED = device_topic(DEVICE, Topic.REPORTED)
OUTCOMES = {"update.refused", "update.failed", "update.rolled_back", "update.healthy"}
OLD_LABEL = "digits@1.0.0"
TIMEOUT_S = 30.0


# ---- observing the agent --------------------------------------------------------------------------------------


def _events(link: MemoryLink) -> list[Event]:
    return [Event.model_validate_json(payload) for _, payload in link.messages(EVENTS)]


def _results(link: MemoryLink) -> list[Result]:
    return [Result.model_validate_json(payload) for _, payload in link.messages(RESULTS)]


def _reported(link: MemoryLink) -> list[ReportedState]:
    return [ReportedState.model_validate_json(payload) for _, payload in link.messages(REPORTED)]


def _wait_event(link: MemoryLink, kinds: set[str] = OUTCOMES, after: int = 0) -> Event:
    """The first event of one of `kinds` with a seq above `after`."""

    def found() -> list[Event]:
        return [e for e in _events(link) if e.type in kinds and e.seq > after]

    link.wait_for(lambda _: bool(found()), TIMEOUT_S, EVENTS)
    return found()[0]


def _wait_update_state(link: MemoryLink, state: str, rev: int) -> ReportedState:
    """The latest config/reported, once it shows `state` and has converged to `rev`."""
    link.wait_for(lambda _: (r := _reported(link)[-1]).update.state == state and r.rev == rev, TIMEOUT_S, REPORTED)
    return _reported(link)[-1]


def _assert_serves(link: MemoryLink, agent: Agent, after_seq: int, bundle_id: str, label: str) -> None:
    """Results after `after_seq` come from `label` alone, which is the active bundle."""
    link.wait_for(lambda _: sum(r.seq > after_seq for r in _results(link)) >= 5, TIMEOUT_S, RESULTS)
    assert {r.bundle for r in _results(link) if r.seq > after_seq} == {label}
    assert agent.runner.model.bundle.id == bundle_id and agent.store.record().active == bundle_id


def _desire(link: MemoryLink, desired: DesiredState) -> None:
    link.deliver(device_topic(DEVICE, Topic.DESIRED), signed(desired, DEVICE))


def _not_applied(link: MemoryLink, agent: Agent, old_id: str, bad_id: str, kind: str, cause: str) -> Event:
    """An update that must not go live: the first outcome is `kind` naming `cause`, config/reported says so, and the
    old bundle keeps serving."""
    event = _wait_event(link)
    assert event.type == kind and cause in event.message, event
    assert event.data["bundle"] == bad_id, event.data
    reported = _wait_update_state(link, kind.removeprefix("update."), rev=1)
    assert reported.update.bundle == bad_id and cause in reported.update.detail, reported.update
    assert reported.bundle.id == old_id and reported.bundle.version == "1.0.0", reported.bundle
    _assert_serves(link, agent, event.seq, old_id, OLD_LABEL)
    kinds = [e.type for e in _events(link)]
    assert "update.activated" not in kinds and "update.healthy" not in kinds, kinds
    return event


def _start_on_old(start_agent: Callable[..., Agent], link: MemoryLink, digits_bundle, **settings) -> Agent:
    return start_agent(None, link=link, bundle=digits_bundle("1.0.0"), **{"source": "synthetic:?fps=20", **settings})


def _offer_from_old(
    start_agent: Callable[..., Agent], link: MemoryLink, digits_bundle, bundle: Path, kind: str, cause: str, **desired
) -> tuple[Agent, Event]:
    """An agent on digits 1.0.0 is asked (rev 1) for `bundle` as digits@1.1.0 (unless `desired` says otherwise), and
    must not apply it (_not_applied)."""
    agent = _start_on_old(start_agent, link, digits_bundle)
    _desire(link, desired_for(bundle, rev=1, **{"version": "1.1.0", "health_checks": 3, **desired}))
    event = _not_applied(link, agent, sha256_file(digits_bundle("1.0.0")), sha256_file(bundle), kind, cause)
    return agent, event


@contextmanager
def _feeding(link: MemoryLink, windows: np.ndarray, period_s: float = 0.04) -> Iterator[None]:
    """Delivers 64-value windows (a digits input) to the agent's `mqtt:` input while the block runs."""
    stop = threading.Event()

    def feed() -> None:
        for window in itertools.cycle(windows):
            if stop.wait(period_s):
                return
            link.deliver(device_topic(DEVICE, "input"), json.dumps({"values": window.tolist()}).encode())

    feeder = threading.Thread(target=feed, daemon=True, name="feeder")
    feeder.start()
    try:
        yield
    finally:
        stop.set()
        feeder.join(timeout=5)


@pytest.fixture
def digit_windows(digits: Path) -> np.ndarray:
    return np.load(digits / "test.npz")["image"][:20].reshape(20, 64)


# ---- making bad bundles ---------------------------------------------------------------------------------------


def _flip_byte(bundle: Path, member: str, out: Path) -> Path:
    """A copy of `bundle` with one byte flipped in the middle of `member`'s data (the tar header stays intact)."""
    shutil.copyfile(bundle, out)
    with tarfile.open(bundle) as tar:
        info = tar.getmember(member)
    position = info.offset_data + info.size // 2
    with out.open("r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert sha256_file(out) != sha256_file(bundle)
    return out


def _resigned(bundle: Path, keys: tuple[Path, Path], scratch: Path, change: Callable[[Path, Manifest], None]) -> Path:
    """`bundle` with `change(unpacked root, manifest)` made to its files, re-hashed and re-signed with the trusted
    key: signature and hashes verify, so only a later check can catch it."""
    root = scratch / "unpacked"
    manifest = open_bundle(bundle, root, load_public_key(keys[1]))
    change(root, manifest)
    files = [FileEntry(path=e.path, sha256=sha256_file(root / e.path), size=(root / e.path).stat().st_size)
             for e in manifest.files]  # fmt: skip
    changed = Manifest.model_validate({**manifest.model_dump(), "files": [f.model_dump() for f in files]})
    assert changed.files != manifest.files
    out = scratch / f"resigned-{bundle.name}"
    write_bundle(root, changed, load_private_key(keys[0]), out)
    return out


def _wrong_selftest_outputs(root: Path, manifest: Manifest) -> None:
    vectors = root / manifest.selftest.file
    with np.load(vectors, allow_pickle=False) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    outputs = [name for name in arrays if name.startswith("out.")]
    assert outputs, arrays.keys()
    for name in outputs:
        peak = float(np.max(np.abs(arrays[name])))
        # Far beyond the tolerance (2% of the peak): reversed order along the class axis, shifted by the peak.
        arrays[name] = (arrays[name][..., ::-1] + 10 * (peak + 1)).astype(arrays[name].dtype)
    with vectors.open("wb") as handle:
        np.savez(handle, **arrays)


def _garbage_model(root: Path, manifest: Manifest) -> None:
    (root / manifest.entrypoint).write_bytes(b"not an ONNX model" * 64)


def _installed(data: Path, public_key: Path, record: ActiveRecord, **bundles: Path) -> dict[str, str]:
    """Bundles installed in the agent's data dir as an earlier run would have left them; `record` names them by
    their keyword (active="new", previous="old") and becomes active.json. Returns {keyword: bundle id}."""
    store = BundleStore(data)
    ids = {name: store.install(path, load_public_key(public_key)).id for name, path in bundles.items()}
    store.set_record(ActiveRecord(active=ids[record.active], previous=ids[record.previous], trial=record.trial))
    return ids


# ---- an update that goes through ------------------------------------------------------------------------------


def test_update_goes_through_every_phase_and_keeps_the_previous_bundle(
    start_agent, link, served_in_memory, digits_bundle
):
    old_id, new = sha256_file(digits_bundle("1.0.0")), digits_bundle("1.1.0")
    new_id = served_in_memory.add(new)
    agent = _start_on_old(start_agent, link, digits_bundle)
    _desire(link, desired_for(new, rev=1, version="1.1.0", health_checks=3))
    event = _wait_event(link)
    assert event.type == "update.healthy" and event.data["bundle"] == new_id, event
    reported = _wait_update_state(link, "healthy", rev=1)
    assert reported.bundle.id == new_id and reported.previous_bundle.id == old_id
    phases = [key for key, _ in itertools.groupby(r.update.state for r in _reported(link) if r.update.bundle)]
    assert phases == ["downloading", "verifying", "testing", "switching", "healthy"]
    steps = [e.type for e in _events(link) if e.type.startswith("update.") and e.type != "update.progress"]
    assert steps == ["update.started", "update.downloaded", "update.selftest", "update.activated", "update.healthy"]
    _assert_serves(link, agent, event.seq, new_id, "digits@1.1.0")
    assert agent.store.record() == ActiveRecord(active=new_id, previous=old_id)


# ---- fetching fails: update.failed ----------------------------------------------------------------------------


def test_server_error_fails_the_update(start_agent, link, served_in_memory, digits_bundle):
    """The server does not have the bundle and answers with an error chunk."""
    unknown = digits_bundle("1.1.0")
    _, event = _offer_from_old(start_agent, link, digits_bundle, unknown, "update.failed", "unknown bundle")
    assert "the server cannot send bundle" in event.message


def test_sha256_mismatch_fails_the_update_and_discards_the_download(
    start_agent, link, served_in_memory, digits_bundle, tmp_path
):
    """Every chunk matches its own header, the whole file does not match the bundle id: the server sends other bytes
    of the same size (a tampered registry)."""
    new = digits_bundle("1.1.0")
    new_id = sha256_file(new)
    served_in_memory.files[new_id] = _flip_byte(new, "artifacts/model.onnx", tmp_path / "tampered.ekb")
    agent, _ = _offer_from_old(start_agent, link, digits_bundle, new, "update.failed",
                               "the downloaded bundle's sha256 does not match the desired bundle id")  # fmt: skip
    assert "update.downloaded" not in [e.type for e in _events(link)]
    # Nothing is kept to resume from: the next attempt downloads from the start.
    assert not list((agent.settings.data_dir / "downloads").iterdir())
    assert not agent.store.has(new_id)


@contextmanager
def _stalling_server(link: MemoryLink, bundle: Path) -> Iterator[str]:
    """The hub's BundleServer answering only the first chunk request: the download stalls after one window of
    chunks, however often the agent asks again. Yields the bundle id."""
    stalling = ServedBundles(MemoryHubClient(link))
    bundle_id = stalling.add(bundle)
    answered: list[bytes] = []

    def first_request_only(client, userdata, message) -> None:
        if not answered:
            answered.append(message.payload)
            stalling.server.on_request(client, userdata, message)

    MemoryHubClient(link).message_callback_add(stalling.server.topic_filter, first_request_only)
    stalling.server.start(route=False)
    try:
        yield bundle_id
    finally:
        stalling.close()


def test_a_stalled_download_fails_at_its_deadline_and_the_next_rev_resumes_with_a_fresh_one(
    start_agent, digits_bundle, big_bundle
):
    """Deadline 3 s, a server that stops answering after one window: update.failed names the deadline, the rev
    converges (the next one is taken), the chunks stay on disk, and rev 2 resumes them under a fresh deadline."""
    old_id = sha256_file(digits_bundle("1.0.0"))
    link = MemoryLink()
    with _stalling_server(link, big_bundle) as big_id:
        agent = _start_on_old(start_agent, link, digits_bundle, update_deadline_s=3)
        _desire(link, desired_for(big_bundle, rev=1, version="2.0.0", health_checks=3))
        failed = _wait_event(link)
        assert failed.type == "update.failed", failed
        deadline = "no complete bundle within the update's deadline of 3 s of downloading"
        progress = f"{WINDOW * CHUNK_SIZE} of {big_bundle.stat().st_size} bytes"
        assert failed.message.startswith(f"{deadline}: {progress}"), failed.message
        assert _wait_update_state(link, "failed", rev=1).bundle.id == old_id
        spent = json.loads((agent.settings.data_dir / "downloads" / f"{big_id}.json").read_text())
        assert (spent["attempt"], spent["seconds"]) == (1, 3.0), spent
        served = ServedBundles(MemoryHubClient(link))
        served.add(big_bundle)
        served.server.start()
        try:
            _desire(link, desired_for(big_bundle, rev=2, version="2.0.0", health_checks=3))
            healthy = _wait_event(link, after=failed.seq)
        finally:
            served.close()
    assert healthy.type == "update.healthy" and healthy.data["bundle"] == big_id, healthy
    resumed = next(e for e in _events(link) if e.type == "update.progress" and e.seq > failed.seq)
    assert resumed.message.startswith(f"resuming download at chunk {WINDOW}/"), resumed


def test_stopping_during_a_download_fails_the_update_and_the_next_start_resumes_it(
    start_agent, digits_bundle, big_bundle
):
    old_id = sha256_file(digits_bundle("1.0.0"))
    first = MemoryLink()
    with _stalling_server(first, big_bundle) as big_id:
        agent = _start_on_old(start_agent, first, digits_bundle)
        _desire(first, desired_for(big_bundle, rev=1, version="2.0.0", health_checks=3))
        part = agent.settings.data_dir / "downloads" / f"{big_id}.part"
        wait_until(lambda: part.is_file() and part.stat().st_size == WINDOW * CHUNK_SIZE, TIMEOUT_S,
                   "the first window of chunks on disk")  # fmt: skip
        agent.stop()
    event = _wait_event(first)
    assert event.type == "update.failed" and event.message == "agent stopping during download", event
    assert _reported(first)[-1].update.state == "failed"
    assert agent.store.record().active == old_id and not agent.store.has(big_id)

    # Restarted, and asked again (a failed update counts as converged: the hub retries under a new rev), it
    # resumes the download where it stopped.
    second = MemoryLink()
    served = ServedBundles(MemoryHubClient(second))
    served.add(big_bundle)
    served.server.start()
    try:
        restarted = _start_on_old(start_agent, second, digits_bundle)
        _desire(second, desired_for(big_bundle, rev=2, version="2.0.0", health_checks=3))
        healthy = _wait_event(second)
        assert healthy.type == "update.healthy" and healthy.data["bundle"] == big_id, healthy
        resumed = next(e for e in _events(second) if e.type == "update.progress")
        assert resumed.message == f"resuming download at chunk {WINDOW}/{-(-big_bundle.stat().st_size // CHUNK_SIZE)}"
        assert resumed.data == {"bundle": big_id, "received": WINDOW * CHUNK_SIZE}
        assert restarted.store.record() == ActiveRecord(active=big_id, previous=old_id)
    finally:
        served.close()


# ---- the bundle is not trusted or not the desired one: update.refused -----------------------------------------


@pytest.mark.parametrize(
    ("member", "cause"),
    [
        ("artifacts/model.onnx", "artifacts/model.onnx sha256 does not match the manifest"),
        ("manifest.json", "signature check failed"),
    ],
    ids=["artifact", "manifest"],
)
def test_flipped_byte_is_refused(
    start_agent, link, served_in_memory, digits_bundle, tmp_path: Path, member: str, cause: str
):
    bad = _flip_byte(digits_bundle("1.1.0"), member, tmp_path / "digits-1.1.0-flipped.ekb")
    bad_id = served_in_memory.add(bad)
    # The desired state names the modified file, so the transfer itself succeeds.
    agent, _ = _offer_from_old(start_agent, link, digits_bundle, bad, "update.refused", cause)
    assert "update.downloaded" in [e.type for e in _events(link)]
    assert not agent.store.has(bad_id)


def test_bundle_signed_by_another_key_is_refused(
    start_agent, link, served_in_memory, digits_bundle, digits: Path, tmp_path: Path
):
    other_private, _ = generate_keypair(tmp_path / "other-key")
    bad = compile_bundle(digits, digits / "calibration.npz", other_private, "1.1.0", tmp_path / "other-key.ekb")
    bad_id = served_in_memory.add(bad)
    agent, event = _offer_from_old(start_agent, link, digits_bundle, bad, "update.refused", "signature check failed")
    assert "not signed by a trusted key" in event.message
    assert not agent.store.has(bad_id)


@pytest.mark.parametrize(("name", "version"), [("digits", "1.1.0"), ("thermostat", "1.2.0")], ids=["version", "name"])
def test_bundle_other_than_the_desired_one_is_refused(
    start_agent, link, served_in_memory, digits_bundle, name: str, version: str
):
    """A genuine, signed bundle, but not the name@version the desired state asks for."""
    actual = digits_bundle("1.2.0")
    actual_id = served_in_memory.add(actual)
    cause = f"the bundle is digits@1.2.0, desired state says {name}@{version}"
    agent, _ = _offer_from_old(start_agent, link, digits_bundle, actual, "update.refused", cause, name=name,
                               version=version)  # fmt: skip
    assert not agent.store.has(actual_id)


def test_without_a_trust_key_every_bundle_is_refused(start_agent, link, served_in_memory, digits_bundle):
    bundle = digits_bundle("1.0.0")
    bundle_id = served_in_memory.add(bundle)
    agent = start_agent(None, link=link, trust_key=None)
    _desire(link, desired_for(bundle, rev=1, version="1.0.0"))
    event = _wait_event(link)
    assert event.type == "update.refused", event
    assert event.message == "no trust key configured (--trust-key): refusing unverifiable bundles"
    reported = _wait_update_state(link, "refused", rev=1)
    assert reported.update.bundle == bundle_id and reported.bundle is None
    assert agent.runner.model is None and not agent.store.has(bundle_id)
    # Refused before the download: nothing was fetched that could never be verified.
    assert "update.downloaded" not in [e.type for e in _events(link)]
    assert not list((agent.settings.data_dir / "downloads").glob("*"))


def test_downgrade_is_refused_unless_allowed(start_agent, link, served_in_memory, digits_bundle):
    newer, older = digits_bundle("1.1.0"), digits_bundle("1.0.0")
    newer_id, older_id = sha256_file(newer), served_in_memory.add(older)
    agent = start_agent(None, link=link, bundle=newer, source="synthetic:?fps=20")
    _desire(link, desired_for(older, rev=1, version="1.0.0", health_checks=3))
    event = _wait_event(link)
    assert event.type == "update.refused", event
    assert "version downgrade from 1.1.0 to 1.0.0 refused" in event.message and "allow_downgrade" in event.message
    reported = _wait_update_state(link, "refused", rev=1)
    assert reported.update.bundle == older_id and "downgrade" in reported.update.detail
    assert reported.bundle.id == newer_id
    # The newer bundle keeps serving; nothing was downloaded.
    _assert_serves(link, agent, event.seq, newer_id, "digits@1.1.0")
    kinds = [e.type for e in _events(link)]
    assert "update.started" not in kinds and "update.downloaded" not in kinds, kinds

    # Forced with allow_downgrade, under a new rev: accepted, and 1.0.0 goes live.
    _desire(link, desired_for(older, rev=2, version="1.0.0", health_checks=3, allow_downgrade=True))
    healthy = _wait_event(link, after=event.seq)
    assert healthy.type == "update.healthy" and healthy.data["bundle"] == older_id, healthy
    reported = _wait_update_state(link, "healthy", rev=2)
    assert reported.bundle.id == older_id and reported.previous_bundle.id == newer_id
    _assert_serves(link, agent, healthy.seq, older_id, OLD_LABEL)


# ---- the bundle does not run: update.refused ------------------------------------------------------------------


def test_bundle_the_runtime_cannot_load_is_refused(
    start_agent, link, served_in_memory, digits_bundle, signing_keys, tmp_path: Path
):
    bad = _resigned(digits_bundle("1.1.0"), signing_keys, tmp_path, _garbage_model)
    bad_id = served_in_memory.add(bad)
    agent, _ = _offer_from_old(start_agent, link, digits_bundle, bad, "update.refused",
                               "onnxruntime cannot load artifacts/model.onnx")  # fmt: skip
    assert "update.selftest" not in [e.type for e in _events(link)]
    assert not agent.store.has(bad_id)


def test_selftest_mismatch_is_refused_and_the_bundle_removed(
    start_agent, link, served_in_memory, digits_bundle, signing_keys, tmp_path: Path
):
    bad = _resigned(digits_bundle("1.1.0"), signing_keys, tmp_path, _wrong_selftest_outputs)
    bad_id = served_in_memory.add(bad)
    agent, _ = _offer_from_old(start_agent, link, digits_bundle, bad, "update.refused",
                               "self-test failed: output 0 differs")  # fmt: skip
    selftest = [e for e in _events(link) if e.type == "update.selftest"]
    assert len(selftest) == 1 and selftest[0].data["passed"] is False and selftest[0].level == "error"
    assert not agent.store.has(bad_id)


# ---- the bundle fails on the device's input: update.rolled_back -----------------------------------------------


def test_health_check_failure_rolls_back_to_the_previous_bundle(
    start_agent, link, served_in_memory, digits_bundle, cnn_bundle: Path, digit_windows
):
    """The CNN passes its own self-test, but the device's input is 64-value windows it cannot take: the health
    check fails after the switch and the agent goes back to digits 1.0.0."""
    old_id, cnn_id = sha256_file(digits_bundle("1.0.0")), served_in_memory.add(cnn_bundle)
    agent = _start_on_old(start_agent, link, digits_bundle, source="mqtt:")
    with _feeding(link, digit_windows):
        link.wait_for(lambda _: len(_results(link)) >= 3, TIMEOUT_S, RESULTS)
        _desire(link, desired_for(cnn_bundle, rev=1, version="1.0.0", name="cnn", health_checks=5))
        event = _wait_event(link)
        assert event.type == "update.rolled_back", event
        assert "cnn@1.0.0 failed its health check" in event.message, event.message
        assert "cannot feed input" in event.message and f"back to {OLD_LABEL}" in event.message
        assert event.data["bundle"] == cnn_id
        kinds = [e.type for e in _events(link)]
        for step in ("update.downloaded", "update.selftest", "update.activated", "inference.error"):
            assert step in kinds, kinds
        assert next(e for e in _events(link) if e.type == "update.selftest").data["passed"] is True
        reported = _wait_update_state(link, "rolled_back", rev=1)
        assert reported.update.bundle == cnn_id and "cannot feed input" in reported.update.detail
        assert reported.bundle.id == old_id
        # No result ever came from the CNN; digits 1.0.0 serves again after the rollback.
        assert {r.bundle for r in _results(link)} == {OLD_LABEL}
        _assert_serves(link, agent, event.seq, old_id, OLD_LABEL)
    assert not agent.store.has(cnn_id)
    assert agent.store.record() == ActiveRecord(active=old_id)


def test_health_check_failure_with_an_unloadable_previous_bundle_rolls_back_to_no_bundle(
    start_agent, link, served_in_memory, digits_bundle, cnn_bundle: Path, digit_windows
):
    old_id, cnn_id = sha256_file(digits_bundle("1.0.0")), served_in_memory.add(cnn_bundle)
    agent = _start_on_old(start_agent, link, digits_bundle, source="mqtt:")
    with _feeding(link, digit_windows):
        link.wait_for(lambda _: len(_results(link)) >= 3, TIMEOUT_S, RESULTS)
        # The old session stays loaded; the copy on disk that a rollback would load is broken.
        old = agent.store.get(old_id)
        (old.root / old.manifest.entrypoint).write_bytes(b"not an ONNX model")
        _desire(link, desired_for(cnn_bundle, rev=1, version="1.0.0", name="cnn", health_checks=5))
        event = _wait_event(link)
    assert event.type == "update.rolled_back", event
    assert "cnn@1.0.0 failed its health check" in event.message and "cannot feed input" in event.message
    assert "the previous bundle cannot be loaded either" in event.message
    assert event.message.endswith("back to no bundle")
    reported = _wait_update_state(link, "rolled_back", rev=1)
    assert "the previous bundle cannot be loaded either" in reported.update.detail
    assert reported.bundle is None and agent.runner.model is None
    assert not agent.store.has(cnn_id) and agent.store.record() == ActiveRecord()


# ---- what a restart finds -------------------------------------------------------------------------------------


def test_a_health_check_cut_short_by_a_restart_resumes_and_keeps_a_healthy_bundle(
    start_agent, link, digits_bundle, signing_keys, tmp_path: Path
):
    ids = _installed(tmp_path / DEVICE, signing_keys[1], ActiveRecord(active="new", previous="old", trial=True),
                     old=digits_bundle("1.0.0"), new=digits_bundle("1.1.0"))  # fmt: skip
    agent = start_agent(None, link=link, source="synthetic:?fps=20")
    event = _wait_event(link)
    assert event.type == "update.healthy" and event.data["bundle"] == ids["new"], event
    # No desired state yet: the default number of health checks.
    assert event.message == f"digits@1.1.0: {DesiredState(rev=0).health_checks} inferences ok"
    assert agent.store.record() == ActiveRecord(active=ids["new"], previous=ids["old"])


def test_a_health_check_cut_short_by_a_restart_resumes_and_rolls_back_a_failing_bundle(
    start_agent, link, digits_bundle, cnn_bundle, signing_keys, tmp_path: Path, digit_windows
):
    ids = _installed(tmp_path / DEVICE, signing_keys[1], ActiveRecord(active="new", previous="old", trial=True),
                     old=digits_bundle("1.0.0"), new=cnn_bundle)  # fmt: skip
    with _feeding(link, digit_windows):
        agent = start_agent(None, link=link, source="mqtt:")
        event = _wait_event(link)
        assert event.type == "update.rolled_back" and event.data["bundle"] == ids["new"], event
        assert f"back to {OLD_LABEL}" in event.message
        _assert_serves(link, agent, event.seq, ids["old"], OLD_LABEL)
    assert agent.store.record() == ActiveRecord(active=ids["old"]) and not agent.store.has(ids["new"])


def test_an_unloadable_active_bundle_falls_back_to_the_previous_at_start(
    start_agent, link, digits_bundle, signing_keys, tmp_path: Path
):
    ids = _installed(tmp_path / DEVICE, signing_keys[1], ActiveRecord(active="new", previous="old"),
                     old=digits_bundle("1.0.0"), new=digits_bundle("1.1.0"))  # fmt: skip
    new = BundleStore(tmp_path / DEVICE).get(ids["new"])
    (new.root / new.manifest.entrypoint).write_bytes(b"not an ONNX model")
    agent = start_agent(None, link=link, source="synthetic:?fps=20")
    failed = _wait_event(link, {"update.failed"})
    assert failed.message.startswith(f"cannot load bundle {ids['new'][:12]}: onnxruntime cannot load"), failed
    rolled_back = _wait_event(link, {"update.rolled_back"})
    assert rolled_back.message == f"fell back to {OLD_LABEL}" and rolled_back.seq > failed.seq
    assert agent.store.record() == ActiveRecord(active=ids["old"], previous=ids["new"])
    _assert_serves(link, agent, rolled_back.seq, ids["old"], OLD_LABEL)


def test_stopping_during_a_health_check_without_input_leaves_it_for_the_restart(
    start_agent, link, served_in_memory, digits_bundle
):
    """No input arrives, so the trial would wait out its 120 s timeout: stop() ends it at once (the control thread
    finishes instead of being abandoned with the outbox closed under it), and active.json keeps the trial."""
    new = digits_bundle("1.1.0")
    new_id = served_in_memory.add(new)
    agent = _start_on_old(start_agent, link, digits_bundle, source="mqtt:")
    _desire(link, desired_for(new, rev=1, version="1.1.0", health_checks=3))
    _wait_event(link, {"update.activated"})
    agent.stop()
    assert not [t.name for t in agent._threads if t.is_alive()]
    assert agent.store.record().active == new_id and agent.store.record().trial
