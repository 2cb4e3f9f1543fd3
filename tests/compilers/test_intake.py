"""Model intake: every bad model is exit 2 with a one-line cause naming the node, op, input or field."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_user_error
from helpers import compile_args as base_args
from onnx import TensorProto, helper, numpy_helper

from edgekit.compile.intake import parse_shape_overrides, prepare_model


def compile_args(model: Path, *extra: str) -> list:
    return base_args(model, "x86-64-avx2", *extra)


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def tiny(op_type: str = "Relu", domain: str = "", opset: int = 17, dims=("N", 4)):
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
    )
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def test_garbage_file(cli, tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_user_error(cli(*compile_args(path)), str(path), "not an ONNX model")


def test_text_file_named_onnx(cli, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README, not a model\n" * 20)
    assert_user_error(cli(*compile_args(path)), str(path), "not an ONNX model")


def test_missing_model_file(cli, tmp_path):
    assert_user_error(cli(*compile_args(tmp_path / "absent.onnx")), "no such model file")


def test_op_no_backend_has(cli, tmp_path):
    path = save(tiny("FancyNonMaxSuppression", domain="com.acme"), tmp_path / "custom.onnx")
    assert_user_error(cli(*compile_args(path)), "the_node", "com.acme::FancyNonMaxSuppression")


def test_unknown_standard_op(cli, tmp_path):
    model = tiny("Relu")
    model.graph.node[0].op_type = "Reluu"
    path = save(model, tmp_path / "typo.onnx")
    assert_user_error(cli(*compile_args(path)), "the_node", "Reluu", "unknown op")


def test_opset_out_of_range(cli, tmp_path):
    path = save(tiny(opset=99), tmp_path / "future.onnx")
    assert_user_error(cli(*compile_args(path)), "opset 99 is out of range")


def test_dynamic_dim_needs_input_shape(cli, tmp_path):
    path = save(tiny(dims=(1, "features")), tmp_path / "dynamic.onnx")
    assert_user_error(cli(*compile_args(path)), "input 'x' dim 1 ('features') is dynamic", "--input-shape x:1xN")


def test_input_shape_resolves_dynamic_dims(tmp_path):
    path = save(tiny(dims=("batch", "features")), tmp_path / "dynamic.onnx")
    prepared = prepare_model(path, tmp_path, parse_shape_overrides(["x:2x7"]))
    assert prepared.inputs[0].shape == [2, 7] and prepared.outputs[0].shape == [2, 7]


def test_dynamic_batch_comes_from_profile(tmp_path, small_cnn_model):
    prepared = prepare_model(small_cnn_model, tmp_path, batch_size=1)
    assert prepared.inputs[0].shape == [1, 3, 32, 32] and prepared.inputs[0].layout == "NCHW"
    assert prepared.outputs[0].shape == [1, 10]


@pytest.mark.parametrize("spec", ["x", "x:", "x:1xAx3", "x:0x3", ":1x2"])
def test_bad_input_shape_flag(cli, small_cnn_model, spec):
    assert_user_error(cli(*compile_args(small_cnn_model, "--input-shape", spec)), "--input-shape")


def test_input_shape_for_unknown_input(cli, small_cnn_model):
    result = cli(*compile_args(small_cnn_model, "--input-shape", "image:1x3x32x32"))
    assert_user_error(result, "model's inputs are: input")


def test_int8_without_calibration_is_refused(cli, small_cnn_model):
    assert_user_error(cli(*compile_args(small_cnn_model, "--precision", "int8")), "needs calibration data", "never")


def test_unknown_precision_and_backend(cli, small_cnn_model):
    assert_user_error(cli(*compile_args(small_cnn_model, "--precision", "int4")), "--precision int4")
    assert_user_error(cli(*compile_args(small_cnn_model, "--backend", "tensorflow")), "--backend tensorflow")


def test_calibration_with_wrong_shape(cli, small_cnn_model, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.zeros((10, 3, 16, 16), np.float32))
    result = cli(*compile_args(small_cnn_model, "--precision", "int8", "--calibration", calib))
    assert_user_error(result, str(calib), "(10, 3, 16, 16)", "'input' needs (N, 3, 32, 32)")


def test_invalid_graph_names_the_problem(cli, tmp_path):
    model = tiny("Relu")
    model.graph.node[0].input[0] = "does_not_exist"
    path = save(model, tmp_path / "broken.onnx")
    assert_user_error(cli(*compile_args(path)), "model is invalid")


def ir3_model(path: Path) -> Path:
    """The classic ONNX-zoo layout: IR 3, opset 9, every weight also listed as a graph input (onnx.checker and
    ONNX Runtime accept it)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["data_0", "w"], ["c"]), helper.make_node("Relu", ["c"], ["prob"])],
        "zoo",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4, 6, 6])],
        [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return save(model, path)


def test_ir3_model_with_weights_as_inputs_loads_and_is_upgraded(cli, tmp_path):
    path = ir3_model(tmp_path / "zoo.onnx")
    prepared = prepare_model(path, tmp_path)
    assert [i.name for i in prepared.inputs] == ["data_0"]  # the weight is a constant, not an input to feed
    assert prepared.opset == 13 and any("IR version 3" in note for note in prepared.notes)
    result = cli(*compile_args(path, "--precision", "fp32", "--backend", "onnxruntime", "-o", tmp_path / "z.ekb"))
    assert result.exit_code == 0, result.output


def stateful_model(path: Path) -> Path:
    """A VAD-like model: audio [batch, 8], an RNN-style state [2, batch, 3] (batch on axis 1) and a scalar int64
    sample rate that the graph checks against 16000."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["h"]),  # [batch, 3]
        helper.make_node("Unsqueeze", ["h", "zero"], ["h1"]),  # [1, batch, 3]
        helper.make_node("Add", ["state", "h1"], ["stateN"]),  # [2, batch, 3]
        helper.make_node("ReduceSum", ["stateN", "zero"], ["summed"], keepdims=0),  # [batch, 3]
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node("Where", ["is16k", "summed", "neg"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "vad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 3]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 3])],
        [numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array(16000, np.int64), "rate"),
         numpy_helper.from_array(np.full((1, 3), -100.0, np.float32), "neg")],
    )  # fmt: skip
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_state_batch_on_axis_1_and_a_scalar_int64_input(tmp_path):
    prepared = prepare_model(stateful_model(tmp_path / "vad.onnx"), tmp_path)
    axes = {spec.name: (spec.shape, spec.dtype, spec.batch_axis) for spec in prepared.inputs}
    assert axes == {"input": ([1, 8], "float32", 0), "state": ([2, 1, 3], "float32", 1), "sr": ([], "int64", None)}
    assert prepared.value_hints == {"sr": [16000]}  # synthetic feeds use the rate the graph expects


def test_stateful_model_compiles_fp32_on_synthetic_data_and_int8_on_named_arrays(cli, tmp_path):
    path = stateful_model(tmp_path / "vad.onnx")
    fp32 = cli(*compile_args(path, "--precision", "fp32", "--backend", "onnxruntime", "--json", "-o",
                             tmp_path / "a.ekb"))  # fmt: skip
    assert fp32.exit_code == 0, fp32.output
    # A random sample rate would take the -100 branch; the hinted 16000 gives real outputs to compare.
    assert json.loads(fp32.stdout)["candidates"][0]["metrics"]["max_abs_error"] < 1e-5
    rng = np.random.default_rng(1)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input=rng.standard_normal((60, 8)).astype(np.float32),
             state=rng.standard_normal((60, 2, 3)).astype(np.float32), sr=np.full(60, 16000))  # fmt: skip
    int8 = cli(*compile_args(path, "--precision", "int8", "--backend", "onnxruntime", "--calibration", calibration,
                             "--json", "-o", tmp_path / "b.ekb"))  # fmt: skip
    assert int8.exit_code == 0, int8.output
    assert json.loads(int8.stdout)["candidates"][0]["metrics"]["cosine"] > 0.99
    assert cli("bench", tmp_path / "b.ekb", "--seconds", "0.1").exit_code == 0  # self-test vectors replay


def test_sklearn_mlp_label_output_is_compared_exactly(cli, tmp_path):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0).fit(x[:1200], y[:1200])
    path = save(to_onnx(mlp, x[:1]), tmp_path / "mlp.onnx")  # outputs: label (int64) and a ZipMap of probabilities
    prepared = prepare_model(path, tmp_path)
    assert [(o.dtype, o.shape) for o in prepared.outputs] == [("int64", [1]), ("float32", [1, 10])]
    calibration = tmp_path / "digits.npz"
    np.savez(calibration, X=x[1200:], labels=y[1200:])
    result = cli(*compile_args(path, "--precision", "fp32", "--backend", "onnxruntime", "--calibration",
                               calibration, "--json", "-o", tmp_path / "m.ekb"))  # fmt: skip
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["candidates"][0]
    assert chosen["verdict"]["output_exact"] == {"output_label": 1.0}
    assert chosen["metrics"]["accuracy"] > 0.85 and chosen["metrics"]["top1_agreement"] == 1.0
