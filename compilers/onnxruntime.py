"""ONNX Runtime backend: offline graph optimisation (fp32), fp16 for GPU profiles, static int8 QDQ per-channel."""

import importlib.metadata
import logging
from pathlib import Path
from typing import Literal

from edgekit.compile.intake import initializer_bytes
from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.errors import BadInput
from edgekit.profiles import Profile
from edgekit.schema import Precision

log = logging.getLogger(__name__)

PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel scales) arrived in opset 13


class OrtOptions(BackendOptions):
    execution_providers: list[str] = ["CPUExecutionProvider"]
    per_channel: bool = True
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    module = "onnxruntime"
    precisions = frozenset({"fp32", "fp16", "int8"})
    Options = OrtOptions
    keeps_float = True

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
    TVM backend, which imports the QDQ graph. Only float compute is quantized: the request's keep_float nodes,
    non-ONNX-domain ops (ai.onnx.ml) and nodes that produce integer tensors (labels, shapes) stay as they are."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    assert request.calibration is not None, "int8 builds are planned only with calibration data"
    work = request.outdir / "quant"
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "model.pre.onnx"
    per_channel, excluded, float_fed = _prepare_for_quantizer(request, prepared, per_channel)
    feeds = list(request.calibration.batches(request.model.batch_size))
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
            nodes_to_exclude=excluded,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[calibrate_method],
        )
    _feed_float(quantized, float_fed)
    _require_quantized(request, quantized)
    return quantized


def _require_quantized(request: BuildRequest, quantized: Path) -> None:
    """An "int8" model in which nothing was quantized is fp32 under another name. It happens when all the compute
    sits inside If/Loop bodies (a VAD's per-sample-rate branches), which ONNX Runtime's quantizer does not enter."""
    import onnx

    if not any(node.op_type == "DequantizeLinear" for node in onnx.load(str(quantized)).graph.node):
        raise BadInput(
            f"{request.model.source}: int8 quantized nothing: the model's compute is inside If/Loop bodies (or all "
            "of it is kept in float), which ONNX Runtime's quantizer does not enter; build it as fp32"
        )


def _prepare_for_quantizer(request: BuildRequest, target: Path, per_channel: bool) -> tuple[bool, list[str], set[str]]:
    """Write the model ORT's quantizer gets to `target`; return whether it can be quantized per channel, the nodes
    to leave in float, and those of them to feed float tensors (_feed_float). Intake already simplified the graph
    and inferred shapes, so ORT's own pre-processing (quant_pre_process) is not run: its optimiser would rename
    nodes that keep_float refers to."""
    import onnx

    model = onnx.load(str(request.model.path))
    _merge_duplicate_opsets(model)
    excluded, float_fed = _nodes_left_in_float(model, request.keep_float)
    if len(excluded) == len(model.graph.node):
        raise BadInput(
            f"{request.model.source}: int8 has nothing to quantize: every node is an ai.onnx.ml op, produces "
            "integers or is kept in float"
        )
    if per_channel and _default_opset(model) < PER_CHANNEL_OPSET:
        model, per_channel = _upgrade_for_per_channel(model)
    _flatten_gemm_biases(model)
    # ORT's quantizer warns about every model without this mark; intake has done the equivalent work.
    model.metadata_props.add(key="onnx.quant.pre_process", value="onnxruntime.quant")
    onnx.save(model, str(target))
    return per_channel, excluded, float_fed


def _merge_duplicate_opsets(model) -> None:
    """List each operator set once, at its highest version. skl2onnx 1.20 lists the default domain twice in its
    tree-ensemble and linear-model exports, and ORT's quantizer then stops ("Failed to find proper ai.onnx domain")."""
    from onnx import helper

    versions: dict[str, int] = {}
    for opset in model.opset_import:
        domain = "" if opset.domain == "ai.onnx" else opset.domain
        versions[domain] = max(versions.get(domain, 0), opset.version)
    if len(versions) < len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in versions.items())


def _default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _upgrade_for_per_channel(model):
    """Per-channel DequantizeLinear has an `axis` only from opset 13. ORT's quantizer writes it into older models
    anyway, which ORT then refuses to load (paddle2onnx's opset 11/12 exports: INVALID_GRAPH … Unrecognized
    attribute: axis for operator DequantizeLinear). Upgrade the opset, or quantize per tensor where that fails."""
    import onnx

    try:
        upgraded = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as error:  # the converter raises assorted errors; per-tensor works at any opset
        log.warning("opset %d kept, weights quantized per tensor (upgrade failed: %s)", _default_opset(model), error)
        return model, False
    return upgraded, True


def _flatten_gemm_biases(model) -> None:
    """Store Gemm biases of shape [1, N] as [N]. skl2onnx writes them 2-D; ORT's per-channel bias check indexes the
    bias as 1-D and fails ("The truth value of an array with more than one element is ambiguous"). Gemm
    broadcasts its bias, so both shapes compute the same."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    flattened: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) < 2 or any(d != 1 for d in bias.dims[:-1]):
            continue
        if bias.name not in flattened:
            flat = numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), f"{bias.name}_flat")
            model.graph.initializer.append(flat)
            flattened[bias.name] = flat.name
        node.input[2] = flattened[bias.name]


def _nodes_left_in_float(model, keep_float: frozenset[str]) -> tuple[list[str], set[str]]:
    """(nodes to leave in float, those of them to feed float tensors): keep_float plus what int8 cannot serve: ops
    outside the ONNX domain (ai.onnx.ml label lookups, tree ensembles), standalone BatchNormalizations, and nodes
    producing integer tensors (shape arithmetic, labels), which the quantizer would otherwise try to wrap in Q/DQ
    where shape inference left their types unknown."""
    import onnx

    names = {node.name for node in model.graph.node}
    unknown = sorted(keep_float - names)
    if unknown:
        raise ValueError(f"keep_float names nodes the model does not have: {', '.join(unknown)}")
    types = _tensor_types(onnx.shape_inference.infer_shapes(model))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    integer = {
        node.name
        for node in model.graph.node
        if any(types.get(output, onnx.TensorProto.FLOAT) not in floats for output in node.output if output)
    }
    # The quantizer pins a Softmax output's range to [0, 1] and fails ("Only an existing tensor can be modified")
    # where that output was never calibrated: its calibrator skips tensors of unknown type, as ONNX's shape inference
    # leaves them downstream of a contrib op it does not know.
    untyped = {node.name for node in model.graph.node if node.op_type == "Softmax" and node.output[0] not in types}
    foreign = {node.name for node in model.graph.node if _is_foreign(node)}
    float_fed = _with_movers_in_front(model, set(keep_float) | foreign | _standalone_batch_norms_and_writers(model))
    return sorted(float_fed | integer | untyped | _activations_feeding(model, float_fed)), float_fed


# Ops through which ONNX Runtime's QDQPropagationTransformer moves a DequantizeLinear forward at load time.
DQ_PROPAGATING_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"})


def _with_movers_in_front(model, nodes: set[str]) -> set[str]:
    """`nodes` plus the MaxPool/Reshape/... chains that feed them, which must read float too. Fed float at its
    own input only, a float Conv behind a MaxPool still ends up reading a DequantizeLinear once ORT propagates the
    DQ past the MaxPool, and WeightBiasQuantization then quantizes its weights per tensor: keeping the second conv
    of Inception v2 in float made it worse than plain int8 (top-1 agreement 76% -> 6%)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    grown, frontier = set(nodes), [node for node in model.graph.node if node.name in nodes]
    while frontier:
        node = frontier.pop()
        for name in node.input[:1] if node.op_type in DQ_PROPAGATING_OPS else node.input:
            mover = producers.get(name)
            if mover is not None and mover.op_type in DQ_PROPAGATING_OPS and mover.name not in grown:
                grown.add(mover.name)
                frontier.append(mover)
    return grown


def _standalone_batch_norms_and_writers(model) -> set[str]:
    """BatchNormalization nodes no Conv or Gemm feeds (pre-activation ones), and the nodes that write their inputs
    (a DenseNet's Concat, a MaxPool), all left in float and fed float. BN divides each channel by its standard
    deviation, so it magnifies the rounding of a per-tensor scale in every channel whose spread is small against
    the tensor's range: by 1/sqrt(epsilon), ~300, for a constant channel, ~40 for DenseNet-121's first block, whose
    features went from 0% to 86% top-1 agreement once its Concats stopped re-quantizing them. A BN after a Conv is
    the Conv's (ORT fuses the two at load)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    standalone = [
        node
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        and getattr(producers.get(node.input[0]), "op_type", None) not in ("Conv", "ConvTranspose", "Gemm")
    ]
    writers = {producers[node.input[0]].name for node in standalone if node.input[0] in producers}
    return {node.name for node in standalone} | writers


def _is_foreign(node) -> bool:
    """An op outside the ONNX domain (ai.onnx.ml, contrib ops): never quantized, always fed in float."""
    return node.domain not in ("", "ai.onnx")


def _activations_feeding(model, nodes: set[str]) -> set[str]:
    """Relu and Clip nodes whose outputs `nodes` read. The quantizer removes such an activation where the
    quantization of its producer's output can clamp instead; a float consumer fed past that Q (_feed_float) would
    then read the unclamped tensor, so these stay as nodes, in float."""
    producers = {output: node for node in model.graph.node for output in node.output}
    return {
        producers[name].name
        for node in model.graph.node
        if node.name in nodes
        for name in node.input
        if name in producers and producers[name].op_type in ("Relu", "Clip")
    }


def _feed_float(path: Path, float_fed: set[str]) -> None:
    """Give the float_fed nodes (keep_float, foreign ops, standalone BNs) the float tensors that Q→DQ pairs
    quantized. The quantizer leaves them unquantized but still feeds them through Q→DQ where a quantized neighbour
    shares the tensor, and ONNX Runtime's WeightBiasQuantization pass (at every load, also on the device) then
    quantizes the weights of a Conv, ConvTranspose or Gemm fed by a DequantizeLinear: per tensor, worse than the
    int8 build it was meant to escape."""
    import onnx

    model = onnx.load(str(path))
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.name in float_fed:
            node.input[:] = [_before_qdq(producers, name) for name in node.input]
    _remove_unused_qdq(model)
    onnx.save(model, str(path))


def _before_qdq(producers: dict, name: str) -> str:
    """The float tensor that a Q→DQ pair turned into `name`, or `name` itself."""
    dequantize = producers.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return name
    quantize = producers.get(dequantize.input[0])
    return quantize.input[0] if quantize is not None and quantize.op_type == "QuantizeLinear" else name


def _remove_unused_qdq(model) -> None:
    """Drop Q/DQ nodes whose outputs nothing reads any more (after _feed_float), consumers first."""
    while True:
        read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        unused = [
            node
            for node in model.graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not read & set(node.output)
        ]
        if not unused:
            return
        for node in unused:
            model.graph.node.remove(node)


def _tensor_types(model) -> dict[str, int]:
    """Element type of every typed tensor in the graph; sequences and maps have none."""
    values = [*model.graph.input, *model.graph.value_info, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    return types


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
