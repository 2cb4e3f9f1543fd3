"""TFLite backend: ONNX → TFLite via onnx2tf (fp32, fp16, full-integer int8 on the user's calibration data).

Input layout is kept as in the ONNX model (NCHW stays NCHW), so the bundle's interface does not change with the
backend. The conversion runs in a subprocess (see _onnx2tf_worker.py) with a time limit; its log is kept in the
work folder, and a failure names the ONNX op and node onnx2tf stopped at.
"""

import importlib.metadata
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.compilers import Backend, BackendOptions, BuildRequest, BuildResult
from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.plugins import installed
from edgekit.profiles import Profile
from edgekit.schema import Precision

log = logging.getLogger(__name__)

# What onnx2tf writes for model.onnx; int8 (float32 I/O) and int8-io (int8 throughout, for NPUs that take integer
# tensors) are quantized by the worker itself.
FLOAT_SUFFIX = {"fp32": "_float32.tflite", "fp16": "_float16.tflite"}
INT8_FILE = "model_int8.tflite"
# onnx2tf names each TensorFlow op after its ONNX node, and TensorFlow refuses names outside this set (it replaces
# only ':'); paddle2onnx names nodes like "Softmax@0", on which tf.nn.softmax raises "not a valid scope name".
TF_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_./>-]")
# Time limit for the conversion: TensorFlow's start-up, then per node (each is traced, some validated) and per MB of
# weights (AlexNet's 240 MB took 144 s on 2 busy cores), twice over for int8 (the quantizer converts again), plus
# calibration per feed; generous, since the machine may be shared. A hang (e.g. in onnx2tf's automatic replacement
# search after an error) ends there instead of blocking the compile.
TIMEOUT_BASE_S = 180.0
TIMEOUT_PER_NODE_S = 0.5
TIMEOUT_PER_WEIGHT_MB_S = 1.0
TIMEOUT_PER_CALIBRATION_FEED_S = 1.0
LOG_FAILED_NODE = re.compile(r"onnx_op_name: (\S+)")
LOG_MISSING_OP = re.compile(r"(\S+) OP is not yet implemented")
LOG_ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_EXCEPTION = re.compile(r"^[\w.]*(Error|Exception)\b:")


class UnsupportedByTflite(BadInput):
    """The model has an op the TFLite path cannot take (exit 2 when tflite or vela was the only backend asked for)."""


class TfliteOptions(BackendOptions):
    integer_io: bool = False


class TfliteBackend(Backend):
    name = "tflite"
    module = "onnx2tf"
    extra = "tflite"
    precisions = frozenset({"fp32", "fp16", "int8"})
    keeps_float = True
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
        target = output_layouts(artifact, request.model.outputs)
        return BuildResult(entrypoint=artifact, runtime="litert", target=target, param_bytes=weight_bytes)


def output_layouts(artifact: Path, outputs: list[TensorSpec]) -> dict[str, Any]:
    """The LiteRT target: onnx2tf leaves some outputs channels-last (a Conv1d's [1, 4, 13] comes out [1, 13, 4]);
    `output_transpose` gives, per output, the permutation that restores the ONNX layout (None: already ONNX's)."""
    from edgekit.agents.runtimes.litert import interpreter_module

    details = interpreter_module().Interpreter(model_path=str(artifact)).get_output_details()
    permutations: list[list[int] | None] = []
    for detail, spec in zip(details, outputs, strict=True):
        rank, shape = len(spec.shape), [int(d) for d in detail["shape"]]
        channels_last = [spec.shape[0], *spec.shape[2:], spec.shape[1]] if rank >= 3 else None
        moved = shape != list(spec.shape) and shape == channels_last
        permutations.append([0, rank - 1, *range(1, rank - 1)] if moved else None)
    return {"output_transpose": permutations} if any(permutations) else {}


@dataclass(frozen=True)
class _TfGraph:
    """What the conversion needs to know about the model handed to onnx2tf."""

    nodes: dict[str, tuple[str, str]]  # TF-safe node name → (op type, name in the prepared model)
    safe_names: dict[str, str]  # name in the prepared model → TF-safe name
    output_producers: list[str]  # per graph output, the TF-safe name of the node that computes it
    recurrent: frozenset[str]  # the nodes of unrolled recurrent layers, which int8 keeps in float


def convert(request: BuildRequest, variant: str, artifact: Path) -> int:
    """Convert request.model to the TFLite variant (fp32, fp16, int8, int8-io), write it to artifact, and
    return its weight bytes."""
    if request.keep_float and not variant.startswith("int8"):
        raise ValueError(f"TFLite {variant} cannot keep layers in float: only its int8 variants can")
    work = (artifact.parent.parent / f"onnx2tf-{variant}").resolve()  # the worker runs in its own folder
    work.mkdir(parents=True, exist_ok=True)
    graph = _write_tf_named_model(request.model.path, work / "model.onnx")
    job = {
        "workdir": str(work),
        "model": str(work / "model.onnx"),
        "output": str(work / "out"),
        # onnx2tf turns 3-5D inputs channels-last unless named here (and refuses other ranks here).
        "keep_shape_inputs": [spec.name for spec in request.model.inputs if len(spec.shape) in (3, 4, 5)],
        "int8": _int8_job(request, variant, graph, work) if variant.startswith("int8") else None,
    }
    (work / "job.json").write_text(json.dumps(job))
    log = work / "onnx2tf.log"
    with request.progress.task(f"tflite {request.precision}: onnx2tf conversion", total=1):
        returncode = _run_worker(work / "job.json", log, _timeout(request, variant, graph))
    produced = work / "out" / (INT8_FILE if job["int8"] else f"model{FLOAT_SUFFIX[variant]}")
    if returncode != 0 or not produced.exists():
        _raise_conversion_error(returncode, log, graph)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(produced, artifact)
    return json.loads((work / "out" / "weights.json").read_text())[produced.name]


def _write_tf_named_model(source: Path, target: Path) -> _TfGraph:
    """Write the model as onnx2tf can take it: node names TensorFlow accepts. Refuses ops of other domains up front
    (the ai.onnx.ml and com.microsoft ops intake could not lower to standard ONNX): TFLite has nothing like them,
    and onnx2tf would only fail on them after TensorFlow's start-up. LSTMs are unrolled: onnx2tf's LSTM fails on the
    state shapes of exported voice detectors ("An `initial_state` was passed that is not compatible with
    `cell.state_size`")."""
    import onnx

    from edgekit.compile.lowering import unroll_recurrent

    model, recurrent, kept = unroll_recurrent(onnx.load(str(source)))
    for reason in kept:
        log.info("recurrent layer left for onnx2tf: %s", reason)
    foreign = next((n for n in model.graph.node if n.domain not in ("", "ai.onnx")), None)
    if foreign is not None:
        raise UnsupportedByTflite(
            f"TFLite has no equivalent of {foreign.domain} op {foreign.op_type} (node {foreign.name or '?'})"
        )
    _split_multi_axis_slices(model.graph)
    _flatten_row_gathers(model)
    nodes, safe_names = {}, {}
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        original = node.name
        if not original or TF_NAME_UNSAFE.search(original):  # unnamed ones too, so that errors can name them
            node.name = _unique(TF_NAME_UNSAFE.sub("_", original or f"{node.op_type}_{index}"), taken)
            taken.add(node.name)
        nodes[node.name] = (node.op_type, original or node.name)
        safe_names[original] = node.name
    onnx.save(model, str(target))
    return _TfGraph(nodes=nodes, safe_names=safe_names, output_producers=_output_producers(model.graph),
                    recurrent=frozenset(safe_names[name] for name in recurrent))  # fmt: skip


def _split_multi_axis_slices(graph) -> None:
    """One Slice per axis instead of one over several: onnx2tf, having made a tensor channels-last, applies such a
    Slice's starts and ends to the wrong axes (silero's STFT takes [0:129] of 258 channels and [1:] of the frames in
    one Slice, and onnx2tf kept 257 channels). The first keeps the node's name, so errors and layers still name it."""
    from onnx import helper, numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in list(graph.node):
        parameters = [constants.get(name) for name in node.input[1:]]
        if node.op_type != "Slice" or len(parameters) < 3 or any(p is None for p in parameters):
            continue
        starts, ends, axes, *steps = parameters
        if starts.size < 2:
            continue
        source, replacement = node.input[0], []
        for index, values in enumerate(
            zip(starts, ends, axes, steps[0] if steps else np.ones_like(starts), strict=True)
        ):
            prefix = f"{node.name}/axis{values[2]}"
            names = [f"{prefix}/{part}" for part in ("starts", "ends", "axes", "steps")]
            graph.initializer.extend(
                numpy_helper.from_array(np.array([value], (axes if part == "axes" else starts).dtype), name)
                for value, name, part in zip(values, names, ("starts", "ends", "axes", "steps"), strict=True)
            )
            last = index == starts.size - 1
            output = node.output[0] if last else f"{prefix}/output"
            name = node.name if index == 0 else prefix
            replacement.append(helper.make_node("Slice", [source, *names], [output], name))
            source = output
        _replace_node(graph, node, replacement)


def _flatten_row_gathers(model) -> None:
    """A Gather of one index on axis 0 of a static 3-D tensor (silero's state[0] and state[1] of a
    [2, 1, 128] state) as Reshape to [rows, -1], the same Gather, Reshape to the output's shape: onnx2tf holds a 3-D
    tensor channels-last ([2, 128, 1]), so its Gather gave [128, 1] where ONNX has [1, 128] and the next Gemm
    failed ("Dimensions must be equal, but are 1 and 128"); onnx2tf's Reshape restores the ONNX layout first. The
    Gather keeps the node's name."""
    from onnx import helper, numpy_helper

    from edgekit.compile.lowering import tensor_types

    graph = model.graph
    types = tensor_types(model)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] in constants:
            continue
        shape, output = types.get(node.input[0], (0, None))[1] or (), types.get(node.output[0], (0, None))[1] or ()
        indices = constants.get(node.input[1])
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
        static = len(shape) == 3 and len(output) == 2 and None not in (*shape, *output)
        if not static or axis % 3 or indices is None or indices.ndim:
            continue
        rows, row = f"{node.name or node.output[0]}/rows", f"{node.name or node.output[0]}/row"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([shape[0], -1], np.int64), f"{rows}/shape"),
            numpy_helper.from_array(np.array(output, np.int64), f"{row}/shape"),
        ])  # fmt: skip
        _replace_node(graph, node, [
            helper.make_node("Reshape", [node.input[0], f"{rows}/shape"], [f"{rows}/output"], rows),
            helper.make_node("Gather", [f"{rows}/output", node.input[1]], [f"{row}/input"], node.name, axis=0),
            helper.make_node("Reshape", [f"{row}/input", f"{row}/shape"], [node.output[0]], row),
        ])  # fmt: skip


def _replace_node(graph, node, replacement: list) -> None:
    """Put `replacement` where `node` was, keeping the graph's topological order."""
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(replacement):
        graph.node.insert(position + offset, new)


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate


def _output_producers(graph) -> list[str]:
    """Per graph output, the node that computes it, looking through Identity nodes (TFLite has no op for those)."""
    producers = {output: node for node in graph.node for output in node.output}
    names = []
    for value in graph.output:
        node = producers.get(value.name)
        while node is not None and node.op_type == "Identity" and node.input[0] in producers:
            node = producers[node.input[0]]
        names.append(node.name if node is not None else "")
    return names


def _int8_job(request: BuildRequest, variant: str, graph: _TfGraph, work: Path) -> dict:
    """The worker's int8 instructions: calibration feeds saved per input (in input order), the I/O type, and the
    nodes to keep in float under their TF-safe names."""
    assert request.calibration is not None, "int8 builds are planned only with calibration data"
    feeds = list(request.calibration.batches(request.model.batch_size))
    paths = []
    for index, spec in enumerate(request.model.inputs):
        np.save(work / f"calib-{index}.npy", np.stack([feed[spec.name] for feed in feeds]))
        paths.append(str(work / f"calib-{index}.npy"))
    return {
        "calibration": paths,
        "integer_io": variant == "int8-io",
        "file": INT8_FILE,
        "keep_float": sorted(_float_nodes(request, graph)),
        "output_producers": graph.output_producers,
    }


def _float_nodes(request: BuildRequest, graph: _TfGraph) -> set[str]:
    """TF-safe names of the nodes int8 leaves in float: the request's keep_float, unrolled recurrent layers, and
    with mixed precision every node the ranking did not leave int8 (the TFLite quantizer takes every op, also the
    STFT magnitudes and reductions that ONNX Runtime's, which the ranking measured, leaves in float)."""
    float_nodes = set(graph.recurrent)
    float_nodes.update(graph.safe_names[name] for name in request.keep_float if name in graph.safe_names)
    if request.int8_only is not None:
        float_nodes.update(safe for name, safe in graph.safe_names.items() if name not in request.int8_only)
    return float_nodes


def _timeout(request: BuildRequest, variant: str, graph: _TfGraph) -> float:
    weight_mb = request.model.param_bytes / 1e6
    conversion = TIMEOUT_BASE_S + TIMEOUT_PER_NODE_S * len(graph.nodes) + TIMEOUT_PER_WEIGHT_MB_S * weight_mb
    if not variant.startswith("int8") or request.calibration is None:
        return conversion
    return 2 * conversion + len(request.calibration) // request.model.batch_size * TIMEOUT_PER_CALIBRATION_FEED_S


def _run_worker(job: Path, log: Path, timeout: float) -> int:
    """The worker's exit status; a conversion still running after `timeout` seconds is killed."""
    with log.open("w") as sink:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "edgekit.compilers._onnx2tf_worker", str(job)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                check=False,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"onnx2tf did not finish within {timeout:.0f} s") from None
    return done.returncode


def _raise_conversion_error(returncode: int, log: Path, graph: _TfGraph) -> None:
    """One line naming the op and node onnx2tf stopped at, when its log says; else its last error line."""
    if returncode < 0:  # killed: its log ends wherever it was
        hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
        raise RuntimeError(f"onnx2tf was killed by signal {-returncode}{hint}")
    text = LOG_ANSI.sub("", log.read_text(errors="replace"))
    error = _last_error(text)
    failed = _failed_node(text, graph)
    if failed is not None:
        op_type, node = failed
        raise UnsupportedByTflite(f"onnx2tf cannot convert op {op_type} (node {node}): {error}")
    raise RuntimeError(f"onnx2tf failed (exit {returncode}): {error}")


def _failed_node(log: str, graph: _TfGraph) -> tuple[str, str] | None:
    """(op type, node name in the prepared model) of the node onnx2tf's log says it failed on."""
    named = LOG_FAILED_NODE.findall(log)
    if named:
        return graph.nodes.get(named[-1], ("?", named[-1]))
    missing = LOG_MISSING_OP.findall(log)
    if missing:
        op_type = missing[-1]
        return op_type, next((original for op, original in graph.nodes.values() if op == op_type), "?")
    return None


def _last_error(log: str) -> str:
    """The last exception line of the log (with the line that explains a Keras layer's failure), else its last
    line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    found = [i for i, line in enumerate(lines) if LOG_EXCEPTION.match(line) or "is not yet implemented" in line]
    if not found:
        return (lines or ["no output"])[-1][:300]
    last = found[-1]
    text = lines[last]
    if "Exception encountered when calling layer" in text and last + 1 < len(lines):
        text = f"{text} {lines[last + 1]}"  # Keras puts the cause on the next line
    return text[:300]
