"""The first user story end to end: train a real classifier, compile it to int8, and ship a bundle that keeps
its accuracy on data no compile step saw."""

import json
import tempfile
from pathlib import Path

import numpy as np

from edgekit.agents.runtimes import get_runtime
from edgekit.bundle import open_bundle
from edgekit.signing import generate_keypair


def accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    predictions = [int(np.argmax(session.run({"image": image[None]})[0])) for image in images]
    return float(np.mean(np.asarray(predictions) == labels))


def test_int8_bundle_keeps_fp32_accuracy_on_held_out_digits(cli, digits, tmp_path):
    private, public = generate_keypair(tmp_path / "keys")
    bundle = tmp_path / "digits-int8.ekb"
    result = cli(
        "compile",
        digits / "digits.onnx",
        "--profile",
        "x86-64-avx512",
        "--precision",
        "int8",
        "--calibration",
        digits / "calibration.npz",
        "--sign-key",
        private,
        "--bench-seconds",
        "0.2",
        "-o",
        bundle,
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {c["precision"] for c in report["candidates"]} == {"int8"}
    assert cli("verify", bundle, "--trust-key", public).exit_code == 0

    test = np.load(digits / "test.npz")
    reference = get_runtime("onnxruntime").load(digits / "digits.onnx", {})
    fp32_accuracy = accuracy(reference, test["image"], test["labels"])
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        manifest = open_bundle(bundle, root, trust_key=None)
        assert (
            manifest.precision == "int8"
            and manifest.verification.param_bytes < manifest.verification.reference_param_bytes / 3
        )
        session = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target)
        int8_accuracy = accuracy(session, test["image"], test["labels"])
    print(f"digits test split: fp32 {fp32_accuracy:.4f}, int8 {int8_accuracy:.4f} ({manifest.backend})")
    assert fp32_accuracy > 0.95
    assert abs(fp32_accuracy - int8_accuracy) <= 0.01


def test_image_folder_calibration_and_preprocessing_reach_the_manifest(cli, digits, tmp_path):
    bundle = tmp_path / "digits-images.ekb"
    result = cli(
        "compile",
        digits / "digits.onnx",
        "--profile",
        "x86-64-avx2",
        "--precision",
        "int8",
        "--backend",
        "onnxruntime",
        "--calibration",
        digits / "images",
        "--color",
        "gray",
        "--bench-seconds",
        "0.1",
        "-o",
        bundle,
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(cli("inspect", bundle, "--json").stdout)
    # No --color given: a 1-channel image input is read as grayscale.
    assert manifest["preprocessing"] == {"color": "gray", "scale": 255.0, "mean": [0.0], "std": [1.0]}
    assert manifest["verification"]["data"] == "held-out calibration split"
    assert manifest["verification"]["samples"] == 50  # 20% of the 200 images is 40, raised to the 50-sample minimum
