"""--input-value: an input frozen to a constant, so control flow that reads it folds away (a VAD's `If` on its
sample rate hides every layer from int8 quantizers and converters)."""

import json

import numpy as np
import onnx
from helpers import assert_user_error, compile_args
from onnx import TensorProto, helper, numpy_helper

from edgekit.compile.intake import prepare_model


def branching_model(path):
    """y = x @ w when mode == 16000, else x @ (2 w): the whole network inside an If, as silero's VAD has it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)

    def branch(name: str, weight: np.ndarray):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_fc")],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["batch", 4])],
            [numpy_helper.from_array(weight, f"{name}_w")],
        )

    graph = helper.make_graph(
        [
            helper.make_node("Equal", ["mode", "rate"], ["is_16k"], name="is_16k"),
            helper.make_node(
                "If",
                ["is_16k"],
                ["y"],
                name="by_rate",
                then_branch=branch("then", w),
                else_branch=branch("else", 2 * w),
            ),
        ],
        "branching",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("mode", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_freezing_an_input_folds_the_branch_it_selects(tmp_path):
    prepared = prepare_model(branching_model(tmp_path / "m.onnx"), tmp_path, input_values={"mode": [16000]})
    graph = onnx.load(str(prepared.path)).graph
    assert [spec.name for spec in prepared.inputs] == ["x"]
    assert [node.op_type for node in graph.node] == ["MatMul"]
    assert any("mode frozen to 16000" in note for note in prepared.notes)


def test_branching_on_an_input_suggests_freezing_it(tmp_path):
    prepared = prepare_model(branching_model(tmp_path / "m.onnx"), tmp_path)
    assert any("--input-value mode=16000" in note for note in prepared.notes), prepared.notes


def test_frozen_model_quantizes_to_int8(cli, tmp_path):
    model = branching_model(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((120, 8)).astype(np.float32),
             mode=np.full(120, 16000, np.int64))  # fmt: skip
    # Accuracy is not what this tests (the cosine below is): 50 held-out samples of a random model flip a few.
    args = compile_args(model, "x86-64-avx512", "--precision", "int8", "--backend", "onnxruntime", "--calibration",
                        data, "--max-accuracy-drop", "100", "--json", out=tmp_path / "m.ekb")  # fmt: skip
    assert_user_error(cli(*args), "int8 quantized nothing")  # ONNX Runtime's quantizer does not enter If branches
    result = cli(*args, "--input-value", "mode=16000")
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["candidates"][0]
    assert chosen["status"] == "chosen" and chosen["metrics"]["cosine"] > 0.99


def test_bad_input_values_are_refused(cli, tmp_path):
    model = branching_model(tmp_path / "m.onnx")
    assert_user_error(cli(*compile_args(model, "x86-64-avx512", "--input-value", "rate")), "NAME=VALUE")
    assert_user_error(cli(*compile_args(model, "x86-64-avx512", "--input-value", "sr=16000")),
                      "--input-value sr: no such input (inputs: x, mode)")  # fmt: skip
    assert_user_error(cli(*compile_args(model, "x86-64-avx512", "--input-value", "mode=1,2")),
                      "2 value(s) given")  # fmt: skip
