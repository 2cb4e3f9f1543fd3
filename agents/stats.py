"""Numbers for telemetry: inference latency percentiles and rate since the last report, and host vitals."""

import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from edgekit.protocol import ModelStats

MAX_CLASSES = 64  # classes counted by name in ModelStats; the rest are summed as "other"


class InferenceStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latencies: list[float] = []
        self._since = time.monotonic()
        self.total = 0

    def record(self, latency_s: float) -> None:
        with self._lock:
            self._latencies.append(latency_s)
            self.total += 1

    def take(self) -> tuple[float | None, float | None, float, int]:
        """(p50 ms, p95 ms, fps, count) over the window since the previous call; starts a new window."""
        with self._lock:
            latencies, self._latencies = self._latencies, []
            now = time.monotonic()
            elapsed, self._since = now - self._since, now
        if not latencies:
            return None, None, 0.0, 0
        p50, p95 = np.percentile(np.asarray(latencies) * 1000, [50, 95])
        return round(float(p50), 3), round(float(p95), 3), round(len(latencies) / max(elapsed, 1e-6), 2), len(latencies)


class LatencyWindow:
    """The most recent `size` latencies, for percentiles that follow the model as it runs now."""

    def __init__(self, size: int = 1000) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, latency_s: float) -> None:
        self._values.append(latency_s)

    def percentiles_ms(self) -> tuple[float | None, float | None]:
        if not self._values:
            return None, None
        p50, p95 = np.percentile(np.fromiter(self._values, float, len(self._values)) * 1000, [50, 95])
        return round(float(p50), 3), round(float(p95), 3)


class ModelHealth:
    """The active bundle since it became active: inferences, errors, recent latency, top-1 class histogram and mean
    confidence (`ModelStats`). A health gate compares these with the previous bundle's on the same device."""

    def __init__(self, bundle_id: str) -> None:
        self.bundle_id = bundle_id
        self.since = time.time()
        self._lock = threading.Lock()
        self._latency = LatencyWindow()
        self._classes: Counter[int] = Counter()
        self._confidence = 0.0
        self._scored = 0
        self.inferences = 0
        self.errors = 0

    def record(self, latency_s: float, top: tuple[int, float] | None) -> None:
        """One inference; `top` is its (class, score) when the task gives one."""
        with self._lock:
            self.inferences += 1
            self._latency.add(latency_s)
            if top is not None:
                self._classes[top[0]] += 1
                self._confidence += top[1]
                self._scored += 1

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def stats(self) -> ModelStats:
        with self._lock:
            p50, p95 = self._latency.percentiles_ms()
            common = self._classes.most_common(MAX_CLASSES)
            classes = {str(label): count for label, count in common}
            other = self._classes.total() - sum(count for _, count in common)
            if other:
                classes["other"] = other
            confidence = round(self._confidence / self._scored, 6) if self._scored else None
            return ModelStats(bundle=self.bundle_id, since=self.since, inferences=self.inferences,
                              errors=self.errors, latency_p50_ms=p50, latency_p95_ms=p95, classes=classes,
                              mean_confidence=confidence)  # fmt: skip


class HostVitals:
    """CPU % and RSS of this process via psutil; temperature where the OS exposes one."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._process.cpu_percent()  # the first call only starts the measurement window
        self._psutil = psutil
        # psutil globs /sys/class/hwmon on every call; a machine without sensors stays without them.
        self._sensors = hasattr(psutil, "sensors_temperatures")

    def cpu_percent(self) -> float:
        return round(self._process.cpu_percent(), 1)

    def memory_mb(self) -> float:
        return round(self._process.memory_info().rss / 2**20, 1)

    def temperature_c(self) -> float | None:
        readings = self._psutil.sensors_temperatures() if self._sensors else {}
        self._sensors = bool(readings)
        for entries in readings.values():
            for entry in entries:
                if entry.current:
                    return round(float(entry.current), 1)
        return _thermal_zone()


def _thermal_zone() -> float | None:
    """Raspberry Pi and Jetson kernels expose the SoC temperature here even when psutil finds nothing."""
    zone = Path("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(zone.read_text()) / 1000, 1)
    except (OSError, ValueError):
        return None
