"""Numbers for telemetry: inference latency percentiles and rate since the last report, and host vitals."""

import threading
import time
from pathlib import Path

import numpy as np


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


class HostVitals:
    """CPU % and RSS of this process via psutil; temperature where the OS exposes one."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._process.cpu_percent()  # the first call only starts the measurement window
        self._psutil = psutil

    def cpu_percent(self) -> float:
        return round(self._process.cpu_percent(), 1)

    def memory_mb(self) -> float:
        return round(self._process.memory_info().rss / 2**20, 1)

    def temperature_c(self) -> float | None:
        reader = getattr(self._psutil, "sensors_temperatures", None)
        readings = reader() if reader else {}
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
