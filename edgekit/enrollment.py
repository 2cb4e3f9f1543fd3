"""The enrollment file: everything a device needs to join a hub, written once by `edgekit hub enroll DEVICE` (or
`POST /api/enrollments`) and read by `edgekit agent --enrollment FILE` and `edgekit agent install --enrollment FILE`.

It holds the device's broker password, so it is written 0600 and the agent never prints it (`redact_url`).
"""

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from edgekit.errors import BadInput
from edgekit.mqtt import parse_broker_url, with_login
from edgekit.protocol import DEVICE_ID
from edgekit.schema import StrictModel, validate_file

PEM_PUBLIC_KEY = r"^-----BEGIN PUBLIC KEY-----\n[\s\S]+\n-----END PUBLIC KEY-----\n?$"


class Enrollment(StrictModel):
    schema_version: Literal[1] = 1
    device_id: str = Field(pattern=DEVICE_ID, description="the device's id, also its MQTT username")
    broker: str = Field(description="mqtt:// or mqtts:// URL as devices reach the broker, without credentials; "
                        "a clustered broker's nodes comma-separated")  # fmt: skip
    username: str = Field(min_length=1, description="MQTT username (the device id)")
    password: str = Field(min_length=16, description="MQTT password; secret")
    trust_key: str | None = Field(
        None, pattern=PEM_PUBLIC_KEY, description="PEM Ed25519 public key bundles must be signed with; None: none yet"
    )
    hub_key: str | None = Field(
        None, pattern=PEM_PUBLIC_KEY, description="PEM Ed25519 public key of the hub, which signs desired states"
    )
    trust_version: int = Field(0, ge=0, description="The hub's trust root version these keys are from")

    def broker_url(self) -> str:
        """`broker` with the username and password in it, as `edgekit.mqtt.parse_broker_url` reads it."""
        return with_login(self.broker, self.username, self.password)


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read: a fresh 0600 file (never world-readable in between) renamed
    over `path`, so a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def write_enrollment(path: Path, enrollment: Enrollment) -> None:
    """Write `enrollment` as JSON, readable by its owner only."""
    write_private(path, enrollment.model_dump_json(indent=2) + "\n")


def load_enrollment(path: Path) -> Enrollment:
    """The enrollment in `path`; BadInput names the file and the first field that is wrong."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise BadInput(f"--enrollment {path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise BadInput(f"--enrollment {path}: not JSON ({error.msg}, line {error.lineno}); expected the file "
                       "`edgekit hub enroll` writes") from None  # fmt: skip
    enrollment = validate_file(Enrollment, data, f"--enrollment {path}")
    parse_broker_url(enrollment.broker)
    return enrollment
