"""ONNX Runtime backend: offline graph optimisation (fp32), fp16 for GPU profiles, static int8 QDQ per-channel."""

import importlib.metadata
from pathlib import Path
from typing import Literal

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.intake import initializer_bytes
from edgekit.profiles import Profile
from edgekit.schema import Precision


class OrtOptions(BackendOptions):
    execution_providers: list[str] = ["CPUExecutionProvider"]
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "onnxruntime"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = OrtOptions

    def unsupported_reason(self, profile: Profile, precision: Precision) -> str | None:
        if profile.cpu.arch == "cortex-m":
            return "ONNX Runtime does not run on microcontrollers"
        if precision == "fp16" and profile.accelerator.kind != "cuda":
            return "fp16 with ONNX Runtime is for GPU profiles (its CPU fp16 kernels are few and slower than fp32)"
        return super().unsupported_reason(profile, precision)

    def versions(self) -> dict[str, str]:
        return {"onnxruntime": importlib.metadata.version("onnxruntime"), "onnx": importlib.metadata.version("onnx")}

    def build(self, request: BuildRequest) -> BuildResult:
        options: OrtOptions = request.options  # type: ignore[assignment]
        request.outdir.mkdir(parents=True, exist_ok=True)
        source = request.model.path
        if request.precision == "int8":
            source = quantize_qdq(request, options.per_channel, options.calibrate_method)
        elif request.precision == "fp16":
            source = self._to_fp16(request)
        artifact = request.outdir / "model.onnx"
        with request.progress.task(f"onnxruntime {request.precision}: offline graph optimisation", total=1):
            self._optimize(source, artifact, request.profile)
        lower_ir_version(artifact)
        return BuildResult(
            entrypoint=artifact,
            runtime="onnxruntime",
            target={"execution_providers": options.execution_providers},
            param_bytes=initializer_bytes(artifact),
        )

    @staticmethod
    def _optimize(source: Path, artifact: Path, profile: Profile) -> None:
        """Save ORT's graph-optimised model. Extended fusions are CPU kernels, so GPU profiles stay at basic;
        layout (level 'all') optimisations are machine-specific and left to the device at load time."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            if profile.accelerator.kind == "cuda"
            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        options.optimized_model_filepath = str(artifact)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _to_fp16(request: BuildRequest) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with request.progress.task("onnxruntime fp16: converting weights and ops", total=1):
            model = convert_float_to_float16(onnx.load(str(request.model.path)), keep_io_types=True)
            path = request.outdir / "model.fp16.onnx"
            onnx.save(model, str(path))
        return path


def quantize_qdq(request: BuildRequest, per_channel: bool = True, calibrate_method: str = "minmax",
                 who: str = "onnxruntime") -> Path:  # fmt: skip
    """Static int8 QDQ model from ONNX Runtime's quantizer and the request's calibration data. Shared with the
    TVM backend, which imports the QDQ graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    assert request.calibration is not None, "int8 builds are planned only with calibration data"
    work = request.outdir / "quant"
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "model.pre.onnx"
    quant_pre_process(str(request.model.path), str(prepared), skip_symbolic_shape=True)
    feeds = list(request.calibration.batches(request.model.inputs[0].shape[0]))
    quantized = work / "model.int8.onnx"
    profile = request.profile
    # x86 CPUs without VNNI can saturate u8*s8 products; ORT's documented remedy is 7-bit weights.
    reduce_range = profile.cpu.arch == "x86_64" and not {"avx512vnni", "avxvnni"} & set(profile.cpu.isa)
    with request.progress.task(f"{who} int8: calibrating", total=len(feeds)) as advance:
        quantize_static(
            str(prepared),
            str(quantized),
            _Reader(feeds, advance),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[calibrate_method],
        )
    return quantized


class _Reader:
    """ORT's CalibrationDataReader protocol over prepared feeds, advancing a progress bar per batch."""

    def __init__(self, feeds, advance) -> None:
        self._feeds = iter(feeds)
        self._advance = advance

    def get_next(self):
        feed = next(self._feeds, None)
        if feed is not None:
            self._advance(1)
        return feed


def lower_ir_version(path: Path) -> None:
    """Stamp the lowest ONNX IR version the model's operator sets need. Models keep the IR version of the onnx
    package that wrote them (14 for onnx 1.20), and a device's older ONNX Runtime refuses anything newer than it
    knows (1.23 stops at 11) although nothing in the file needs it."""
    import onnx

    model = onnx.load(str(path))
    used = {node.domain for node in model.graph.node} | {""}
    # ORT's optimiser declares every domain it knows; unused ones would still pin a newer IR version.
    opsets = [opset for opset in model.opset_import if opset.domain in used]
    lowest = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    if lowest < model.ir_version or len(opsets) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(opsets)
        model.ir_version = min(lowest, model.ir_version)
        onnx.save(model, str(path))
