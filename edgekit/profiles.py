"""Device profiles: one YAML file per target device in firmware_profiles/, validated by `Profile`."""

import platform
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from edgekit.errors import BadInput
from edgekit.schema import Precision, StrictModel, validate_file

Arch = Literal["x86_64", "aarch64", "armv7", "cortex-m"]


class Cpu(StrictModel):
    arch: Arch
    model: str = Field(description="CPU core, e.g. cortex-a72 or skylake-avx512; also the compiler's -mcpu")
    cores: int = Field(ge=1)
    isa: list[str] = Field(description="ISA extensions the code may use, e.g. avx2, avx512f, neon, dotprod")
    triple: str = Field(description="LLVM target triple, e.g. aarch64-linux-gnu")


class Accelerator(StrictModel):
    kind: Literal["none", "cuda", "npu"]
    name: str | None = None
    arch: str | None = Field(None, description="e.g. sm_87 for CUDA, ethos-u55-128 for an Ethos-U NPU")
    tops: float | None = Field(None, gt=0, description="Vendor peak int8 TOPS, informational")


class Memory(StrictModel):
    ram_mb: int = Field(gt=0)
    sram_kb: int | None = Field(None, gt=0)
    flash_kb: int | None = Field(None, gt=0)


class Preprocessing(StrictModel):
    """How raw images become model input; stored in the bundle so the device does exactly the same."""

    color: Literal["rgb", "bgr", "gray"] | None = Field(None, description="Unset: gray for 1 channel, else rgb")
    scale: float = Field(255.0, gt=0, description="Pixels are divided by this before mean/std")
    mean: list[float] = [0.0]
    std: list[float] = [1.0]

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, value: list[float]) -> list[float]:
        if any(v == 0 for v in value):
            raise ValueError("std must not contain 0")
        return value


class Candidate(StrictModel):
    """One way to build for this device, tried in the order listed."""

    backend: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    precision: Precision
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific, validated by the backend")


class Profile(StrictModel):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    description: str
    cpu: Cpu
    accelerator: Accelerator
    memory: Memory
    batch_size: int = Field(1, ge=1, description="Used for a dynamic batch dimension")
    candidates: list[Candidate] = Field(min_length=1)
    runtime_packages: list[str] = Field(min_length=1, description="What the device installs to run bundles")
    preprocessing: Preprocessing | None = None

    def runs_on_this_host(self) -> bool:
        """True when the host's CPU has this profile's architecture (runtimes that pick their kernels when they
        run, such as ONNX Runtime and OpenVINO, then run the device's artifact here)."""
        return host_arch() == self.cpu.arch

    def isa_missing_here(self) -> list[str]:
        """The profile's ISA extensions this host's CPU lacks ([] when it has them all, or cannot tell)."""
        have = host_isa()
        return [] if have is None else [name for name in self.cpu.isa if CPU_FLAGS.get(name, name) not in have]

    def host_can_run(self) -> bool:
        """True when code compiled for exactly this CPU (TVM's, built with its -mcpu and ISA) runs on this host:
        the same architecture and every ISA extension the profile names (an AVX-512 build on a host without
        AVX-512 dies of an illegal instruction)."""
        return self.runs_on_this_host() and not self.isa_missing_here()


# Profile ISA names that Linux's /proc/cpuinfo spells otherwise (x86 `flags`, ARM `Features`).
CPU_FLAGS = {"sse4.2": "sse4_2", "avx512vnni": "avx512_vnni", "neon": "asimd", "dotprod": "asimddp",
             "fp16": "asimdhp"}  # fmt: skip


@cache
def host_isa() -> frozenset[str] | None:
    """The CPU flags Linux reports for this host; None where it does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def builtin_profile_dir() -> Path:
    return Path(str(resources.files("edgekit.firmware_profiles")))


def builtin_profile_names() -> list[str]:
    return sorted(path.stem for path in builtin_profile_dir().glob("*.yaml"))


def load_profile_file(path: Path) -> Profile:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise BadInput(f"{path}: cannot read profile: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BadInput(f"{path}:{where}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a profile must be a YAML mapping, got {type(data).__name__}")
    profile = validate_file(Profile, data, path)
    if profile.name != path.stem:
        raise BadInput(f"{path}: name: '{profile.name}' must match the file name '{path.stem}'")
    return profile


@cache
def load_profile(name_or_path: str) -> Profile:
    """A built-in profile by name (`rpi4`), or a profile YAML file by path (`./my-board.yaml`)."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return load_profile_file(Path(name_or_path))
    path = builtin_profile_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(builtin_profile_names())
        raise BadInput(f"unknown profile '{name_or_path}' (known: {known}; or pass a path to a .yaml file)")
    return load_profile_file(path)
