"""`edgekit bench BUNDLE --on DEVICE`: a bundle timed on a device of the fleet, through the hub, without activating
it (docs/measure.md). Like the other API commands it imports only httpx and rich."""

import json as jsonlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from edgekit.cli.console import console, print_json
from edgekit.cli.hub_cmd import HubOpt, JsonOpt, TokenOpt, _client

# (label, BenchResult field, unit)
FIGURES = (("p50", "p50_ms", "ms"), ("p95", "p95_ms", "ms"), ("throughput", "throughput", "/s"),
           ("threads", "threads", ""), ("peak RSS", "peak_rss_mib", "MiB"), ("added RSS", "added_rss_mib", "MiB"),
           ("temperature", "temperature_c", "°C"), ("throttled", "throttled", ""),
           ("live model p50 before", "live_p50_before_ms", "ms"), ("… during", "live_p50_during_ms", "ms"),
           ("… after", "live_p50_after_ms", "ms"))  # fmt: skip


ON_HELP = "A device id, or group:LABEL[=VALUE]: its first online member whose profile is the bundle's."


def bench_command(
    bundle: Annotated[Path, typer.Argument(help="The signed .ekb to time (pushed to the hub's registry first).")],
    on: Annotated[str, typer.Option("--on", help=ON_HELP)],
    seconds: Annotated[float, typer.Option(help="Seconds the device times it, after warm-up.", min=0.1, max=600)] = 5,
    hub_url: HubOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time BUNDLE on a fleet device without activating it: the device verifies it like an update, runs it at a
    lower priority than its live model, and reports p50/p95, throughput, RSS, temperature and the live model's
    latency before, during and after. Exit 1 when the device could not (offline, refused, no answer)."""
    with _client(hub_url, token) as client:
        job = client.time_bundle(bundle, on, seconds)
    if as_json:
        print_json(jsonlib.dumps(job, indent=2))
        return
    console.print(_table(job))


def _table(job: dict[str, Any]) -> Table:
    result = job["result"]
    table = Table("", escape(f"{job['device_id']}: {result['machine']}, {result['cpu']}"),
                  title=f"{escape(job['bundle_id'][:12])}: {result['runs']} runs")  # fmt: skip
    for label, field, unit in FIGURES:
        value = result.get(field)
        table.add_row(label, _figure(value, unit))
    return table


def _figure(value: float | bool | None, unit: str) -> str:
    if value is None:
        return "—"
    return str(value).lower() if isinstance(value, bool) else f"{value:g} {unit}".strip()


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
