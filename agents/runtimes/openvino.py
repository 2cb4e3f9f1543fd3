"""OpenVINO adapter: runs IR (`.xml` + `.bin`) on the first device of the bundle's priority list present here."""

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.agents.runtimes import Runtime


def pick_device(requested: str, available: list[str]) -> str:
    """`AUTO:NPU,GPU,CPU` → the first of NPU, GPU, CPU that this machine has (CPU always is)."""
    choices = requested.split(":", 1)[1].split(",") if requested.startswith("AUTO:") else [requested]
    for choice in choices:
        if any(device == choice or device.startswith(f"{choice}.") for device in available):
            return choice
    return "CPU"


class OvSession:
    def __init__(self, compiled, device: str) -> None:
        self._request = compiled.create_infer_request()
        self._outputs = compiled.outputs
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds)
        return [np.asarray(results[output]) for output in self._outputs]


class OpenVino(Runtime):
    name = "openvino"
    module = "openvino"
    install = "pip install openvino"

    def load(self, model: Path, target: dict[str, Any], threads: int | None = None) -> OvSession:
        import openvino as ov

        core = ov.Core()
        device = pick_device(target.get("device", "CPU"), core.available_devices)
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        if "inference_precision" in target and device in ("CPU", "GPU"):
            config["INFERENCE_PRECISION_HINT"] = target["inference_precision"]
        elif device == "CPU" and pick_device(target.get("device", "CPU"), ["NPU", "GPU"]) != "CPU":  # asks for one
            # A CPU standing in for an fp16 accelerator (no NPU/GPU here) would compute in bf16 where it has
            # AVX512-BF16 or AMX: 8 mantissa bits against fp16's 11, failing builds the accelerator runs well.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        compiled = core.compile_model(core.read_model(str(model)), device, config)
        return OvSession(compiled, f"openvino {device}")
