"""Delta updates (docs/protocol.md, "Delta updates") on a real agent over a real Mosquitto, the hub's BundleServer
answering: the bundle rebuilt from a delta installs byte for byte; a damaged delta, a hub that refuses the request's
`base`, a bundle for which no delta pays and a device without a bundle of the same model all end in the whole
bundle, installed; the events say which way it came."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import MqttServedBundles, desired_for, signed
from brokers import Subscriber, publish, wait_until

from edgekit.agents.transfer import DELTA_RETRIES, STALL_S
from edgekit.bundle import sha256_file
from edgekit.delta import encode_delta
from edgekit.protocol import ChunkRequest, Event, Topic, device_topic

DEVICE = "dev-1"
EVENTS = device_topic(DEVICE, Topic.EVENTS)
TIMEOUT_S = 60.0


@pytest.fixture
def served(mosquitto) -> Iterator[MqttServedBundles]:
    bundles = MqttServedBundles(mosquitto)
    yield bundles
    bundles.close()


@pytest.fixture
def events(mosquitto) -> Iterator[Subscriber]:
    with Subscriber(mosquitto.url, EVENTS) as sub:
        yield sub


def _copy(bundle: Path, folder: Path) -> Path:
    """The bundle in this test's own folder, so the server's delta cache (`deltas/` beside it) is this test's."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(bundle, folder / bundle.name))


def _events(sub: Subscriber) -> list[Event]:
    return [Event.model_validate_json(payload) for _, payload in sub.messages(EVENTS)]


def _update(mosquitto, start_agent, events: Subscriber, old: Path, new: Path, version: str):
    """An agent on `old` asked for `new`; returns (agent, its events once the update came out healthy)."""
    agent = start_agent(mosquitto, bundle=old, source="synthetic:?fps=20")
    wait_until(lambda: agent.link.connected, TIMEOUT_S, "the agent to connect")
    publish(mosquitto.url, device_topic(DEVICE, Topic.DESIRED), signed(desired_for(new, 1, version, health_checks=3)),
            retain=True)  # fmt: skip
    outcomes = {"update.healthy", "update.failed", "update.refused", "update.rolled_back"}
    outcome = wait_until(lambda: next((e for e in _events(events) if e.type in outcomes), None), TIMEOUT_S,
                         "the update's outcome")  # fmt: skip
    assert outcome.type == "update.healthy", outcome
    return agent, _events(events)


def _downloaded(events: list[Event]) -> Event:
    (event,) = [e for e in events if e.type == "update.downloaded"]
    return event


def _fallbacks(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type == "update.progress" and "fallback" in e.data]


def _runs_exactly(agent, bundle: Path) -> None:
    """The device runs `bundle`, and the files it installed are that bundle byte for byte (repacked, they give its
    exact bytes)."""
    installed = agent.runner.model.bundle
    assert installed.id == sha256_file(bundle)
    assert agent.store.repack(installed) == bundle.read_bytes()


def test_a_delta_update_installs_the_target_byte_for_byte(mosquitto, start_agent, served, events, digits_bundle,
                                                          tmp_path):  # fmt: skip
    old, new = _copy(digits_bundle("1.0.0"), tmp_path / "b"), _copy(digits_bundle("1.1.0"), tmp_path / "b")
    served.add(old), served.add(new)
    agent, seen = _update(mosquitto, start_agent, events, old, new, "1.1.0")
    downloaded = _downloaded(seen)
    assert downloaded.data["via"] == "delta", downloaded
    assert downloaded.data["received"] < new.stat().st_size / 2, downloaded
    assert f"a {downloaded.data['received']}-byte delta received" in downloaded.message
    assert not _fallbacks(seen)
    assert served.server.deltas_served == 1
    _runs_exactly(agent, new)
    assert agent.store.record().previous == sha256_file(old)


def test_a_damaged_delta_falls_back_to_the_whole_bundle(mosquitto, start_agent, served, events, digits_bundle,
                                                        tmp_path):  # fmt: skip
    """The server's cached delta has one byte flipped (a bad disk): its chunks and its sha256 are consistent, so
    only applying it and checking the result can tell."""
    old, new = _copy(digits_bundle("1.0.0"), tmp_path / "b"), _copy(digits_bundle("1.1.0"), tmp_path / "b")
    old_id, new_id = served.add(old), served.add(new)
    delta = bytearray(encode_delta(old.read_bytes(), new.read_bytes()))
    delta[len(delta) // 2] ^= 0xFF
    cache = tmp_path / "deltas"
    cache.mkdir()
    (cache / f"{old_id}-{new_id}.zst").write_bytes(delta)
    agent, seen = _update(mosquitto, start_agent, events, old, new, "1.1.0")
    (fallback,) = _fallbacks(seen)
    assert fallback.message.startswith("no delta update (") and "downloading the whole bundle" in fallback.message
    assert fallback.data["base"] == old_id
    assert "delta" in fallback.data["fallback"], fallback  # the delta could not be applied, or gave other bytes
    assert _downloaded(seen).data == {
        "bundle": new_id,
        "via": "full",
        "received": new.stat().st_size,
        "transport": "mqtt",
    }
    assert seen.index(fallback) < seen.index(_downloaded(seen))
    _runs_exactly(agent, new)


def test_a_hub_that_refuses_the_base_field_gets_the_whole_bundle_asked_again(
    mosquitto, start_agent, events, digits_bundle, tmp_path
):
    """A hub from before the rule that receivers ignore unknown fields rejects a request naming a `base`, and so
    never answers it: after DELTA_RETRIES re-requests the device asks for the whole bundle."""
    served = MqttServedBundles(mosquitto)
    server = served.server
    refused: list[bytes] = []

    def strict(client, userdata, message) -> None:
        if ChunkRequest.model_validate_json(message.payload).base is not None:
            refused.append(message.payload)
            return
        server.on_request(client, userdata, message)

    # Set before or after its first connect: either way `strict` is what routes requests to the server.
    served.client.on_connect = lambda *args: server.start(route=False)
    served.client.message_callback_add(server.topic_filter, strict)
    try:
        old, new = _copy(digits_bundle("1.0.0"), tmp_path / "b"), _copy(digits_bundle("1.1.0"), tmp_path / "b")
        served.add(old), served.add(new)
        agent, seen = _update(mosquitto, start_agent, events, old, new, "1.1.0")
    finally:
        served.close()
    assert len(refused) == DELTA_RETRIES + 1
    (fallback,) = _fallbacks(seen)
    expected = f"no answer to {DELTA_RETRIES + 1} delta requests {STALL_S:g} s apart"
    assert fallback.data["fallback"] == expected, fallback
    assert _downloaded(seen).data["via"] == "full"
    _runs_exactly(agent, new)


def test_no_delta_pays_for_a_new_model_the_hub_sends_it_whole(mosquitto, start_agent, served, events,
                                                               digits_bundle, big_bundle, tmp_path):  # fmt: skip
    """digits 2.0.0 is another network with random weights: a delta from 1.0.0 would be most of it, so the server
    answers the delta request with the whole bundle's chunks, which the device takes as its download."""
    old, new = _copy(digits_bundle("1.0.0"), tmp_path / "b"), _copy(big_bundle, tmp_path / "b")
    served.add(old), served.add(new)
    agent, seen = _update(mosquitto, start_agent, events, old, new, "2.0.0")
    assert _downloaded(seen).data["via"] == "full"
    assert not _fallbacks(seen)
    assert served.server.deltas_served == 0
    assert not list((tmp_path / "deltas").glob("*.zst"))
    _runs_exactly(agent, new)


def test_an_update_from_another_model_downloads_in_full(mosquitto, start_agent, served, events, cnn_bundle,
                                                         digits_bundle, tmp_path):  # fmt: skip
    """The device runs cnn, the desired bundle is digits: nothing in common, no delta is asked for."""
    old, new = _copy(cnn_bundle, tmp_path / "b"), _copy(digits_bundle("1.1.0"), tmp_path / "b")
    served.add(old), served.add(new)
    agent, seen = _update(mosquitto, start_agent, events, old, new, "1.1.0")
    assert _downloaded(seen).data["via"] == "full"
    assert not _fallbacks(seen)
    assert served.server.deltas_served == 0 and not (tmp_path / "deltas").exists()
    _runs_exactly(agent, new)


def test_only_a_bundle_that_repacks_to_its_own_bytes_is_a_base(digits_bundle, signing_keys, tmp_path):
    """The device rebuilds its bundle's .ekb from the unpacked files; a bundle tarred by another tool (other member
    times here) does not rebuild to its id, so it is no base (the update downloads the whole bundle)."""
    import tarfile

    from edgekit.agents.bundles import BundleStore
    from edgekit.signing import load_public_key

    original = digits_bundle("1.0.0")
    retarred = tmp_path / "retarred.ekb"
    with tarfile.open(original) as source, tarfile.open(retarred, "w") as out:
        for member in source.getmembers():
            member.mtime = 1_700_000_000
            out.addfile(member, source.extractfile(member))
    store = BundleStore(tmp_path / "device")
    key = load_public_key(signing_keys[1])
    assert store.repack(store.install(original, key)) == original.read_bytes()
    assert store.repack(store.install(retarred, key)) is None
