"""Shadow evaluation: a verified bundle runs beside the active one on a sample of live inputs, never switched to.

The runner offers every active inference to `Shadow.offer` (the frame, the feeds, the outputs and how long the
active model took). The shadow runs on the same input when the sampling allows (every Nth input) and its CPU budget
has room: its summed inference time stays within `budget` × the active model's summed time since the shadow
started. It runs in the inference thread, after the active result has gone out, so the active model's latency is
measured as without a shadow; a device with idle time between frames loses nothing, one at full load gives up at
most `budget` of its throughput (benchmarks/shadow_bench.py measures both).

Agreement per task: classifiers, the same top-1 class; detectors, the share of boxes matched one to one by class
and IoU >= 0.5 (1 when both found nothing); raw outputs, the cosine of the two output vectors (0 when opposite).
"""

import threading
import time
from collections import deque

import numpy as np

from edgekit.agents.postprocess import Task, class_name, detect, iou
from edgekit.agents.runner import LoadedModel
from edgekit.agents.sources import Frame, to_feeds
from edgekit.agents.stats import LatencyWindow
from edgekit.manifest import Manifest
from edgekit.protocol import Detection, Disagreement, ShadowStats, Thresholds

MATCH_IOU = 0.5
METRICS = {"classifier": "top1", "detector": "boxes", "raw": "cosine"}
RECENT_DISAGREEMENTS = 8


class Shadow:
    def __init__(self, model: LoadedModel, active: Manifest, active_id: str, task: Task, every_n: int,
                 budget: float, threads: int, active_threads: int) -> None:  # fmt: skip
        self.model = model
        self.threads, self.active_threads = threads, active_threads
        self.active_id = active_id
        self.task = task
        self.every_n = every_n
        self.budget = budget
        self._active = active
        self._same_input = (model.bundle.manifest.inputs[0], model.bundle.manifest.preprocessing) == (
            active.inputs[0], active.preprocessing)  # fmt: skip
        self._lock = threading.Lock()
        self._offered = 0
        self._active_s = 0.0
        self._shadow_s = 0.0
        self._samples = 0
        self._agreement = 0.0
        self._errors = 0
        self._skipped = 0
        self._latency = LatencyWindow()
        self._active_latency = LatencyWindow()
        self._recent: deque[Disagreement] = deque(maxlen=RECENT_DISAGREEMENTS)

    def offer(self, frame: Frame, feeds: dict[str, np.ndarray], outputs: list[np.ndarray], active_s: float,
              thresholds: Thresholds) -> None:  # fmt: skip
        """One active inference: shadow it when the sampling and the budget allow."""
        self._offered += 1
        self._active_s += active_s
        if self._offered % self.every_n:
            return
        if self._shadow_s > self.budget * self._active_s:
            self._skipped += 1
            return
        started = time.perf_counter()
        try:
            shadow_feeds = feeds if self._same_input else to_feeds(
                frame, self.model.bundle.manifest.inputs[0], self.model.bundle.manifest.preprocessing)  # fmt: skip
            shadow_outputs = self.model.session.run(shadow_feeds)
            failed = not all(np.isfinite(o).all() for o in shadow_outputs if np.issubdtype(o.dtype, np.floating))
        except Exception:  # a shadow that cannot run an input is an error in its record, never the active's
            failed, shadow_outputs = True, []
        elapsed = time.perf_counter() - started
        self._shadow_s += elapsed
        with self._lock:
            if failed:
                self._errors += 1
                return
            self._latency.add(elapsed)
            self._active_latency.add(active_s)
            self._samples += 1
            self._agreement += self._compare(outputs[0], shadow_outputs[0], thresholds)

    def _compare(self, active: np.ndarray, shadow: np.ndarray, thresholds: Thresholds) -> float:
        if self.task == "classifier":
            a, s = int(np.argmax(active[0])), int(np.argmax(shadow[0]))
            if a != s:
                shadow_name = _name(s, self.model.bundle.manifest)
                self._recent.append(Disagreement(active=_name(a, self._active), shadow=shadow_name))
            return float(a == s)
        if self.task == "detector":
            a_boxes, s_boxes = detect(active, thresholds), detect(shadow, thresholds)
            agreement = box_agreement(a_boxes, s_boxes)
            if agreement < 1:
                self._recent.append(Disagreement(active=_boxes(a_boxes, self._active),
                                                 shadow=_boxes(s_boxes, self.model.bundle.manifest)))  # fmt: skip
            return agreement
        return cosine(active, shadow)

    def stats(self) -> ShadowStats:
        with self._lock:
            p50, p95 = self._latency.percentiles_ms()
            active_p50, active_p95 = self._active_latency.percentiles_ms()
            return ShadowStats(
                bundle=self.model.bundle.id, active=self.active_id, metric=METRICS[self.task], samples=self._samples,
                agreement=round(self._agreement / self._samples, 6) if self._samples else None, errors=self._errors,
                latency_p50_ms=p50, latency_p95_ms=p95, active_p50_ms=active_p50, active_p95_ms=active_p95,
                budget_skipped=self._skipped, disagreements=list(self._recent), threads=self.threads,
                active_threads=self.active_threads,
            )  # fmt: skip


def box_agreement(active: list[Detection], shadow: list[Detection]) -> float:
    """Boxes matched one to one (same class, IoU >= 0.5, best first) over the larger count; 1 when both are empty."""
    if not active and not shadow:
        return 1.0
    unmatched = list(shadow)
    matched = 0
    for box in active:
        candidates = [(iou(box.box, other.box), i) for i, other in enumerate(unmatched) if other.label == box.label]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= MATCH_IOU:
            unmatched.pop(best[1])
            matched += 1
    return matched / max(len(active), len(shadow))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if x.shape != y.shape:
        return 0.0
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norm == 0:
        return float(np.array_equal(x, y))
    return max(0.0, float(x @ y) / norm)


def _name(label: int, manifest: Manifest) -> str:
    name = class_name(manifest.labels, label)
    return f"{label} {name}" if name else str(label)


def _boxes(boxes: list[Detection], manifest: Manifest) -> str:
    names = ", ".join(_name(box.label, manifest) for box in boxes[:4])
    return f"{len(boxes)} boxes: {names}" if boxes else "no boxes"
