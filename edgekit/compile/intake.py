"""Model intake: load an ONNX file, reject what no backend can build, fix dynamic dims, simplify.

Every rejection is a BadInput naming the file and the node, op, input or field at fault.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import BadInput
from edgekit.manifest import Layout, TensorSpec

log = logging.getLogger(__name__)

MIN_OPSET = 7
# Old models (e.g. the ONNX-zoo classics at opset 9) are upgraded to this opset, which every backend's importer
# covers (TVM's and onnx2tf's converters and ORT's per-channel QDQ need >= 13); newer models keep theirs.
UPGRADE_OPSET = 13
# Symbolic dim names exporters use for the batch (PyTorch "batch_size", Keras "N", paddle "-1" → unnamed).
BATCH_DIM_NAMES = {"batch", "batch_size", "batchsize", "bs", "b", "n", "unk__batch"}
# Domains whose ops some runtime implements: the ONNX standard sets and ONNX Runtime's contrib ops.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
GRAPH_ATTRIBUTE = 5  # onnx.AttributeProto.GRAPH: If branches, Loop and Scan bodies
# A lowered op family must give ONNX Runtime's outputs on this many synthetic feeds, floats at these scales, within
# these tolerances (integer outputs, e.g. labels, exactly).
LOWERING_FEEDS = 12
LOWERING_SCALES = (1.0, 10.0, 100.0)
LOWERING_RTOL, LOWERING_ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class PreparedModel:
    """A checked, static-shaped, simplified fp32 model on disk, ready for every backend."""

    path: Path
    source: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    param_bytes: int  # weight (initializer) bytes, counted once when the model is prepared
    # Values an integer input plausibly takes (e.g. the sample rates a scalar `sr` is compared with), for synthetic
    # feeds: a random integer is as wrong for a sample rate as a random float.
    value_hints: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what intake changed that the user should know about

    @property
    def batch_size(self) -> int:
        from edgekit.samples import feed_size

        return feed_size(self.inputs)


def parse_shape_overrides(specs: list[str]) -> dict[str, list[int]]:
    """`--input-shape x:1x3x224x224` → {"x": [1, 3, 224, 224]}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise BadInput(
                f"--input-shape '{spec}': expected NAME:D1xD2x... with positive dims, e.g. input:1x3x224x224"
            )
        shapes[name] = shape
    return shapes


def parse_input_values(specs: list[str]) -> dict[str, list[float]]:
    """`--input-value sr=16000` → {"sr": [16000.0]}; cast to the input's type when it is frozen."""
    values: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        try:
            numbers = [float(v) for v in text.split(",")]
        except ValueError:
            numbers = []
        if not sep or not name or not numbers:
            raise BadInput(f"--input-value '{spec}': expected NAME=VALUE or NAME=V1,V2,..., e.g. sr=16000")
        values[name] = numbers
    return values


def _freeze_inputs(path: Path, model, values: dict[str, list[float]], notes: list[str]) -> None:
    """Replace each named graph input by a constant of its type and shape (onnxslim then folds control flow that
    reads it)."""
    from onnx import helper, numpy_helper

    inputs = {value.name: value for value in _graph_inputs(model)}
    for name, numbers in values.items():
        value = inputs.get(name)
        if value is None:
            raise BadInput(f"{path}: --input-value {name}: no such input (inputs: {', '.join(inputs)})")
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        shape = dims if None not in dims else [len(numbers)] * len(dims)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if int(np.prod(shape)) != len(numbers):
            raise BadInput(
                f"{path}: --input-value {name}: {len(numbers)} value(s) given, the input's shape {dims or '[]'} "
                f"holds {int(np.prod(shape))}"
            )
        model.graph.input.remove(value)
        model.graph.initializer.append(numpy_helper.from_array(np.array(numbers).astype(dtype).reshape(shape), name))
        shown = ",".join(f"{n:g}" for n in numbers)
        notes.append(f"input {name} frozen to {shown} (--input-value): the bundle has no {name} input")


def _freezing_hints(model, hints: dict[str, list[int]]) -> list[str]:
    """Control flow at the top of the graph hides its layers from int8 quantizers and most converters; where an
    integer input it compares with constants is what it branches on, freezing that input folds it away."""
    if not any(node.op_type in ("If", "Loop") for node in model.graph.node):
        return []
    remaining = {value.name for value in _graph_inputs(model)}
    return [
        f"the graph branches on input {name}: if the device always feeds one value, --input-value {name}="
        f"{values[0]} folds the branches away, so int8 and every backend see its layers"
        for name, values in hints.items()
        if name in remaining and values
    ]


def _load(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.is_file():
        raise BadInput(f"{path}: no such model file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as error:
        raise BadInput(f"{path}: not an ONNX model (protobuf parse failed: {error})") from None
    if model.ir_version == 0 or not model.graph.node or not model.opset_import:
        raise BadInput(f"{path}: not an ONNX model (no ir_version, opset_import or graph nodes)")
    return model


def _default_opset(path: Path, model) -> int:
    import onnx

    versions = {entry.domain: entry.version for entry in model.opset_import}
    opset = versions.get("", versions.get("ai.onnx"))
    if opset is None:
        raise BadInput(f"{path}: opset_import has no entry for the default ONNX domain")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise BadInput(f"{path}: opset {opset} is out of range; supported opsets are {MIN_OPSET}..{newest}")
    return opset


def _check_ops(path: Path, model, opset: int) -> None:
    import onnx

    for index, node in enumerate(model.graph.node):
        label = f"node '{node.name or f'#{index}'}' (op {node.domain + '::' if node.domain else ''}{node.op_type})"
        if node.domain not in KNOWN_DOMAINS:
            raise BadInput(f"{path}: {label}: custom domain '{node.domain}' is not supported by any edgekit backend")
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain in ("", "ai.onnx.ml") and not onnx.defs.has(node.op_type, domain):
            raise BadInput(f"{path}: {label}: unknown op; it is not part of ONNX opset {opset}")


def _is_dynamic(dim) -> bool:
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def _graph_inputs(model) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _batch_symbol(inputs) -> str | None:
    """The symbolic dim name that stands for the batch: a conventional name anywhere, else the first input's dim 0."""
    for graph_input in inputs:
        for dim in graph_input.type.tensor_type.shape.dim:
            if dim.dim_param and dim.dim_param.lower() in BATCH_DIM_NAMES:
                return dim.dim_param
    first = inputs[0].type.tensor_type.shape.dim if inputs else []
    if first and _is_dynamic(first[0]) and first[0].dim_param:
        return first[0].dim_param
    return None


def _batch_axis(graph_input, position: int, symbol: str | None, first_dim0: int | None) -> int | None:
    """Which dim of this input is the batch. By name where the exporter named it (an RNN state [2, batch, 128] has
    it at 1); else dim 0 of the first input, and dim 0 of the other inputs whose dim 0 is like it (dynamic too, or
    the same size). Scalars and inputs without such a dim (a sample rate, a fixed-size state) are not batched."""
    dims = list(graph_input.type.tensor_type.shape.dim)
    if not dims:
        return None
    if symbol is not None:
        return next((axis for axis, dim in enumerate(dims) if dim.dim_param == symbol), None)
    if position == 0:
        return 0
    if first_dim0 is None:
        return 0 if _is_dynamic(dims[0]) else None
    return 0 if not _is_dynamic(dims[0]) and dims[0].dim_value == first_dim0 else None


def _fix_input_shapes(path: Path, model, overrides: dict[str, list[int]], batch_size: int) -> dict[str, int | None]:
    """Make every input static (the batch dim from the profile, others from --input-shape); returns each input's
    batch axis."""
    graph_inputs = _graph_inputs(model)
    unknown = set(overrides) - {i.name for i in graph_inputs}
    if unknown:
        names = ", ".join(i.name for i in graph_inputs)
        raise BadInput(f"--input-shape names {', '.join(sorted(unknown))}, but the model's inputs are: {names}")
    symbol = _batch_symbol(graph_inputs)
    first_dims = graph_inputs[0].type.tensor_type.shape.dim if graph_inputs else []
    first_dim0 = first_dims[0].dim_value if first_dims and not _is_dynamic(first_dims[0]) else None
    axes = {i.name: _batch_axis(i, n, symbol, first_dim0) for n, i in enumerate(graph_inputs)}
    for graph_input in graph_inputs:
        dims = graph_input.type.tensor_type.shape.dim
        wanted = overrides.get(graph_input.name)
        if wanted is not None:
            _apply_override(graph_input.name, dims, wanted)
            continue
        for position, dim in enumerate(dims):
            if not _is_dynamic(dim):
                continue
            if position != axes[graph_input.name]:
                label = f" ('{dim.dim_param}')" if dim.dim_param else ""
                hint = "x".join(_dim_hint(dims, axes[graph_input.name], batch_size))
                raise BadInput(
                    f"{path}: input '{graph_input.name}' dim {position}{label} is dynamic; "
                    f"give it with --input-shape {graph_input.name}:{hint}"
                )
            dim.Clear()
            dim.dim_value = batch_size
    return axes


def _apply_override(name: str, dims, wanted: list[int]) -> None:
    if len(wanted) != len(dims):
        raise BadInput(f"--input-shape {name}: rank {len(wanted)} given, model input has rank {len(dims)}")
    for position, (dim, value) in enumerate(zip(dims, wanted, strict=True)):
        if not _is_dynamic(dim) and dim.dim_value != value:
            raise BadInput(
                f"--input-shape {name}: dim {position} is fixed to {dim.dim_value} in the model, got {value}"
            )
        dim.Clear()
        dim.dim_value = value


def _dim_hint(dims, batch_axis: int | None, batch_size: int) -> list[str]:
    return [
        str(d.dim_value) if not _is_dynamic(d) else (str(batch_size) if i == batch_axis else "N")
        for i, d in enumerate(dims)
    ]


def _modernize(path: Path, model, opset: int, notes: list[str]):
    """What onnx.checker and ONNX Runtime accept must load. IR < 4 lists every weight as a graph input, which
    later tools read as inputs a user must feed (or reject after they drop them); opsets below UPGRADE_OPSET miss
    what the backends' importers convert. Both are upgraded; a model the converter cannot upgrade keeps its opset."""
    import onnx
    from onnx import version_converter

    if model.ir_version < 4:
        initializers = {init.name for init in model.graph.initializer}
        kept = [i for i in model.graph.input if i.name not in initializers]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append(f"IR version {model.ir_version} model: weights listed as graph inputs are treated as constants")
    versions = list(model.opset_import)
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(versions, ignore_unknown=True), 4)
    if opset < UPGRADE_OPSET:
        try:
            upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
            onnx.checker.check_model(upgraded)
        except Exception as error:  # the converter raises assorted errors; the original opset still loads
            log.warning("%s: opset %d kept (upgrade to %d failed: %s)", path, opset, UPGRADE_OPSET, error)
        else:
            notes.append(f"opset {opset} upgraded to {UPGRADE_OPSET}")
            return upgraded
    return model


def _name_nodes(model) -> None:
    """Give every node a unique name: mixed precision and the report refer to layers by node name, and many
    exporters leave names empty or repeat them."""
    existing = {node.name for node in model.graph.node if node.name}
    used: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            name = f"{node.op_type}_{index}"
            while name in used or name in existing:
                name += "_"
            node.name = name
        used.add(node.name)


def _unwrap_zipmap(model, notes: list[str]) -> None:
    """scikit-learn exports end classifiers in ZipMap (a list of {class: probability} maps). No edge runtime passes
    such a value on; the probability tensor it wraps carries the same numbers, so that becomes the output."""
    import onnx

    zipmaps = [n for n in model.graph.node if n.op_type == "ZipMap"]
    if not zipmaps:
        return
    known = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in zipmaps:
        outputs = {o.name: o for o in model.graph.output}
        if node.output[0] not in outputs:
            continue
        position = list(model.graph.output).index(outputs[node.output[0]])
        replacement = onnx.ValueInfoProto()
        if node.input[0] in known:
            replacement.CopyFrom(known[node.input[0]])
        else:
            replacement.CopyFrom(onnx.helper.make_tensor_value_info(node.input[0], 1, ["batch", "classes"]))
        model.graph.node.remove(node)
        model.graph.output.remove(outputs[node.output[0]])
        model.graph.output.insert(position, replacement)
        notes.append(f"output '{node.output[0]}' (ZipMap) is replaced by the probability tensor '{node.input[0]}'")


def _integer_hints(model) -> dict[str, list[int]]:
    """For each integer input, constants the graph compares it with (Equal/Less/Greater… against a Constant or an
    initializer, also inside If/Loop bodies): a sample rate `sr` checked against 8000 and 16000 gets those."""
    from onnx import numpy_helper

    integer_types = {2, 3, 4, 5, 6, 7, 12, 13}
    wanted = {i.name for i in _graph_inputs(model) if i.type.tensor_type.elem_type in integer_types}
    constants: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    hints: dict[str, list[int]] = {}
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in _all_nodes(model.graph):
        if node.op_type not in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
            continue
        names = set(node.input)
        for name in names & wanted:
            for other in names - {name}:
                if other in constants and constants[other].size <= 16:
                    hints.setdefault(name, []).extend(int(v) for v in constants[other].ravel())
    return {name: sorted(set(values)) for name, values in hints.items()}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == GRAPH_ATTRIBUTE:
                yield from _all_nodes(attribute.g)


def _check(path: Path, model) -> None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0]
        raise BadInput(f"{path}: model is invalid: {first_line}") from None


def _infer_shapes(path: Path, model):
    """Checked, with shapes inferred. Where ONNX's inference gives up on a model ONNX Runtime runs (an LSTM inside an
    If branch), the model goes on without inferred shapes: a partial pass would write wrong ones into subgraphs,
    which ONNX Runtime then trusts. Outputs left unknown are measured by a run (`_measure_output_shapes`)."""
    import onnx

    _check(path, model)
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as error:
        log.debug("%s: shape inference failed (%s); output shapes will be measured", path, error)
        return model


def _run_synthetic(model, inputs: list[TensorSpec], hints: dict[str, list[int]]) -> list:
    from edgekit.compile.calibration import synthetic_feed

    return _run(model, [synthetic_feed(inputs, hints)])[0]


def _run(model, feeds: list[dict[str, np.ndarray]]) -> list[list]:
    """ONNX Runtime's outputs for each feed, from one CPU session."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, feed) for feed in feeds]


def _lower(path: Path, model, overrides: dict[str, list[int]], batch_size: int, hints: dict[str, list[int]],
           notes: list[str]):  # fmt: skip
    """Rewrite ops only ONNX Runtime runs (ai.onnx.ml, com.microsoft fusions) as standard ONNX (compile.lowering),
    one op family at a time. A family's lowering is kept only where ONNX Runtime gives the same outputs for it as
    for the original on synthetic feeds: integers equal, floats within LOWERING_RTOL/ATOL. What stays is noted."""
    import onnx

    from edgekit.compile import lowering

    families = lowering.lowerable(model)
    if not families:
        return model
    static = onnx.ModelProto()
    static.CopyFrom(model)
    axes = _fix_input_shapes(path, static, overrides, batch_size)
    initializers = {init.name for init in static.graph.initializer}
    feeds = _lowering_feeds(_tensor_specs(path, static.graph.input, initializers, axes), hints)
    try:
        expected = _run(model, feeds)
    except Exception as error:  # the original does not run here; intake's later checks say why
        log.debug("%s: not lowered, ONNX Runtime cannot run the original: %s", path, error)
        return model
    for domain, op_type in families:
        lowered = lowering.lower(model, (domain, op_type))
        reasons = lowered.skipped
        if lowered.model is not None:
            difference = _lowering_difference(model.graph.output, expected, lowered.model, feeds)
            if difference is None:
                model = lowered.model
                count = f" ({lowered.count} nodes)" if lowered.count > 1 else ""
                notes.append(f"{domain} {op_type}{count} lowered to {'/'.join(lowered.ops)} so every backend can "
                             "build it")  # fmt: skip
            else:
                reasons = [difference]
        if reasons:
            why = "; ".join(dict.fromkeys(reasons))
            notes.append(f"{domain} {op_type} could not be lowered to standard ONNX ({why}): backends other than "
                         "ONNX Runtime may refuse it")  # fmt: skip
    return model


def _lowering_feeds(inputs: list[TensorSpec], hints: dict[str, list[int]]) -> list[dict[str, np.ndarray]]:
    """Synthetic feeds, floats at several scales: standard-normal values alone would leave a tree's splits on raw
    features (pixel counts, ages) mostly on one side."""
    from edgekit.compile.calibration import synthetic_samples
    from edgekit.samples import feed_size

    batch = feed_size(inputs)
    feeds = list(synthetic_samples(inputs, batch * LOWERING_FEEDS, hints, seed=1).batches(batch))
    for index, feed in enumerate(feeds):
        scale = LOWERING_SCALES[index % len(LOWERING_SCALES)]
        for name, array in feed.items():
            if array.dtype.kind == "f":
                feed[name] = (array * scale).astype(array.dtype)
    return feeds


def _lowering_difference(outputs, expected: list[list], model, feeds: list[dict[str, np.ndarray]]) -> str | None:
    """How the lowered model's outputs differ from the original's, in words; None where they agree. Integer outputs
    (labels) are compared on the feeds where no float output has a tie for its highest score: a forest's votes tie
    exactly, and which class wins then depends on the order the runtime adds the trees in."""
    try:
        actual = _run(model, feeds)
    except Exception as error:  # ORT's errors name the node
        return f"ONNX Runtime cannot run the lowered graph: {str(error).strip().splitlines()[0]}"
    decided = [not any(_top_tied(np.asarray(array)) for array in run) for run in expected]
    for position, value in enumerate(outputs):
        pairs = [
            (np.asarray(want[position]), np.asarray(got[position])) for want, got in zip(expected, actual, strict=True)
        ]
        if any(want.shape != got.shape or want.dtype != got.dtype for want, got in pairs):
            return f"output '{value.name}' changes shape or type"
        if pairs[0][0].dtype.kind != "f":
            differ = sum(int(np.any(want != got)) for (want, got), clear in zip(pairs, decided, strict=True) if clear)
            if differ:
                return f"output '{value.name}' differs on {differ} of {sum(decided)} synthetic feeds"
        elif not all(np.allclose(got, want, LOWERING_RTOL, LOWERING_ATOL) for want, got in pairs):
            error = max(float(np.max(np.abs(got - want), initial=0)) for want, got in pairs)
            return f"output '{value.name}' differs by up to {error:.3g}"
    return None


def _top_tied(array: np.ndarray) -> bool:
    """Whether some row of a float array [..., C >= 2] has its two highest values within LOWERING_RTOL/ATOL."""
    if array.dtype.kind != "f" or array.ndim < 1 or array.shape[-1] < 2:
        return False
    top = np.sort(array.reshape(-1, array.shape[-1]), axis=-1)[:, -2:]
    return bool(np.isclose(top[:, 0], top[:, 1], LOWERING_RTOL, LOWERING_ATOL).any())


def _measure_output_shapes(path: Path, model, inputs: list[TensorSpec], hints: dict[str, list[int]]) -> None:
    """Output shapes that inference could not make static, from one ONNX Runtime run on synthetic inputs."""
    import onnx

    try:
        outputs = _run_synthetic(model, inputs, hints)
    except Exception as error:  # ORT's errors name the node; one line is what the user needs
        raise BadInput(f"{path}: ONNX Runtime cannot run this model: {str(error).strip().splitlines()[0]}") from None
    for value, array in zip(model.graph.output, outputs, strict=True):
        if not isinstance(array, np.ndarray):
            raise BadInput(f"{path}: output '{value.name}' is a {type(array).__name__}; edgekit bundles give tensors")
        value.type.tensor_type.ClearField("shape")
        value.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d) for d in array.shape)


def _runs_static(model, inputs: list[TensorSpec], hints: dict[str, list[int]]) -> bool:
    try:
        _run_synthetic(model, inputs, hints)
    except Exception as error:  # any failure means: keep the graph's dims symbolic
        log.debug("the static-shaped model does not run: %s", error)
        return False
    return True


def _has_subgraphs(model) -> bool:
    return any(a.type == GRAPH_ATTRIBUTE for node in model.graph.node for a in node.attribute)


def _clear_value_info(graph) -> None:
    """Exporters' intermediate shapes (paddle writes -1 for the batch) contradict the static shapes set here."""
    graph.ClearField("value_info")
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == GRAPH_ATTRIBUTE:
                _clear_value_info(attribute.g)


def _simplify(path: Path, model):
    import onnxslim

    model = _infer_shapes(path, model)
    try:
        model = onnxslim.slim(model)
    except Exception as error:  # onnxslim raises assorted errors; keep going with the checked model
        log.warning("%s: simplification skipped (%s: %s)", path, type(error).__name__, error)
    return _infer_shapes(path, model)


def _layout(shape: list[int]) -> Layout:
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
            return "NCHW"
        if shape[3] in (1, 3, 4):
            return "NHWC"
    if len(shape) == 2:
        return "NC"
    return "other"


def _tensor_specs(path: Path, values, initializers: set[str], axes: dict[str, int | None]) -> list[TensorSpec]:
    from onnx.helper import tensor_dtype_to_np_dtype

    specs = []
    for value in values:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            kind = value.type.WhichOneof("value")
            raise BadInput(f"{path}: '{value.name}' is a {kind}, not a tensor; edgekit bundles take and give tensors")
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if not _is_dynamic(d) else -1 for d in tensor_type.shape.dim]
        if -1 in shape:
            raise BadInput(f"{path}: shape of '{value.name}' could not be made static (got {shape})")
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        axis = axes.get(value.name, 0 if shape else None)
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype, layout=_layout(shape), batch_axis=axis))
    return specs


def initializer_bytes(path: Path) -> int:
    """Bytes of weights (initializers) stored in an ONNX file."""
    import onnx

    return _weight_bytes(onnx.load(str(path)))


def _weight_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer)


def prepare_model(
    path: Path,
    workdir: Path,
    input_shapes: dict[str, list[int]] | None = None,
    batch_size: int = 1,
    input_values: dict[str, list[float]] | None = None,
) -> PreparedModel:
    """Check, freeze inputs given values, make static and simplify `path`; writes `workdir/model.fp32.onnx`."""
    import onnx

    notes: list[str] = []
    model = _load(path)
    opset = _default_opset(path, model)
    _check_ops(path, model, opset)
    model = _modernize(path, model, opset, notes)
    _unwrap_zipmap(model, notes)
    _freeze_inputs(path, model, input_values or {}, notes)
    _clear_value_info(model.graph)
    hints = _integer_hints(model)
    model = _lower(path, model, input_shapes or {}, batch_size, hints, notes)
    symbolic = onnx.ModelProto()
    symbolic.CopyFrom(model)
    axes = _fix_input_shapes(path, model, input_shapes or {}, batch_size)
    inputs = _tensor_specs(path, model.graph.input, {init.name for init in model.graph.initializer}, axes)
    model = _simplify(path, model)
    if _has_subgraphs(model) and not _runs_static(model, inputs, hints):
        # Control flow whose branches are shaped for other inputs (a VAD's 8 kHz branch under 16 kHz-sized input)
        # fails ONNX Runtime's type inference once the dims are fixed; the graph keeps them symbolic, the bundle's
        # interface is still the static shapes, and backends that need static graphs say so for their candidate.
        notes.append("input dims stay symbolic in the graph: ONNX Runtime rejects its control flow with them fixed")
        model = _simplify(path, symbolic)
    _name_nodes(model)
    notes.extend(_freezing_hints(model, hints))
    if not all(_is_static(value) for value in model.graph.output):
        _measure_output_shapes(path, model, inputs, hints)
    prepared = workdir / "model.fp32.onnx"
    onnx.save(model, str(prepared))
    initializers = {init.name for init in model.graph.initializer}
    return PreparedModel(
        path=prepared,
        source=path,
        inputs=inputs,
        outputs=_tensor_specs(path, model.graph.output, initializers, {}),
        opset=_default_opset(path, model),
        param_bytes=_weight_bytes(model),
        value_hints=hints,
        notes=notes,
    )


def _is_static(value) -> bool:
    tensor_type = value.type.tensor_type
    return tensor_type.HasField("shape") and not any(_is_dynamic(d) for d in tensor_type.shape.dim)
