"""Compiler backends: one module per backend, discovered at first use.

A backend declares which profiles and precisions it can build and turns a prepared fp32 model (plus
calibration data for int8) into artifacts that a runtime adapter in `edgekit.agents.runtimes` can load.
Adding a backend is adding a module here with one `Backend` subclass; its heavy imports stay inside methods.
"""

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import yaml
from pydantic import ValidationError

from edgekit.compile.intake import PreparedModel
from edgekit.errors import BadInput
from edgekit.plugins import discover, installed
from edgekit.profiles import Profile
from edgekit.progress import Progress
from edgekit.protocol import TrialSpec, TrialTiming
from edgekit.samples import SampleSet
from edgekit.schema import Precision, StrictModel, describe_validation_error


class TrialTimer(Protocol):
    """Times TVM tuning trials on a fleet device of the profile's kind (`edgekit compile --measure-on`): what lets
    a workstation tune for a CPU it is not (edgekit.compile.device.FleetTrialTimer)."""

    target: str

    def time_trials(self, trials: list[tuple[Path, TrialSpec]]) -> tuple[str, list[TrialTiming]]:
        """(the device id, one timing per trial, in order) for (library, spec) pairs; EdgekitError when the device
        could not time them at all."""


class BackendOptions(StrictModel):
    """Per-candidate options a profile may set; each backend subclasses this with its own fields."""


@dataclass(frozen=True)
class BuildRequest:
    model: PreparedModel
    profile: Profile
    precision: Precision
    calibration: SampleSet | None
    options: BackendOptions
    outdir: Path
    progress: Progress
    # Node names of the prepared fp32 model that an int8 build leaves in float: the most quantization-sensitive
    # layers, chosen by the pipeline's mixed-precision search when plain int8 misses the accuracy budget.
    keep_float: frozenset[str] = frozenset()
    # With mixed precision, the only nodes int8 may quantize: the ranked layers not kept in float. A backend whose
    # quantizer also picks ops the ranking never saw (NNCF quantizes ReduceMean and LSTM inputs; ONNX Runtime's
    # QDQ does not) keeps those in float too, so that the ranking describes what it builds.
    int8_only: frozenset[str] | None = None
    trial_timer: TrialTimer | None = None  # --measure-on: where tuning trials for a foreign CPU are timed


@dataclass(frozen=True)
class HostStandIn:
    """What the verifier runs on the workstation when the device artifact itself cannot run here
    (e.g. the int8 TFLite that vela compiled for an Ethos-U NPU)."""

    entrypoint: Path
    runtime: str
    target: dict[str, Any]
    note: str


@dataclass(frozen=True)
class BuildResult:
    entrypoint: Path
    runtime: str
    target: dict[str, Any]
    param_bytes: int
    host_stand_in: HostStandIn | None = None
    details: dict[str, Any] = field(default_factory=dict)  # backend facts for the report, e.g. NPU op counts
    unfit: list[str] = field(default_factory=list)  # why the build cannot serve the device, e.g. SRAM overflow


class Backend(ABC):
    name: ClassVar[str]
    module: ClassVar[str]  # import name the build needs
    extra: ClassVar[str] = "compile"  # the pip extra that installs it
    precisions: ClassVar[frozenset[str]]
    # Whether an int8 build honours BuildRequest.keep_float, so mixed precision can rescue it.
    keeps_float: ClassVar[bool] = False
    Options: ClassVar[type[BackendOptions]] = BackendOptions

    @classmethod
    def available(cls) -> bool:
        return installed(cls.module)

    def parse_options(self, options: dict[str, Any], where: str) -> BackendOptions:
        try:
            return self.Options.model_validate(options)
        except ValidationError as error:
            raise BadInput(f"{where}: options for backend '{self.name}': {describe_validation_error(error)}") from None

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        """None when this backend can build for the profile at that precision, else why not."""
        if precision not in self.precisions:
            return f"{self.name} does not build {precision}"
        return None

    def emulate(
        self, result: BuildResult, profile: Profile, feeds: list[dict[str, np.ndarray]]
    ) -> list[np.ndarray] | None:
        """Run the device artifact itself on `feeds` under emulation, when this backend has an emulator for the
        profile and the host cannot run the artifact natively; None otherwise (`compile --verify-emulated`)."""
        return None

    @abstractmethod
    def build(self, request: BuildRequest) -> BuildResult:
        """Write artifacts under request.outdir; return the entrypoint and how to run it."""

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the tools this backend used, for the manifest."""


@cache
def backends() -> dict[str, type[Backend]]:
    return discover(sys.modules[__name__], Backend)


def parse_backend_options(specs: list[str]) -> dict[str, dict[str, Any]]:
    """`--option tvm.tune_trials=64` → {"tvm": {"tune_trials": 64}}: values read as YAML scalars and checked
    against the backend's own Options model here, so a typo fails before any build, even for a backend the
    profile does not list."""
    options: dict[str, dict[str, Any]] = {}
    known = backends()
    for spec in specs:
        key, sep, text = spec.partition("=")
        backend, dot, name = key.partition(".")
        if not sep or not dot or not backend or not name:
            raise BadInput(f"--option '{spec}': expected BACKEND.NAME=VALUE, e.g. tvm.tune_trials=64")
        if backend not in known:
            raise BadInput(f"--option '{spec}': no backend '{backend}' (known: {', '.join(sorted(known))})")
        fields = known[backend].Options.model_fields
        if name not in fields:
            listed = ", ".join(sorted(fields)) or "none"
            raise BadInput(f"--option '{spec}': backend '{backend}' has no option '{name}' (its options: {listed})")
        options.setdefault(backend, {})[name] = _scalar(spec, text)
    for backend, values in options.items():
        try:
            known[backend].Options.model_validate(values)
        except ValidationError as error:
            raise BadInput(f"--option: backend '{backend}': {describe_validation_error(error)}") from None
    return options


def _scalar(spec: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raise BadInput(f"--option '{spec}': cannot read the value '{text}'") from None
