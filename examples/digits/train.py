"""Train a small digit classifier on scikit-learn's bundled digits data and export it to ONNX.

Writes into OUT (default ./digits-out):
    digits.onnx        MLP classifier, input `image` of shape (N, 1, 8, 8) in [0, 1], output `probabilities` (N, 10)
    calibration.npz    the training split (`image`, `labels`): calibration data for `edgekit compile`
    test.npz           the held-out test split (`image`, `labels`): never trained or calibrated on; `--eval-data`
    images/            the first 200 training images as PNG, to try image-folder calibration

Run:  python examples/digits/train.py OUT
Then: edgekit compile OUT/digits.onnx --profile x86-64-avx512 --precision int8 \
          --calibration OUT/calibration.npz --eval-data OUT/test.npz -o digits.ekb
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

# The examples folder holds the helper the examples share; it is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sklearn_onnx import mlp_layers

OPSET = 17


def train(seed: int = 0) -> tuple[MLPClassifier, dict[str, np.ndarray]]:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    classifier = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=seed)
    classifier.fit(x_train.reshape(len(x_train), -1), y_train)
    return classifier, {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def to_onnx(classifier: MLPClassifier) -> onnx.ModelProto:
    """Flatten → (Gemm → Relu)* → Gemm → Softmax, with the trained weights as initializers."""
    layers, initializers = mlp_layers(classifier, "x0")
    nodes = [helper.make_node("Flatten", ["image"], ["x0"], name="flatten", axis=1), *layers]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgekit-examples")
    onnx.checker.check_model(model)
    return model


def write_outputs(out: Path, classifier: MLPClassifier, split: dict[str, np.ndarray]) -> None:
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(classifier), str(out / "digits.onnx"))
    np.savez(out / "calibration.npz", image=split["x_train"][:, None], labels=split["y_train"])
    np.savez(out / "test.npz", image=split["x_test"][:, None], labels=split["y_test"])
    images = out / "images"
    images.mkdir(exist_ok=True)
    for index, image in enumerate(split["x_train"][:200]):
        cv2.imwrite(str(images / f"{index:04d}.png"), np.round(image * 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="digits-out", type=Path, help="output folder")
    args = parser.parse_args()
    classifier, split = train()
    accuracy = classifier.score(split["x_test"].reshape(len(split["x_test"]), -1), split["y_test"])
    write_outputs(args.out, classifier, split)
    print(f"trained MLP on {len(split['x_train'])} digits; test accuracy {accuracy:.4f}; wrote {args.out}/digits.onnx")


if __name__ == "__main__":
    main()
