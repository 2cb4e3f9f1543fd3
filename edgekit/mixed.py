"""Mixed precision: which layers to keep in float when plain int8 misses the accuracy budget.

Sensitivity comes from ONNX Runtime's QDQ model of the same calibration data, run side by side with the fp32 model
on a few calibration samples (never the held-out ones that judge the result). For every quantized node, its
output's error against fp32 is compared with the error already present at its activation inputs: the increase is
what quantizing that node (its weights and inputs) costs. Errors are normalised (|q - f|^2 / |f|^2), so layers of
any scale compare. The pipeline keeps the top of this ranking in float and rebuilds, in a few growing rounds.
"""

import logging
import math
from pathlib import Path

import numpy as np

from edgekit.calibration import SampleSet
from edgekit.intake import PreparedModel

log = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 8
# Fractions of the quantized layers kept in float, one rebuild each: a few layers first, then more.
ROUNDS = (0.04, 0.12, 0.3, 0.6)


def keep_float_rounds(ranked: list[str]) -> list[list[str]]:
    """The layer sets to try in turn, each larger than the one before; at least one layer stays int8 (with every
    layer in float the build would be fp32 labelled int8)."""
    rounds: list[list[str]] = []
    for fraction in ROUNDS:
        count = min(len(ranked) - 1, max(1, math.ceil(fraction * len(ranked))))
        if count >= 1 and (not rounds or count > len(rounds[-1])):
            rounds.append(ranked[:count])
    return rounds


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
    return sorted(sensitivity, key=sensitivity.get, reverse=True)


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
            exact = ours[f].astype(np.float64)
            noise[key] += float(np.sum((exact - theirs[q].astype(np.float64)) ** 2))
            energy[key] += float(np.sum(exact**2))
    return {key: noise[key] / energy[key] if energy[key] else 0.0 for key in pairs}


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
