"""Shared by the examples: a trained scikit-learn MLPClassifier as ONNX nodes, written with `onnx.helper` so that
no converter package is needed."""

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier


def mlp_layers(classifier: MLPClassifier, current: str) -> tuple[list[NodeProto], list[TensorProto]]:
    """(Gemm → Relu)* → Gemm → Softmax into `probabilities`, reading the tensor named `current`."""
    nodes: list[NodeProto] = []
    initializers: list[TensorProto] = []
    layers = list(zip(classifier.coefs_, classifier.intercepts_, strict=True))
    for index, (weights, bias) in enumerate(layers):
        w_name, b_name, out = f"fc{index}.weight", f"fc{index}.bias", f"fc{index}"
        initializers += [
            numpy_helper.from_array(weights.astype(np.float32), w_name),
            numpy_helper.from_array(bias.astype(np.float32), b_name),
        ]
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [out], name=f"fc{index}"))
        current = out
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{index}"], name=f"relu{index}"))
            current = f"relu{index}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], name="softmax", axis=1))
    return nodes, initializers
