"""OpenVINO backend: IR with fp32 or fp16 weights, int8 via NNCF post-training quantization."""

import importlib.metadata
import logging
from pathlib import Path
from typing import Any, Literal

from edgekit.compile.intake import PreparedModel
from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.errors import BadInput
from edgekit.profiles import Profile
from edgekit.schema import Precision

log = logging.getLogger(__name__)

RECURRENT = ["LSTMSequence", "LSTMCell", "GRUSequence", "GRUCell", "RNNSequence", "RNNCell"]  # OpenVINO op types


class OvOptions(BackendOptions):
    device: str = "CPU"
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True


class OpenVinoBackend(Backend):
    name = "openvino"
    module = "openvino"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = OvOptions
    keeps_float = True

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
            model, kept_ops = _convert(request.model, _float_nodes(request))
        if request.precision == "int8":
            model = self._quantize(model, request, options, kept_ops)
        artifact = request.outdir / "model.xml"
        ov.save_model(model, str(artifact), compress_to_fp16=request.precision == "fp16")
        return BuildResult(
            entrypoint=artifact,
            runtime="openvino",
            target=_target(options, request.precision),
            param_bytes=artifact.with_suffix(".bin").stat().st_size,
        )

    @staticmethod
    def _quantize(model, request: BuildRequest, options: OvOptions, kept_ops: list[str]):
        import nncf

        assert request.calibration is not None, "int8 builds are planned only with calibration data"
        feeds = list(request.calibration.batches(request.model.batch_size))
        with request.progress.task("openvino int8: NNCF calibration", total=len(feeds)):
            return nncf.quantize(
                model,
                nncf.Dataset(feeds),
                subset_size=len(feeds),
                preset=nncf.QuantizationPreset.MIXED
                if options.preset == "mixed"
                else nncf.QuantizationPreset.PERFORMANCE,
                fast_bias_correction=options.fast_bias_correction,
                # Recurrent cells stay float, as in ONNX Runtime's QDQ: int8 error in a state compounds every step.
                ignored_scope=nncf.IgnoredScope(names=kept_ops, types=RECURRENT, validate=False),
                advanced_parameters=_mixed_precision_ranges() if request.int8_only is not None else None,
            )


def _mixed_precision_ranges():
    """Mixed-precision rounds quantize with the ranges the sensitivity ranking measured with: ONNX Runtime's global
    min/max. NNCF's default (the mean of per-sample maxima) clips the rare large values that a layer's ranking
    assumed intact: a voice detector's speech probabilities, near 0 in most windows, lost their peaks (cosine
    0.95 where the ranking promised 0.9999)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)


def _float_nodes(request: BuildRequest) -> frozenset[str]:
    """ONNX nodes to keep in float: the named ones, or with mixed precision every node it may not quantize."""
    if request.int8_only is None:
        return request.keep_float
    import onnx

    named = {node.name for node in onnx.load(str(request.model.path)).graph.node if node.name}
    return frozenset(named - request.int8_only) | request.keep_float


def _convert(model: PreparedModel, keep_float: frozenset[str]) -> tuple[Any, list[str]]:
    """The OpenVINO model of a prepared ONNX model, and the names of the ops that its keep_float nodes became.

    These are ov.convert_model's own steps (OpenVINO's ONNX frontend, then its MOC transformations and cleanups),
    spelled out because the mapping needs the model in between. The frontend keeps every ONNX tensor name on the
    output that carries it; MOC then fuses ops and drops those names (a Conv and the per-channel Mul after it, as in
    paddle's exports, become one Convolution named after the Mul or 'Multiply_<n>'), recording only in each op's
    fused_names which frontend ops it absorbed; and convert_model's last step erases fused_names too."""
    from openvino._offline_transformations import (
        apply_fused_names_cleanup,
        apply_moc_legacy_transformations,
        apply_moc_transformations,
        compress_quantize_weights_transformation,
    )
    from openvino.frontend import FrontEndManager, OpConversionFailure

    frontend = FrontEndManager().load_by_framework("onnx")
    try:
        converted = frontend.convert(frontend.load(str(model.path)))
    except (OpConversionFailure, RuntimeError) as error:
        raise BadInput(
            f"{model.source}: OpenVINO cannot convert this model: {_conversion_summary(str(error))}"
        ) from None
    kept = {node: _frontend_ops(converted, tensors) for node, tensors in _node_outputs(model.path, keep_float).items()}
    apply_moc_transformations(converted, cf=False, smart_reshape=True)
    compress_quantize_weights_transformation(converted)
    apply_moc_legacy_transformations(converted, [])
    ignored = _ops_absorbing(converted, kept)
    apply_fused_names_cleanup(converted)
    return converted, ignored


def _conversion_summary(message: str) -> str:
    """The '-- ' lines after OpenVINO's last 'Summary:' (one per kind of failure, naming the ops), else the last
    line of the message (e.g. "Unsupported value_info type: output_probability")."""
    _, _, summary = message.rpartition("Summary:")
    failures = [line.strip().removeprefix("-- ") for line in summary.splitlines() if line.strip().startswith("-- ")]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(failures) or (lines[-1] if lines else "no reason given")


def _node_outputs(path: Path, nodes: frozenset[str]) -> dict[str, set[str]]:
    """Output tensor names of each named ONNX node."""
    import onnx

    if not nodes:
        return {}
    outputs = {node.name: set(node.output) for node in onnx.load(str(path)).graph.node}
    unknown = sorted(nodes - outputs.keys())
    if unknown:
        raise ValueError(f"keep_float names nodes the model does not have: {', '.join(unknown)}")
    return {node: outputs[node] for node in nodes}


def _frontend_ops(model, tensors: set[str]) -> set[str]:
    """Friendly names of the frontend ops that compute `tensors`: from the ops whose outputs carry those names back
    to the nearest named tensors (the ONNX node's inputs). The frontend names ops after ONNX nodes only in part (a
    Conv becomes Convolution '<node>/WithoutBiases' plus Add '<node>', an op making a graph output takes the output's
    name, helpers get generated names), so the tensor names are what ties them to the node."""
    producers = {
        name: op
        for op in model.get_ordered_ops()
        if op.get_type_name() != "Result"
        for output in op.outputs()
        for name in output.get_names()
    }
    pending = [producers[tensor] for tensor in tensors if tensor in producers]
    names: set[str] = set()
    while pending:
        op = pending.pop()
        if op.get_friendly_name() in names or op.get_type_name() in ("Constant", "Parameter"):
            continue
        names.add(op.get_friendly_name())
        pending.extend(i.get_source_output().get_node() for i in op.inputs() if not i.get_source_output().get_names())
    return names


def _ops_absorbing(model, kept: dict[str, set[str]]) -> list[str]:
    """Friendly names of the ops (after MOC) that absorbed any frontend op of a kept node. A node OpenVINO folded
    away entirely (a Reshape paddle2onnx put after a MatMul) computes nothing left to keep in float."""
    absorbed = {
        op.get_friendly_name(): _fused_names(op)
        for op in model.get_ordered_ops()
        if op.get_type_name() not in ("Constant", "Parameter", "Result")
    }
    names: set[str] = set()
    for node, frontend_ops in sorted(kept.items()):
        ops = {name for name, fused in absorbed.items() if fused & frontend_ops}
        if not ops:
            log.debug("keep_float: ONNX node %s has no OpenVINO op (folded away)", node)
        names |= ops
    return sorted(names)


def _fused_names(op) -> set[str]:
    """The frontend ops this op stands for (its own name where transformations recorded none)."""
    info = op.get_rt_info()
    if "fused_names_0" not in info:
        return {op.get_friendly_name()}
    return set(info["fused_names_0"].astype(str).split(","))


def _target(options: OvOptions, precision: str) -> dict[str, str]:
    """What the device asks OpenVINO for. OpenVINO computes in bf16 by default on CPUs that have it (AVX512-BF16,
    AMX), so an fp32 bundle also asks for f32: else it is neither what its name says nor what other hosts verify.
    So does int8 on a CPU: the layers it leaves in float (mixed precision keeps the sensitive ones there) are fp32.
    An accelerator (NPU) computes those in fp16 whatever is asked."""
    asks_f32 = precision == "fp32" or (precision == "int8" and options.device == "CPU")
    return {"device": options.device, **({"inference_precision": "f32"} if asks_f32 else {})}
