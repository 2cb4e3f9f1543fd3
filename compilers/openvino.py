"""OpenVINO backend: IR with fp32 or fp16 weights, int8 via NNCF post-training quantization."""

import importlib.metadata
from typing import Literal

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.profiles import Profile
from edgekit.schema import Precision


class OvOptions(BackendOptions):
    device: str = "CPU"
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True


class OpenVinoBackend(Backend):
    name = "openvino"
    module = "openvino"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = OvOptions

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        if profile.cpu.arch not in ("x86_64", "aarch64"):
            return f"OpenVINO runs on x86-64 and aarch64, not {profile.cpu.arch}"
        if profile.accelerator.kind == "cuda":
            return "OpenVINO has no CUDA device"
        return super().unsupported_reason(profile, precision)

    def versions(self) -> dict[str, str]:
        return {"openvino": importlib.metadata.version("openvino"), "nncf": importlib.metadata.version("nncf")}

    def build(self, request: BuildRequest) -> BuildResult:
        import openvino as ov

        options: OvOptions = request.options  # type: ignore[assignment]
        request.outdir.mkdir(parents=True, exist_ok=True)
        with request.progress.task(f"openvino {request.precision}: converting to IR", total=1):
            model = ov.convert_model(str(request.model.path))
        if request.precision == "int8":
            model = self._quantize(model, request, options)
        artifact = request.outdir / "model.xml"
        ov.save_model(model, str(artifact), compress_to_fp16=request.precision == "fp16")
        return BuildResult(
            entrypoint=artifact,
            runtime="openvino",
            target={"device": options.device},
            param_bytes=artifact.with_suffix(".bin").stat().st_size,
        )

    @staticmethod
    def _quantize(model, request: BuildRequest, options: OvOptions):
        import nncf

        assert request.calibration is not None, "int8 builds are planned only with calibration data"
        feeds = list(request.calibration.batches(request.model.inputs[0].shape[0]))
        with request.progress.task("openvino int8: NNCF calibration", total=len(feeds)):
            return nncf.quantize(
                model,
                nncf.Dataset(feeds),
                subset_size=len(feeds),
                preset=nncf.QuantizationPreset.MIXED
                if options.preset == "mixed"
                else nncf.QuantizationPreset.PERFORMANCE,
                fast_bias_correction=options.fast_bias_correction,
            )
