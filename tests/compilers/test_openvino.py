"""OpenVINO backend: IR with fp32/fp16 weights and NNCF int8, checked in the IR and by running it."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ml_imputer_model

from edgekit.agents.runtimes import get_runtime
from edgekit.compile.calibration import load_samples
from edgekit.compile.intake import PreparedModel, prepare_model
from edgekit.compilers import BuildRequest, BuildResult, backends
from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.profiles import Preprocessing, load_profile
from edgekit.progress import NoProgress


def build(
    model: PreparedModel,
    outdir: Path,
    precision: str,
    calibration: Path | None = None,
    keep_float: frozenset[str] = frozenset(),
    int8_only: frozenset[str] | None = None,
) -> BuildResult:
    backend = backends()["openvino"]()
    return backend.build(
        BuildRequest(
            model=model,
            profile=load_profile("x86-64-avx2"),
            precision=precision,
            calibration=load_samples(calibration, model.inputs, Preprocessing()) if calibration else None,
            options=backend.parse_options({}, "test"),
            outdir=outdir,
            progress=NoProgress(),
            keep_float=keep_float,
            int8_only=int8_only,
        )
    )


@pytest.fixture(scope="module")
def builds(tmp_path_factory, small_cnn_model, small_cnn_calibration):
    work = tmp_path_factory.mktemp("openvino")
    model = prepare_model(small_cnn_model, work)
    results = {
        precision: build(model, work / precision, precision, small_cnn_calibration if precision == "int8" else None)
        for precision in ("fp32", "fp16", "int8")
    }
    return model, results


def test_ir_files_and_weight_sizes(builds):
    _, results = builds
    bins = {p: Path(r.entrypoint).with_suffix(".bin").stat().st_size for p, r in results.items()}
    assert bins["fp16"] < 0.6 * bins["fp32"]
    assert bins["int8"] < 0.6 * bins["fp32"]


def test_int8_ir_holds_fake_quantize(builds):
    _, results = builds
    xml = Path(results["int8"].entrypoint).read_text()
    assert 'type="FakeQuantize"' in xml
    assert 'element_type="i8"' in xml or 'element_type="u8"' in xml


def test_each_precision_matches_fp32_reference(builds):
    model, results = builds
    x = {"input": np.random.default_rng(5).random((1, 3, 32, 32), dtype=np.float32)}
    reference = get_runtime("onnxruntime").load(model.path, {}).run(x)[0].ravel()
    for precision, result in results.items():
        got = get_runtime("openvino").load(result.entrypoint, result.target).run(x)[0].ravel()
        cosine = reference @ got / np.linalg.norm(reference) / np.linalg.norm(got)
        assert cosine > (0.98 if precision == "int8" else 0.9999), precision


def test_fp32_asks_for_f32_arithmetic(builds):
    """OpenVINO computes in bf16 by default on CPUs with AVX512-BF16 or AMX (this test's CI machines may have it):
    an fp32 bundle asks for f32 and matches ONNX Runtime to float rounding; int8 asks it for its float layers."""
    model, results = builds
    assert results["fp32"].target == {"device": "CPU", "inference_precision": "f32"}
    assert results["int8"].target == {"device": "CPU", "inference_precision": "f32"}
    assert "inference_precision" not in results["fp16"].target
    x = {"input": np.random.default_rng(6).random((1, 3, 32, 32), dtype=np.float32)}
    reference = get_runtime("onnxruntime").load(model.path, {}).run(x)[0]
    got = get_runtime("openvino").load(results["fp32"].entrypoint, results["fp32"].target).run(x)[0]
    assert np.max(np.abs(reference - got)) < 1e-4 * max(1.0, float(np.max(np.abs(reference))))


def test_npu_profile_asks_for_npu_first():
    backend = backends()["openvino"]()
    options = backend.parse_options(load_profile("intel-core-ultra-npu").candidates[0].options, "test")
    assert options.device == "AUTO:NPU,GPU,CPU"
    assert "CUDA" in backend.unsupported_reason(load_profile("jetson-nano"), "fp16")


def ops_by_name(result: BuildResult) -> dict:
    import openvino as ov

    return {op.get_friendly_name(): op for op in ov.Core().read_model(str(result.entrypoint)).get_ordered_ops()}


def reads_quantized(op) -> bool:
    """Whether an input of `op` comes from a FakeQuantize, or from a weight stored in 8 bits (NNCF's compressed
    weights: an i8/u8 Constant, then Convert, Subtract and Multiply back to float)."""
    for port in op.inputs():
        source = port.get_source_output().get_node()
        while source.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape"):
            source = source.input(0).get_source_output().get_node()
        if source.get_type_name() == "FakeQuantize" or str(source.get_output_element_type(0)) in ("i8", "u8"):
            return True
    return False


def conv_scale_conv(path: Path) -> PreparedModel:
    """Conv 'conv_0', a per-channel Mul 'scale_0' (paddle's MobileOne/BatchNorm leftovers), Relu, Conv 'conv_1':
    handed over as it is, since intake's simplifier would fold the Mul into the Conv before OpenVINO could."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "conv_0.w": rng.standard_normal((8, 3, 3, 3)) * 0.3,
        "scale_0.w": 1 + 0.1 * rng.standard_normal((1, 8, 1, 1)),
        "conv_1.w": rng.standard_normal((8, 8, 3, 3)) * 0.2,
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_0.w"], ["conv_0.out"], name="conv_0", pads=[1] * 4),
        helper.make_node("Mul", ["conv_0.out", "scale_0.w"], ["scale_0.out"], name="scale_0"),
        helper.make_node("Relu", ["scale_0.out"], ["relu_0.out"], name="relu_0"),
        helper.make_node("Conv", ["relu_0.out", "conv_1.w"], ["y"], name="conv_1", pads=[1] * 4),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_scale_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    spec = TensorSpec(name="x", shape=[1, 3, 16, 16], dtype="float32")
    return PreparedModel(path=path, source=path, inputs=[spec], outputs=[], opset=13, param_bytes=0)


def test_onnx_nodes_map_to_the_openvino_ops_they_became(builds, tmp_path):
    """OpenVINO splits a Conv into Convolution '<node>/WithoutBiases' + Add '<node>'; names the op that makes a
    graph output after that output (Gemm 'fc' becomes MatMul 'logits', Conv 'conv_1' Convolution 'y'); and fuses a
    Conv with the Mul after it into one Convolution named after the Mul ('scale_0')."""
    from edgekit.compilers.openvino import _convert

    model, _ = builds
    first = next(node.name for node in onnx.load(str(model.path)).graph.node if node.op_type == "Conv")
    assert _convert(model, frozenset({first}))[1] == [first, f"{first}/WithoutBiases"]
    assert _convert(model, frozenset({"fc"}))[1] == ["logits"]
    fused = conv_scale_conv(tmp_path / "conv_scale_conv.onnx")
    assert _convert(fused, frozenset({"conv_0"}))[1] == ["scale_0"]
    assert _convert(fused, frozenset({"conv_1"}))[1] == ["y"]
    with pytest.raises(ValueError, match="keep_float names nodes the model does not have: no-such-conv"):
        _convert(model, frozenset({"no-such-conv"}))


def test_int8_keeps_a_conv_float_after_openvino_fused_it(tmp_path):
    model = conv_scale_conv(tmp_path / "conv_scale_conv.onnx")
    np.savez(tmp_path / "calibration.npz", x=np.random.default_rng(1).standard_normal((8, 3, 16, 16)))
    plain = ops_by_name(build(model, tmp_path / "plain", "int8", tmp_path / "calibration.npz"))
    mixed = ops_by_name(build(model, tmp_path / "mixed", "int8", tmp_path / "calibration.npz", frozenset({"conv_0"})))
    assert reads_quantized(plain["scale_0"]) and not reads_quantized(mixed["scale_0"])
    assert reads_quantized(mixed["y"]), "conv_1 stays int8"


def test_int8_keeps_the_named_layers_without_fake_quantize(builds, tmp_path, small_cnn_calibration):
    model, results = builds
    first, second = [node.name for node in onnx.load(str(model.path)).graph.node if node.op_type == "Conv"]
    mixed = build(model, tmp_path, "int8", small_cnn_calibration, frozenset({second, "fc"}))
    plain_ops, mixed_ops = ops_by_name(results["int8"]), ops_by_name(mixed)
    for kept in (f"{second}/WithoutBiases", "logits"):
        assert reads_quantized(plain_ops[kept]) and not reads_quantized(mixed_ops[kept]), kept
    assert reads_quantized(mixed_ops[f"{first}/WithoutBiases"]), "the other layer stays int8"


def test_mixed_precision_quantizes_only_the_ranked_layers_with_global_ranges(builds, tmp_path):
    """With int8_only, what NNCF would also quantize (here the second conv and fc) stays float, and activation
    ranges are the global min/max the ranking measured with, not NNCF's mean of per-sample maxima (one sample of
    the calibration set peaks at 50, the others at 1)."""
    model, _ = builds
    first, second = [node.name for node in onnx.load(str(model.path)).graph.node if node.op_type == "Conv"]
    x = np.random.default_rng(2).random((20, 3, 32, 32), dtype=np.float32)
    x[0, 0, 0, 0] = 50.0
    np.savez(tmp_path / "peaks.npz", input=x)
    plain = ops_by_name(build(model, tmp_path / "plain", "int8", tmp_path / "peaks.npz"))
    mixed = ops_by_name(build(model, tmp_path / "mixed", "int8", tmp_path / "peaks.npz", int8_only=frozenset({first})))
    assert reads_quantized(mixed[f"{first}/WithoutBiases"])
    assert not reads_quantized(mixed[f"{second}/WithoutBiases"]) and not reads_quantized(mixed["logits"])
    plain_range, mixed_range = (
        next(
            float(np.max(op.input_value(2).get_node().get_data()))
            for op in ops.values()
            if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() == "Parameter"
        )
        for ops in (plain, mixed)
    )
    assert plain_range < 10 and mixed_range == pytest.approx(50.0, rel=0.02), (plain_range, mixed_range)


def test_ai_onnx_ml_op_is_refused_in_one_line_naming_the_op(tmp_path):
    """OpenVINO has no ai.onnx.ml ops (those intake cannot lower); its own report is many lines, the candidate's
    reason is one."""
    path = ml_imputer_model(tmp_path / "imputer.onnx")
    with pytest.raises(BadInput) as refused:
        build(prepare_model(path, tmp_path), tmp_path / "out", "fp32")
    message = str(refused.value)
    assert message.count("\n") == 0 and message.startswith(str(path))
    assert message.endswith("OpenVINO cannot convert this model: No conversion rule found for operations: "
                            "ai.onnx.ml.Imputer")  # fmt: skip


def test_sklearn_classifier_lowered_at_intake_builds_and_keeps_its_labels(tmp_path):
    """skl2onnx's logistic regression (LinearClassifier, Normalizer) reaches OpenVINO as standard ops."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    classifier = LogisticRegression(max_iter=200).fit(x[:1000], y[:1000])
    path = tmp_path / "logreg.onnx"
    onnx.save(to_onnx(classifier, x[:1], options={id(classifier): {"zipmap": False}}), str(path))
    result = build(prepare_model(path, tmp_path), tmp_path / "out", "fp32")
    compiled = get_runtime("openvino").load(result.entrypoint, result.target)
    labels = [int(compiled.run({"X": row[None]})[0][0]) for row in x[1000:1100]]
    np.testing.assert_array_equal(labels, classifier.predict(x[1000:1100]))


def test_cpu_standing_in_for_an_accelerator_computes_in_f32(builds, monkeypatch):
    """No NPU here: the host CPU runs an NPU bundle, in f32 rather than its bf16 default (further from the NPU's
    fp16 than f32 is)."""
    import openvino as ov

    _, results = builds
    asked = {}
    compile_model = ov.Core.compile_model

    def recording(core, model, device, config):
        asked.update(config)
        return compile_model(core, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    for device in ("NPU", "AUTO:NPU,GPU,CPU"):
        asked.clear()
        session = get_runtime("openvino").load(results["fp16"].entrypoint, {"device": device})
        assert session.device == "openvino CPU" and asked["INFERENCE_PRECISION_HINT"] == "f32", device
    asked.clear()
    get_runtime("openvino").load(results["fp16"].entrypoint, {"device": "CPU"})
    assert "INFERENCE_PRECISION_HINT" not in asked, "a CPU target keeps OpenVINO's own choice for fp16"
