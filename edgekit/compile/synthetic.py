"""ONNX models generated in code (random weights, no downloads) for benchmarks, demos and tests.

`mobilenet_v2` reproduces MobileNetV2's architecture exactly (inverted residuals, depthwise convs, ReLU6,
width multiplier), so its latency is representative even though its weights are random.
"""

import numpy as np

MOBILENET_V2_BLOCKS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class _GraphBuilder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _const(self, array: np.ndarray, prefix: str) -> str:
        from onnx import numpy_helper

        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> str:
        """Conv with BatchNorm folded in (He-initialised, so activations keep unit scale), then ReLU6."""
        from onnx import helper

        fan_in = (c_in // groups) * kernel * kernel
        weight = self.rng.standard_normal((c_out, c_in // groups, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        bias = self.rng.standard_normal(c_out) * 0.05
        out = self._name("conv")
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self._const(weight, "w"), self._const(bias, "b")],
                [out],
                name=out,
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=groups,
            )
        )
        if not act:
            return out
        clipped = self._name("relu6_")
        lo, hi = self._const(np.array(0.0), "lo"), self._const(np.array(6.0), "hi")
        self.nodes.append(helper.make_node("Clip", [out, lo, hi], [clipped], name=clipped))
        return clipped

    def add(self, a: str, b: str) -> str:
        from onnx import helper

        out = self._name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out


def _channels(value: float) -> int:
    """MobileNet's rounding of scaled channel counts to multiples of 8."""
    rounded = max(8, int(value + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * value else rounded


def mobilenet_v2(resolution: int = 224, width: float = 1.0, classes: int = 1000, seed: int = 0):
    """MobileNetV2 (Sandler et al. 2018) as an ONNX ModelProto with input `input` (1, 3, R, R)."""
    from onnx import TensorProto, helper

    g = _GraphBuilder(seed)
    c_in = _channels(32 * width)
    x = g.conv("input", 3, c_in, 3, 2)
    for expand, c, repeats, stride in MOBILENET_V2_BLOCKS:
        c_out = _channels(c * width)
        for i in range(repeats):
            hidden = c_in * expand
            y = g.conv(x, c_in, hidden, 1, 1) if expand != 1 else x
            y = g.conv(y, hidden, hidden, 3, stride if i == 0 else 1, groups=hidden)
            y = g.conv(y, hidden, c_out, 1, 1, act=False)
            x = g.add(x, y) if (i > 0 or stride == 1) and c_in == c_out else y
            c_in = c_out
    last = _channels(1280 * max(1.0, width))
    x = g.conv(x, c_in, last, 1, 1)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    fc_w = g._const(g.rng.standard_normal((classes, last)) * np.sqrt(1.0 / last), "fc_w")
    fc_b = g._const(np.zeros(classes), "fc_b")
    g.nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_v2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekit.synthetic")


def small_cnn(resolution: int = 32, classes: int = 10, seed: int = 0, batch: int | str = "N"):
    """Two conv layers and a classifier head: a fast stand-in for a camera model in tests."""
    from onnx import TensorProto, helper

    g = _GraphBuilder(seed)
    x = g.conv("input", 3, 16, 3, 2)
    x = g.conv(x, 16, 32, 3, 2)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    fc_w = g._const(g.rng.standard_normal((classes, 32)) * np.sqrt(1.0 / 32), "fc_w")
    fc_b = g._const(np.zeros(classes), "fc_b")
    g.nodes.append(helper.make_node("Gemm", ["flat", fc_w, fc_b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        g.nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgekit.synthetic")


def wide_mlp(megabytes: float = 20.0, inputs: int = 64, classes: int = 10, seed: int = 0):
    """A classifier whose fp32 weights take about `megabytes`: a stand-in for a big model in transfer tests."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    hidden = max(16, int(megabytes * 2**20 / 4 / (inputs + classes)))
    w1 = (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
