"""Image folders for drift tests (importable because pytest.ini puts tests/ on the path): the digits example's
splits written as PNGs, as a camera or a folder of photos would give them, and the same held-out images changed."""

from pathlib import Path

import numpy as np


def digit_folders(digits: Path, out: Path) -> dict[str, Path]:
    """Folders of 8x8 gray PNGs: `calibration` (the training split, 1,347 images), `held_out` (the test split, 450,
    never calibrated on), `inverted` (the test split, negated) and `noise` (450 uniform-noise images)."""
    import cv2

    train = np.load(digits / "calibration.npz")["image"][:, 0]
    test = np.load(digits / "test.npz")["image"][:, 0]
    pixels = lambda images: np.round(images * 255).astype(np.uint8)  # noqa: E731 (as examples/digits/train.py)
    noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    sets = {"calibration": pixels(train), "held_out": pixels(test), "inverted": 255 - pixels(test), "noise": noise}
    folders = {}
    for name, images in sets.items():
        folder = out / name
        folder.mkdir(parents=True)
        for index, image in enumerate(images):
            cv2.imwrite(str(folder / f"{index:04d}.png"), image)
        folders[name] = folder
    return folders
