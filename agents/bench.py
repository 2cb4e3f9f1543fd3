"""Benchmark jobs: a candidate bundle timed on this device without activating it (docs/measure.md).

The hub signs a `BenchJob` for this device (`bench/job`). The control thread takes it between desired states, so a
job never races an update for the bundle store. The candidate is fetched, verified and self-tested exactly like an
update (`Updater.prepare_candidate`), then timed on its own self-test inputs in a thread at a lower scheduling
priority (nice +10) than the live model's, so the live model keeps its share of the CPU; the live model's p50
before, during and after the job says how much it was disturbed all the same. The answer is a `bench.result` event
(its data a `BenchResult`) or `bench.failed` with the reason; the candidate is removed from the store either way
(unless it is also the active, previous or shadow bundle).
"""

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgekit.agents.runner import LoadedModel, Report, Runner
from edgekit.agents.runtimes import Session
from edgekit.agents.updater import UpdateFailed, Updater
from edgekit.protocol import BenchJob, BenchResult
from edgekit.selftest import selftest_vectors

log = logging.getLogger(__name__)

NICE = 10  # added to the timing thread's niceness: the live model's inference thread stays at the agent's
AFTER_S = 1.0  # how long the live model is watched after the candidate stopped
RSS_EVERY = 16  # runs between two RSS readings (each reads /proc)
# The Raspberry Pi firmware's throttling flags (vcgencmd get_throttled); bit 2: throttled now.
RPI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1",
             "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd4f": "Neoverse-V2"}  # fmt: skip


class LiveLatency:
    """The live model's latencies as they come (`Runner.latency_tap`), taken as a p50 per stretch of time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: list[float] = []

    def add(self, latency_s: float) -> None:
        with self._lock:
            self._values.append(latency_s)

    def take_p50_ms(self) -> float | None:
        with self._lock:
            values, self._values = self._values, []
        return round(float(np.median(values)) * 1000, 3) if values else None


def run_job(job: BenchJob, updater: Updater, runner: Runner, report: Report) -> None:
    """Verify, time and remove `job`'s candidate; report the outcome as one event."""
    before = runner.model_health.stats().latency_p50_ms if runner.model_health else None
    live = LiveLatency()
    try:
        model = updater.prepare_candidate(job.bundle, attempt=int(time.time()))
    except UpdateFailed as error:
        _failed(report, job, f"{error.phase}: {error}")
        return
    try:
        result = _measure(job, model, runner, live, before, updater.threads)
    except Exception as error:  # a candidate that cannot run its own vectors is the job's failure, not the agent's
        log.debug("benchmark job %s failed", job.id, exc_info=True)
        _failed(report, job, f"running it failed: {type(error).__name__}: {error}")
        return
    finally:
        runner.latency_tap = None
        del model
        updater.release_candidates()
    report("bench.result", f"{job.bundle.name}@{job.bundle.version}: p50 {result.p50_ms:g} ms, p95 "
           f"{result.p95_ms:g} ms over {result.runs} runs", **result.model_dump())  # fmt: skip


def _failed(report: Report, job: BenchJob, reason: str) -> None:
    report("bench.failed", f"benchmark job {job.id} ({job.bundle.name}@{job.bundle.version}): {reason}",
           level="error", job=job.id, bundle=job.bundle.id, reason=reason)  # fmt: skip


def _measure(job: BenchJob, model: LoadedModel, runner: Runner, live: LiveLatency, before: float | None,
             threads: int | None) -> BenchResult:  # fmt: skip
    feeds = selftest_vectors(model.bundle.root, model.bundle.manifest).feeds
    rss_before = _rss_mib()
    runner.latency_tap = live.add
    timing = _Timing(model.session, feeds, job)
    worker = threading.Thread(target=timing.run, name="bench", daemon=True)
    worker.start()
    worker.join()
    during = live.take_p50_ms()
    time.sleep(AFTER_S)
    after = live.take_p50_ms()
    if timing.error is not None:
        raise timing.error
    latencies = np.asarray(timing.latencies) * 1000
    p50, p95 = np.percentile(latencies, [50, 95])
    return BenchResult(
        job=job.id, bundle=model.bundle.id, runs=len(latencies), p50_ms=round(float(p50), 3),
        p95_ms=round(float(p95), 3), throughput=round(len(latencies) / max(timing.elapsed, 1e-9), 2),
        threads=threads or os.cpu_count(), peak_rss_mib=timing.peak_rss_mib,
        added_rss_mib=round(timing.peak_rss_mib - rss_before, 1) if timing.peak_rss_mib and rss_before else None,
        machine=platform.machine(), cpu=cpu_description(), temperature_c=_temperature_c(), throttled=_throttled(),
        live_p50_before_ms=before, live_p50_during_ms=during, live_p50_after_ms=after,
    )  # fmt: skip


class _Timing:
    """The candidate run on its feeds, round robin, for `job.seconds` after `job.warmup` runs, in the thread that
    calls `run` (niced first)."""

    def __init__(self, session: Session, feeds: list[dict[str, np.ndarray]], job: BenchJob) -> None:
        self.session, self.feeds, self.job = session, feeds, job
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.peak_rss_mib: float | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        _lower_priority()
        try:
            self._time()
        except Exception as error:  # handed to the control thread, which reports it
            self.error = error

    def _time(self) -> None:
        run: Callable[[int], None] = lambda i: self.session.run(self.feeds[i % len(self.feeds)])  # noqa: E731
        for i in range(self.job.warmup):
            run(i)
        started = time.perf_counter()
        deadline = started + self.job.seconds
        i = 0
        while not self.latencies or time.perf_counter() < deadline:
            tick = time.perf_counter()
            run(i)
            self.latencies.append(time.perf_counter() - tick)
            if i % RSS_EVERY == 0:
                self.peak_rss_mib = max(self.peak_rss_mib or 0.0, _rss_mib() or 0.0) or None
            i += 1
        self.elapsed = time.perf_counter() - started


def _lower_priority() -> None:
    try:  # Linux: a thread id names just this thread
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + NICE)
    except (OSError, AttributeError):
        log.debug("could not lower the benchmark thread's priority", exc_info=True)


def _rss_mib() -> float | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def cpu_description() -> str:
    """The CPU's model name (x86) or core type (ARM's `CPU part`), and how many cores."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name") or ARM_PARTS.get(fields.get("CPU part", ""), "") or platform.processor()
    return f"{name or platform.machine()}, {os.cpu_count()} cores"


def _temperature_c() -> float | None:
    readings = []
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            readings.append(int(zone.read_text()) / 1000)
        except (OSError, ValueError):
            continue
    return round(max(readings), 1) if readings else None


def _throttled() -> bool | None:
    try:
        return bool(int(RPI_THROTTLED.read_text().strip(), 16) & 0x4)
    except (OSError, ValueError):
        return None
