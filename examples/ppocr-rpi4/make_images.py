"""Scene-text images for the PP-OCR detector: words drawn with OpenCV on textured backgrounds, with their boxes.

Writes into OUT (default ./ppocr-out):
    images/NNN.png   320x320 BGR images, 1-4 words each (calibration data for `edgekit compile`)
    boxes.json       {"NNN.png": [[x0, y0, x1, y1], ...]}: where each word was drawn

Run:  python examples/ppocr-rpi4/make_images.py OUT [--count 40]
"""

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

SIZE = 320
WORDS = ["EDGE", "kit", "Sensor 42", "OPEN", "exit", "Line 7", "PUSH", "12:45", "ROLLOUT", "arm64", "Pi 4", "OCR"]
FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]


def background(rng: np.random.Generator) -> np.ndarray:
    """A smooth colour gradient with noise: text detectors should not fire on it."""
    base = rng.uniform(120, 255, size=3)
    ramp = np.linspace(0, rng.uniform(-60, 60), SIZE)[None, :, None]
    image = np.clip(base[None, None, :] + ramp + rng.normal(0, 6, (SIZE, SIZE, 3)), 0, 255)
    return image.astype(np.uint8)


def draw_words(image: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """1-4 non-overlapping words in dark colours; returns their boxes."""
    boxes: list[list[int]] = []
    for _ in range(int(rng.integers(1, 5))):
        word, font = WORDS[int(rng.integers(len(WORDS)))], FONTS[int(rng.integers(len(FONTS)))]
        scale, thickness = float(rng.uniform(0.8, 1.6)), int(rng.integers(2, 4))
        (width, height), baseline = cv2.getTextSize(word, font, scale, thickness)
        if width >= SIZE - 20:
            continue
        x, y = int(rng.integers(10, SIZE - width - 10)), int(rng.integers(height + 10, SIZE - baseline - 10))
        box = [x, y - height, x + width, y + baseline]
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            continue
        colour = tuple(int(c) for c in rng.uniform(0, 70, size=3))
        cv2.putText(image, word, (x, y), font, scale, colour, thickness, cv2.LINE_AA)
        boxes.append(box)
    return boxes


def write_images(out: Path, count: int, seed: int = 0) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    truth = {}
    for index in range(count):
        image = background(rng)
        name = f"{index:03d}.png"
        truth[name] = draw_words(image, rng)
        cv2.imwrite(str(out / "images" / name), image)
    (out / "boxes.json").write_text(json.dumps(truth, indent=1))
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("ppocr-out"))
    parser.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    truth = write_images(args.out, args.count)
    print(f"wrote {len(truth)} images with {sum(map(len, truth.values()))} words to {args.out / 'images'}")


if __name__ == "__main__":
    main()
