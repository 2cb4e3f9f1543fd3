"""Updates the agent must refuse or roll back, on both brokers: the old bundle keeps serving, an event says why,
and `config/reported` shows the outcome.

Each bad bundle is real and fails exactly one check: a flipped byte (hash or signature), another signing key,
a version downgrade, self-test vectors that disagree with the model, and a bundle whose model cannot take the
device's real input (health check after the switch).
"""

import json
import shutil
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from agent_helpers import ServedBundles, desired_for, sequenced
from brokers import Subscriber, host_port, publish
from typer.testing import CliRunner

from edgekit.agents.agent import Agent
from edgekit.bundle import open_bundle, sha256_file, write_bundle
from edgekit.cli import app
from edgekit.hub.broker import EmbeddedBroker
from edgekit.manifest import FileEntry, Manifest
from edgekit.protocol import DesiredState, Event, ReportedState, Result, Status, device_topic, encode
from edgekit.signing import generate_keypair, load_private_key, load_public_key

DEVICE = "dev-1"
TOPICS = f"edgekit/v1/{DEVICE}/#"
EVENTS = f"edgekit/v1/{DEVICE}/events"
RESULTS = f"edgekit/v1/{DEVICE}/results"
REPORTED = f"edgekit/v1/{DEVICE}/config/reported"
STATUS = f"edgekit/v1/{DEVICE}/status"
OLD_LABEL = "digits@1.0.0"
TIMEOUT_S = 30.0


# ---- observing the agent --------------------------------------------------------------------------------------


def _events(sub: Subscriber) -> list[Event]:
    return sequenced(sub.messages(EVENTS), Event)


def _results(sub: Subscriber) -> list[Result]:
    return sequenced(sub.messages(RESULTS), Result)


def _wait_event(sub: Subscriber, kinds: set[str], timeout: float = TIMEOUT_S, after: int = 0) -> Event:
    """The first event of one of `kinds` with a seq above `after`."""

    def found() -> list[Event]:
        return [e for e in _events(sub) if e.type in kinds and e.seq > after]

    sub.wait_for(lambda _: bool(found()), timeout, EVENTS)
    return found()[0]


def _wait_update_state(sub: Subscriber, state: str, rev: int, timeout: float = TIMEOUT_S) -> ReportedState:
    """The latest retained config/reported, once it shows `state` and has converged to `rev`."""

    def latest() -> ReportedState | None:
        messages = sub.messages(REPORTED)
        return ReportedState.model_validate_json(messages[-1][1]) if messages else None

    sub.wait_for(lambda _: (r := latest()) is not None and r.update.state == state and r.rev == rev, timeout, REPORTED)
    return latest()


def _assert_old_keeps_serving(sub: Subscriber, agent: Agent, after_seq: int, old_id: str, count: int = 5) -> None:
    """At least `count` results after `after_seq`, all from the old bundle, which is still the active one."""
    sub.wait_for(lambda _: sum(r.seq > after_seq for r in _results(sub)) >= count, TIMEOUT_S, RESULTS)
    later = [r.bundle for r in _results(sub) if r.seq > after_seq]
    assert later and set(later) == {OLD_LABEL}, later
    model = agent.runner.model
    assert (model.bundle.manifest.name, model.bundle.manifest.version) == ("digits", "1.0.0")
    assert agent.store.record().active == old_id and model.bundle.id == old_id


def _started(sub: Subscriber, start_agent: Callable[..., Agent], broker: EmbeddedBroker, **settings) -> Agent:
    """An agent that is online (so it is subscribed) and already producing results."""
    agent = start_agent(broker, **settings)
    sub.wait_for(lambda ms: any(Status.model_validate_json(p).state == "online" for _, p in ms), TIMEOUT_S, STATUS)
    return agent


def _desire(broker: EmbeddedBroker, desired: DesiredState) -> None:
    publish(broker.url, device_topic(DEVICE, "config/desired"), encode(desired), retain=True)


def _refused_then_old_serves(
    sub: Subscriber, agent: Agent, old_id: str, bad_id: str, kind: str, state: str, cause: str, rev: int = 1
) -> Event:
    """Common checks (a)-(d) for an update that must not go live."""
    event = _wait_event(sub, {"update.refused", "update.failed", "update.rolled_back", "update.healthy"})
    assert event.type == kind, event
    assert cause in event.message, event.message
    assert event.data.get("bundle") == bad_id, event.data
    reported = _wait_update_state(sub, state, rev)
    assert reported.update.bundle == bad_id and cause in reported.update.detail, reported.update
    assert reported.bundle.id == old_id and reported.bundle.version == "1.0.0", reported.bundle
    _assert_old_keeps_serving(sub, agent, event.seq, old_id)
    kinds = [e.type for e in _events(sub)]
    assert "update.activated" not in kinds and "update.healthy" not in kinds, kinds
    # Nothing of the bad bundle is kept on the device.
    assert not agent.store.has(bad_id)
    return event


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


def _compile_digits(digits: Path, key: Path, version: str, out: Path) -> Path:
    args = ["compile", str(digits / "digits.onnx"), "-p", "x86-64-avx2", "--precision", "fp32",
            "--backend", "onnxruntime", "--calibration", str(digits / "calibration.npz"), "--sign-key", str(key),
            "--bundle-version", version, "--name", "digits", "--bench-seconds", "0.02", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _with_wrong_selftest(bundle: Path, keys: tuple[Path, Path], scratch: Path, out: Path) -> Path:
    """The bundle with its self-test's expected outputs changed, re-hashed and re-signed with the trusted key:
    signature and hashes verify, only the self-test can catch it."""
    root = scratch / "unpacked"
    manifest = open_bundle(bundle, root, load_public_key(keys[1]))
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
    files = [FileEntry(path=e.path, sha256=sha256_file(root / e.path), size=(root / e.path).stat().st_size)
             for e in manifest.files]  # fmt: skip
    changed = Manifest.model_validate({**manifest.model_dump(), "files": [f.model_dump() for f in files]})
    assert changed.files != manifest.files
    write_bundle(root, changed, load_private_key(keys[0]), out)
    return out


# ---- the cases ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "cause"),
    [
        ("artifacts/model.onnx", "artifacts/model.onnx sha256 does not match the manifest"),
        ("manifest.json", "signature check failed"),
    ],
    ids=["artifact", "manifest"],
)
def test_flipped_byte_is_refused(
    broker, start_agent, served: ServedBundles, digits_bundle, tmp_path: Path, member: str, cause: str
):
    old = digits_bundle("1.0.0")
    bad = _flip_byte(digits_bundle("1.1.0"), member, tmp_path / "digits-1.1.0-flipped.ekb")
    bad_id = served.add(bad)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _started(sub, start_agent, broker, bundle=old, source="synthetic:?fps=20")
        # The desired state names the modified file, so the transfer itself succeeds.
        _desire(broker, desired_for(bad, rev=1, version="1.1.0", health_checks=3))
        _refused_then_old_serves(sub, agent, sha256_file(old), bad_id, "update.refused", "refused", cause)
        assert "update.downloaded" in [e.type for e in _events(sub)]


def test_bundle_signed_by_another_key_is_refused(
    broker, start_agent, served: ServedBundles, digits_bundle, digits: Path, tmp_path: Path
):
    other_private, _ = generate_keypair(tmp_path / "other-key")
    bad = _compile_digits(digits, other_private, "1.1.0", tmp_path / "digits-1.1.0-other-key.ekb")
    old = digits_bundle("1.0.0")
    bad_id = served.add(bad)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _started(sub, start_agent, broker, bundle=old, source="synthetic:?fps=20")
        _desire(broker, desired_for(bad, rev=1, version="1.1.0", health_checks=3))
        event = _refused_then_old_serves(sub, agent, sha256_file(old), bad_id, "update.refused", "refused",
                                         "signature check failed")  # fmt: skip
        assert "not signed by the trusted key" in event.message


def test_downgrade_is_refused_unless_allowed(broker, start_agent, served: ServedBundles, digits_bundle):
    newer, older = digits_bundle("1.1.0"), digits_bundle("1.0.0")
    newer_id, older_id = sha256_file(newer), served.add(older)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _started(sub, start_agent, broker, bundle=newer, source="synthetic:?fps=20")
        _desire(broker, desired_for(older, rev=1, version="1.0.0", health_checks=3))
        event = _wait_event(sub, {"update.refused", "update.failed", "update.rolled_back", "update.healthy"})
        assert event.type == "update.refused", event
        assert "version downgrade from 1.1.0 to 1.0.0 refused" in event.message, event.message
        assert "allow_downgrade" in event.message
        reported = _wait_update_state(sub, "refused", rev=1)
        assert reported.update.bundle == older_id and "downgrade" in reported.update.detail
        assert reported.bundle.id == newer_id
        # The newer bundle keeps serving; nothing was downloaded.
        sub.wait_for(lambda _: sum(r.seq > event.seq for r in _results(sub)) >= 5, TIMEOUT_S, RESULTS)
        assert {r.bundle for r in _results(sub) if r.seq > event.seq} == {"digits@1.1.0"}
        assert agent.runner.model.bundle.manifest.version == "1.1.0"
        kinds = [e.type for e in _events(sub)]
        assert "update.started" not in kinds and "update.downloaded" not in kinds, kinds

        # Forced with allow_downgrade, under a new rev: accepted, and 1.0.0 goes live.
        _desire(broker, desired_for(older, rev=2, version="1.0.0", health_checks=3, allow_downgrade=True))
        healthy = _wait_event(sub, {"update.healthy", "update.refused", "update.failed", "update.rolled_back"},
                              after=event.seq)  # fmt: skip
        assert healthy.type == "update.healthy", healthy
        reported = _wait_update_state(sub, "healthy", rev=2)
        assert reported.bundle.id == older_id and reported.previous_bundle.id == newer_id
        assert healthy.data["bundle"] == older_id
        sub.wait_for(lambda _: sum(r.seq > healthy.seq for r in _results(sub)) >= 5, TIMEOUT_S, RESULTS)
        assert {r.bundle for r in _results(sub) if r.seq > healthy.seq} == {OLD_LABEL}
        assert agent.runner.model.bundle.manifest.version == "1.0.0"
        assert agent.store.record().active == older_id


def test_selftest_mismatch_is_refused(
    broker, start_agent, served: ServedBundles, digits_bundle, signing_keys, tmp_path: Path
):
    old = digits_bundle("1.0.0")
    bad = _with_wrong_selftest(digits_bundle("1.1.0"), signing_keys, tmp_path, tmp_path / "digits-1.1.0-st.ekb")
    bad_id = served.add(bad)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _started(sub, start_agent, broker, bundle=old, source="synthetic:?fps=20")
        _desire(broker, desired_for(bad, rev=1, version="1.1.0", health_checks=3))
        _refused_then_old_serves(sub, agent, sha256_file(old), bad_id, "update.refused", "refused",
                                 "self-test failed: output 0 differs")  # fmt: skip
        selftest = [e for e in _events(sub) if e.type == "update.selftest"]
        assert len(selftest) == 1 and selftest[0].data["passed"] is False and selftest[0].level == "error"


class _Feeder:
    """Publishes 64-value windows (a digits input) to the agent's `mqtt:` input until closed."""

    def __init__(self, broker: EmbeddedBroker, windows: np.ndarray, period_s: float = 0.04) -> None:
        self._windows = windows
        self._period_s = period_s
        self._stop = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self._client.connect(*host_port(broker.url))
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="feeder")
        self._thread.start()

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self._period_s):
            window = self._windows[index % len(self._windows)]
            self._client.publish(device_topic(DEVICE, "input"), json.dumps({"values": window.tolist()}), qos=1)
            index += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.disconnect()
        self._client.loop_stop()


def test_health_check_failure_rolls_back(
    broker, start_agent, served: ServedBundles, digits_bundle, digits: Path, cnn_bundle: Path
):
    """The CNN passes its own self-test, but the device's input is 64-value windows it cannot take: the health
    check fails after the switch and the agent goes back to digits 1.0.0."""
    old = digits_bundle("1.0.0")
    old_id, cnn_id = sha256_file(old), served.add(cnn_bundle)
    windows = np.load(digits / "test.npz")["image"][:20].reshape(20, 64)
    with Subscriber(broker.url, TOPICS) as sub:
        agent = _started(sub, start_agent, broker, bundle=old, source="mqtt:")
        feeder = _Feeder(broker, windows)
        try:
            sub.wait_for(lambda _: len(_results(sub)) >= 3, TIMEOUT_S, RESULTS)
            _desire(broker, desired_for(cnn_bundle, rev=1, version="1.0.0", name="cnn", health_checks=5))
            event = _wait_event(sub, {"update.refused", "update.failed", "update.rolled_back", "update.healthy"})
            assert event.type == "update.rolled_back", event
            assert "cnn@1.0.0 failed its health check" in event.message, event.message
            assert "cannot feed input" in event.message and f"back to {OLD_LABEL}" in event.message
            assert event.data["bundle"] == cnn_id
            kinds = [e.type for e in _events(sub)]
            for step in ("update.downloaded", "update.selftest", "update.activated", "inference.error"):
                assert step in kinds, kinds
            selftest = next(e for e in _events(sub) if e.type == "update.selftest")
            assert selftest.data["passed"] is True
            reported = _wait_update_state(sub, "rolled_back", rev=1)
            assert reported.update.bundle == cnn_id and "cannot feed input" in reported.update.detail
            assert reported.bundle.id == old_id
            # No result ever came from the CNN; digits 1.0.0 serves again after the rollback.
            assert {r.bundle for r in _results(sub)} == {OLD_LABEL}
            _assert_old_keeps_serving(sub, agent, event.seq, old_id)
            assert not agent.store.has(cnn_id)
        finally:
            feeder.close()
