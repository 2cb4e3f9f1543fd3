"""`edgekit config set|show`: a device's or a device group's configuration through the hub's REST API
(`/api/devices/{id}/config`, `/api/groups/{KEY=VALUE}/config`; docs/hub.md "Device configuration").

Like the other API commands it imports only httpx and rich."""

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgekit.cli.console import console, print_json
from edgekit.cli.hub_cmd import HubOpt, JsonOpt, TokenOpt, _client
from edgekit.errors import BadInput

app = typer.Typer(
    help="Configure devices from the hub: input source, task, thresholds, rates, capture (docs/hub.md).",
    no_args_is_help=True,
)


def parse_capture(value: str) -> dict[str, Any] | None:
    """`off` (None: capture off) or a CapturePolicy as a JSON object."""
    if value == "off":
        return None
    try:
        policy = json.loads(value)
    except json.JSONDecodeError as error:
        raise BadInput(f"--capture '{value[:80]}': expected off or a JSON object ({error.msg})") from None
    if not isinstance(policy, dict):
        raise BadInput(f"--capture '{value[:80]}': expected off or a JSON object, e.g. '{{\"random_rate\": 0.01}}'")
    return policy


def build_change(source: str | None, task: str | None, thresholds: dict[str, Any], rates: dict[str, Any],
                 capture: str | None) -> dict[str, Any]:  # fmt: skip
    """The request body: only what was given (thresholds and rates without their unset options)."""
    change: dict[str, Any] = {}
    if source is not None:
        change["source"] = None if source == "default" else source
    if task is not None:
        change["task"] = task
    for name, values in (("thresholds", thresholds), ("rates", rates)):
        given = {key: value for key, value in values.items() if value is not None}
        if given:
            change[name] = given
    if capture is not None:
        change["capture"] = parse_capture(capture)
    if not change:
        raise BadInput("nothing to change: give --source, --task, --score, --top-k, --iou, --telemetry-s, "
                       "--max-fps or --capture")  # fmt: skip
    return change


def check_target(target: str) -> str:
    if target == "all" or target == "group:":
        raise BadInput(f"--to {target}: expected a device id or group:KEY[=VALUE] (a label selector)")
    return target


@app.command("set")
def set_config(
    to: Annotated[str, typer.Option("--to", help="A device id, or group:KEY[=VALUE] (the devices with that label).")],
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="KIND:TARGET, e.g. camera:0, video:/data/clip.mp4, mqtt:; "
            "'default': none from the hub (the agent's own --source).",
        ),
    ] = None,
    task: Annotated[str | None, typer.Option("--task", help="auto, classifier, detector or raw.")] = None,
    score: Annotated[float | None, typer.Option("--score", min=0, max=1, help="Score threshold (0-1).")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, max=100, help="Classes reported per result.")] = None,
    iou: Annotated[float | None, typer.Option("--iou", min=0, max=1, help="NMS overlap for detectors (0-1).")] = None,
    telemetry_s: Annotated[
        float | None, typer.Option("--telemetry-s", min=0.01, max=3600, help="Seconds between telemetry messages.")
    ] = None,
    max_fps: Annotated[float | None, typer.Option("--max-fps", min=0.01, help="Cap on inferences per second.")] = None,
    capture: Annotated[
        str | None,
        typer.Option(
            "--capture",
            help='A capture policy as JSON, e.g. \'{"below_confidence": 0.5, "max_per_day": 100}\' '
            "(docs/datasets.md), or off.",
        ),
    ] = None,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a device's or a group's configuration; what is not given stays. The devices get it as a new desired
    state; one that cannot apply it (a source it does not have) refuses it and keeps its previous one
    (`edgekit config show DEVICE`)."""
    change = build_change(source, task, {"score": score, "top_k": top_k, "iou": iou},
                          {"telemetry_s": telemetry_s, "max_fps": max_fps}, capture)  # fmt: skip
    with _client(hub_url, token) as client:
        result = client.set_config(check_target(to), change)
    if as_json:
        print_json(json.dumps(result, indent=2))
        return
    console.print(f"{escape(result['target'])}: {escape(json.dumps(result['change']))}", highlight=False)
    if result.get("group"):
        console.print(f"group configuration version {result['group']['version']}: "
                      f"{escape(json.dumps(result['group']['config']))}", highlight=False)  # fmt: skip
    table = Table("device", "sent as rev", "not sent because")
    for sent in result["sent"]:
        table.add_row(escape(sent["device"]), str(sent["rev"] or "-"), escape(sent["error"]))
    console.print(table if result["sent"] else "no device in it now; devices that join get it")


@app.command("show")
def show_config(
    device: Annotated[str, typer.Argument(help="The device id.")],
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What the hub last sent a device, what it runs, and whether it refused the last change."""
    with _client(hub_url, token) as client:
        shown = client.device_config(device)
    if as_json:
        print_json(json.dumps(shown, indent=2))
        return
    table = Table("", "desired (hub)", "reported (device)")
    for name in sorted(set(shown["desired"]) | set(shown["reported"])):
        table.add_row(name, *(escape(json.dumps(shown[side].get(name))) for side in ("desired", "reported")))
    console.print(table)
    state = shown.get("state")
    if state and state["state"] == "refused":
        console.print(f"[red]refused[/] rev {state['rev']}: {escape(state['detail'])} (keeps its previous "
                      "configuration)", highlight=False)  # fmt: skip
    elif state:
        console.print(f"applied rev {state['rev']}", highlight=False)
    groups = ", ".join(f"{g['selector']} (v{g['version']})" for g in shown["groups"]) or "none"
    console.print(f"group configurations: {escape(groups)}", highlight=False)
