"""Calibration and verification samples: an `.npz` file or a folder of images, or synthetic inputs when the
user gave none (the sample set itself, and its layout, are in edgekit.samples)."""

from pathlib import Path

import numpy as np

from edgekit.errors import BadInput
from edgekit.manifest import TensorSpec
from edgekit.profiles import Preprocessing
from edgekit.samples import IMAGE_SUFFIXES, SampleSet, feed_size, item_shape, preprocess_image, resolve_preprocessing

LABEL_KEYS = ("labels", "y")
# A text array naming where the samples came from (a hub dataset's export); the compile report names it.
SOURCE_KEY = "source"
SINGLE_INPUT_KEYS = ("inputs", "x", "arr_0")


def load_samples(path: Path, inputs: list[TensorSpec], preprocessing: Preprocessing) -> SampleSet:
    if path.is_dir():
        return _load_image_folder(path, inputs, preprocessing)
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, inputs)
    if not path.exists():
        raise BadInput(f"{path}: calibration data not found")
    raise BadInput(f"{path}: calibration data must be a folder of images or an .npz file")


def synthetic_samples(
    inputs: list[TensorSpec], count: int, hints: dict[str, list[int]] | None = None, seed: int = 0
) -> SampleSet:
    """Inputs for comparing fp32/fp16 builds when the user gave no data: standard-normal floats; integers from the
    values the graph compares them with (`hints`, e.g. a sample rate's 8000/16000), else small non-negative ones
    (indices, counts, flags); random booleans."""
    rng = np.random.default_rng(seed)
    arrays = {spec.name: _synthetic(rng, spec, count, (hints or {}).get(spec.name)) for spec in inputs}
    return SampleSet(arrays, None, "synthetic", _axes(inputs))


def synthetic_feed(inputs: list[TensorSpec], hints: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """One feed of synthetic inputs at the model's batch size."""
    batch = feed_size(inputs)
    return next(synthetic_samples(inputs, batch, hints).batches(batch))


def _synthetic(rng: np.random.Generator, spec: TensorSpec, count: int, hint: list[int] | None) -> np.ndarray:
    shape = (count, *item_shape(spec))
    kind = np.dtype(spec.dtype).kind
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        return (rng.choice(hint, shape) if hint else rng.integers(0, 4, shape)).astype(spec.dtype)
    return rng.standard_normal(shape).astype(spec.dtype)


def _axes(inputs: list[TensorSpec]) -> dict[str, int | None]:
    return {spec.name: spec.batch_axis for spec in inputs}


def _load_npz(path: Path, inputs: list[TensorSpec]) -> SampleSet:
    try:
        archive = np.load(path, allow_pickle=False)
        data = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: not a readable .npz file ({error})") from None
    labels = next((data.pop(key) for key in LABEL_KEYS if key in data), None)
    source = data.pop(SOURCE_KEY) if SOURCE_KEY in data and data[SOURCE_KEY].dtype.kind == "U" else None
    arrays = {}
    for spec in inputs:
        key = spec.name if spec.name in data else _single_input_key(path, data, inputs)
        arrays[spec.name] = _conform(path, key, data[key], spec)
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise BadInput(f"{path}: inputs have different sample counts: {counts}")
    if labels is not None and len(labels) != len(next(iter(arrays.values()))):
        raise BadInput(f"{path}: 'labels' has {len(labels)} entries, inputs have {next(iter(counts.values()))} samples")
    origin = f"{path} ({str(source)[:300]})" if source is not None else str(path)
    return SampleSet(arrays, labels.astype(np.int64) if labels is not None else None, origin, _axes(inputs))


def _single_input_key(path: Path, data: dict[str, np.ndarray], inputs: list[TensorSpec]) -> str:
    names = ", ".join(spec.name for spec in inputs)
    if len(inputs) == 1:
        for key in (*SINGLE_INPUT_KEYS, *data):
            if key in data:
                return key
    raise BadInput(f"{path}: no array named after the model inputs ({names}); arrays present: {', '.join(data)}")


def _conform(path: Path, key: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    item = item_shape(spec)
    # Flattened samples (e.g. (N, 64) for a (N, 1, 8, 8) input) are accepted when the element count fits, and so
    # are samples that keep a batch dim of 1 (e.g. (N, 2, 1, 128) for a state [2, batch, 128]).
    if array.ndim >= 1 and tuple(array.shape[1:]) != item and np.prod(array.shape[1:]) == np.prod(item):
        array = array.reshape(len(array), *item)
    if array.ndim == 0 or tuple(array.shape[1:]) != item:
        raise BadInput(
            f"{path}: array '{key}' has shape {tuple(array.shape)}; model input '{spec.name}' "
            f"needs (N{''.join(f', {d}' for d in item)})"
        )
    return array.astype(spec.dtype, copy=False)


def _image_geometry(path: Path, spec: TensorSpec) -> tuple[int, int, int]:
    """(height, width, channels) of an image input, or BadInput when the input is not image-shaped."""
    if spec.layout == "NCHW":
        _, channels, height, width = spec.shape
    elif spec.layout == "NHWC":
        _, height, width, channels = spec.shape
    else:
        raise BadInput(
            f"{path}: a folder of images needs a 4-D NCHW or NHWC model input; "
            f"'{spec.name}' is {spec.shape} (use an .npz)"
        )
    return height, width, channels


def _load_image_folder(path: Path, inputs: list[TensorSpec], preprocessing: Preprocessing) -> SampleSet:
    import cv2

    if len(inputs) != 1:
        raise BadInput(f"{path}: a folder of images can feed a single-input model only; this one has {len(inputs)}")
    spec = inputs[0]
    height, width, channels = _image_geometry(path, spec)
    preprocessing = resolve_preprocessing(preprocessing, spec)
    if (preprocessing.color == "gray") != (channels == 1):
        raise BadInput(
            f"{path}: --color {preprocessing.color} does not fit input '{spec.name}' with {channels} channel(s)"
        )
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    images = [preprocess_image(_read_image(cv2, file, preprocessing), height, width, preprocessing) for file in files]
    batch = np.stack(images)
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return SampleSet({spec.name: np.ascontiguousarray(batch, dtype=spec.dtype)}, None, str(path), _axes(inputs))


def _read_image(cv2, file: Path, preprocessing: Preprocessing) -> np.ndarray:
    flag = cv2.IMREAD_GRAYSCALE if preprocessing.color == "gray" else cv2.IMREAD_COLOR
    image = cv2.imread(str(file), flag)
    if image is None:
        raise BadInput(f"{file}: cannot decode image")
    return image
