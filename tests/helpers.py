"""Assertions and builders shared by tests (importable because pytest.ini puts tests/ on the path)."""

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgekit.cli import app


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def assert_user_error(result: CliResult, *fragments: str) -> None:
    """Exit 2, one line naming the cause, and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # Progress bars of the steps that ran before the failure may precede the error; nothing else may.
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and "━" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def compile_args(model, profile: str, *extra, out=None, seconds: str = "0.05") -> list:
    """`edgekit compile` arguments with a short latency measurement, as most tests want."""
    return ["compile", model, "-p", profile, "--bench-seconds", seconds, *(["-o", out] if out else []), *extra]


def compile_bundle(model: Path, calibration: Path, key: Path, version: str, out: Path, name: str = "digits",
                   *extra: str) -> Path:  # fmt: skip
    """A signed fp32 onnxruntime bundle of `model` (a .onnx file, or a folder holding `<name>.onnx`), built by the
    real `edgekit compile`; `key` is the Ed25519 private key that signs it; `extra`: more compile flags."""
    if model.is_dir():
        model = model / f"{name}.onnx"
    args = ["compile", str(model), "-p", "x86-64-avx2", "--precision", "fp32", "--backend", "onnxruntime",
            "--calibration", str(calibration), "--sign-key", str(key), "--bundle-version", version,
            "--name", name, "--bench-seconds", "0.02", "-o", str(out), *extra]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def ml_imputer_model(path: Path) -> Path:
    """A model of one ai.onnx.ml op that intake has no lowering for (Imputer: NaN → 0), so only ONNX Runtime runs
    it."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Imputer", ["x"], ["y"], name="imputer", domain="ai.onnx.ml",
                            imputed_value_floats=[0.0] * 4, replaced_value_float=float("nan"))  # fmt: skip
    graph = helper.make_graph(
        [node], "imputer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def save(path: Path, nodes: list, inputs: dict, outputs: dict, weights: dict, opset: int = 17) -> Path:
    """A float32 ONNX model from nodes, {input: shape}, {output: shape} and {initializer: array} (float32 unless
    given as an integer array)."""
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs.items()],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        [numpy_helper.from_array(_float32_unless_integer(array), name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _float32_unless_integer(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) and array.dtype.kind == "i" else np.asarray(array, np.float32)


def outlier_classifier(path: Path) -> Path:
    """Feature 0 spikes to ±1000 and has zero weight; the class comes from the other, unit-scale features. The
    int8 input quantization spends its 256 steps on the spikes, so plain int8 guesses; with fc1 in float the input
    is never quantized."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32))
    w1[0] = 0.0
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
    ]
    return save(path, nodes, {"x": [1, 16]}, {"logits": [1, 4]}, {"w1": w1, "w2": rng.standard_normal((32, 4))})


def outlier_samples(path: Path, count: int = 200) -> Path:
    """Calibration data for `outlier_classifier`, as .npz: unit-scale features, and feature 0 at ±1000."""
    x = np.random.default_rng(1).standard_normal((count, 16)).astype(np.float32)
    x[:, 0] = np.where(np.arange(count) % 2, 1000.0, -1000.0)
    np.savez(path, x=x)
    return path


def voice_detector_lstm(path: Path, steps: int = 1) -> Path:
    """A recurrent head exported like silero's: LSTM over [steps, 1, 16] with its state [1, 1, 8] as inputs and
    h/c as outputs. onnx2tf's own LSTM failed on it ("An `initial_state` was passed that is not compatible with
    `cell.state_size`")."""
    rng = np.random.default_rng(0)
    hidden = 8
    nodes = [
        helper.make_node("LSTM", ["x", "w", "r", "b", "", "h", "c"], ["y", "hn", "cn"], name="rnn", hidden_size=hidden),
        helper.make_node("Reshape", ["y", "flat"], ["y2"], name="flatten"),
        helper.make_node("Gemm", ["y2", "head"], ["logit"], name="head", transB=1),
        helper.make_node("Sigmoid", ["logit"], ["p"], name="probability"),
    ]
    weights = {"w": rng.standard_normal((1, 4 * hidden, 16)) * 0.3,
               "r": rng.standard_normal((1, 4 * hidden, hidden)) * 0.3, "b": rng.standard_normal((1, 8 * hidden)) * 0.1,
               "head": rng.standard_normal((1, steps * hidden)),
               "flat": np.array([1, -1])}  # fmt: skip
    state = [1, 1, hidden]
    return save(path, nodes, {"x": [steps, 1, 16], "h": state, "c": state}, {"p": [1, 1], "hn": state, "cn": state},
                weights)  # fmt: skip


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of `members` (name, bytes) as regular files, in that order: for hand-made bundles."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _append_to_output(model_path: Path, out: Path, build) -> Path:
    """`model_path` with its first output rewritten by `build(graph, output name) → (nodes, initializers, new name)`:
    the same model with a change at its end, still a valid ONNX file that any backend compiles."""
    model = onnx.load(str(model_path))
    graph = model.graph
    output = graph.output[0]
    nodes, initializers, new_name = build(graph, output.name)
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    renamed = helper.make_tensor_value_info(new_name, output.type.tensor_type.elem_type, None)
    renamed.type.CopyFrom(output.type)
    graph.output.remove(output)
    graph.output.insert(0, renamed)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def with_permuted_classes(model_path: Path, out: Path, classes: int) -> Path:
    """A deliberately damaged classifier: its class scores rolled by one along the class axis (class i reports as
    i + 1). It loads, runs as fast and passes its own self-test once compiled; only a comparison with the original
    on real input shows it is wrong."""

    def build(graph, name: str):
        order = numpy_helper.from_array(np.roll(np.arange(classes, dtype=np.int64), 1), "permuted_order")
        node = helper.make_node("Gather", [name, "permuted_order"], ["permuted_scores"], axis=1)
        return [node], [order], "permuted_scores"

    return _append_to_output(model_path, out, build)


def with_extra_work(model_path: Path, out: Path, size: int = 2048, rounds: int = 6) -> Path:
    """A slower model with the same outputs: `rounds` square matmuls of `size` on a slice of the input, scaled by 0
    and added to the first output (nothing an optimizer removes: 0 × x is not 0 for NaN or infinity)."""

    def build(graph, name: str):
        first = graph.input[0].name
        rng = np.random.default_rng(0)
        weights = numpy_helper.from_array((rng.standard_normal((size, size)) / size).astype(np.float32), "work_w")
        flat_shape = numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "work_flat")
        starts = numpy_helper.from_array(np.array([0], dtype=np.int64), "work_start")
        ends = numpy_helper.from_array(np.array([size], dtype=np.int64), "work_end")
        axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "work_axis")
        tiled = numpy_helper.from_array(np.array([1, size], dtype=np.int64), "work_repeats")
        zero = numpy_helper.from_array(np.array(0, dtype=np.float32), "work_zero")
        nodes = [
            helper.make_node("Reshape", [first, "work_flat"], ["work_flat_in"]),
            helper.make_node("Slice", ["work_flat_in", "work_start", "work_end", "work_axis"], ["work_sliced"]),
            helper.make_node("ReduceMean", ["work_sliced"], ["work_mean"], keepdims=1),
            helper.make_node("Tile", ["work_mean", "work_repeats"], ["work_0"]),
        ]
        for i in range(rounds):
            nodes.append(helper.make_node("MatMul", [f"work_{i}", "work_w"], [f"work_{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"work_{rounds}"], ["work_sum"], keepdims=0),
            helper.make_node("Mul", ["work_sum", "work_zero"], ["work_nothing"]),
            helper.make_node("Add", [name, "work_nothing"], ["slow_output"]),
        ]
        return nodes, [weights, flat_shape, starts, ends, axes, tiled, zero], "slow_output"

    return _append_to_output(model_path, out, build)
