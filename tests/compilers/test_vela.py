"""Ethos-U backend: vela on full-integer TFLite, NPU/CPU placement and memory reported, verified via a stand-in."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from helpers import outlier_classifier
from onnx import helper

from edgekit.compilers import backends
from edgekit.profiles import load_profile


def compile_json(cli, model: Path, calibration: Path, profile: str | Path, out: Path, exit_codes=(0, 1)) -> dict:
    # Random weights: agreement is reported, not gated, since these tests are about NPU placement.
    result = cli("compile", model, "-p", profile, "--calibration", calibration, "--max-accuracy-drop", "100",
                 "--bench-seconds", "0.05", "-o", out, "--json")  # fmt: skip
    assert result.exit_code in exit_codes, result.output
    return json.loads(result.stdout)


def test_mobilenet_runs_entirely_on_the_ethos_u55(cli, mobilenet_small, tmp_path):
    model, calibration = mobilenet_small
    bundle = tmp_path / "mnv2-u55.ekb"
    report = compile_json(cli, model, calibration, "ethos-u55", bundle)
    chosen = report["candidates"][0]
    assert chosen["status"] == "chosen", chosen
    details = chosen["details"]
    assert details["npu_ops"] > 50 and details["cpu_ops"] == 0 and details["cpu_fallback"] == []
    assert details["sram_kib"] > 0 and details["flash_kib"] > 0 and details["npu_cycles"] > 0
    assert "pre-vela int8 TFLite" in chosen["metrics"]["verified_on"]
    assert "no npu ethos-u55-128" in report["ranking"]
    manifest = json.loads(cli("inspect", bundle, "--json").stdout)
    assert manifest["runtime"] == "ethos-u" and manifest["entrypoint"] == "artifacts/model_vela.tflite"
    assert manifest["target"]["accelerator"] == "ethos-u55-128"
    assert manifest["build_details"]["npu_ops"] == details["npu_ops"]
    text = cli("compile", model, "-p", "ethos-u55", "--calibration", calibration, "--max-accuracy-drop", "100",
               "--bench-seconds", "0.05", "-o", tmp_path / "again.ekb").stdout  # fmt: skip
    assert f"{details['npu_ops']} ops on the NPU, 0 on the CPU" in text
    bench = cli("bench", bundle)
    assert bench.exit_code == 2 and "runs with 'ethos-u' on the device" in bench.stderr


def with_sin(model_path: Path, out: Path) -> Path:
    """The same network with a Sin after the first activation: an op Ethos-U55 cannot run."""
    model = onnx.load(str(model_path))
    clip = next(n for n in model.graph.node if n.op_type == "Clip")
    original = clip.output[0]
    clip.output[0] = f"{original}_pre_sin"
    index = list(model.graph.node).index(clip)
    model.graph.node.insert(index + 1, helper.make_node("Sin", [clip.output[0]], [original], name="wave"))
    onnx.save(model, str(out))
    return out


def test_unsupported_op_is_listed_as_cpu_fallback(cli, small_cnn_model, small_cnn_calibration, tmp_path):
    model = with_sin(small_cnn_model, tmp_path / "sin.onnx")
    report = compile_json(cli, model, small_cnn_calibration, "ethos-u55", tmp_path / "sin.ekb")
    details = report["candidates"][0]["details"]
    assert details["cpu_ops"] >= 1
    assert any(entry.startswith("SIN ") for entry in details["cpu_fallback"]), details["cpu_fallback"]


def with_paddle_names(model_path: Path, out: Path) -> Path:
    """The same network named as paddle2onnx names nodes ("Conv@0"), ending in a Softmax as PP-OCR's text-angle
    classifier does: onnx2tf passed "Softmax@0" to TensorFlow, which refused it, so Ethos-U had no path."""
    model = onnx.load(str(model_path))
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}@{index}"
    logits = model.graph.output[0]
    model.graph.node.append(helper.make_node("Softmax", [logits.name], ["probabilities"], name="Softmax@0", axis=1))
    logits.name = "probabilities"
    onnx.save(model, str(out))
    return out


def test_paddle_named_classifier_runs_on_the_npu(cli, small_cnn_model, small_cnn_calibration, tmp_path):
    model = with_paddle_names(small_cnn_model, tmp_path / "paddle.onnx")
    report = compile_json(cli, model, small_cnn_calibration, "ethos-u55", tmp_path / "paddle.ekb")
    chosen = report["candidates"][0]
    assert chosen["status"] == "chosen", chosen["reason"]
    assert chosen["details"]["cpu_ops"] == 0 and chosen["details"]["npu_ops"] > 0
    assert chosen["metrics"]["cosine"] > 0.99


def test_sram_overflow_is_refused_naming_the_limit(cli, mobilenet_small, tmp_path):
    model, calibration = mobilenet_small
    tiny = load_profile("ethos-u55").model_dump(mode="json") | {"name": "tiny-u55"}
    tiny["memory"] = {"ram_mb": 1, "sram_kb": 16, "flash_kb": 4096}
    profile = tmp_path / "tiny-u55.yaml"
    profile.write_text(yaml.safe_dump(tiny))
    report = compile_json(cli, model, calibration, profile, tmp_path / "tiny.ekb", exit_codes=(2,))
    candidate = report["candidates"][0]
    assert candidate["status"] == "rejected"
    assert "KiB SRAM, tiny-u55 has 16" in candidate["reason"]
    assert not (tmp_path / "tiny.ekb").exists()
    shown = cli("compile", model, "-p", profile, "--calibration", calibration, "--bench-seconds", "0.05",
                "-o", tmp_path / "tiny.ekb")  # fmt: skip
    assert shown.exit_code == 2 and "does not fit tiny-u55: needs" in shown.output and "Traceback" not in shown.output


@pytest.mark.parametrize("profile", ["x86-64-avx2", "rpi4", "jetson-nano"])
def test_vela_only_targets_ethos_u(profile):
    assert "Ethos-U" in backends()["vela"]().unsupported_reason(load_profile(profile), "int8")


def test_vela_stand_in_uses_integer_io(cli, small_cnn_model, small_cnn_calibration, tmp_path):
    """The stand-in has int8 input/output tensors; the LiteRT adapter quantizes and dequantizes around them."""
    report = compile_json(cli, small_cnn_model, small_cnn_calibration, "ethos-u55", tmp_path / "s.ekb")
    metrics = report["candidates"][0]["metrics"]
    assert metrics["cosine"] > 0.95 and np.isfinite(metrics["max_abs_error"])


@pytest.mark.parametrize("estimator", ["logistic", "forest"])
def test_lowered_sklearn_classifiers_build_for_the_npu(cli, tmp_path, estimator):
    """vela 4 raises KeyError printing its operator table for a lowered scikit-learn classifier (GATHER of the
    label, CASTs); the build goes on without the table, and the CPU fallbacks are still named. A forest's label is
    an ARG_MAX of its class scores, which the int8 quantizer leaves float and vela then refuses to parse ("IFM has
    to be 8bit"), so it reads the int8 scores."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short fit does not converge
        model = LogisticRegression(max_iter=50) if estimator == "logistic" else RandomForestClassifier(8, max_depth=5)
        fitted = model.fit(x, y)
    model = tmp_path / f"{estimator}.onnx"
    onnx.save(to_onnx(fitted, x[:1], options={id(fitted): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3}),
              str(model))  # fmt: skip
    data = tmp_path / "digits.npz"
    np.savez(data, input=x[:200], labels=y[:200])
    report = compile_json(cli, model, data, "ethos-u55", tmp_path / f"{estimator}.ekb")
    chosen = report["candidates"][0]
    assert chosen["status"] == "chosen", chosen["reason"]
    assert "GATHER" in " ".join(chosen["details"]["cpu_fallback"]) and chosen["details"]["cpu_ops"] > 0


def test_mixed_precision_keeps_the_sensitive_layer_on_the_cortex_m(cli, tmp_path):
    """Plain int8 collapses the outlier feature; mixed precision keeps fc1 in float, which vela leaves to the CPU
    (TFLite Micro) between a DEQUANTIZE and a QUANTIZE while the rest stays on the NPU."""
    model = outlier_classifier(tmp_path / "outliers.onnx")
    x = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    x[:, 0] = np.where(np.arange(200) % 2, 1000.0, -1000.0)
    np.savez(data := tmp_path / "x.npz", x=x)
    result = cli("compile", model, "-p", "ethos-u55", "--calibration", data, "--bench-seconds", "0.05",
                 "-o", tmp_path / "o.ekb", "--json")  # fmt: skip
    candidate = json.loads(result.stdout)["candidates"][0]
    assert candidate["status"] == "chosen", candidate["reason"]
    assert candidate["details"]["mixed_precision"]["keep_float"] == ["fc1"]
    assert candidate["metrics"]["top1_agreement"] >= 0.97
    assert candidate["details"]["npu_ops"] >= 1 and any(
        "DEQUANTIZE" in op for op in candidate["details"]["cpu_fallback"]
    )
