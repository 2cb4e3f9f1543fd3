"""TFLite backend: ONNX → TFLite via onnx2tf (fp32, fp16, full-integer int8 on the user's calibration data).

Input layout is kept as in the ONNX model (NCHW stays NCHW), so the bundle's interface does not change with the
backend. The conversion runs in a subprocess (see _onnx2tf_worker.py); its log is kept for the error message.
"""

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.plugins import installed
from edgekit.profiles import Profile
from edgekit.schema import Precision

OUTPUT_SUFFIX = {
    "fp32": "_float32.tflite",
    "fp16": "_float16.tflite",
    "int8": "_integer_quant.tflite",  # int8 weights and activations, float32 input/output
    "int8-io": "_full_integer_quant.tflite",  # int8 throughout, for NPUs that take integer tensors
}


class TfliteOptions(BackendOptions):
    integer_io: bool = False


class TfliteBackend(Backend):
    name = "tflite"
    module = "onnx2tf"
    extra = "tflite"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = TfliteOptions

    @classmethod
    def available(cls) -> bool:
        return installed("onnx2tf") and installed("tensorflow") and installed("onnx_graphsurgeon")

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        if profile.cpu.arch == "cortex-m":
            return "plain TFLite does not target microcontrollers; the vela backend builds for Ethos-U"
        return super().unsupported_reason(profile, precision)

    def versions(self) -> dict[str, str]:
        return {name: importlib.metadata.version(name) for name in ("onnx2tf", "tensorflow")}

    def build(self, request: BuildRequest) -> BuildResult:
        options: TfliteOptions = request.options  # type: ignore[assignment]
        variant = "int8-io" if request.precision == "int8" and options.integer_io else request.precision
        artifact = request.outdir / "model.tflite"
        weight_bytes = convert(request, variant, artifact)
        return BuildResult(entrypoint=artifact, runtime="litert", target={}, param_bytes=weight_bytes)


def convert(request: BuildRequest, variant: str, artifact: Path) -> int:
    """Convert request.model to the TFLite variant (fp32, fp16, int8, int8-io), write it to artifact, and
    return its weight bytes."""
    work = artifact.parent.parent / f"onnx2tf-{variant}"
    work.mkdir(parents=True, exist_ok=True)
    calibration = {}
    if variant.startswith("int8"):
        assert request.calibration is not None, "int8 builds are planned only with calibration data"
        for name, samples in request.calibration.inputs.items():
            np.save(work / f"calib-{len(calibration)}.npy", samples)
            calibration[name] = str(work / f"calib-{len(calibration)}.npy")
    job = {
        "workdir": str(work),
        "model": str(request.model.path),
        "output": str(work / "out"),
        "calibration": calibration,
        "keep_layout_inputs": [t.name for t in request.model.inputs if t.layout == "NCHW"],
    }
    (work / "job.json").write_text(json.dumps(job))
    log = work / "onnx2tf.log"
    with request.progress.task(f"tflite {request.precision}: onnx2tf conversion", total=1), log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-m", "edgekit.compilers._onnx2tf_worker", str(work / "job.json")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
        )
    produced = next((work / "out").glob(f"*{OUTPUT_SUFFIX[variant]}"), None)
    if done.returncode != 0 or produced is None:
        raise RuntimeError(f"onnx2tf failed (exit {done.returncode}): {_last_error(log)}")
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(produced, artifact)
    return json.loads((work / "out" / "weights.json").read_text())[produced.name]


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ERROR" in line]
    return (errors or lines or ["no output"])[-1][:300]
