"""TFLite backend: onnx2tf conversion offline, run with LiteRT, on a real trained classifier and on small models
built here with the traits of real exports that broke it."""

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import assert_user_error, compile_args, ml_imputer_model, outlier_classifier, save, voice_detector_lstm
from onnx import TensorProto, helper, numpy_helper

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


def test_onnx2tf_failure_names_the_op_and_node(cli, tmp_path):
    """A model onnx2tf cannot convert fails that candidate with one line naming the op and node; nothing else
    breaks."""
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
    assert statuses["tflite"][1].startswith("build: UnsupportedByTflite: onnx2tf cannot convert op GridSample "
                                            "(node sampler): ")  # fmt: skip
    assert "\n" not in statuses["tflite"][1]


def compile_tflite(cli, model: Path, precision: str, data: Path, out: Path) -> dict:
    """The tflite candidate's report entry from `edgekit compile --backend tflite` on x86-64."""
    result = cli(*compile_args(model, "x86-64-avx512", "--backend", "tflite", "--precision", precision,
                               "--calibration", data, "--json", out=out))  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)["candidates"][0]


def paddle_style_classifier(path: Path) -> Path:
    """The head of PP-OCR's text-angle classifier as paddle2onnx exports it: nodes named "Op@N", a Softmax over two
    classes behind a MatMul + Add. onnx2tf passed "Softmax@0" to tf.nn.softmax, which refused it as a scope name."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "conv2d_0.w_0"], ["conv2d_0.tmp_0"], name="Conv@0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv2d_0.tmp_0", "s", "b", "m", "v"], ["bn_0.tmp_2"], name="BN@0"),
        helper.make_node("HardSigmoid", ["bn_0.tmp_2"], ["hard_sigmoid_0.tmp_0"], name="HardSigmoid@0"),
        helper.make_node("GlobalAveragePool", ["hard_sigmoid_0.tmp_0"], ["pool2d_0.tmp_0"], name="Pool@0"),
        helper.make_node("Reshape", ["pool2d_0.tmp_0", "shape@0"], ["reshape2_0.tmp_0"], name="Reshape@0"),
        helper.make_node("MatMul", ["reshape2_0.tmp_0", "fc_0.w_0"], ["linear_1.tmp_0"], name="MatMul@0"),
        helper.make_node("Add", ["linear_1.tmp_0", "fc_0.b_0"], ["linear_1.tmp_1"], name="Add@0"),
        helper.make_node("Softmax", ["linear_1.tmp_1"], ["softmax_0.tmp_0"], name="Softmax@0", axis=1),
    ]
    weights = {
        "conv2d_0.w_0": rng.standard_normal((8, 3, 3, 3)), "s": rng.uniform(0.5, 1.5, 8),
        "b": rng.standard_normal(8), "m": rng.standard_normal(8) * 0.1, "v": rng.uniform(0.5, 1.5, 8),
        "fc_0.w_0": rng.standard_normal((8, 2)) * 8, "fc_0.b_0": [0.0, 0.0], "shape@0": np.array([1, 8]),
    }  # fmt: skip
    return save(path, nodes, {"x": [1, 3, 16, 32]}, {"softmax_0.tmp_0": [1, 2]}, weights, opset=11)


def test_paddle_node_names_convert_and_match_fp32(cli, tmp_path):
    model = paddle_style_classifier(tmp_path / "cls.onnx")
    np.savez(data := tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((60, 3, 16, 32), np.float32))
    candidate = compile_tflite(cli, model, "int8", data, tmp_path / "cls.ekb")
    assert candidate["status"] == "chosen", candidate["reason"]
    assert candidate["metrics"]["cosine"] > 0.999
    assert candidate["metrics"]["top1_agreement"] >= 0.98


def stft_like(path: Path) -> Path:
    """Silero's STFT front end: a strided Conv makes channels-first frames, and one Slice over two axes takes the
    first half of the channels and drops the first frame. onnx2tf applied that Slice to the wrong axes of its
    channels-last tensor, and the Conv after it found 15 channels where it expects 8."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "basis"], ["frames"], name="stft", strides=[4]),
        helper.make_node("Slice", ["frames", "starts", "ends", "axes"], ["real"], name="real_part"),
        helper.make_node("Mul", ["real", "real"], ["power"], name="power"),
        helper.make_node("Conv", ["power", "w"], ["y"], name="encoder"),
    ]
    weights = {"basis": rng.standard_normal((16, 1, 8)), "w": rng.standard_normal((4, 8, 3)),
               "starts": np.array([0, 1]), "ends": np.array([8, 2**62]), "axes": np.array([1, 2])}  # fmt: skip
    return save(path, nodes, {"x": [1, 1, 64]}, {"y": [1, 4, 12]}, weights)


def test_a_slice_over_two_axes_of_channels_first_frames_converts(cli, tmp_path):
    model = stft_like(tmp_path / "stft.onnx")
    np.savez(data := tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((60, 1, 64), np.float32))
    candidate = compile_tflite(cli, model, "fp32", data, tmp_path / "stft.ekb")
    assert candidate["status"] == "chosen", candidate["reason"]
    assert candidate["metrics"]["cosine"] > 0.9999


def test_inputs_and_outputs_keep_their_onnx_order_and_shape(cli, tmp_path):
    """onnx2tf's int8 SavedModel sorts inputs and outputs by name (here: img before seq, pooled before tokens), and
    onnx2tf makes 3-5D inputs channels-last unless told otherwise (seq [1, 5, 12] → [1, 12, 5], the channels-last
    img [1, 12, 12, 3] → [1, 12, 3, 12])."""
    rng = np.random.default_rng(0)
    model = save(
        tmp_path / "layouts.onnx",
        [helper.make_node("MatMul", ["seq", "w"], ["tokens"], name="proj"),
         helper.make_node("Transpose", ["img"], ["img_nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
         helper.make_node("Conv", ["img_nchw", "k"], ["features"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["features"], ["pooled"], name="pool")],
        {"seq": [1, 5, 12], "img": [1, 12, 12, 3]}, {"tokens": [1, 5, 4], "pooled": [1, 4, 1, 1]},
        {"w": rng.standard_normal((12, 4)), "k": rng.standard_normal((4, 3, 3, 3))},
    )  # fmt: skip
    np.savez(data := tmp_path / "d.npz", seq=rng.standard_normal((60, 5, 12), np.float32),
             img=rng.standard_normal((60, 12, 12, 3), np.float32))  # fmt: skip
    candidate = compile_tflite(cli, model, "int8", data, tmp_path / "layouts.ekb")
    assert candidate["status"] == "chosen", candidate["reason"]
    assert candidate["metrics"]["cosine"] > 0.999


def test_ai_onnx_ml_op_is_refused_without_running_onnx2tf(cli, tmp_path):
    model = ml_imputer_model(tmp_path / "imputer.onnx")
    asked = cli(*compile_args(model, "x86-64-avx512", "--backend", "tflite", "--precision", "fp32"))
    assert_user_error(asked, "TFLite has no equivalent of ai.onnx.ml op Imputer (node imputer)")
    auto = cli(*compile_args(model, "x86-64-avx2", "--precision", "fp32", "--json", out=tmp_path / "imp.ekb"))
    tflite = next(c for c in json.loads(auto.stdout)["candidates"] if c["backend"] == "tflite")
    assert tflite["status"] == "failed"
    assert "TFLite has no equivalent of ai.onnx.ml op Imputer" in tflite["reason"]


def sklearn_style_classifier(path: Path) -> Path:
    """A classifier as skl2onnx exports it: probabilities, and the label looked up as the ai.onnx.ml op
    ArrayFeatureExtractor(classes, ArgMax(probabilities)), reshaped and cast to int64."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["scores"], name="Gemm", transB=1),
        helper.make_node("Softmax", ["scores"], ["probabilities"], name="Softmax"),
        helper.make_node("ArgMax", ["probabilities"], ["argmax_output"], name="ArgMax", axis=1),
        helper.make_node("ArrayFeatureExtractor", ["classes", "argmax_output"], ["looked_up"], domain="ai.onnx.ml"),
        helper.make_node("Reshape", ["looked_up", "flat"], ["reshaped"], name="Reshape"),
        helper.make_node("Cast", ["reshaped"], ["label"], name="Cast", to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(rng.standard_normal((3, 6)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(3, np.float32), "b"),
         numpy_helper.from_array(np.array([10, 20, 30], np.int32), "classes"),
         numpy_helper.from_array(np.array([-1], np.int64), "flat")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def test_sklearn_label_lookup_converts_as_a_gather(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.compile.intake import prepare_model
    from edgekit.compilers import BuildRequest
    from edgekit.compilers.tflite import TfliteBackend, TfliteOptions
    from edgekit.profiles import load_profile
    from edgekit.progress import NoProgress

    model = prepare_model(sklearn_style_classifier(tmp_path / "mlp.onnx"), tmp_path)
    request = BuildRequest(model, load_profile("x86-64-avx512"), "fp32", None, TfliteOptions(),
                           tmp_path / "fp32" / "artifacts", NoProgress())  # fmt: skip
    interpreter = Interpreter(model_path=str(TfliteBackend().build(request).entrypoint))
    interpreter.allocate_tensors()
    reference = get_runtime("onnxruntime").load(model.source, {})  # the original, with ArrayFeatureExtractor
    labels, expected = [], []
    for x in np.random.default_rng(1).standard_normal((40, 1, 6)).astype(np.float32):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        labels.append(int(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]))
        expected.append(int(reference.run({"x": x})[0][0]))
    assert labels == expected and set(labels) == {10, 20, 30}


def test_a_conversion_past_its_time_limit_is_stopped(cli, small_cnn_model, tmp_path, monkeypatch):
    from edgekit.compilers import tflite

    monkeypatch.setattr(tflite, "TIMEOUT_BASE_S", 1.0)
    monkeypatch.setattr(tflite, "TIMEOUT_PER_NODE_S", 0.0)
    monkeypatch.setattr(tflite, "TIMEOUT_PER_WEIGHT_MB_S", 0.0)
    result = cli(*compile_args(small_cnn_model, "rpi5", "--backend", "tflite", "--precision", "fp32", "--json",
                               out=tmp_path / "b.ekb"))  # fmt: skip
    assert result.exit_code == 1, result.output
    reason = json.loads(result.stdout)["candidates"][0]["reason"]
    assert reason.startswith("build: RuntimeError: onnx2tf did not finish within 1 s"), reason


def test_mixed_precision_keeps_the_sensitive_layer_in_float(cli, tmp_path):
    model = outlier_classifier(tmp_path / "outliers.onnx")
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    x[:, 0] = np.where(np.arange(200) % 2, 1000.0, -1000.0)
    np.savez(data := tmp_path / "x.npz", x=x)
    candidate = compile_tflite(cli, model, "int8", data, tmp_path / "outliers.ekb")
    mixed = candidate["details"]["mixed_precision"]
    assert "fp32" in mixed["int8_reason"]  # plain int8 was rejected (its scores collapse), and says why
    assert candidate["status"] == "chosen" and mixed["keep_float"] == ["fc1"]
    assert candidate["metrics"]["top1_agreement"] >= 0.97
    assert mixed["size_vs_int8"] > 1  # fc1's weights stayed float32


@pytest.mark.parametrize("steps", [1, 3])
def test_an_lstm_is_unrolled_exactly(tmp_path, steps):
    from edgekit.compile.lowering import unroll_recurrent

    model = onnx.load(str(voice_detector_lstm(tmp_path / "vad.onnx", steps)))
    unrolled, nodes, skipped = unroll_recurrent(model)
    assert not skipped and "rnn" in nodes and not any(n.op_type == "LSTM" for n in unrolled.graph.node)
    rng = np.random.default_rng(2)
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lowered = ort.InferenceSession(unrolled.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(3):
        state = {name: rng.standard_normal((1, 1, 8), np.float32) for name in ("h", "c")}
        feed = {"x": rng.standard_normal((steps, 1, 16), np.float32), **state}
        for want, got in zip(original.run(None, feed), lowered.run(None, feed), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_lstm_with_state_inputs_converts_and_int8_keeps_it_in_float(cli, tmp_path):
    model = voice_detector_lstm(tmp_path / "vad.onnx")
    rng = np.random.default_rng(1)
    state = {name: rng.standard_normal((60, 1, 8), np.float32) * 0.5 for name in ("h", "c")}
    np.savez(data := tmp_path / "x.npz", x=rng.standard_normal((60, 1, 16), np.float32), **state)
    fp32 = compile_tflite(cli, model, "fp32", data, tmp_path / "fp32.ekb")
    assert fp32["status"] == "chosen", fp32["reason"]
    assert fp32["metrics"]["cosine"] > 0.99999
    int8 = compile_tflite(cli, model, "int8", data, tmp_path / "int8.ekb")
    assert int8["status"] == "chosen", int8["reason"]
    assert int8["metrics"]["cosine"] > 0.999


def test_rows_gathered_from_a_state_input_feed_a_gemm(cli, tmp_path):
    """silero's if-less export reads state[0] of its [2, 1, 8] state input with a Gather; onnx2tf, holding the 3-D
    input channels-last, gave [8, 1] and its Gemm failed ("Dimensions must be equal, but are 1 and 8")."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["state", "zero"], ["h"], name="h_of_state", axis=0),
        helper.make_node("Gemm", ["x", "w"], ["xw"], name="input_gemm", transB=1),
        helper.make_node("Gemm", ["h", "r"], ["hr"], name="state_gemm", transB=1),
        helper.make_node("Add", ["xw", "hr"], ["y"], name="add"),
    ]
    weights = {"zero": np.array(0), "w": rng.standard_normal((8, 16)), "r": rng.standard_normal((8, 8))}
    model = save(tmp_path / "state.onnx", nodes, {"x": [1, 16], "state": [2, 1, 8]}, {"y": [1, 8]}, weights)
    np.savez(data := tmp_path / "x.npz", x=rng.standard_normal((60, 16), np.float32),
             state=rng.standard_normal((60, 2, 1, 8), np.float32))  # fmt: skip
    candidate = compile_tflite(cli, model, "fp32", data, tmp_path / "state.ekb")
    assert candidate["status"] == "chosen", candidate["reason"]
    assert candidate["metrics"]["cosine"] > 0.99999


def test_only_float_variants_refuse_keep_float(small_cnn_model, tmp_path):
    from edgekit.compile.intake import prepare_model
    from edgekit.compilers import BuildRequest
    from edgekit.compilers.tflite import TfliteBackend, TfliteOptions
    from edgekit.profiles import load_profile
    from edgekit.progress import NoProgress

    model, profile = prepare_model(small_cnn_model, tmp_path), load_profile("rpi5")
    request = BuildRequest(
        model, profile, "fp32", None, TfliteOptions(), tmp_path / "out", NoProgress(), frozenset({"fc"})
    )
    with pytest.raises(ValueError, match="TFLite fp32 cannot keep layers in float"):
        TfliteBackend().build(request)
