"""Make a synthetic camera clip of moving shapes with per-frame ground truth, and a shape classifier for it.

Writes into OUT (default ./video-out):
    clip.avi           MJPG video, 128x96 at 20 fps, 288 frames: 12 segments of 24 frames, each with one moving,
                       turning circle, square or triangle (random size and colour) or nothing, on grey sensor noise
    clip.json          ground truth: {"fps": 20.0, "labels": [class index of every frame]}
    labels.json        class names in output order: ["none", "circle", "square", "triangle"]
    shapes.onnx        classifier: input `image` (N, 1, 48, 64) grey in [0, 1], output `probabilities` (N, 4)
    calibration.npz    2,000 frames no training step saw (`image`, `labels`): calibration data for `edgekit compile`

The model is fixed edge-direction filters (no training), a rotation-invariant summary of their histogram, and a
small MLP head trained with scikit-learn (see feature_graph). Training frames come from the same renderer,
pass through a JPEG round trip like MJPG frames, and are preprocessed by the function the agent applies to every
video frame (edgekit.samples.preprocess_image: grey, linear resize to 64x48, divide by 255).

Run:  python examples/video-pipeline/make_video.py OUT
Then: edgekit compile OUT/shapes.onnx --profile x86-64-avx2 --precision int8 \
          --calibration OUT/calibration.npz -o shapes.ekb
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

from edgekit.profiles import Preprocessing
from edgekit.samples import preprocess_image

# The examples folder holds the helper the examples share; it is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sklearn_onnx import mlp_layers

OPSET = 17
CLASSES = ["none", "circle", "square", "triangle"]
FRAME_W, FRAME_H = 128, 96
INPUT_H, INPUT_W = 48, 64  # half the frame size: the agent's resize keeps the aspect ratio
FPS = 20.0
SEGMENT_FRAMES = 24
SEGMENTS = 12
TRAIN_SAMPLES = 4000
CALIBRATION_SAMPLES = 2000
# What compile stores in the bundle and the agent applies: grey (the input has one channel), pixels / 255.
PREPROCESSING = Preprocessing(color="gray")
DIRECTIONS = 16  # orientation histogram bins
HARMONICS = DIRECTIONS // 2  # the histogram's Fourier harmonics 1 … 8 (higher ones repeat them)
DFT_GAIN = 1.5  # puts the power features on a scale of 0 to about 2
KERNEL = 7
SIGMA = 1.0
EDGE_THRESHOLD = 0.02  # gradient (pixel value / 255 per pixel) that sensor noise stays under
EDGE_GAIN = 400.0  # puts the strength feature on the power features' scale (0 to about 2)
TUNING_DEGREES = 30.0  # an edge counts in the directions within this angle of its own
FEATURE_NOISE, NOISY_COPIES = 0.015, 3  # see train()
# Added to the edge strength before dividing by it: large enough that int8 does not round it to 0 in an empty frame.
EPSILON = 0.02


@dataclass
class Shape:
    """One object: its class, centre, radius (pixels; a polygon's corners lie on it), angle (degrees), BGR colour,
    and its motion per frame."""

    label: int
    x: float
    y: float
    size: float
    angle: float
    color: tuple[int, int, int]
    dx: float
    dy: float
    spin: float

    def step(self) -> None:
        """Move one frame, bouncing off the edges so the whole shape stays in view (the label stays true)."""
        self.x, self.dx = _bounce(self.x + self.dx, self.dx, self.size, FRAME_W - self.size)
        self.y, self.dy = _bounce(self.y + self.dy, self.dy, self.size, FRAME_H - self.size)
        self.angle += self.spin


def _bounce(position: float, speed: float, low: float, high: float) -> tuple[float, float]:
    if position < low:
        return 2 * low - position, -speed
    if position > high:
        return 2 * high - position, -speed
    return position, speed


@dataclass
class Scene:
    """A background (grey level and noise) and an optional shape; `render` draws one noisy frame of it."""

    background: int
    noise: float
    shape: Shape | None

    @property
    def label(self) -> int:
        return self.shape.label if self.shape else 0

    def render(self, rng: np.random.Generator) -> np.ndarray:
        # Fresh sensor noise every frame, as a real camera has.
        noisy = rng.normal(self.background, self.noise, (FRAME_H, FRAME_W, 3))
        frame = np.clip(noisy, 0, 255).astype(np.uint8)
        if self.shape:
            _draw(frame, self.shape)
        return frame


def _draw(frame: np.ndarray, shape: Shape) -> None:
    centre = np.array([shape.x, shape.y])
    if CLASSES[shape.label] == "circle":
        cv2.circle(frame, (round(shape.x), round(shape.y)), round(shape.size), shape.color, -1, cv2.LINE_AA)
        return
    corners = 4 if CLASSES[shape.label] == "square" else 3
    angles = np.deg2rad(shape.angle + np.arange(corners) * 360.0 / corners)
    points = centre + shape.size * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    cv2.fillPoly(frame, [np.round(points).astype(np.int32)], shape.color, cv2.LINE_AA)


def random_scene(rng: np.random.Generator, label: int) -> Scene:
    background = int(rng.integers(60, 170))
    shape = None
    if label:
        size = float(rng.uniform(22, 34))
        shape = Shape(
            label=label,
            x=float(rng.uniform(size, FRAME_W - size)),
            y=float(rng.uniform(size, FRAME_H - size)),
            size=size,
            angle=float(rng.uniform(0, 360)),
            color=_contrasting_color(rng, background),
            dx=float(rng.uniform(-3, 3)),
            dy=float(rng.uniform(-2, 2)),
            spin=float(rng.uniform(-6, 6)),
        )
    return Scene(background=background, noise=float(rng.uniform(4, 16)), shape=shape)


def _contrasting_color(rng: np.random.Generator, background: int) -> tuple[int, int, int]:
    """A random BGR colour whose brightness differs clearly from the background's, so the outline is visible."""
    while True:
        bgr = rng.integers(0, 256, 3)
        luma = 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]
        if abs(luma - background) >= 50:
            return int(bgr[0]), int(bgr[1]), int(bgr[2])


def to_input(frame: np.ndarray) -> np.ndarray:
    """A BGR frame → the model's (1, 48, 64) input, exactly as the agent preprocesses a video frame."""
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return preprocess_image(gray, INPUT_H, INPUT_W, PREPROCESSING).transpose(2, 0, 1)


def sample_set(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` single frames of random scenes, balanced over the classes, passed through a JPEG round trip."""
    labels = np.arange(count) % len(CLASSES)
    images = []
    for label in labels:
        scene = random_scene(rng, int(label))
        if scene.shape:
            for _ in range(int(rng.integers(0, 10))):  # angles and places reached by moving, as in the clip
                scene.shape.step()
        quality = int(rng.integers(70, 96))
        _, encoded = cv2.imencode(".jpg", scene.render(rng), [cv2.IMWRITE_JPEG_QUALITY, quality])
        images.append(to_input(cv2.imdecode(encoded, cv2.IMREAD_COLOR)))
    return np.stack(images).astype(np.float32), labels


def write_clip(path: Path, rng: np.random.Generator) -> list[int]:
    """The video, segment by segment (each class three times, in random order); returns every frame's label."""
    order = rng.permutation(np.arange(SEGMENTS) % len(CLASSES))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (FRAME_W, FRAME_H))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write MJPG video to {path}")
    labels = []
    for label in order:
        scene = random_scene(rng, int(label))
        for _ in range(SEGMENT_FRAMES):
            writer.write(scene.render(rng))
            labels.append(scene.label)
            if scene.shape:
                scene.shape.step()
    writer.release()
    return labels


def read_clip(path: Path) -> np.ndarray:
    """Every frame of the clip as OpenCV decodes it (what the agent's video source reads), as model inputs."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(to_input(frame))
    capture.release()
    return np.stack(frames)


def edge_filters() -> np.ndarray:
    """Derivative-of-Gaussian kernels, one per direction: each responds to edges whose brightness rises that way."""
    offsets = np.arange(KERNEL) - KERNEL // 2
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    gauss = np.exp(-(xx**2 + yy**2) / (2 * SIGMA**2))
    gauss /= gauss.sum()
    dx, dy = -xx / SIGMA**2 * gauss, -yy / SIGMA**2 * gauss
    angles = np.arange(DIRECTIONS) * 2 * np.pi / DIRECTIONS
    kernels = np.cos(angles)[:, None, None] * dx + np.sin(angles)[:, None, None] * dy
    return kernels[:, None].astype(np.float32)


def feature_graph() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`image` → `features`: how strongly edge directions repeat around the circle, and the total edge strength.

    A circle has edges in every direction, a square in four (every 90 degrees), a triangle in three: the
    histogram of edge directions has no peaks, four or three. Its Fourier power at each harmonic measures that
    and does not change when the shape moves, turns, grows or swaps brightness with the background. The
    filters are fixed, not trained; only the classifier head after them is."""
    nodes = [
        # No padding: a padded border would be one strong edge around every frame.
        helper.make_node("Conv", ["image", "edges.weight"], ["edges"], name="edges", pads=[0] * 4),
        # A derivative filter answers gradient x cos(angle) to an edge at that angle from its direction. To
        # count an edge only in the directions within TUNING_DEGREES of its own, whatever its contrast, subtract
        # cos(TUNING_DEGREES) x the pixel's strongest answer (its gradient); the threshold drops sensor noise.
        helper.make_node("ReduceMax", ["edges"], ["gradient"], name="gradient", axes=[1], keepdims=1),
        helper.make_node("Mul", ["gradient", "tuning"], ["gradient_tuned"], name="gradient_tuned"),
        helper.make_node("Add", ["gradient_tuned", "threshold"], ["floor"], name="floor"),
        helper.make_node("Sub", ["edges", "floor"], ["edges_above"], name="edges_above"),
        helper.make_node("Relu", ["edges_above"], ["edge_map"], name="edge_map"),
        helper.make_node("GlobalAveragePool", ["edge_map"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["histogram"], name="histogram", axis=1),
        helper.make_node("ReduceSum", ["histogram", "axis1"], ["strength"], name="strength", keepdims=1),
        helper.make_node("Add", ["strength", "epsilon"], ["strength_eps"], name="strength_eps"),
        helper.make_node("Div", ["histogram", "strength_eps"], ["shares"], name="shares"),
        helper.make_node("MatMul", ["shares", "dft.cos"], ["real"], name="dft_real"),
        helper.make_node("MatMul", ["shares", "dft.sin"], ["imag"], name="dft_imag"),
        helper.make_node("Mul", ["real", "real"], ["real2"], name="real2"),
        helper.make_node("Mul", ["imag", "imag"], ["imag2"], name="imag2"),
        # Power, not magnitude: a square root near 0 would magnify int8 rounding errors many times.
        helper.make_node("Add", ["real2", "imag2"], ["power"], name="power"),
        helper.make_node("Concat", ["power", "strength"], ["features"], name="features", axis=1),
    ]
    harmonics = np.outer(np.arange(DIRECTIONS), np.arange(1, HARMONICS + 1)) * 2 * np.pi / DIRECTIONS
    tuning = np.cos(np.deg2rad(TUNING_DEGREES))
    initializers = [
        numpy_helper.from_array(edge_filters() * EDGE_GAIN, "edges.weight"),
        numpy_helper.from_array(np.array(tuning, np.float32), "tuning"),
        # Scaled by (1 - tuning): in its own direction, an edge then counts exactly when its gradient is over
        # EDGE_THRESHOLD.
        numpy_helper.from_array(np.array((1 - tuning) * EDGE_THRESHOLD * EDGE_GAIN, np.float32), "threshold"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([EPSILON], np.float32), "epsilon"),
        # Scaled so that the power spans about the strength's range: int8 gives a Concat one scale for all inputs.
        numpy_helper.from_array((DFT_GAIN * np.cos(harmonics)).astype(np.float32), "dft.cos"),
        numpy_helper.from_array((DFT_GAIN * np.sin(harmonics)).astype(np.float32), "dft.sin"),
    ]
    return nodes, initializers


def features(images: np.ndarray) -> np.ndarray:
    """The feature part of the model, run by ONNX Runtime: training sees exactly what the exported graph computes."""
    nodes, initializers = feature_graph()
    graph = helper.make_graph(nodes, "shape_features", [_image_input()], [_tensor("features", HARMONICS + 1)],
                              initializers)  # fmt: skip
    return _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), images)


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the exported fp32 model under ONNX Runtime."""
    return float(np.mean(np.argmax(_run(model, images), axis=1) == np.asarray(labels)))


def _run(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def train(x: np.ndarray, y: np.ndarray, seed: int) -> MLPClassifier:
    """The classifier head, on the features as they are (all between 0 and about 2).

    Not standardised: a feature that is almost always 0 would get a tiny std, and dividing by it would make the
    head react to int8 rounding errors in that feature as if they were signal."""
    # int8 rounds every feature by up to a few hundredths: train on copies with that much noise, so that the
    # quantized model draws the same class boundaries as the float one.
    rng = np.random.default_rng(seed)
    noisy = np.concatenate([x] + [x + rng.normal(0, FEATURE_NOISE, x.shape) for _ in range(NOISY_COPIES)])
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    classifier.fit(noisy, np.tile(y, NOISY_COPIES + 1))
    return classifier


def to_onnx(classifier: MLPClassifier) -> onnx.ModelProto:
    """The feature graph, then (Gemm → Relu)* → Gemm → Softmax with the trained weights as initializers."""
    nodes, initializers = feature_graph()
    layers, weights = mlp_layers(classifier, "features")
    nodes, initializers = nodes + layers, initializers + weights
    graph = helper.make_graph(nodes, "shapes", [_image_input()], [_tensor("probabilities", len(CLASSES))],
                              initializers)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgekit-examples")
    onnx.checker.check_model(model)
    return model


def _image_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, INPUT_H, INPUT_W])


def _tensor(name: str, width: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])


def make(out: Path, seed: int = 0) -> dict[str, float]:
    """Everything above into `out`; returns the fp32 model's accuracy on held-out frames and on the clip."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train = sample_set(rng, TRAIN_SAMPLES)
    x_calib, y_calib = sample_set(rng, CALIBRATION_SAMPLES)
    model = to_onnx(train(features(x_train), y_train, seed))
    onnx.save(model, str(out / "shapes.onnx"))
    np.savez(out / "calibration.npz", image=x_calib, labels=y_calib)

    labels = write_clip(out / "clip.avi", rng)
    (out / "clip.json").write_text(json.dumps({"fps": FPS, "labels": labels}))
    (out / "labels.json").write_text(json.dumps(CLASSES))
    clip = read_clip(out / "clip.avi")
    if len(clip) != len(labels):
        raise SystemExit(f"{out / 'clip.avi'}: wrote {len(labels)} frames, OpenCV read back {len(clip)}")
    return {
        "held_out": accuracy(model, x_calib, y_calib),
        "clip": accuracy(model, clip, labels),
        "frames": len(labels),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="video-out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="one seed for the training set, the model and the clip")
    args = parser.parse_args()
    scores = make(args.out, args.seed)
    print(
        f"wrote {args.out}/clip.avi ({scores['frames']} frames at {FPS:g} fps) and {args.out}/shapes.onnx; "
        f"fp32 accuracy: held-out frames {scores['held_out']:.4f}, clip.avi read back {scores['clip']:.4f}"
    )


if __name__ == "__main__":
    main()
