"""`edgekit hub acl`: Mosquitto password + ACL files that confine each device to its own topics."""

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli.console import console
from edgekit.errors import BadInput


def acl(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for passwd, acl and credentials.json.")],
    device: Annotated[list[str] | None, typer.Option("--device", help="A device id; repeatable.")] = None,
    devices_file: Annotated[
        Path | None, typer.Option("--devices-file", help="A file with one device id per line.")
    ] = None,
) -> None:
    """Generate Mosquitto `password_file` and `acl_file` entries: each device (username = its id) may publish and
    subscribe only under edgekit/v1/<its id>/, the hub user (edgekit-hub) under all of edgekit/."""
    from edgekit.hub.acl import HUB_USER, write_acl_files

    ids = list(device or [])
    if devices_file is not None:
        if not devices_file.is_file():
            raise BadInput(f"--devices-file {devices_file}: no such file")
        ids += [line.strip() for line in devices_file.read_text().splitlines() if line.strip()]
    files = write_acl_files(out, ids)
    console.print(f"wrote {files.password_file} ({len(ids)} devices + {HUB_USER}), {files.acl_file}")
    console.print(f"passwords for provisioning: {files.credentials} (mode 0600; each agent uses mqtt://ID:PASSWORD@…)")
    console.print("mosquitto.conf:", highlight=False)
    console.print(f"  allow_anonymous false\n  password_file {files.password_file}\n  acl_file {files.acl_file}")
