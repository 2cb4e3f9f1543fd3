"""Model intake: load an ONNX file, reject what no backend can build, fix dynamic dims, simplify.

Every rejection is a BadInput naming the file and the node, op, input or field at fault.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BadInput
from edgekit.manifest import Layout, TensorSpec

log = logging.getLogger(__name__)

MIN_OPSET = 7
# Domains whose ops some runtime implements: the ONNX standard sets and ONNX Runtime's contrib ops.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


@dataclass(frozen=True)
class PreparedModel:
    """A checked, static-shaped, simplified fp32 model on disk, ready for every backend."""

    path: Path
    source: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    param_bytes: int  # weight (initializer) bytes, counted once when the model is prepared


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


def _fix_input_shapes(path: Path, model, overrides: dict[str, list[int]], batch_size: int) -> None:
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    unknown = set(overrides) - {i.name for i in graph_inputs}
    if unknown:
        names = ", ".join(i.name for i in graph_inputs)
        raise BadInput(f"--input-shape names {', '.join(sorted(unknown))}, but the model's inputs are: {names}")
    for graph_input in graph_inputs:
        dims = graph_input.type.tensor_type.shape.dim
        wanted = overrides.get(graph_input.name)
        if wanted is not None:
            if len(wanted) != len(dims):
                raise BadInput(
                    f"--input-shape {graph_input.name}: rank {len(wanted)} given, model input has rank {len(dims)}"
                )
            for position, (dim, value) in enumerate(zip(dims, wanted, strict=False)):
                if not _is_dynamic(dim) and dim.dim_value != value:
                    raise BadInput(
                        f"--input-shape {graph_input.name}: dim {position} is fixed to {dim.dim_value} "
                        f"in the model, got {value}"
                    )
                dim.Clear()
                dim.dim_value = value
            continue
        for position, dim in enumerate(dims):
            if not _is_dynamic(dim):
                continue
            if position != 0:
                label = f" ('{dim.dim_param}')" if dim.dim_param else ""
                raise BadInput(
                    f"{path}: input '{graph_input.name}' dim {position}{label} is dynamic; "
                    f"give it with --input-shape {graph_input.name}:{'x'.join(_dim_hint(dims, batch_size))}"
                )
            dim.Clear()
            dim.dim_value = batch_size


def _dim_hint(dims, batch_size: int) -> list[str]:
    return [
        str(d.dim_value) if not _is_dynamic(d) else (str(batch_size) if i == 0 else "N") for i, d in enumerate(dims)
    ]


def _infer_shapes(path: Path, model):
    import onnx

    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise BadInput(f"{path}: model is invalid: {first_line}") from None


def _layout(shape: list[int]) -> Layout:
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
            return "NCHW"
        if shape[3] in (1, 3, 4):
            return "NHWC"
    if len(shape) == 2:
        return "NC"
    return "other"


def _tensor_specs(path: Path, values, initializers: set[str]) -> list[TensorSpec]:
    from onnx.helper import tensor_dtype_to_np_dtype

    specs = []
    for value in values:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if not _is_dynamic(d) else -1 for d in tensor_type.shape.dim]
        if -1 in shape:
            raise BadInput(f"{path}: shape of '{value.name}' could not be made static (got {shape})")
        dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype, layout=_layout(shape)))
    return specs


def initializer_bytes(path: Path) -> int:
    """Bytes of weights (initializers) stored in an ONNX file."""
    import onnx

    return _weight_bytes(onnx.load(str(path)))


def _weight_bytes(model) -> int:
    from onnx import numpy_helper

    return sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer)


def prepare_model(
    path: Path, workdir: Path, input_shapes: dict[str, list[int]] | None = None, batch_size: int = 1
) -> PreparedModel:
    """Check, make static and simplify `path`; writes `workdir/model.fp32.onnx`."""
    import onnx
    import onnxslim

    model = _load(path)
    opset = _default_opset(path, model)
    _check_ops(path, model, opset)
    _fix_input_shapes(path, model, input_shapes or {}, batch_size)
    model = _infer_shapes(path, model)
    try:
        model = onnxslim.slim(model)
    except Exception as error:  # onnxslim raises assorted errors; keep going with the checked model
        log.warning("%s: simplification skipped (%s: %s)", path, type(error).__name__, error)
    model = _infer_shapes(path, model)
    initializers = {init.name for init in model.graph.initializer}
    prepared = workdir / "model.fp32.onnx"
    onnx.save(model, str(prepared))
    return PreparedModel(
        path=prepared,
        source=path,
        inputs=_tensor_specs(path, model.graph.input, initializers),
        outputs=_tensor_specs(path, model.graph.output, initializers),
        opset=opset,
        param_bytes=_weight_bytes(model),
    )
