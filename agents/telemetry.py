"""The agent's periodic telemetry: inference latency and rate, host vitals, queue and outbox figures."""

import threading
from collections.abc import Callable
from typing import Any

from edgekit.agents.runner import Runner
from edgekit.agents.stats import HostVitals
from edgekit.agents.store import Outbox


class TelemetryLoop:
    def __init__(self, runner: Runner, outbox: Outbox, rejected_payloads: Callable[[], int]) -> None:
        self._runner = runner
        self._outbox = outbox
        self._rejected_payloads = rejected_payloads
        self._vitals = HostVitals()

    def run(self, stopping: threading.Event, interval: Callable[[], float], send: Callable[[dict], None]) -> None:
        """Until `stopping`: every `interval()` seconds (asked anew each time), `send` the fields."""
        while not stopping.wait(interval()):
            send(self.fields())

    def fields(self) -> dict[str, Any]:
        """A Telemetry message's fields; the inference figures cover the time since the previous call."""
        p50, p95, fps, count = self._runner.stats.take()
        model = self._runner.model
        return {
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "fps": fps,
            "inferences": count,
            "cpu_percent": self._vitals.cpu_percent(),
            "memory_mb": self._vitals.memory_mb(),
            "temperature_c": self._vitals.temperature_c(),
            "queue_depth": self._runner.queue_depth,
            "dropped_frames": self._runner.dropped,
            "store_depth": self._outbox.depth(),
            "store_dropped": self._outbox.dropped,
            "rejected_payloads": self._rejected_payloads(),
            "bundle": model.bundle.label if model else None,
            "model": health.stats() if (health := self._runner.model_health) else None,
            "shadow": shadow.stats() if (shadow := self._runner.shadow) else None,
            "drift": self._runner.drift.stats(),
            "capture": capture.spool.stats() if (capture := self._runner.capture) else None,
        }
