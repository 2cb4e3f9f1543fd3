"""Arm Ethos-U backend: full-integer int8 TFLite (via the tflite backend's conversion), compiled by Arm's vela.

The vela output runs only on the NPU, so verification runs the pre-vela int8 TFLite on the host with LiteRT and
says so. vela's own report gives NPU/CPU operator placement, SRAM and flash use and a cycle estimate; operators
that fall back to the microcontroller's CPU are listed by name, and a build that overflows the profile's SRAM or
flash is marked unfit.
"""

import csv
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult, HostStandIn
from edgekit.compilers.tflite import TfliteBackend, convert, output_layouts
from edgekit.profiles import Profile
from edgekit.schema import Precision

FALLBACK_LINE = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '(.*)'")
COUNT_LINE = re.compile(r"^(CPU|NPU) operators = (\d+)")
KIB_LINE = re.compile(r"^Total (SRAM|Off-chip Flash) used\s+([\d.]+) KiB")
VELA = "import sys; from ethosu.vela.vela import main; sys.exit(main())"


class VelaOptions(BackendOptions):
    config: str = "Arm/vela.ini"
    system_config: str = "Ethos_U55_High_End_Embedded"
    memory_mode: str = "Shared_Sram"
    optimise: Literal["Performance", "Size"] = "Performance"


class VelaBackend(Backend):
    name = "vela"
    module = "ethosu"
    extra = "tflite"
    precisions = frozenset({"int8"})
    # Layers mixed precision keeps in float run on the Cortex-M beside the NPU (vela leaves float ops to TFLite
    # Micro's kernels), at CPU speed.
    keeps_float = True
    Options = VelaOptions

    @classmethod
    def available(cls) -> bool:
        return super().available() and TfliteBackend.available()

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        if not (profile.accelerator.arch or "").startswith("ethos-u"):
            return "vela compiles for Arm Ethos-U NPUs only"
        return super().unsupported_reason(profile, precision)

    def versions(self) -> dict[str, str]:
        return {"ethos-u-vela": importlib.metadata.version("ethos-u-vela"), **TfliteBackend().versions()}

    def build(self, request: BuildRequest) -> BuildResult:
        options: VelaOptions = request.options  # type: ignore[assignment]
        stand_in = request.outdir.parent / "host" / "model.int8.tflite"
        weight_bytes = convert(request, "int8-io", stand_in)
        accelerator = request.profile.accelerator.arch
        with request.progress.task(f"vela: compiling for {accelerator}", total=1):
            output = _run_vela(stand_in, request.outdir, accelerator, options)
        artifact = request.outdir / "model_vela.tflite"
        (request.outdir / f"{stand_in.stem}_vela.tflite").rename(artifact)
        details = _summarize(output, next(request.outdir.glob("*_summary_*.csv")), accelerator, options)
        for csv_file in request.outdir.glob("*.csv"):
            csv_file.unlink()
        return BuildResult(
            entrypoint=artifact,
            runtime="ethos-u",
            target={
                "accelerator": accelerator,
                "system_config": options.system_config,
                "memory_mode": options.memory_mode,
            },
            param_bytes=weight_bytes,
            host_stand_in=HostStandIn(
                entrypoint=stand_in,
                runtime="litert",
                target=output_layouts(stand_in, request.model.outputs),
                note="the pre-vela int8 TFLite; the NPU build runs only on the Ethos-U",
            ),
            details=details,
            unfit=_memory_overflows(details, request.profile),
        )


def _run_vela(model: Path, outdir: Path, accelerator: str, options: VelaOptions) -> str:
    command = [
        sys.executable,
        "-c",
        VELA,
        str(model),
        "--output-dir",
        str(outdir),
        "--accelerator-config",
        accelerator,
        "--config",
        options.config,
        "--system-config",
        options.system_config,
        "--memory-mode",
        options.memory_mode,
        "--optimise",
        options.optimise,
    ]
    done = subprocess.run([*command, "--show-cpu-operations"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)  # fmt: skip
    if done.returncode != 0 and "regor_operations_from_database" in done.stdout:
        # vela 4's operator table raises KeyError on some graphs (a lowered scikit-learn model's GATHER/CAST);
        # without it the CPU fallbacks are still named, one warning line each.
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        last = (done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"vela failed (exit {done.returncode}): {last[:300]}")
    return done.stdout


def _summarize(output: str, summary_csv: Path, accelerator: str, options: VelaOptions) -> dict[str, Any]:
    lines = output.splitlines()
    counts = {m.group(1): int(m.group(2)) for m in map(COUNT_LINE.match, lines) if m}
    fallback = [f"{m.group(1)} ({m.group(2)})" for m in map(FALLBACK_LINE.match, lines) if m]
    memory = {m.group(1): float(m.group(2)) for m in map(KIB_LINE.match, lines) if m}
    with summary_csv.open() as handle:
        summary = next(csv.DictReader(handle))
    return {
        "accelerator": accelerator,
        "system_config": options.system_config,
        "memory_mode": options.memory_mode,
        "npu_ops": counts.get("NPU"),  # None where vela could not print its operator table
        "cpu_ops": counts.get("CPU", len(fallback)),
        "cpu_fallback": fallback,
        "sram_kib": memory.get("SRAM", float(summary["sram_memory_used"])),
        "flash_kib": memory.get("Off-chip Flash", float(summary["off_chip_flash_memory_used"])),
        "npu_cycles": int(float(summary["cycles_total"])),
        "estimated_inference_ms": float(summary["inference_time"]) * 1000.0,
        "estimated_inferences_per_s": float(summary["inferences_per_second"]),
    }


def _memory_overflows(details: dict[str, Any], profile: Profile) -> list[str]:
    problems = []
    if profile.memory.sram_kb and details["sram_kib"] > profile.memory.sram_kb:
        problems.append(f"needs {details['sram_kib']:.0f} KiB SRAM, {profile.name} has {profile.memory.sram_kb}")
    if profile.memory.flash_kb and details["flash_kib"] > profile.memory.flash_kb:
        problems.append(f"needs {details['flash_kib']:.0f} KiB flash, {profile.name} has {profile.memory.flash_kb}")
    return problems
