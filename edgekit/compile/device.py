"""Candidates ranked by what a device of the user's own fleet measured (`edgekit compile --measure-on`,
docs/measure.md).

The compile stack never imports the hub: the CLI hands the pipeline a `DeviceMeasurer`, which sends one signed
candidate bundle to a device through the hub and waits for its numbers (`edgekit.hub.client.FleetMeasurer`). Every
passing candidate is measured on the same device, one after the other; when any measurement fails (the device went
offline, refused the bundle, did not answer), the compile falls back to the profile's order and says why.
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgekit import __version__
from edgekit.bundle import file_entries, write_bundle
from edgekit.errors import EdgekitError, OperationFailed
from edgekit.manifest import Manifest, Metrics, SelfTest, TensorSpec
from edgekit.protocol import TRIALS_KEY, BenchResult, TrialResult, TrialSpec, TrialTiming
from edgekit.signing import key_id


class DeviceMeasurer(Protocol):
    target: str  # a device id or group:LABEL[=VALUE], as the user gave it

    def measure(self, bundle: Path) -> tuple[str, BenchResult]:
        """(the device id, what it measured) for a signed bundle; EdgekitError saying why not."""

    def measure_trials(self, bundle: Path) -> tuple[str, TrialResult]:
        """As `measure`, for a signed bundle of TVM tuning trials (TRIALS_KEY)."""


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


@dataclass(frozen=True)
class TrialBundles:
    """What a trial bundle is made of besides its trials: who signs it, what it is for, where it is written."""

    name: str
    profile: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    key: Ed25519PrivateKey
    workdir: Path


class FleetTrialTimer:
    """TVM tuning trials (MetaSchedule's trial libraries, built here for the device's CPU) packed into one signed
    trial bundle per batch and timed on the --measure-on device, which verifies it like any bundle
    (edgekit.compilers.TrialTimer)."""

    def __init__(self, measurer: DeviceMeasurer, bundles: TrialBundles) -> None:
        self.measurer, self.bundles = measurer, bundles
        self.target = measurer.target
        self.batches = 0

    def time_trials(self, trials: list[tuple[Path, TrialSpec]]) -> tuple[str, list[TrialTiming]]:
        self.batches += 1
        device, result = self.measurer.measure_trials(self._pack(trials))
        if len(result.trials) != len(trials):
            raise OperationFailed(f"device {device} timed {len(result.trials)} of {len(trials)} trials")
        return device, result.trials

    def _pack(self, trials: list[tuple[Path, TrialSpec]]) -> Path:
        spec = self.bundles
        root = spec.workdir / f"trials-{self.batches}"
        (root / "trials").mkdir(parents=True, exist_ok=True)
        listed = []
        for index, (library, trial) in enumerate(trials):
            shutil.copyfile(library, root / "trials" / f"{index}.so")
            listed.append(trial.model_copy(update={"file": f"trials/{index}.so"}).model_dump())
        (root / "selftest").mkdir(exist_ok=True)
        # A trial bundle has no model to self-test (its job installs it without loading it); the manifest still
        # names a vectors file, as every bundle's does.
        np.savez(root / "selftest" / "vectors.npz")
        size = sum(path.stat().st_size for path in (root / "trials").iterdir())
        manifest = Manifest(
            name=f"{spec.name}-tuning", version=f"0.0.{self.batches}+trials", created=datetime.now(timezone.utc),
            profile=spec.profile, backend="tvm", precision="fp32", runtime="tvm", target={"device": "cpu"},
            entrypoint=listed[0]["file"] if listed else "selftest/vectors.npz", inputs=spec.inputs,
            outputs=spec.outputs, files=file_entries(root), compiler={"edgekit": __version__},
            verification=Metrics(verified_on="not verified: TVM tuning trials, timed on a fleet device",
                                 model_bytes=size, param_bytes=0, reference_model_bytes=0, reference_param_bytes=0),
            build_details={TRIALS_KEY: listed}, selftest=SelfTest(file="selftest/vectors.npz", count=1, atol=0, rtol=0),
            signing_key_id=key_id(spec.key.public_key()),
        )  # fmt: skip
        out = spec.workdir / f"trials-{self.batches}.ekb"
        write_bundle(root, manifest, spec.key, out)
        shutil.rmtree(root)
        return out
