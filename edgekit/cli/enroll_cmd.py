"""`edgekit hub enroll DEVICE…`: each device's login on the hub's embedded broker, as one enrollment file (0600)
for `edgekit agent --enrollment FILE` (or a folder of them for `edgekit fleet simulate --enrollments DIR`). Works
whether the hub runs or not: a running broker takes the logins at once."""

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli.console import console, err_console
from edgekit.errors import BadInput

HUB_USER_HELP = (
    "Make hub users (edgekit-hub-NAME) for more hub processes on this broker (each needs its own: the broker binds "
    "client ids to logins), not devices; prints each one's broker URL once, for their --broker."
)


def enroll(
    device_ids: Annotated[
        list[str], typer.Argument(help="Device ids (each its MQTT username): letters, digits, . _ -")
    ],
    data: Annotated[Path, typer.Option("--data", help="The hub's folder.")] = Path("edgekit-hub"),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The enrollment file, for one device.")] = None,
    out_dir: Annotated[
        Path, typer.Option("--out-dir", help="Where DEVICE.enrollment.json files go (without --out).")
    ] = Path("."),
    trust_key: Annotated[
        Path | None, typer.Option("--trust-key", "-k", help="Ed25519 public key bundles are signed with.")
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker-url", help="mqtt://HOST:PORT as devices reach the broker (default: where it listens)."),
    ] = None,
    hub_user: Annotated[
        bool,
        typer.Option("--hub-user", help=HUB_USER_HELP),
    ] = False,
) -> None:
    """Create each device's broker login (a new password; enrolling again replaces it) and its enrollment file."""
    from edgekit.enrollment import write_enrollment
    from edgekit.hub.acl import BrokerUsers
    from edgekit.hub.broker import listen_address, reload_broker
    from edgekit.hub.keys import HubTrust
    from edgekit.hub.service import device_broker
    from edgekit.mqtt import parse_broker_url, with_login

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
    root = HubTrust(data / "trust", trust_key).root
    users = BrokerUsers(broker_dir)
    if hub_user:
        for name in device_ids:
            # The hub's rights on every device's topics, so shown once, like an API token.
            print(with_login(broker_url, *users.add_hub_user(name)))
        reload_broker(broker_dir)
        return
    if out is not None and len(device_ids) > 1:
        raise BadInput(f"--out {out}: one file for one device; for {len(device_ids)} devices use --out-dir")
    for enrollment in users.enroll(device_ids, broker_url, root):
        path = out or out_dir / f"{enrollment.device_id}.enrollment.json"
        write_enrollment(path, enrollment)
        console.print(f"wrote {path} (mode 0600: {enrollment.device_id}'s broker password; copy it to the device)")
    live = reload_broker(broker_dir)
    console.print("on a device:  edgekit agent --enrollment FILE", highlight=False)
    if not live:
        err_console.print("the hub's broker is not running: the login takes effect when it starts")
    if not root.bundle_keys:
        err_console.print("[yellow]warning:[/] the hub trusts no bundle key (--trust-key): the device will refuse "
                          "updates until it has one")  # fmt: skip
