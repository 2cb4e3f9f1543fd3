"""Candidates ranked by what a device of the user's own fleet measured (`edgekit compile --measure-on`,
docs/measure.md).

The compile stack never imports the hub: the CLI hands the pipeline a `DeviceMeasurer`, which sends one signed
candidate bundle to a device through the hub and waits for its numbers (`edgekit.hub.client.FleetMeasurer`). Every
passing candidate is measured on the same device, one after the other; when any measurement fails (the device went
offline, refused the bundle, did not answer), the compile falls back to the profile's order and says why.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgekit.errors import EdgekitError
from edgekit.protocol import BenchResult


class DeviceMeasurer(Protocol):
    target: str  # a device id or group:LABEL[=VALUE], as the user gave it

    def measure(self, bundle: Path) -> tuple[str, BenchResult]:
        """(the device id, what it measured) for a signed bundle; EdgekitError saying why not."""


@dataclass(frozen=True)
class MeasuredOn:
    device: str
    machine: str
    cpu: str

    def describe(self) -> str:
        return f"device {self.device} ({self.machine}, {self.cpu})"


@dataclass(frozen=True)
class DeviceMeasurements:
    """Every candidate's numbers (in the order given) when all were measured on one device; else why not."""

    results: list[BenchResult]
    measured_on: MeasuredOn | None
    failure: str = ""


def measure_candidates(measurer: DeviceMeasurer, bundles: list[Path], label: Callable[[int], str],
                       measured_one: Callable[[], None]) -> DeviceMeasurements:  # fmt: skip
    """Measure each bundle in turn on `measurer`'s device; stop at the first failure (the rest would be ranked on
    numbers from different conditions, or none)."""
    results: list[BenchResult] = []
    devices: set[str] = set()
    for index, bundle in enumerate(bundles):
        try:
            device, result = measurer.measure(bundle)
        except EdgekitError as error:
            return DeviceMeasurements(results, None, f"{label(index)}: {error}")
        results.append(result)
        devices.add(device)
        measured_one()
    if len(devices) > 1:  # a group's first online member changed between two candidates
        return DeviceMeasurements(results, None, f"the candidates were timed on different devices ({sorted(devices)})")
    if not results:
        return DeviceMeasurements(results, None, "no candidate passed verification to be measured")
    first = results[0]
    return DeviceMeasurements(results, MeasuredOn(devices.pop(), first.machine, first.cpu))
