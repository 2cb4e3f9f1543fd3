"""`edgekit bench BUNDLE --on DEVICE` (edgekit.cli.bundle_cmds): a bundle timed on a device of the fleet, through the
hub, without activating it (docs/measure.md). Like the other API commands it imports only httpx and rich."""

import json as jsonlib
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from edgekit.cli.console import console, print_json
from edgekit.cli.hub_cmd import _client

# (label, BenchResult field, unit)
FIGURES = (("p50", "p50_ms", "ms"), ("p95", "p95_ms", "ms"), ("throughput", "throughput", "/s"),
           ("threads", "threads", ""), ("peak RSS", "peak_rss_mib", "MiB"), ("added RSS", "added_rss_mib", "MiB"),
           ("temperature", "temperature_c", "°C"), ("throttled", "throttled", ""),
           ("live model p50 before", "live_p50_before_ms", "ms"), ("… during", "live_p50_during_ms", "ms"),
           ("… after", "live_p50_after_ms", "ms"))  # fmt: skip


ON_HELP = "A device id, or group:LABEL[=VALUE]: its first online member whose profile is the bundle's."


def bench_on_device(bundle: Path, on: str, seconds: float, hub_url: str | None, token: str | None,
                    as_json: bool) -> None:  # fmt: skip
    """`edgekit bench BUNDLE --on TARGET`: push, time on the device, print the device's figures."""
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
