"""`edgekit hub acl`: Mosquitto password and ACL files so each device may use only its own topics.

Devices log in with their device id as the MQTT username. The ACL uses Mosquitto's `pattern` rules with `%u`,
so one rule set covers every device: a device can publish its status, telemetry, results, events, reported
state and chunk requests, and read its desired state, bundle chunks and input — under `edgekit/v1/<its id>/`
only. The hub's user may read and write everything under `edgekit/`.
"""

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import BadInput
from edgekit.protocol import DEVICE_ID, PREFIX, Topic

HUB_USER = "edgekit-hub"
DEVICE_WRITES = (Topic.STATUS, Topic.TELEMETRY, Topic.RESULTS, Topic.EVENTS, Topic.REPORTED, Topic.TRANSFER_REQUEST)
DEVICE_READS = (Topic.DESIRED, Topic.TRANSFER_CHUNK, Topic.INPUT)
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd writes for its $7$ (PBKDF2-SHA512) format


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """Mosquitto 2's `$7$` password hash (PBKDF2-SHA512), as `mosquitto_passwd` writes it."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text() -> str:
    lines = ["# Written by `edgekit hub acl`.", f"user {HUB_USER}", "topic readwrite edgekit/#", "",
             "# Every device (username = device id) only under its own prefix."]  # fmt: skip
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
    bad = [d for d in device_ids if not pattern.match(d) or d == HUB_USER]
    if bad:
        raise BadInput(f"device ids {', '.join(bad)}: expected letters, digits, . _ - (and not '{HUB_USER}')")
    if not device_ids:
        raise BadInput("no device ids given (--device ID, repeatable, or --devices-file FILE with one id per line)")


def write_acl_files(out: Path, device_ids: list[str]) -> AclFiles:
    """passwd + acl for mosquitto, and credentials.json (mode 0600) with the generated passwords to provision."""
    _check_ids(device_ids)
    out.mkdir(parents=True, exist_ok=True)
    passwords = {HUB_USER: secrets.token_urlsafe(24)} | {d: secrets.token_urlsafe(24) for d in device_ids}
    password_file = out / "passwd"
    _write_private(password_file, "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in passwords.items()))
    acl_file = out / "acl"
    acl_file.write_text(acl_text())
    credentials = out / "credentials.json"
    _write_private(credentials, json.dumps(passwords, indent=2) + "\n")
    return AclFiles(password_file, acl_file, credentials)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
