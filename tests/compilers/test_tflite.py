"""TFLite backend: onnx2tf conversion offline, run with LiteRT, on a real trained classifier."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgekit.agents.runtimes import get_runtime
from edgekit.bundle import open_bundle


def accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    predictions = [int(np.argmax(session.run({"image": image[None]})[0])) for image in images]
    return float(np.mean(np.asarray(predictions) == labels))


def test_digits_tflite_int8_within_one_point_of_fp32(cli, digits, tmp_path):
    bundle = tmp_path / "digits-tflite.ekb"
    result = cli("compile", digits / "digits.onnx", "-p", "x86-64-avx512", "--backend", "tflite",
                 "--precision", "int8", "--calibration", digits / "calibration.npz", "--bench-seconds", "0.1",
                 "-o", bundle)  # fmt: skip
    assert result.exit_code == 0, result.output
    test = np.load(digits / "test.npz")
    fp32 = accuracy(get_runtime("onnxruntime").load(digits / "digits.onnx", {}), test["image"], test["labels"])
    with tempfile.TemporaryDirectory() as scratch:
        manifest = open_bundle(bundle, Path(scratch), trust_key=None)
        assert (manifest.backend, manifest.precision, manifest.runtime) == ("tflite", "int8", "litert")
        weights = manifest.verification
        assert weights.param_bytes < weights.reference_param_bytes / 3  # int8 weights
        assert weights.param_bytes < weights.model_bytes  # counts the weight buffers, not the whole file
        session = get_runtime("litert").load(Path(scratch) / manifest.entrypoint, manifest.target)
        int8 = accuracy(session, test["image"], test["labels"])
    print(f"digits test split: fp32 {fp32:.4f}, tflite int8 {int8:.4f}")
    assert fp32 - int8 <= 0.01


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_tflite_matches_reference(cli, small_cnn_model, tmp_path, precision):
    result = cli("compile", small_cnn_model, "-p", "rpi5", "--backend", "tflite", "--precision", precision,
                 "--bench-seconds", "0.05", "-o", tmp_path / "b.ekb", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    chosen = json.loads(result.stdout)["candidates"][0]
    assert chosen["status"] == "chosen"
    assert chosen["metrics"]["cosine"] > 0.9999
    assert chosen["metrics"]["verified_on"].startswith("host x86_64 litert")


def test_onnx2tf_failure_is_a_failed_candidate_with_its_error(cli, tmp_path):
    """A model onnx2tf cannot convert fails that candidate with onnx2tf's message; nothing else breaks."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("GridSample", ["x", "grid"], ["y"], name="sampler")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
         helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 4, 4, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
    )  # fmt: skip
    path = tmp_path / "grid.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = cli("compile", path, "-p", "x86-64-avx2", "--precision", "fp32", "--bench-seconds", "0.05",
                 "-o", tmp_path / "g.ekb", "--json")  # fmt: skip
    report = json.loads(result.stdout)
    statuses = {c["backend"]: (c["status"], c["reason"]) for c in report["candidates"]}
    assert statuses["onnxruntime"][0] in ("chosen", "passed")
    assert statuses["tflite"][0] == "failed"
    assert "onnx2tf failed" in statuses["tflite"][1]
