"""Calibration data: image folders through OpenCV, .npz files, and the calibration/held-out split."""

import numpy as np
import pytest

from edgekit.compile.calibration import load_samples
from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.profiles import Preprocessing

NCHW = TensorSpec(name="input", shape=[1, 3, 4, 6], dtype="float32", layout="NCHW")
NHWC = TensorSpec(name="input", shape=[1, 4, 6, 3], dtype="float32", layout="NHWC")


@pytest.fixture
def image_folder(tmp_path):
    import cv2

    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    image = np.zeros((8, 12, 3), np.uint8)
    image[:, :, 0] = 200  # OpenCV stores BGR: this image is pure blue
    for index in range(3):
        cv2.imwrite(str(folder / "cats" / f"{index}.png"), image)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_folder_rgb_nchw_with_mean_std(image_folder):
    prep = Preprocessing(color="rgb", scale=255.0, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    samples = load_samples(image_folder, [NCHW], prep)
    x = samples.inputs["input"]
    assert x.shape == (3, 3, 4, 6) and x.dtype == np.float32
    blue = (200 / 255 - 0.5) / 0.25
    assert np.allclose(x[:, 2], blue) and np.allclose(x[:, 0], -2.0)  # RGB: blue is channel 2


def test_image_folder_bgr_nhwc(image_folder):
    samples = load_samples(image_folder, [NHWC], Preprocessing(color="bgr", mean=[0.0], std=[1.0]))
    x = samples.inputs["input"]
    assert x.shape == (3, 4, 6, 3)
    assert np.allclose(x[..., 0], 200 / 255) and np.allclose(x[..., 2], 0.0)  # BGR: blue is channel 0


def test_image_folder_needs_image_input(image_folder):
    flat = TensorSpec(name="x", shape=[1, 64], dtype="float32", layout="NC")
    with pytest.raises(BadInput, match="NCHW or NHWC"):
        load_samples(image_folder, [flat], Preprocessing())


def test_undecodable_image_is_named(image_folder):
    (image_folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BadInput, match=r"broken\.jpg: cannot decode"):
        load_samples(image_folder, [NCHW], Preprocessing())


def test_npz_with_labels_and_flat_arrays(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.arange(10 * 72, dtype=np.float64).reshape(10, 72), labels=np.arange(10))
    samples = load_samples(path, [NCHW], Preprocessing())
    assert samples.inputs["input"].shape == (10, 3, 4, 6) and samples.inputs["input"].dtype == np.float32
    calibration, held_out = samples.split(0.2)
    assert len(calibration) == 8 and len(held_out) == 2
    assert set(calibration.labels) | set(held_out.labels) == set(range(10))
    again = samples.split(0.2)[1]
    assert np.array_equal(again.labels, held_out.labels)  # deterministic


def test_npz_label_count_mismatch(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, input=np.zeros((4, 3, 4, 6), np.float32), labels=np.arange(3))
    with pytest.raises(BadInput, match="'labels' has 3 entries"):
        load_samples(path, [NCHW], Preprocessing())


def test_too_few_samples_to_hold_out(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, input=np.zeros((1, 3, 4, 6), np.float32))
    with pytest.raises(BadInput, match="need at least 2"):
        load_samples(path, [NCHW], Preprocessing()).split(0.2)


def test_not_npz_or_folder(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3")
    with pytest.raises(BadInput, match=r"folder of images or an \.npz"):
        load_samples(path, [NCHW], Preprocessing())
