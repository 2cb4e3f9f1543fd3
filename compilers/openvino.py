"""OpenVINO backend: IR with fp32 or fp16 weights, int8 via NNCF post-training quantization."""

import importlib.metadata
from pathlib import Path
from typing import Literal

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.errors import BadInput
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
            model = _convert(request.model.path, request.model.source)
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
                ignored_scope=nncf.IgnoredScope(names=_ops_of_nodes(model, request.model.path, request.keep_float)),
            )


def _convert(path: Path, source: Path):
    """The OpenVINO model of an ONNX file. What OpenVINO cannot take (e.g. scikit-learn's ai.onnx.ml ops) is refused
    in one line naming the ops, from the summary at the end of OpenVINO's multi-line report."""
    import openvino as ov
    from openvino.frontend import OpConversionFailure

    try:
        return ov.convert_model(str(path))
    except (OpConversionFailure, RuntimeError) as error:
        raise BadInput(f"{source}: OpenVINO cannot convert this model: {_conversion_summary(str(error))}") from None


def _conversion_summary(message: str) -> str:
    """The '-- ' lines after OpenVINO's last 'Summary:' (one per kind of failure, naming the ops), else the last
    line of the message (e.g. "Unsupported value_info type: output_probability")."""
    _, _, summary = message.rpartition("Summary:")
    failures = [line.strip().removeprefix("-- ") for line in summary.splitlines() if line.strip().startswith("-- ")]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return "; ".join(failures) or (lines[-1] if lines else "no reason given")


def _ops_of_nodes(model, onnx_path: Path, nodes: frozenset[str]) -> list[str]:
    """Friendly names of the OpenVINO ops that the named ONNX nodes became, for NNCF's ignored scope. OpenVINO names
    ops after ONNX nodes only in part: a Conv becomes Convolution '<node>/WithoutBiases' plus Add '<node>', an op
    that produces a graph output takes that output's name, helper ops get generated names. What it keeps is every
    ONNX tensor name, on the output that carries it; so a node's ops are the ones from its output tensors back to
    the nearest named tensors (its inputs)."""
    import onnx

    if not nodes:
        return []
    outputs = {node.name: set(node.output) for node in onnx.load(str(onnx_path)).graph.node}
    unknown = sorted(nodes - outputs.keys())
    if unknown:
        raise ValueError(f"keep_float names nodes the model does not have: {', '.join(unknown)}")
    producers = {
        name: op
        for op in model.get_ordered_ops()
        if op.get_type_name() != "Result"
        for output in op.outputs()
        for name in output.get_names()
    }
    names: set[str] = set()
    for node in sorted(nodes):
        ops = _ops_back_to_named_tensors([producers[tensor] for tensor in outputs[node] if tensor in producers])
        if not ops:
            raise ValueError(f"keep_float: ONNX node '{node}' has no OpenVINO op (OpenVINO folded it away)")
        names |= ops
    return sorted(names)


def _ops_back_to_named_tensors(ops: list) -> set[str]:
    """Friendly names of `ops` and of the ops upstream of them up to named tensors, constants and parameters."""
    names: set[str] = set()
    while ops:
        op = ops.pop()
        if op.get_friendly_name() in names or op.get_type_name() in ("Constant", "Parameter"):
            continue
        names.add(op.get_friendly_name())
        ops.extend(i.get_source_output().get_node() for i in op.inputs() if not i.get_source_output().get_names())
    return names
