"""Model intake: every bad model is exit 2 with a one-line cause naming the node, op, input or field."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_user_error
from helpers import compile_args as base_args
from onnx import TensorProto, helper

from edgekit.intake import parse_shape_overrides, prepare_model


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
