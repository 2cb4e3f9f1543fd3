"""Trust roots and signed desired states (edgekit/trust.py, agents/trust.py, edgekit/hub/keys.py), without a
broker: how a device walks from the root it has to the newest, what it keeps across restarts, and how the hub
issues roots (and survives a crash in the middle of a rotation)."""

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit.agents.trust import DeviceTrust
from edgekit.errors import BadInput
from edgekit.hub.keys import KEY_FILE, NEXT_KEY_FILE, HubTrust
from edgekit.protocol import DesiredState, encode
from edgekit.signing import generate_keypair
from edgekit.trust import (
    ROOT_TYPE,
    TrustChain,
    TrustRoot,
    Untrusted,
    open_desired,
    public_pem,
    seal,
    sign_desired,
    walk_chain,
)


def _key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _root(version: int, hub: Ed25519PrivateKey, bundles: list[Ed25519PrivateKey] = ()) -> TrustRoot:
    return TrustRoot(version=version, hub_keys=[public_pem(hub)], bundle_keys=[public_pem(b) for b in bundles])


def test_a_device_walks_several_rotations_at_once():
    """Given v0 (the enrolled key), the chain v1..v3 (each signed by the previous hub key and its own) leads to v3."""
    keys = [_key() for _ in range(4)]
    chain = TrustChain(roots=[seal(ROOT_TYPE, _root(v, keys[v]), [keys[v - 1], keys[v]]) for v in range(1, 4)])
    root, newest = walk_chain(_root(0, keys[0]), chain)
    assert root.version == 3 and root.hub_keys == [public_pem(keys[3])] and newest == chain.roots[-1]
    again, nothing = walk_chain(root, chain)  # already there: roots at or below v3 are skipped
    assert again == root and nothing is None


@pytest.mark.parametrize(
    "signers, version, reason",
    [
        ("new", 1, "not signed by a hub key of trust root v0"),  # the attacker's own key alone
        ("old", 1, "not signed by a hub key of trust root v1 itself"),  # the new key never proved itself
        ("both", 2, "does not follow v0"),  # a gap: the device cannot check v2 without v1
    ],
)
def test_a_root_not_signed_by_the_old_and_the_new_hub_key_is_refused(signers, version, reason):
    old, new = _key(), _key()
    by = {"new": [new], "old": [old], "both": [old, new]}[signers]
    chain = TrustChain(roots=[seal(ROOT_TYPE, _root(version, new), by)])
    with pytest.raises(Untrusted, match=reason):
        walk_chain(_root(0, old), chain)


def test_signed_desired_states_are_bound_to_key_device_and_payload_type():
    hub = _key()
    root = _root(0, hub)
    payload = encode(sign_desired(hub, "cam-1", DesiredState(rev=4), ttl_s=60))
    statement = open_desired(payload, root, "cam-1", 10_000)
    assert statement.desired.rev == 4 and time.time() <= statement.expires < time.time() + 61
    with pytest.raises(Untrusted, match="signed for device 'cam-1', not this one"):
        open_desired(payload, root, "cam-2", 10_000)
    with pytest.raises(Untrusted, match="not signed by a hub key"):
        open_desired(payload, _root(0, _key()), "cam-1", 10_000)
    # A root envelope signed by the hub is not a desired state, whatever its payload.
    as_root = encode(seal(ROOT_TYPE, DesiredState(rev=4), [hub]))
    with pytest.raises(Untrusted, match="payload type"):
        open_desired(as_root, root, "cam-1", 10_000)


def _pem_file(folder: Path, name: str, key: Ed25519PrivateKey) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(public_pem(key))
    return path


def test_a_device_keeps_the_newest_root_across_restarts_and_never_falls_back(tmp_path):
    """After a rotation, a restart with the keys it was first given (a unit file that still names them) keeps the
    stored root; an operator re-enrolling at the same or a higher version replaces it."""
    old_hub, new_hub, old_bundles, new_bundles = _key(), _key(), _key(), _key()
    given = (_pem_file(tmp_path, "hub.pub", old_hub), _pem_file(tmp_path, "trust.pub", old_bundles))
    trust = DeviceTrust(tmp_path / "data", *given, version=1)
    v2 = seal(ROOT_TYPE, _root(2, new_hub, [new_bundles]), [old_hub, new_hub])
    assert trust.accept(TrustChain(roots=[v2])).version == 2
    restarted = DeviceTrust(tmp_path / "data", *given, version=1)
    assert restarted.root.version == 2 and restarted.root.hub_keys == [public_pem(new_hub)]
    assert [public_pem(k) for k in restarted.bundle_keys()] == [public_pem(new_bundles)]
    re_enrolled = DeviceTrust(tmp_path / "data", _pem_file(tmp_path / "e", "hub.pub", _key()), None, version=2)
    assert re_enrolled.root.version == 2 and re_enrolled.root.hub_keys != [public_pem(new_hub)]


def test_a_corrupt_stored_root_falls_back_to_the_given_keys(tmp_path, caplog):
    hub = _key()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trust.json").write_text("{not json")
    trust = DeviceTrust(tmp_path / "data", _pem_file(tmp_path, "hub.pub", hub), None)
    assert trust.root.hub_keys == [public_pem(hub)] and "unreadable" in caplog.text


def test_without_a_hub_key_a_device_has_no_root_but_may_verify_its_bundle(tmp_path):
    bundles = _key()
    trust = DeviceTrust(tmp_path / "data", None, _pem_file(tmp_path, "trust.pub", bundles))
    assert trust.root is None and [public_pem(k) for k in trust.bundle_keys()] == [public_pem(bundles)]
    with pytest.raises(Untrusted, match="no hub key"):
        trust.accept(TrustChain(roots=[seal(ROOT_TYPE, _root(1, _key()), [_key()])]))


# ---- the hub's side ---------------------------------------------------------------------------------------------


def test_the_hub_creates_its_key_once_and_keeps_it_private(tmp_path):
    _, bundle_pub = generate_keypair(tmp_path / "bundle-key")
    trust = HubTrust(tmp_path / "trust", bundle_pub)
    assert trust.root.version == 1 and len(trust.root.bundle_keys) == 1
    assert (tmp_path / "trust" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "trust").stat().st_mode & 0o777 == 0o700
    assert HubTrust(tmp_path / "trust").root == trust.root  # reopened: the same root, the same key


def test_a_different_bundle_key_at_start_is_refused_with_the_way_to_rotate(tmp_path):
    _, first = generate_keypair(tmp_path / "first")
    _, second = generate_keypair(tmp_path / "second")
    HubTrust(tmp_path / "trust", first)
    with pytest.raises(BadInput, match=r"is not a bundle key of trust root v1.*edgekit hub rotate-keys --bundle-key"):
        HubTrust(tmp_path / "trust", second)


def test_rotation_issues_a_root_devices_can_walk_to(tmp_path):
    trust = HubTrust(tmp_path / "trust")
    device = DeviceTrust(tmp_path / "device", trust.public_key_file, None, version=1)
    _, bundle_pub = generate_keypair(tmp_path / "bundle-key")
    root = trust.rotate(new_hub_key=True, bundle_keys=[bundle_pub.read_text()])
    assert root.version == 2 and device.accept(trust.chain()) == root
    payload = trust.sign_desired("cam-1", DesiredState(rev=1))
    assert device.open_desired(payload, "cam-1", 10_000).desired.rev == 1
    assert trust.public_key_file.read_text() == root.hub_keys[0]


@pytest.mark.parametrize("root_written", [True, False])
def test_a_rotation_cut_short_keeps_a_key_the_newest_root_names(tmp_path, root_written):
    """A crash after the new key was written: with the root written too, the new key is taken; without, dropped."""
    trust = HubTrust(tmp_path / "trust")
    before = (tmp_path / "trust" / KEY_FILE).read_text()
    pending = _key()
    from edgekit.hub.keys import _private_pem

    (tmp_path / "trust" / NEXT_KEY_FILE).write_text(_private_pem(pending))
    if root_written:
        old = trust._key
        trust._write_root(seal(ROOT_TYPE, _root(2, pending), [old, pending]))
    reopened = HubTrust(tmp_path / "trust")
    assert not (tmp_path / "trust" / NEXT_KEY_FILE).exists()
    expected = public_pem(pending) if root_written else public_pem(trust._key)
    assert reopened.root.hub_keys == [expected]
    assert ((tmp_path / "trust" / KEY_FILE).read_text() != before) is root_written
