"""Signed desired states (#14 item 2): an attacker who can publish on a device's `config/desired` (a broker left open,
a stolen login, a compromised broker) still cannot steer the device.

The worst case on purpose: a plain Mosquitto that lets anyone publish, a real agent on it trusting the test hub's
key, and a paho client as the attacker. Each attack asks the device, with a rev above anything it has seen, to go
back to cnn 1.0.0 (`allow_downgrade`) while it runs 2.0.0. After each, the genuine hub sends a harmless state with
the next rev; once the device reports that rev, the attack is over: it must have refused, by name, and still run
2.0.0 with no update started. Counted in the reliability table (attacks tried / held).
"""

import base64
import json
import time

import pytest
from agent_helpers import HubSigner, MqttServedBundles, desired_for, shared_signer, signed, started_agents
from brokers import Subscriber, publish
from reliability import record

from edgekit.agents.agent import Agent
from edgekit.bundle import sha256_file
from edgekit.protocol import Event, ReportedState, Thresholds, Topic, device_topic, encode
from edgekit.trust import ROOT_TYPE, TrustChain, TrustRoot, public_pem, seal

AREA = "attack: signed desired state"
DEVICE = "dev-1"
TIMEOUT_S = 60.0
DESIRED = device_topic(DEVICE, Topic.DESIRED)
EVENTS = device_topic(DEVICE, Topic.EVENTS)
REPORTED = device_topic(DEVICE, Topic.REPORTED)
ATTACK_REV = 1000


@pytest.fixture
def device(mosquitto, start_agent, cnn_bundles) -> Agent:
    """An agent on the open broker running cnn 2.0.0, trusting the test hub's key and the bundles' key."""
    return start_agent(mosquitto, bundle=cnn_bundles["v2"], trust_key=cnn_bundles["public"],
                       source="synthetic:?fps=5")  # fmt: skip


@pytest.fixture
def start_agent(tmp_path):
    """`agent_helpers.started_agents` under tmp_path (the bundle key is each test's): stopped at teardown."""
    with started_agents(tmp_path) as start:
        yield start


def _downgrade(cnn_bundles: dict, rev: int = ATTACK_REV):
    """What the attacker wants: back to 1.0.0, forced."""
    return desired_for(cnn_bundles["v1"], rev=rev, version="1.0.0", name="cnn", allow_downgrade=True)


def _events(watch: Subscriber) -> list[Event]:
    return [Event.model_validate_json(payload) for _, payload in watch.messages(EVENTS)]


def _reported_rev(watch: Subscriber) -> int:
    reports = watch.messages(REPORTED)
    return ReportedState.model_validate_json(reports[-1][1]).rev if reports else -1


def _attack(name: str, payload: bytes, mosquitto, device: Agent, cnn_bundles: dict, marker_rev: int,
            refusal: str) -> None:  # fmt: skip
    """Publish `payload` (retained, like a desired state) on the device's desired topic, then the hub's marker;
    the device must refuse the attack with an event containing `refusal`, and apply nothing of it."""
    with Subscriber(mosquitto.url, EVENTS, REPORTED) as watch:
        publish(mosquitto.url, DESIRED, payload, retain=True)
        marker = desired_for(cnn_bundles["v2"], rev=marker_rev, version="2.0.0", name="cnn",
                             thresholds=Thresholds(top_k=marker_rev % 5 + 1))  # fmt: skip
        publish(mosquitto.url, DESIRED, signed(marker, DEVICE), retain=True)
        watch.wait_for(lambda _: _reported_rev(watch) >= marker_rev, TIMEOUT_S, REPORTED)
        events = _events(watch)
    old_id = sha256_file(cnn_bundles["v1"])
    refused = [e for e in events if e.type in ("config.rejected", "payload.rejected") and refusal in e.message]
    started = [e for e in events if e.type == "update.started" and e.data.get("bundle") == old_id]
    applied = int(device.runner.model.bundle.manifest.version != "2.0.0") + len(started)
    record(AREA, f"{name}: applied", applied, 0)
    assert refused, f"{name}: no refusal naming {refusal!r} in {[e.message for e in events]}"
    assert applied == 0, f"{name}: the device acted on it ({started})"


def test_unsigned_desired_state_is_refused(mosquitto, device, cnn_bundles):
    """The format every agent took before signing: plain JSON with allow_downgrade."""
    _attack("unsigned", encode(_downgrade(cnn_bundles)), mosquitto, device, cnn_bundles, 1,
            "not a signed")  # fmt: skip


def test_desired_state_signed_by_another_key_is_refused(mosquitto, device, cnn_bundles, tmp_path):
    forged = HubSigner(tmp_path / "attacker").sign(_downgrade(cnn_bundles), DEVICE)
    _attack("forged signature", forged, mosquitto, device, cnn_bundles, 1, "not signed by a hub key")


def test_desired_state_changed_after_signing_is_refused(mosquitto, device, cnn_bundles):
    """A genuine, harmless state with its payload rewritten to the downgrade, the hub's signature kept."""
    envelope = json.loads(signed(desired_for(cnn_bundles["v2"], rev=ATTACK_REV, version="2.0.0", name="cnn"), DEVICE))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["desired"] = json.loads(encode(_downgrade(cnn_bundles)))
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    _attack("tampered", json.dumps(envelope).encode(), mosquitto, device, cnn_bundles, 1, "not signed by a hub key")


def test_desired_state_signed_for_another_device_is_refused(mosquitto, device, cnn_bundles):
    """Genuine, but for dev-2 (which may be allowed the downgrade): replayed to dev-1."""
    _attack("other device", signed(_downgrade(cnn_bundles), "dev-2"), mosquitto, device, cnn_bundles, 1,
            "signed for device 'dev-2'")  # fmt: skip


def test_expired_desired_state_is_refused(mosquitto, device, cnn_bundles):
    """Genuine and for this device, but signed an hour ago with a minute to live: held back, then released."""
    stale = shared_signer().sign(_downgrade(cnn_bundles), DEVICE, ttl_s=60, now=time.time() - 3600)
    _attack("expired", stale, mosquitto, device, cnn_bundles, 1, "expired at")


def test_replayed_older_desired_state_changes_nothing(mosquitto, start_agent, cnn_bundles, tmp_path):
    """The hub once rolled the device back to 1.0.0 (rev 1), then forward to 2.0.0 (rev 2). Replaying rev 1, genuine
    and unexpired, does nothing: the device has applied a higher rev."""
    served = MqttServedBundles(mosquitto)
    served.add(cnn_bundles["v2"])
    try:
        device = start_agent(mosquitto, bundle=cnn_bundles["v1"], trust_key=cnn_bundles["public"],
                             source="synthetic:?fps=5")  # fmt: skip
        rollback = signed(_downgrade(cnn_bundles, rev=1), DEVICE)
        publish(mosquitto.url, DESIRED, rollback, retain=True)
        forward = desired_for(cnn_bundles["v2"], rev=2, version="2.0.0", name="cnn", health_checks=3)
        with Subscriber(mosquitto.url, REPORTED) as watch:
            publish(mosquitto.url, DESIRED, signed(forward, DEVICE), retain=True)
            watch.wait_for(lambda _: _reported_rev(watch) >= 2, TIMEOUT_S, REPORTED)
        assert device.runner.model.bundle.manifest.version == "2.0.0"
        with Subscriber(mosquitto.url, EVENTS, REPORTED) as watch:
            publish(mosquitto.url, DESIRED, rollback, retain=True)
            marker = desired_for(cnn_bundles["v2"], rev=3, version="2.0.0", name="cnn")
            publish(mosquitto.url, DESIRED, signed(marker, DEVICE), retain=True)
            watch.wait_for(lambda _: _reported_rev(watch) >= 3, TIMEOUT_S, REPORTED)
            started = [e for e in _events(watch) if e.type == "update.started"]
    finally:
        served.close()
    applied = len(started) + int(device.runner.model.bundle.manifest.version != "2.0.0")
    record(AREA, "replayed older rev: applied", applied, 0)
    assert applied == 0, started


def test_forged_trust_root_is_refused_and_its_key_never_trusted(mosquitto, device, cnn_bundles, tmp_path):
    """The attacker announces a root v1 that names its own key as the hub's, signed by that key, then sends a state
    signed by it: the root is refused (not signed by the hub key the device has) and so is the state."""
    attacker = HubSigner(tmp_path / "attacker")
    root = TrustRoot(version=1, hub_keys=[public_pem(attacker.key)], bundle_keys=[])
    chain = TrustChain(roots=[seal(ROOT_TYPE, root, [attacker.key])])
    with Subscriber(mosquitto.url, EVENTS) as watch:
        publish(mosquitto.url, device_topic(DEVICE, Topic.TRUST), encode(chain), retain=True)
        watch.wait_for(lambda _: any(e.type == "trust.rejected" for e in _events(watch)), TIMEOUT_S, EVENTS)
    assert device.trust.root.version == 0 and device.trust.root.hub_keys == [shared_signer().public.read_text()]
    record(AREA, "forged trust root: accepted", int(device.trust.root.version != 0), 0)
    _attack("state signed by the forged root's key", attacker.sign(_downgrade(cnn_bundles), DEVICE), mosquitto,
            device, cnn_bundles, 1, "not signed by a hub key")  # fmt: skip


def test_without_a_hub_key_every_desired_state_is_refused(mosquitto, start_agent, cnn_bundles):
    """An agent given no hub key (no enrolment, no --hub-key) takes no desired state, even a correctly signed one,
    and keeps running its --bundle."""
    device = start_agent(mosquitto, hub_key=None, bundle=cnn_bundles["v2"], trust_key=cnn_bundles["public"],
                         source="synthetic:?fps=5")  # fmt: skip
    with Subscriber(mosquitto.url, EVENTS) as watch:
        publish(mosquitto.url, DESIRED, signed(_downgrade(cnn_bundles), DEVICE), retain=True)
        events = watch.wait_for(lambda _: any(e.type == "config.rejected" for e in _events(watch)), TIMEOUT_S, EVENTS)
    messages = [Event.model_validate_json(p).message for _, p in events]
    assert any("no hub key" in m for m in messages), messages
    assert device.runner.model.bundle.manifest.version == "2.0.0"


def _bench_attack(name: str, payload: bytes, mosquitto, refusal: str) -> None:
    """A benchmark job (edgekit.agents.bench) on the device's bench/job topic: refused by name, nothing fetched."""
    with Subscriber(mosquitto.url, EVENTS) as watch:
        publish(mosquitto.url, device_topic(DEVICE, Topic.BENCH), payload)
        watch.wait_for(lambda _: any(refusal in e.message for e in _events(watch)), TIMEOUT_S, EVENTS)
        time.sleep(0.5)  # anything it would have started after refusing would show by now
        events = _events(watch)
    fetched = [e for e in events if e.type in ("update.downloaded", "update.selftest", "bench.result")]
    record(AREA, f"benchmark job {name}: bundles fetched or run", len(fetched), 0)
    assert not fetched, f"{name}: the device acted on it ({[e.message for e in fetched]})"


@pytest.mark.parametrize("how", ["unsigned", "signed by another key"])
def test_a_forged_benchmark_job_is_refused(mosquitto, device, cnn_bundles, tmp_path, how: str) -> None:
    from edgekit.protocol import BenchJob, DesiredBundle
    from edgekit.trust import sign_bench

    bundle = DesiredBundle(id=sha256_file(cnn_bundles["v1"]), name="cnn", version="1.0.0",
                           size=cnn_bundles["v1"].stat().st_size)  # fmt: skip
    job = BenchJob(id="attack", bundle=bundle, seconds=1)
    if how == "unsigned":
        _bench_attack(how, job.model_dump_json().encode(), mosquitto, "not a signed benchmark job")
    else:
        forged = encode(sign_bench(HubSigner(tmp_path / "attacker").key, DEVICE, job, 600))
        _bench_attack(how, forged, mosquitto, "not signed by a hub key")
