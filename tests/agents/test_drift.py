"""Drift on real images: compile sketches the calibration images into the bundle, and the agent scores what its
source shows against that sketch (in its own loop, and in the telemetry it sends over a real Mosquitto)."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from brokers import Subscriber, wait_until
from drift_helpers import digit_folders
from helpers import compile_bundle
from typer.testing import CliRunner

from edgekit.agents.drift import DriftMonitor
from edgekit.agents.runtimes import get_runtime
from edgekit.agents.sources import Frame, to_feeds
from edgekit.bundle import open_bundle
from edgekit.cli import app
from edgekit.drift import LARGE, MODERATE
from edgekit.protocol import Telemetry

REFERENCE_SAMPLES = 1347  # the whole training split: 1,078 calibrate, 269 verify


@pytest.fixture(scope="module")
def digit_images(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return digit_folders(digits, tmp_path_factory.mktemp("digit-images"))


@pytest.fixture(scope="module")
def images_bundle(digits: Path, digit_images: dict[str, Path], signing_keys, tmp_path_factory) -> Path:
    """digits 1.0.0 calibrated on the training split's PNGs."""
    out = tmp_path_factory.mktemp("images-bundle") / "digits-1.0.0.ekb"
    return compile_bundle(digits, digit_images["calibration"], signing_keys[0], "1.0.0", out, "digits",
                          "--color", "gray")  # fmt: skip


@pytest.fixture(scope="module")
def int8_bundle(digits: Path, digit_images: dict[str, Path], signing_keys, tmp_path_factory) -> Path:
    """digits int8 (ONNX Runtime), calibrated on the training split's PNGs: its softmax output moves in steps of
    1/256, so its confidences are not fp32's."""
    out = tmp_path_factory.mktemp("int8-bundle") / "digits-int8.ekb"
    args = ["compile", digits / "digits.onnx", "-p", "x86-64-avx2", "--precision", "int8", "--backend", "onnxruntime",
            "--calibration", digit_images["calibration"], "--color", "gray", "--sign-key", signing_keys[0],
            "--bench-seconds", "0.02", "-o", out]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return out


def folder_score(bundle: Path, folder: Path) -> tuple[float, str]:
    """(score, feature) after the bundle's model ran on every image of `folder` as the agent runs it: decoded as
    the folder source decodes, preprocessed by `to_feeds`, one inference each."""
    import cv2

    with tempfile.TemporaryDirectory() as scratch:
        manifest = open_bundle(bundle, Path(scratch), trust_key=None)
        session = get_runtime(manifest.runtime).load(Path(scratch) / manifest.entrypoint, manifest.target)
        monitor = DriftMonitor(manifest.drift_reference)
        for file in sorted(folder.glob("*.png")):
            frame = Frame(cv2.imread(str(file), cv2.IMREAD_GRAYSCALE), "image")
            feeds = to_feeds(frame, manifest.inputs[0], manifest.preprocessing)
            monitor.observe(feeds, session.run(feeds))
    stats = monitor.stats()
    assert stats is not None and stats.samples == monitor.window
    return stats.score, stats.feature


def test_compile_sketches_the_calibration_images(images_bundle, cli):
    with tempfile.TemporaryDirectory() as scratch:
        manifest = open_bundle(images_bundle, Path(scratch), trust_key=None)
        report = json.loads((Path(scratch) / "report.json").read_text())
    reference = manifest.drift_reference
    assert reference is not None and reference.samples == REFERENCE_SAMPLES
    assert [f.name for f in reference.features] == ["confidence", "image.mean[0]", "image.std[0]"]
    assert report["drift_reference"] == (
        f"3 features (confidence, image.mean[0], image.std[0]) from {REFERENCE_SAMPLES} calibration and held-out "
        "samples"
    )
    shown = cli("inspect", images_bundle).stdout
    assert f"confidence, image.mean[0], image.std[0] from {REFERENCE_SAMPLES} samples" in shown


def test_synthetic_samples_make_no_reference_and_the_report_says_why(cli, digits, tmp_path):
    result = cli("compile", digits / "digits.onnx", "-p", "x86-64-avx2", "--precision", "fp32", "--backend",
                 "onnxruntime", "--bench-seconds", "0.02", "-o", tmp_path / "d.ekb", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["drift_reference"].startswith("none: the samples are synthetic")
    assert open_bundle(tmp_path / "d.ekb", tmp_path / "open", trust_key=None).drift_reference is None


def test_held_out_images_score_low_and_changed_images_high(images_bundle, digit_images):
    scores = {name: folder_score(images_bundle, digit_images[name]) for name in ("held_out", "inverted", "noise")}
    print("drift on real digits:", {name: f"{score:.3f} ({feature})" for name, (score, feature) in scores.items()})
    assert scores["held_out"][0] < MODERATE
    assert scores["inverted"][0] > LARGE and scores["noise"][0] > LARGE


def test_an_int8_bundle_is_scored_against_its_own_outputs_not_fp32s(int8_bundle, digit_images):
    score, feature = folder_score(int8_bundle, digit_images["held_out"])
    assert score < MODERATE, f"held-out images score {score:.3f} on {feature}"


def test_the_agent_reports_drift_in_telemetry_once_its_window_is_full(mosquitto, start_agent, images_bundle,
                                                                      digit_images):  # fmt: skip
    topic = "edgekit/v1/dev-1/telemetry"
    with Subscriber(mosquitto.url, topic) as sub:
        start_agent(mosquitto, bundle=images_bundle, source=f"folder:{digit_images['inverted']}?fps=50")
        wait_until(lambda: any(Telemetry.model_validate_json(p).drift for _, p in sub.messages(topic)), 60,
                   "telemetry with a drift figure")  # fmt: skip
        telemetry = [Telemetry.model_validate_json(p) for _, p in sub.messages(topic)]
    first = next(i for i, t in enumerate(telemetry) if t.drift)
    assert sum(t.inferences for t in telemetry[:first]) > 0  # it ran before, while the window filled
    drift = telemetry[first].drift
    assert drift.samples == 200 and drift.score > LARGE and drift.feature in ("image.mean[0]", "image.std[0]")
    assert np.isfinite(drift.score)
