"""Train a vibration anomaly detector on synthetic sensor data (numpy + scikit-learn, no torch); export it to ONNX.

The detector is PCA reconstruction: windows of a healthy machine lie close to a few principal directions (the
shaft orders at slightly varying speed, amplitude and phase); a fault (bearing impulses, a shifted gear mesh,
clipping) puts energy outside them. The ONNX graph projects a window onto those directions, takes the energy of
what is left, and turns it into 2-class [normal, anomaly] logits around a fixed threshold, so the agent reports it
as a classifier (softmax, then the top class): label 1 is an anomaly.

Writes into OUT (default ./sensor-anomaly-out):
    anomaly.onnx       input `window` (N, 128), output `logits` (N, 2) = [normal, anomaly]
    calibration.npz    `window` (1000, 128) and `labels`, a quarter of them faults: calibration for `edgekit compile`
    test.npz           `window` (1500, 128), `labels` and `kinds`, a third of them faults: held out, never compiled

Run:  python examples/sensor-anomaly/train.py OUT
Then: edgekit compile OUT/anomaly.onnx --profile x86-64-avx2 --precision int8 \
          --calibration OUT/calibration.npz -o anomaly.ekb
"""

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sensor import FAULTS, WINDOW, Vibration
from sklearn.decomposition import PCA

OPSET = 17
COMPONENTS = 8  # sin and cos of three orders, plus room for their speed wander
THRESHOLD_MARGIN = 1.25  # times the 99.9th percentile of healthy training windows' residual energy
STEEPNESS = 4.0  # P(anomaly) = sigmoid(STEEPNESS * ln(energy / threshold)): 0.5 at the threshold, 0.83 at 1.5x


def windows(count: int, fault_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(windows (count, WINDOW), kinds) from one continuous stream; faults fall on random windows."""
    vibration = Vibration(seed)
    rng = np.random.default_rng(seed + 1000)
    kinds = np.where(rng.random(count) < fault_fraction, rng.choice(FAULTS, count), "normal")
    return np.stack([vibration.window(kind) for kind in kinds]), kinds


def residual_energy(pca: PCA, x: np.ndarray) -> np.ndarray:
    """Mean square of what the principal directions do not explain, per window."""
    return ((x - pca.inverse_transform(pca.transform(x))) ** 2).mean(axis=1)


def train(seed: int = 0) -> tuple[PCA, float]:
    """PCA fitted on healthy windows only, and the energy threshold above which a window is an anomaly."""
    healthy, _ = windows(4000, 0.0, seed)
    pca = PCA(COMPONENTS, random_state=seed).fit(healthy)
    threshold = THRESHOLD_MARGIN * float(np.quantile(residual_energy(pca, healthy), 0.999))
    return pca, threshold


def to_onnx(pca: PCA, threshold: float) -> onnx.ModelProto:
    """Sub mean → MatMul (project) → MatMul (reconstruct) → Sub → ReduceSumSquare → Log → 2-class logits.

    Two thin MatMuls (128x8, 8x128) rather than one 128x128 projector: their weights are small, so int8
    quantization adds little error to the reconstruction. ReduceSumSquare and Log are not quantized by ONNX
    Runtime, which keeps the residual energy in float. The graph ends in logits, not Softmax: a quantized
    Softmax output need not sum to 1 exactly, and the agent then applies a second softmax (agents/postprocess.py)."""
    components = pca.components_.astype(np.float32)
    constants = {
        "mean": pca.mean_.astype(np.float32),
        "project": components.T.copy(),
        "reconstruct": components,
        "log_threshold": np.array([np.log(threshold * WINDOW)], np.float32),  # ReduceSumSquare sums, not averages
        "half_steepness": np.array([STEEPNESS / 2], np.float32),
    }
    nodes = [
        helper.make_node("Sub", ["window", "mean"], ["centered"]),
        helper.make_node("MatMul", ["centered", "project"], ["coefficients"]),
        helper.make_node("MatMul", ["coefficients", "reconstruct"], ["reconstruction"]),
        helper.make_node("Sub", ["centered", "reconstruction"], ["residual"]),
        helper.make_node("ReduceSumSquare", ["residual"], ["energy"], axes=[1], keepdims=1),
        helper.make_node("Log", ["energy"], ["log_energy"]),
        helper.make_node("Sub", ["log_energy", "log_threshold"], ["log_ratio"]),
        # The agent's softmax turns [-z, z] into [1 - p, p]: p = sigmoid(2z) = sigmoid(STEEPNESS * ln(energy / t))
        helper.make_node("Mul", ["log_ratio", "half_steepness"], ["z"]),
        helper.make_node("Neg", ["z"], ["minus_z"]),
        helper.make_node("Concat", ["minus_z", "z"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "vibration_pca_anomaly",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgekit-examples")
    onnx.checker.check_model(model)
    return model


def write_outputs(out: Path, pca: PCA, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writes the model and both data sets; returns the test set (windows, labels, kinds)."""
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(pca, threshold), str(out / "anomaly.onnx"))
    calibration, calibration_kinds = windows(1000, 0.25, seed=1)
    np.savez(out / "calibration.npz", window=calibration, labels=(calibration_kinds != "normal").astype(np.int64))
    test, test_kinds = windows(1500, 1 / 3, seed=2)
    test_labels = (test_kinds != "normal").astype(np.int64)
    np.savez(out / "test.npz", window=test, labels=test_labels, kinds=test_kinds)
    return test, test_labels, test_kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="sensor-anomaly-out", type=Path, help="output folder")
    args = parser.parse_args()
    pca, threshold = train()
    test, labels, kinds = write_outputs(args.out, pca, threshold)
    flagged = residual_energy(pca, test) > threshold
    correct = flagged == labels.astype(bool)
    rates = ", ".join(f"{kind} {np.mean(correct[kinds == kind]):.3f}" for kind in np.unique(kinds))
    print(f"PCA with {COMPONENTS} components, threshold {threshold:.5f} mean square; held-out accuracy "
          f"{np.mean(correct):.4f} ({rates}); wrote {args.out}/anomaly.onnx")  # fmt: skip


if __name__ == "__main__":
    main()
