"""`edgekit hub enroll DEVICE`: a device's login on the hub's embedded broker, as one enrollment file (0600) for
`edgekit agent --enrollment FILE`. Works whether the hub runs or not: a running broker takes the login at once."""

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli.console import console, err_console
from edgekit.errors import BadInput


def enroll(
    device_id: Annotated[str, typer.Argument(help="The device's id (its MQTT username): letters, digits, . _ -")],
    data: Annotated[Path, typer.Option("--data", help="The hub's folder.")] = Path("edgekit-hub"),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="The enrollment file (default: DEVICE.enrollment.json).")
    ] = None,
    trust_key: Annotated[
        Path | None, typer.Option("--trust-key", "-k", help="Ed25519 public key bundles are signed with.")
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker-url", help="mqtt://HOST:PORT as devices reach the broker (default: where it listens)."),
    ] = None,
) -> None:
    """Create DEVICE's broker login (a new password; enrolling again replaces it) and write its enrollment file."""
    from edgekit.enrollment import write_enrollment
    from edgekit.hub.acl import BrokerUsers
    from edgekit.hub.broker import listen_address, reload_broker
    from edgekit.hub.service import device_broker
    from edgekit.mqtt import parse_broker_url

    broker_dir = data / "broker"
    if broker_url is not None:
        parse_broker_url(broker_url)
    elif (address := listen_address(broker_dir)) is not None:
        broker_url = device_broker(*address)
    else:
        raise BadInput(f"--data {data}: no embedded broker has started there yet; start `edgekit hub --data {data}` "
                       "once, or pass --broker-url mqtt://HOST:PORT")  # fmt: skip
    if trust_key is not None and not trust_key.is_file():
        raise BadInput(f"--trust-key {trust_key}: no such file")
    enrollment = BrokerUsers(broker_dir).enroll([device_id], broker_url, trust_key)[0]
    path = out or Path(f"{device_id}.enrollment.json")
    write_enrollment(path, enrollment)
    live = reload_broker(broker_dir)
    console.print(f"wrote {path} (mode 0600: it holds {device_id}'s broker password; copy it to the device)")
    console.print(f"on the device:  edgekit agent --enrollment {path.name}", highlight=False)
    if not live:
        err_console.print("the hub's broker is not running: the login takes effect when it starts")
    if trust_key is None:
        err_console.print("[yellow]warning:[/] no --trust-key: the device will refuse updates until it has one")
