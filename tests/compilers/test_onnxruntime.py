"""ONNX Runtime backend: real builds, inspected as ONNX graphs and run through the runtime adapter."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import compile_args

from edgekit.calibration import load_samples
from edgekit.compilers import BuildRequest, backends
from edgekit.intake import prepare_model
from edgekit.profiles import Preprocessing, load_profile
from edgekit.progress import NoProgress


def build(model_path: Path, tmp_path: Path, profile: str, precision: str, calibration: Path | None = None):
    backend = backends()["onnxruntime"]()
    model = prepare_model(model_path, tmp_path)
    samples = load_samples(calibration, model.inputs, Preprocessing()) if calibration else None
    target = load_profile(profile)
    listed = [c.options for c in target.candidates if (c.backend, c.precision) == ("onnxruntime", precision)]
    request = BuildRequest(
        model=model,
        profile=target,
        precision=precision,
        calibration=samples,
        options=backend.parse_options(listed[0] if listed else {}, "test"),
        outdir=tmp_path / "out",
        progress=NoProgress(),
    )
    return model, backend.build(request)


def test_int8_is_static_qdq_per_channel(tmp_path, small_cnn_model, small_cnn_calibration):
    _, result = build(small_cnn_model, tmp_path, "x86-64-avx512", "int8", small_cnn_calibration)
    graph = onnx.load(str(result.entrypoint)).graph
    ops = {node.op_type for node in graph.node}
    # After offline optimisation ORT fuses QDQ pairs into quantized kernels or keeps explicit QDQ nodes.
    assert ops & {"QLinearConv", "QuantizeLinear", "DequantizeLinear", "ConvInteger"}, ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert int8_weights, "conv weights should be stored as int8"
    scales = [i for i in graph.initializer if "scale" in i.name and len(i.dims) == 1 and i.dims[0] > 1]
    assert scales, "per-channel quantization stores one scale per output channel"
    assert result.param_bytes < 0.5 * prepare_model(Path(small_cnn_model), tmp_path).param_bytes


def test_int8_runs_close_to_fp32(tmp_path, small_cnn_model, small_cnn_calibration):
    from edgekit.agents.runtimes import get_runtime

    model, result = build(small_cnn_model, tmp_path, "x86-64-avx2", "int8", small_cnn_calibration)
    runtime = get_runtime("onnxruntime")
    x = {"input": np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)}
    reference = runtime.load(model.path, {}).run(x)[0]
    quantized = runtime.load(result.entrypoint, result.target).run(x)[0]
    cosine = float(reference.ravel() @ quantized.ravel() / np.linalg.norm(reference) / np.linalg.norm(quantized))
    assert cosine > 0.98


def test_fp16_for_gpu_profile_stores_half_weights(tmp_path, small_cnn_model):
    _, result = build(small_cnn_model, tmp_path, "jetson-orin-nano", "fp16")
    graph = onnx.load(str(result.entrypoint)).graph
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays fp32
    assert result.target["execution_providers"][0] == "TensorrtExecutionProvider"


def test_fp16_is_refused_for_cpu_profiles_and_microcontrollers():
    backend = backends()["onnxruntime"]()
    assert "GPU profiles" in backend.unsupported_reason(load_profile("x86-64-avx2"), "fp16")
    assert "microcontrollers" in backend.unsupported_reason(load_profile("ethos-u55"), "int8")
    assert backend.unsupported_reason(load_profile("rpi4"), "int8") is None


@pytest.mark.parametrize("profile", ["x86-64-avx2", "rpi4"])
def test_compile_reports_every_candidate(cli, tmp_path, small_cnn_model, small_cnn_calibration, profile):
    import json

    result = cli(
        "compile",
        small_cnn_model,
        "-p",
        profile,
        "--calibration",
        small_cnn_calibration,
        "--bench-seconds",
        "0.05",
        "-o",
        tmp_path / "b.ekb",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    statuses = {(c["backend"], c["precision"]): c["status"] for c in report["candidates"]}
    assert list(statuses.values()).count("chosen") == 1
    if profile == "rpi4":
        # Profile order picks for a foreign CPU; TVM builds and passes but comes after the vendor runtimes.
        assert statuses[("tflite", "int8")] == "chosen" and statuses[("tvm", "int8")] == "passed"
        chosen = next(c for c in report["candidates"] if c["status"] == "chosen")
        assert "stand-in for the aarch64 device" in chosen["metrics"]["verified_on"]
    for c in report["candidates"]:
        if c["metrics"]:
            m = c["metrics"]
            assert m["latency_p50_ms"] > 0 and m["cosine"] > 0.9 and m["param_bytes"] > 0
            assert m["data"] == "held-out calibration split" and m["samples"] == 8


def test_no_passing_candidate_fails_with_the_table(cli, tmp_path, small_cnn_model):
    out = tmp_path / "never.ekb"
    args = compile_args(small_cnn_model, "x86-64-avx2", "--backend", "onnxruntime", "--precision", "fp32", out=out)
    result = cli(*args, "--max-accuracy-drop", "-1")
    assert result.exit_code == 1
    assert "rejected" in result.stdout and "top-1 differs from fp32" in result.stdout
    assert "no candidate built and passed verification" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_artifact_carries_the_lowest_ir_version_its_opsets_need(tmp_path, small_cnn_model, small_cnn_calibration,
                                                               precision):  # fmt: skip
    """A device's older ONNX Runtime (1.23 reads IR <= 11) must load what a current onnx package (IR 14) wrote."""
    source = onnx.load(str(small_cnn_model))
    source.ir_version = 14
    newest = tmp_path / "ir14.onnx"
    onnx.save(source, str(newest))
    _, result = build(newest, tmp_path, "rpi4", precision, small_cnn_calibration if precision == "int8" else None)
    artifact = onnx.load(str(result.entrypoint))
    used = {node.domain for node in artifact.graph.node} | {""}
    assert {opset.domain for opset in artifact.opset_import} == used
    assert artifact.ir_version == onnx.helper.find_min_ir_version_for(list(artifact.opset_import), ignore_unknown=True)
    assert artifact.ir_version <= 11
