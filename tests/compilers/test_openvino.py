"""OpenVINO backend: IR with fp32/fp16 weights and NNCF int8, checked in the IR and by running it."""

from pathlib import Path

import numpy as np
import pytest

from edgekit.agents.runtimes import get_runtime
from edgekit.calibration import load_samples
from edgekit.compilers import BuildRequest, backends
from edgekit.intake import prepare_model
from edgekit.profiles import Preprocessing, load_profile
from edgekit.progress import NoProgress


@pytest.fixture(scope="module")
def builds(tmp_path_factory, small_cnn_model, small_cnn_calibration):
    work = tmp_path_factory.mktemp("openvino")
    backend = backends()["openvino"]()
    model = prepare_model(small_cnn_model, work)
    samples = load_samples(small_cnn_calibration, model.inputs, Preprocessing())
    results = {}
    for precision in ("fp32", "fp16", "int8"):
        results[precision] = backend.build(
            BuildRequest(
                model=model,
                profile=load_profile("x86-64-avx2"),
                precision=precision,
                calibration=samples if precision == "int8" else None,
                options=backend.parse_options({}, "test"),
                outdir=work / precision,
                progress=NoProgress(),
            )
        )
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


def test_npu_profile_asks_for_npu_first():
    backend = backends()["openvino"]()
    options = backend.parse_options(load_profile("intel-core-ultra-npu").candidates[0].options, "test")
    assert options.device == "AUTO:NPU,GPU,CPU"
    assert "CUDA" in backend.unsupported_reason(load_profile("jetson-nano"), "fp16")
