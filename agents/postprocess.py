"""Turn raw model outputs into results: top-k classes for classifiers, filtered boxes for detectors."""

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from edgekit.protocol import Detection, Score, Thresholds

Task = Literal["classifier", "detector", "raw"]
SUMS_TO_ONE = 1 / 64
RAW_VALUES = 64  # a raw result carries at most this many numbers; a full feature map does not belong in MQTT


def infer_task(output_shapes: list[list[int]]) -> Task:
    """From the first output's shape: (1, C) is a classifier, (1, N, >=6) boxes+score+class a detector."""
    shape = output_shapes[0]
    if len(shape) == 2 and shape[1] > 1:
        return "classifier"
    if len(shape) == 3 and shape[2] >= 6:
        return "detector"
    return "raw"


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax unless the values already are a distribution (the model ends in softmax)."""
    values = logits.astype(np.float64).ravel()
    # An int8 softmax output moves in steps of 1/256, so its sum is off by several steps; a second softmax would
    # flatten 0.996 to 0.73.
    if values.min() >= 0 and abs(values.sum() - 1.0) < SUMS_TO_ONE:
        return values
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def class_name(labels: list[str] | None, index: int) -> str | None:
    """The bundle's name for a class; None without labels or for an index they do not cover (a detector's class
    count is not known when it is compiled), never an error."""
    return labels[index] if labels and 0 <= index < len(labels) else None


def classify(output: np.ndarray, thresholds: Thresholds, labels: list[str] | None = None) -> list[Score]:
    probs = probabilities(output[0])
    top = np.argsort(-probs)[: thresholds.top_k]
    return [Score(label=int(i), score=round(float(probs[i]), 6), name=class_name(labels, int(i))) for i in top]


def detect(output: np.ndarray, thresholds: Thresholds, labels: list[str] | None = None) -> list[Detection]:
    """Rows are x1, y1, x2, y2, score, class; keeps rows over the score threshold, then per-class NMS."""
    rows = output[0].astype(np.float32)
    rows = rows[rows[:, 4] >= thresholds.score]
    kept: list[Detection] = []
    for label in np.unique(rows[:, 5]).astype(int):
        candidates = rows[rows[:, 5] == label]
        for row in _nms(candidates[np.argsort(-candidates[:, 4])], thresholds.iou):
            kept.append(Detection(box=[float(v) for v in row[:4]], score=float(row[4]), label=int(label),
                                  name=class_name(labels, int(label))))  # fmt: skip
    kept.sort(key=lambda d: -d.score)
    return kept[: thresholds.top_k]


def _nms(rows: np.ndarray, iou_limit: float) -> list[np.ndarray]:
    selected: list[np.ndarray] = []
    for row in rows:
        if all(iou(row, other) <= iou_limit for other in selected):
            selected.append(row)
    return selected


def iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def postprocess(
    task: Task, outputs: list[np.ndarray], thresholds: Thresholds, labels: list[str] | None = None
) -> dict[str, Any]:
    """The task-specific fields of a Result; classes named from `labels` (the bundle's) where it has them."""
    if task == "classifier":
        return {"top": classify(outputs[0], thresholds, labels)}
    if task == "detector":
        return {"detections": detect(outputs[0], thresholds, labels)}
    return {"values": [float(v) for v in outputs[0].ravel()[:RAW_VALUES]]}


def outputs_are_sane(outputs: list[np.ndarray]) -> bool:
    """What the health check asks of every inference after a switch: no NaN or infinity anywhere."""
    return all(np.isfinite(o).all() for o in outputs if np.issubdtype(o.dtype, np.floating))
