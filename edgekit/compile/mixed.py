"""Mixed precision: which layers to keep in float when plain int8 misses the accuracy budget.

Sensitivity comes from ONNX Runtime's QDQ model of the same calibration data, run side by side with the fp32 model
on a few calibration samples (never the held-out ones that judge the result), in two steps:

1. Local: for every quantized node, its output's error against fp32 is compared with the error already present at
   its activation inputs: the increase is what quantizing that node (its weights and inputs) costs. Errors are
   normalised (|q - f|^2 / |f|^2), so layers of any scale compare. One run ranks every layer.
2. End to end: the layers are measured again, in that order for as long as END_TO_END_SECONDS allows, where it
   matters, at the model's outputs: the fp32 model with only that one node quantized (its own
   QuantizeLinear/DequantizeLinear taken from the QDQ model). A local error says little about a layer whose output
   a sigmoid squashes or whose error a recurrent state carries on, and a small model (a voice detector's six
   convolutions) can be measured layer by layer in a second.

The pipeline keeps the top of the ranking in float and rebuilds, in a few growing rounds.
"""

import logging
import math
import time
from pathlib import Path

import numpy as np

from edgekit.compile.intake import PreparedModel
from edgekit.samples import SampleSet

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 8
# The end-to-end step re-measures layers from the top of the local ranking for at most this long: one ONNX Runtime
# session per layer. Not capped by count: the local ranking can place a decisive layer far down (Inception v2's first
# convolution, which reads the image, was 73rd of 95 locally and 19th end to end).
END_TO_END_SECONDS = 90.0
# Fractions of the quantized layers kept in float, one rebuild each: a few layers first, then more.
ROUNDS = (0.04, 0.12, 0.3, 0.6)
# A last round counts compute layers instead: this fraction of them, with every op ranked above the last one kept.
COMPUTE_ROUND = 0.6
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def keep_float_rounds(ranked: list[str], compute: frozenset[str] = frozenset()) -> list[list[str]]:
    """The layer sets to try in turn, each larger than the one before; at least one layer stays int8 (with every
    layer in float the build would be fp32 labelled int8). The last one holds COMPUTE_ROUND of the `compute` layers
    (those with weights): where cheap elementwise ops crowd the ranking (a paddle hardswish is four of them), 60% of
    the layers left most convolutions in int8 (PP-OCR's text detector with ONNX Runtime: 36 of 64, cosine 0.998;
    with 60% of the convolutions in float, 0.9995)."""
    rounds: list[list[str]] = []
    for count in [math.ceil(fraction * len(ranked)) for fraction in ROUNDS] + [_compute_prefix(ranked, compute)]:
        count = min(len(ranked) - 1, max(1, count))
        if count >= 1 and (not rounds or count > len(rounds[-1])):
            rounds.append(ranked[:count])
    return rounds


def _compute_prefix(ranked: list[str], compute: frozenset[str]) -> int:
    """How long a prefix of `ranked` holds COMPUTE_ROUND of its compute layers (0 when it has none)."""
    wanted = math.ceil(COMPUTE_ROUND * sum(name in compute for name in ranked))
    if not wanted:
        return 0
    seen = 0
    for length, name in enumerate(ranked, 1):
        seen += name in compute
        if seen == wanted:
            return length
    return 0


def compute_layers(model: PreparedModel) -> frozenset[str]:
    """Nodes of the model that multiply by weights (Conv, ConvTranspose, Gemm, MatMul with a constant operand)."""
    import onnx

    graph = onnx.load(str(model.path)).graph
    weights = {init.name for init in graph.initializer}
    return frozenset(
        node.name
        for node in graph.node
        if node.op_type in COMPUTE_OPS and any(name in weights for name in node.input[:2])
    )


def rank_sensitive_nodes(model: PreparedModel, qdq_model: Path, calibration: SampleSet) -> list[str]:
    """Node names of the fp32 model, most quantization-sensitive first (only nodes the QDQ model quantized)."""
    import onnx

    float_graph = onnx.load(str(model.path)).graph
    qdq_graph = onnx.load(str(qdq_model)).graph
    quantized = _quantized_nodes(qdq_graph)
    weights = {init.name for init in float_graph.initializer}
    pairs: dict[str, tuple[str, str]] = {}  # fp32 tensor → (fp32 name, name of what the QDQ node reads/writes)
    for node in float_graph.node:
        twin = quantized.get(node.name)
        if twin is None:
            continue
        for ours, theirs in zip(node.input, twin.input, strict=False):
            if ours and ours not in weights:
                pairs[f"{node.name}/in/{ours}"] = (ours, theirs)
        pairs[f"{node.name}/out"] = (node.output[0], twin.output[0])
    if not pairs:
        return []
    feeds = list(calibration.subset(np.arange(min(len(calibration), SENSITIVITY_SAMPLES))).batches(model.batch_size))
    errors = _relative_errors(model.path, qdq_model, pairs, feeds)
    sensitivity = {}
    for node in float_graph.node:
        if f"{node.name}/out" not in errors:
            continue
        inputs = [errors[k] for k in errors if k.startswith(f"{node.name}/in/")]
        sensitivity[node.name] = errors[f"{node.name}/out"] - max(inputs, default=0.0)
    local = sorted(sensitivity, key=sensitivity.get, reverse=True)
    measured = _end_to_end(model.path, qdq_graph, quantized, local, feeds)
    return sorted(measured, key=measured.get, reverse=True) + [name for name in local if name not in measured]


def _end_to_end(
    float_model: Path, qdq_graph, quantized: dict, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Per node, the worst relative error over the model's float outputs with only that node quantized. Stops at
    END_TO_END_SECONDS; a node whose single-node model does not run is left out (it keeps its local rank)."""
    import onnx
    import onnxruntime as ort

    base = onnx.load(str(float_model))
    reference = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [reference.run(None, feed) for feed in feeds]
    floating = [i for i, out in enumerate(reference.get_outputs()) if out.type == "tensor(float)"]
    producers = {output: node for node in qdq_graph.node for output in node.output}
    weights = {init.name: init for init in qdq_graph.initializer}
    deadline = time.monotonic() + END_TO_END_SECONDS
    errors: dict[str, float] = {}
    for name in names:
        if time.monotonic() > deadline:
            log.info("end-to-end sensitivity: time is up after %d of %d layers", len(errors), len(names))
            break
        probe = _quantizing_only(base, name, quantized[name], producers, weights)
        try:
            session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            errors[name] = _output_error([session.run(None, feed) for feed in feeds], expected, floating)
        except Exception:  # an unmeasurable node keeps its local rank
            log.debug("end-to-end sensitivity of %s not measured", name, exc_info=True)
    return errors


def _quantizing_only(base, name: str, twin, producers: dict, weights: dict):
    """A copy of the fp32 model in which node `name` reads its inputs through the QuantizeLinear/DequantizeLinear
    pairs the QDQ model gave its twin, and nothing else is quantized."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(base)
    graph = model.graph
    position, node = next((i, n) for i, n in enumerate(graph.node) if n.name == name)
    added = []
    for slot, (ours, theirs) in enumerate(zip(node.input, twin.input, strict=False)):
        dequantize = producers.get(theirs)
        if not ours or dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        prefix = f"{name}/probe{slot}"
        quantized_input = dequantize.input[0]  # a weight, stored quantized
        source = producers.get(quantized_input)
        if source is not None and source.op_type == "QuantizeLinear":  # an activation, quantized as it is read
            quantized_input = f"{prefix}/q"
            added.append(onnx.helper.make_node("QuantizeLinear", [ours, *source.input[1:]], [quantized_input],
                                               f"{prefix}/q", **_attributes(source)))  # fmt: skip
        added.append(onnx.helper.make_node("DequantizeLinear", [quantized_input, *dequantize.input[1:]],
                                           [f"{prefix}/dq"], f"{prefix}/dq", **_attributes(dequantize)))  # fmt: skip
        node.input[slot] = f"{prefix}/dq"
    present = {init.name for init in graph.initializer}
    needed = {tensor for step in added for tensor in step.input if tensor in weights and tensor not in present}
    graph.initializer.extend(weights[tensor] for tensor in sorted(needed))
    for offset, step in enumerate(added):
        graph.node.insert(position + offset, step)
    return model


def _attributes(node) -> dict:
    import onnx

    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}


def _output_error(got: list[list[np.ndarray]], expected: list[list[np.ndarray]], floating: list[int]) -> float:
    """The worst |q - f|^2 / |f|^2 over the float outputs, accumulated over the feeds."""
    worst = 0.0
    for index in floating:
        parts = [_noise_and_energy(e[index], g[index]) for e, g in zip(expected, got, strict=True)]
        noise, energy = sum(n for n, _ in parts), sum(e for _, e in parts)
        worst = max(worst, noise / energy if energy else 0.0)
    return worst


def _relative_errors(
    float_model: Path, qdq_model: Path, pairs: dict[str, tuple[str, str]], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """|q - f|^2 / |f|^2 per pair over all feeds, accumulated feed by feed: a detector's every activation for all
    samples at once would not fit in memory."""
    reference = _exposing(float_model, {f for f, _ in pairs.values()})
    quantized = _exposing(qdq_model, {q for _, q in pairs.values()})
    noise = dict.fromkeys(pairs, 0.0)
    energy = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        ours, theirs = reference(feed), quantized(feed)
        for key, (f, q) in pairs.items():
            added_noise, added_energy = _noise_and_energy(ours[f], theirs[q])
            noise[key] += added_noise
            energy[key] += added_energy
    return {key: noise[key] / energy[key] if energy[key] else 0.0 for key in pairs}


def _noise_and_energy(exact: np.ndarray, approximate: np.ndarray) -> tuple[float, float]:
    """|q - f|^2 and |f|^2, in float64: their ratio over all feeds is the normalised error the rankings use."""
    exact = exact.astype(np.float64)
    return float(np.sum((exact - approximate.astype(np.float64)) ** 2)), float(np.sum(exact**2))


def _quantized_nodes(graph) -> dict:
    """Nodes of the QDQ graph that read a DequantizeLinear output: the ones the quantizer put in int8."""
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name: n
        for n in graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(n.input)
    }


def _exposing(path: Path, names: set[str]):
    """A function running the model on one feed that returns the named tensors, exposed as extra outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(names - present))
    options = ort.SessionOptions()
    # Fusions would remove the intermediate tensors asked for.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = sorted(names)
    return lambda feed: dict(zip(wanted, session.run(wanted, feed), strict=True))
