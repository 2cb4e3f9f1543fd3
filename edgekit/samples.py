"""Samples and image preprocessing that the workstation and the device share: a set of model inputs stored
item-major, cut into feeds, and the image transform a camera frame or a calibration image goes through.

Samples are stored item-major: `(N, *item_shape)`, where an input's item shape is its shape without the batch dim
(which need not be dim 0: an RNN state [2, batch, 128] has items of [2, 128]), or its whole shape when the input is
not batched (a scalar sample rate). Feeds put `batch_size` items back along each input's batch axis.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.profiles import Preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


def item_shape(spec: TensorSpec) -> tuple[int, ...]:
    """One sample of this input: its shape without the batch dim, or all of it when it is not batched."""
    return tuple(d for axis, d in enumerate(spec.shape) if axis != spec.batch_axis)


@dataclass(frozen=True)
class SampleSet:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    origin: str
    batch_axes: dict[str, int | None] = field(default_factory=dict)  # per input; missing means 0

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, indices: np.ndarray) -> "SampleSet":
        labels = self.labels[indices] if self.labels is not None else None
        return SampleSet({k: v[indices] for k, v in self.inputs.items()}, labels, self.origin, self.batch_axes)

    def split(self, holdout_fraction: float, minimum: int = 1, seed: int = 0) -> tuple["SampleSet", "SampleSet"]:
        """(calibration, held-out): a seeded shuffle, so class-sorted data still splits fairly; at least `minimum`
        samples are held out."""
        count = len(self)
        if count < 2:
            raise BadInput(f"{self.origin}: {count} sample(s); need at least 2 (calibration plus held-out)")
        order = np.random.default_rng(seed).permutation(count)
        held = min(count - 1, max(1, minimum, round(count * holdout_fraction)))
        return self.subset(np.sort(order[held:])), self.subset(np.sort(order[:held]))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of exactly `batch_size` items; a remainder smaller than one batch is left out."""
        for start in range(0, len(self) - batch_size + 1, batch_size):
            yield {name: self._feed(name, array[start : start + batch_size]) for name, array in self.inputs.items()}

    def _feed(self, name: str, items: np.ndarray) -> np.ndarray:
        axis = self.batch_axes.get(name, 0)
        # An input that is not batched (a sample rate, a shared state) takes the first item's value for the feed.
        return np.asarray(items[0]) if axis is None else np.ascontiguousarray(np.moveaxis(items, 0, axis))

    def batch_labels(self, batch_size: int) -> np.ndarray | None:
        if self.labels is None:
            return None
        return self.labels[: (len(self) // batch_size) * batch_size]


def feed_size(inputs: list[TensorSpec]) -> int:
    """Items per feed: the batch dim of the first batched input (1 when nothing is batched)."""
    return next((spec.shape[spec.batch_axis] for spec in inputs if spec.batch_axis is not None), 1)


def resolve_preprocessing(preprocessing: Preprocessing, spec: TensorSpec) -> Preprocessing:
    """Fill in the colour order from the input's channel count when neither profile nor flags set it."""
    if preprocessing.color is not None or spec.layout not in ("NCHW", "NHWC"):
        return preprocessing
    channels = spec.shape[1] if spec.layout == "NCHW" else spec.shape[3]
    return preprocessing.model_copy(update={"color": "gray" if channels == 1 else "rgb"})


def image_input(image: np.ndarray, spec: TensorSpec, preprocessing: Preprocessing) -> np.ndarray:
    """A BGR/gray uint8 image (a camera frame, a captured sample) as the model input `spec` at batch size 1, exactly as
    compile's calibration transforms images; ValueError when the input is not image-shaped."""
    # Here, not above: a values-only device (a serial sensor) may run without OpenCV.
    import cv2

    if spec.layout not in ("NCHW", "NHWC"):
        raise ValueError(f"an image frame cannot feed input '{spec.name}' {spec.shape} (layout {spec.layout})")
    height, width = (spec.shape[2], spec.shape[3]) if spec.layout == "NCHW" else (spec.shape[1], spec.shape[2])
    prep = resolve_preprocessing(preprocessing, spec)
    if prep.color == "gray" and image.ndim == 3:
        # Luma weights, as decoders' gray conversion uses; a plain channel mean would shift every pixel.
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif prep.color != "gray" and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    item = preprocess_image(image, height, width, prep)
    if spec.layout == "NCHW":
        item = item.transpose(2, 0, 1)
    return np.ascontiguousarray(item[None], dtype=spec.dtype)


def preprocess_image(image: np.ndarray, height: int, width: int, preprocessing: Preprocessing) -> np.ndarray:
    """BGR/gray uint8 image (as OpenCV decodes it) → float32 HWC, resized, colour-ordered and normalised."""
    import cv2

    if preprocessing.color == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 2:
        image = image[:, :, None]
    scaled = image.astype(np.float32) / preprocessing.scale
    return (scaled - np.asarray(preprocessing.mean, np.float32)) / np.asarray(preprocessing.std, np.float32)
