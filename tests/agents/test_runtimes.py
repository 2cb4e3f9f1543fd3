"""Runtime adapters (the device side): discovery, device fallback, and the self-test that guards activation."""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import compile_args

from edgekit.agents.runtimes import get_runtime, runtimes
from edgekit.agents.runtimes.openvino import pick_device
from edgekit.bundle import open_bundle
from edgekit.errors import BadInput
from edgekit.selftest import OUTPUT_PREFIX, run_selftest


def test_adapters_are_discovered():
    assert {"onnxruntime", "openvino"} <= set(runtimes())
    with pytest.raises(BadInput, match="unknown runtime 'tensorrt'"):
        get_runtime("tensorrt")


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("AUTO:NPU,GPU,CPU", ["CPU"], "CPU"),
        ("AUTO:NPU,GPU,CPU", ["CPU", "GPU.0", "NPU"], "NPU"),
        ("AUTO:NPU,GPU,CPU", ["CPU", "GPU.1"], "GPU"),
        ("CPU", ["CPU"], "CPU"),
    ],
)
def test_openvino_device_priority(requested, available, expected):
    assert pick_device(requested, available) == expected


def test_cli_and_agent_side_start_without_the_compiler_stack():
    """`edgekit --help` and the runtime adapters must not import onnx, nncf, openvino or onnxruntime."""
    code = (
        "import sys; from edgekit.cli import app; import edgekit.agents.runtimes as r; r.runtimes(); "
        "heavy = [m for m in ('onnx', 'nncf', 'openvino', 'onnxruntime', 'cv2', 'tvm') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_selftest_passes_on_the_bundle_and_catches_a_wrong_model(cli, digits, tmp_path):
    bundle = tmp_path / "d.ekb"
    args = compile_args(
        digits / "digits.onnx", "x86-64-avx2", "--backend", "onnxruntime", "--precision", "fp32", out=bundle
    )
    assert cli(*args).exit_code == 0
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        manifest = open_bundle(bundle, root, trust_key=None)
        session = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target)
        assert run_selftest(session, root, manifest).passed

        vectors = dict(np.load(root / manifest.selftest.file))
        vectors[f"{OUTPUT_PREFIX}0"] = np.roll(vectors[f"{OUTPUT_PREFIX}0"], 1, axis=1)  # another model's answers
        np.savez(root / manifest.selftest.file, **vectors)
        result = run_selftest(session, root, manifest)
        assert not result.passed and "output 0 differs" in result.detail


def test_litert_passes_integer_tensors_without_a_scale_through_unchanged():
    from edgekit.agents.runtimes.litert import _dequantize, _quantize

    label = {"dtype": np.int64, "quantization": (0.0, 0)}  # a classifier's label, a sample rate: not quantized
    assert _dequantize(np.array([7, 3], np.int64), label).tolist() == [7, 3]
    assert _quantize(np.array(16000), label) == 16000
    quantized = {"dtype": np.int8, "quantization": (0.5, 2)}
    assert _dequantize(np.array([4], np.int8), quantized).tolist() == [1.0]
    assert _quantize(np.array([1.0], np.float32), quantized).tolist() == [4]
