"""examples/ppocr-rpi4: the PP-OCRv4 text detector shipped in `rapidocr-onnxruntime`, compiled with TVM for rpi4
and run as an aarch64 library on the emulated arm64 device.

Slow (~2 min on 2 cores): a 4.7 MB network lowered twice (aarch64 and the x86 stand-in) and 8 emulated runs.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hub_helpers import signing_keys

from edgekit.bundle import open_bundle
from edgekit.compile import emulation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ppocr-rpi4"


def detector_model() -> Path:
    """The detector inside the installed package, found without importing it (its runtime deps are not needed)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec is not None, "rapidocr-onnxruntime is not installed (make install adds it)"
    return Path(spec.submodule_search_locations[0]) / "models" / "ch_PP-OCRv4_det_infer.onnx"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppocr")
    subprocess.run([sys.executable, str(EXAMPLE / "make_images.py"), str(out), "--count", "40"], check=True)
    return out


def test_the_detector_finds_the_drawn_words(images):
    """The preprocessing the README gives (BGR, mean/std 0.5) is what the model expects: text lights up, the
    background does not."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(detector_model()), providers=["CPUExecutionProvider"])
    truth = json.loads((images / "boxes.json").read_text())
    found = total = false_pixels = background_pixels = 0
    for name, boxes in truth.items():
        image = cv2.imread(str(images / "images" / name)).astype(np.float32) / 255.0
        prob = session.run(None, {"x": ((image - 0.5) / 0.5).transpose(2, 0, 1)[None]})[0][0, 0]
        outside = np.ones(prob.shape, bool)
        for x0, y0, x1, y1 in boxes:
            total += 1
            found += bool((prob[y0:y1, x0:x1] > 0.5).mean() > 0.2)
            outside[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = False
        false_pixels += int((prob[outside] > 0.5).sum())
        background_pixels += int(outside.sum())
    assert found / total >= 0.9, f"{found} of {total} words found"
    assert false_pixels / background_pixels < 0.01, false_pixels / background_pixels


@pytest.mark.slow
def test_compiled_for_rpi4_and_verified_on_the_emulated_arm64_device(cli, images, tmp_path):
    assert (emulation.sysroot() / "READY").exists(), "no emulated arm64 device: run `make arm64-sysroot`"
    bundle = tmp_path / "ppocr-det-rpi4.ekb"
    key, _ = signing_keys(tmp_path / "keys")
    result = cli("compile", detector_model(), "--profile", "rpi4", "--backend", "tvm", "--precision", "fp32",
                 "--input-shape", "x:1x3x320x320", "--calibration", images / "images", "--color", "bgr",
                 "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--verify-emulated", "--sign-key", key,
                 "-o", bundle, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    chosen = next(c for c in json.loads(result.stdout)["candidates"] if c["status"] == "chosen")
    emulated = chosen["details"]["emulated_aarch64"]
    assert emulated["samples"] == 8
    # Same graph, same fp32 arithmetic on another ISA: only operation order differs.
    assert emulated["max_abs_error"] < 1e-3 and emulated["cosine"] > 0.9999, emulated
    open_bundle(bundle, tmp_path / "unpacked", trust_key=None)
    library = subprocess.run(["file", "-b", tmp_path / "unpacked" / "artifacts" / "model.so"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert "ARM aarch64" in library, library
