"""The rpi4 TVM library itself, run on an emulated arm64 device (qemu-user + Debian arm64 Python + aarch64 TVM
runtime, from `make arm64-sysroot`), agrees with the x86 fp32 ONNX Runtime reference.

Tolerance: max abs error < 1e-4 on outputs of order 1 (fp32 code on two ISAs; seen: ~1e-7). Slow: each emulated
run takes ~20 s, and `make test-all` builds the sysroot first (~1 min the first time)."""

import json

import pytest
from helpers import compile_args


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits", "small_cnn"])
def test_rpi4_library_matches_reference_under_emulation(cli, model, digits, small_cnn_model, tmp_path):
    path = digits / "digits.onnx" if model == "digits" else small_cnn_model
    args = compile_args(path, "rpi4", "--backend", "tvm", "--verify-emulated", "--json", out=tmp_path / "m.ekb")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    chosen = next(c for c in json.loads(result.stdout)["candidates"] if c["status"] == "chosen")
    emulated = chosen["details"]["emulated_aarch64"]
    assert emulated["samples"] >= 8
    assert emulated["max_abs_error"] < 1e-4
    assert emulated["top1_agreement"] == 1.0
    assert "ran under qemu-user" in chosen["metrics"]["verified_on"]
