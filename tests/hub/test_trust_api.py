"""The hub's trust over HTTP (`/api/trust`, `edgekit hub rotate-keys`): who may rotate, what a rotation leaves on
disk and in enrollments, and that a restarted hub signs with the key it rotated to."""

import httpx
import pytest
from hub_helpers import signing_keys

from edgekit.hub.auth import create_token
from edgekit.hub.db import AuditEntry
from edgekit.protocol import DesiredState
from edgekit.signing import key_id
from edgekit.trust import Untrusted, open_desired, public_key, public_pem


def _client(hub, scope: str) -> httpx.Client:
    token = create_token(hub.sessions, f"t-{scope}", "test", scope=scope)
    return httpx.Client(base_url=hub.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                        trust_env=False)  # fmt: skip


def test_only_admin_tokens_rotate_and_each_rotation_is_audited(make_hub, tmp_path):
    _, bundle_pub = signing_keys(tmp_path / "bundle")
    hub = make_hub()
    with _client(hub, "read") as reader, _client(hub, "operate") as operator, _client(hub, "admin") as admin:
        first = reader.get("/api/trust").json()
        assert first["version"] == 1 and first["bundle_keys"] == []
        assert first["hub_key_pem"] == hub.trust.public_key_file.read_text()
        assert operator.post("/api/trust/rotate", json={"hub_key": True}).status_code == 403
        nothing = admin.post("/api/trust/rotate", json={})
        assert nothing.status_code == 422 and "nothing to rotate" in nothing.text
        junk_pem = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
        junk = admin.post("/api/trust/rotate", json={"bundle_keys": [junk_pem]})
        assert junk.status_code == 422
        rotated = admin.post("/api/trust/rotate", json={"hub_key": True, "bundle_keys": [bundle_pub.read_text()]})
        assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    assert body["version"] == 2 and body["hub_keys"] != first["hub_keys"]
    assert body["bundle_keys"] == [key_id(public_key(bundle_pub.read_text()))]
    with hub.sessions() as session:
        entries = session.query(AuditEntry).filter(AuditEntry.action.startswith("trust"))
        actions = [(e.actor, e.action, e.detail["version"]) for e in entries]
    assert actions == [("t-admin", "trust.rotate", 2)]


def test_a_restarted_hub_keeps_its_rotated_key_and_enrolls_devices_on_the_newest_root(make_hub, tmp_path):
    hub = make_hub()
    before = hub.trust.root
    root = hub.rotate_keys(new_hub_key=True, bundle_keys=None)
    data_dir = hub.settings.data_dir
    hub.stop()
    again = make_hub(data_dir=data_dir)
    assert again.trust.root == root and root.hub_keys != before.hub_keys
    enrollment = again.enroll(["cam-9"])[0]
    assert enrollment.trust_version == 2 and enrollment.hub_key == root.hub_keys[0]
    # What it signs now verifies with the rotated key, and not with the first one.
    payload = again.trust.sign_desired("cam-9", DesiredState(rev=3))
    assert open_desired(payload, root, "cam-9", 100_000).desired.rev == 3
    with pytest.raises(Untrusted, match="not signed by a hub key of trust root v1"):
        open_desired(payload, before, "cam-9", 100_000)


def test_rotate_keys_on_the_command_line(make_hub, tmp_path, cli):
    _, bundle_pub = signing_keys(tmp_path / "bundle")
    hub = make_hub()
    admin = create_token(hub.sessions, "cli-admin", "test", scope="admin")
    operate = create_token(hub.sessions, "cli-op", "test", scope="operate")
    denied = cli("hub", "rotate-keys", "--hub-key", "--hub", hub.http_url, "--token", operate)
    assert denied.exit_code == 2 and "scope 'admin'" in denied.output, denied.output
    missing = cli("hub", "rotate-keys", "--bundle-key", tmp_path / "none.pub", "--hub", hub.http_url, "--token", admin)
    assert missing.exit_code == 2 and "none.pub" in missing.output, missing.output
    done = cli("hub", "rotate-keys", "--bundle-key", bundle_pub, "--hub", hub.http_url, "--token", admin)
    assert done.exit_code == 0 and "trust root v2" in done.output, done.output
    assert hub.trust.root.bundle_keys == [public_pem(public_key(bundle_pub.read_text()))]
