"""Mosquitto password and ACL files so each device may use only its own topics: the embedded broker's
(`BrokerUsers`, under the hub's data folder, from the first start) and `edgekit hub acl`'s for an external broker.

Devices log in with their device id as the MQTT username. The ACL uses Mosquitto's `pattern` rules with `%u`,
so one rule set covers every device: a device can publish its status, telemetry, results, events, reported
state, chunk requests and captured samples, and read its desired state, bundle chunks, input and sample acks —
under `edgekit/v1/<its id>/` only. The hub's user may read and write everything under `edgekit/`.

What Mosquitto 2.0's ACL file cannot express (checked against Debian's 2.0.11): it does not check SUBSCRIBE at
all, so a device's subscription to `$share/GROUP/edgekit/v1/+/telemetry` is granted (the messages are then
checked on delivery and dropped). A device in the hubs' group would take and drop a share of their messages;
what keeps the group to the hubs is a secret group name (`check_share_group`). Refusing the subscription itself
needs Mosquitto's dynamic-security plugin.
"""

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgekit.enrollment import Enrollment, write_private
from edgekit.errors import BadInput
from edgekit.protocol import DEVICE_ID, PREFIX, Topic
from edgekit.trust import TrustRoot

HUB_USER = "edgekit-hub"
# The hubs' shared-subscription group is their secret: a device that knows it can join it (module docstring).
MIN_SHARE_GROUP = 16
DEVICE_WRITES = (Topic.STATUS, Topic.TELEMETRY, Topic.RESULTS, Topic.EVENTS, Topic.REPORTED, Topic.TRANSFER_REQUEST,
                 Topic.PROBE, Topic.SAMPLES)  # fmt: skip
DEVICE_READS = (Topic.DESIRED, Topic.TRUST, Topic.TRANSFER_CHUNK, Topic.INPUT, Topic.PROBE,
                Topic.SAMPLES_ACK, Topic.BENCH)  # fmt: skip
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for its $7$ (PBKDF2-SHA512) format


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's `$7$` password hash (PBKDF2-SHA512), as `mosquitto_passwd` writes it."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(hub_users: list[str] | None = None) -> str:
    lines = ["# Written by edgekit: the hub's users, then every device only under its own prefix."]
    for user in hub_users or [HUB_USER]:
        lines += [f"user {user}", "topic readwrite edgekit/#", ""]
    lines += [f"pattern write {PREFIX}/%u/{name}" for name in DEVICE_WRITES]
    lines += [f"pattern read {PREFIX}/%u/{name}" for name in DEVICE_READS]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class AclFiles:
    password_file: Path
    acl_file: Path
    credentials: Path


def _check_ids(device_ids: list[str]) -> None:
    pattern = re.compile(DEVICE_ID)
    bad = [d for d in device_ids if not pattern.match(d) or d.startswith(HUB_USER)]
    if bad:
        raise BadInput(f"device ids {', '.join(bad)}: expected letters, digits, . _ - (not starting '{HUB_USER}')")
    if not device_ids:
        raise BadInput("no device ids given (--device ID, repeatable, or --devices-file FILE with one id per line)")


def write_acl_files(out: Path, device_ids: list[str]) -> AclFiles:
    """passwd + acl for mosquitto, and credentials.json (mode 0600) with the generated passwords to provision."""
    _check_ids(device_ids)
    out.mkdir(parents=True, exist_ok=True)
    passwords = {HUB_USER: secrets.token_urlsafe(24)} | {d: secrets.token_urlsafe(24) for d in device_ids}
    password_file = out / "passwd"
    write_private(password_file, "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in passwords.items()))
    acl_file = out / "acl"
    acl_file.write_text(acl_text())
    credentials = out / "credentials.json"
    write_private(credentials, json.dumps(passwords, indent=2) + "\n")
    return AclFiles(password_file, acl_file, credentials)


def check_share_group(group: str) -> None:
    """Refuse a guessable shared-subscription group: Mosquitto's ACL file lets any device subscribe to it."""
    if len(group) < MIN_SHARE_GROUP or not re.fullmatch(r"[A-Za-z0-9_.-]+", group):
        raise BadInput(
            f"--share-group '{group}': expected {MIN_SHARE_GROUP}+ letters, digits, . _ - known only to the hubs "
            "(a device that knows the group can take a share of the hubs' messages); e.g. `openssl rand -hex 12`"
        )


class BrokerUsers:
    """The embedded broker's users: `passwd` and `acl` in `folder` (0600, like the folder's other secrets), the
    hub's own user and password (`hub.password`), and one user per enrolled device.

    Mosquitto reads both files at start and again on SIGHUP (`MosquittoBroker.reload`), so a device enrolled
    while the broker runs can log in at once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.password_file = folder / "passwd"
        self.acl_file = folder / "acl"
        self._hub_password_file = folder / "hub.password"

    def ensure(self) -> "BrokerUsers":
        """Create the hub's user and the ACL on first use; keep the passwords already there."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        if not self._hub_password_file.is_file():
            write_private(self._hub_password_file, secrets.token_urlsafe(24))
        hashes = self._hashes()
        if HUB_USER not in hashes:
            hashes[HUB_USER] = mosquitto_password_hash(self.hub_password)
            self._write_hashes(hashes)
        write_private(self.acl_file, acl_text([user for user in hashes if user.startswith(HUB_USER)]))
        return self

    @property
    def hub_password(self) -> str:
        return self._hub_password_file.read_text().strip()

    def add_devices(self, device_ids: list[str]) -> dict[str, str]:
        """A new password for each device (re-enrolling replaces the old one, which stops working), by id; returned
        once, only their hashes are kept."""
        _check_ids(device_ids)
        self.ensure()
        passwords = {device_id: secrets.token_urlsafe(24) for device_id in device_ids}
        hashes = {device_id: mosquitto_password_hash(password) for device_id, password in passwords.items()}
        self._write_hashes(self._hashes() | hashes)
        return passwords

    def enroll(self, device_ids: list[str], broker: str, root: TrustRoot) -> list[Enrollment]:
        """`add_devices`, as enrollment files: `broker` is the URL devices reach, `root` the hub's newest trust root
        (its hub key and bundle key; a root without a bundle key: the device refuses updates until it has one)."""
        trust = {"hub_key": root.hub_keys[0], "trust_key": (root.bundle_keys or [None])[0],
                 "trust_version": root.version}  # fmt: skip
        return [Enrollment(device_id=device_id, broker=broker, username=device_id, password=password, **trust)
                for device_id, password in self.add_devices(device_ids).items()]  # fmt: skip

    def add_hub_user(self, name: str) -> tuple[str, str]:
        """(username, password) of a new user with the hub's rights, `edgekit-hub-NAME`: for another hub process
        on this broker (each needs its own: the broker binds client ids to usernames) or a tool that watches."""
        user = f"{HUB_USER}-{name}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
            raise BadInput(f"hub user name '{name}': expected 1-32 letters, digits, . _ -")
        self.ensure()
        password = secrets.token_urlsafe(24)
        self._write_hashes(self._hashes() | {user: mosquitto_password_hash(password)})
        self.ensure()  # the ACL names every hub user
        return user, password

    def device_ids(self) -> list[str]:
        """Every enrolled device (users that are not hubs)."""
        return sorted(user for user in self._hashes() if not user.startswith(HUB_USER))

    def _hashes(self) -> dict[str, str]:
        if not self.password_file.is_file():
            return {}
        lines = self.password_file.read_text().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def _write_hashes(self, hashes: dict[str, str]) -> None:
        write_private(self.password_file, "".join(f"{user}:{hashed}\n" for user, hashed in hashes.items()))
