"""Benchmark jobs: a candidate bundle timed on this device without activating it (docs/measure.md).

The hub signs a `BenchJob` for this device (`bench/job`). The control thread takes it between desired states, so
a job never races an update for the bundle store. The candidate is fetched, verified and self-tested exactly like
an update (`Updater.prepare_candidate`), then timed on its own self-test inputs in a thread at a lower scheduling
priority (nice +10) than the live model's, so the live model keeps its share of the CPU; the live model's p50
before, during and after the job says how much it was disturbed all the same. The answer is a `bench.result`
event (its data a `BenchResult`) or `bench.failed` with the reason; the candidate is removed from the store either
way (unless it is also the active, previous or shadow bundle).

A job of mode `tvm-trials` carries a bundle of TVM tuning trials instead of a model (`edgekit compile
--measure-on` tuning for this device's CPU): each trial library is verified with the bundle, then timed as
MetaSchedule's own runner would time it, and the answer is a `TrialResult`.
"""

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from edgekit.agents.runner import LoadedModel, Report, Runner
from edgekit.agents.runtimes import Session
from edgekit.agents.updater import UpdateFailed, Updater
from edgekit.manifest import Manifest
from edgekit.protocol import TRIALS_KEY, BenchJob, BenchResult, TrialResult, TrialSpec, TrialTiming
from edgekit.selftest import selftest_vectors

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    if job.mode == "tvm-trials":
        _run_trials(job, updater, report)
        return
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


def _run_trials(job: BenchJob, updater: Updater, report: Report) -> None:
    try:
        installed = updater.install_candidate(job.bundle, attempt=int(time.time()))
        specs = _trial_specs(installed.manifest)
        timings = _Niced(lambda: time_trials(installed.root, specs, job)).run()
    except UpdateFailed as error:
        _failed(report, job, f"{error.phase}: {error}")
        return
    except Exception as error:  # a malformed trial list, or no TVM runtime: the job's failure, not the agent's
        log.debug("trial job %s failed", job.id, exc_info=True)
        _failed(report, job, f"{type(error).__name__}: {error}")
        return
    finally:
        updater.release_candidates()
    result = TrialResult(job=job.id, bundle=job.bundle.id, trials=timings, machine=platform.machine(),
                         cpu=cpu_description())  # fmt: skip
    timed = sum(t.secs is not None for t in timings)
    report("bench.result", f"{job.bundle.name}@{job.bundle.version}: {timed} of {len(timings)} tuning trials timed",
           **result.model_dump())  # fmt: skip


def _trial_specs(manifest: Manifest) -> list[TrialSpec]:
    """The trials a trial bundle lists; each must be one of the bundle's own (signed, hashed) files."""
    files = {entry.path for entry in manifest.files}
    specs = [TrialSpec.model_validate(spec) for spec in manifest.build_details.get(TRIALS_KEY, [])]
    if unlisted := [spec.file for spec in specs if spec.file not in files]:
        raise ValueError(f"trial libraries not among the bundle's files: {unlisted[:3]}")
    return specs


def time_trials(root: Path, specs: list[TrialSpec], job: BenchJob) -> list[TrialTiming]:
    """Each MetaSchedule trial timed as MetaSchedule's own runner times it: random arguments, the module's entry
    function under TVM's time evaluator. A trial that does not load or run is a failed trial, not a failed job; a
    device without the TVM runtime fails the job (ModuleNotFoundError)."""
    import tvm

    device = tvm.cpu(0)
    rng = np.random.default_rng(0)
    timings = []
    for spec in specs:
        try:
            module = tvm.runtime.load_module(str(root / spec.file))
            args = [tvm.runtime.tensor(rng.uniform(-1, 1, shape).astype(t), device) for _, t, shape in spec.args]
            evaluator = module.time_evaluator(module.entry_name, device, number=job.number, repeat=job.repeat)
            timings.append(TrialTiming(secs=[float(s) for s in evaluator(*args).results]))
        except Exception as error:  # TVM raises its own error types for schedules that do not run
            timings.append(TrialTiming(error=f"{type(error).__name__}: {str(error)[:1500]}"))
    return timings


def _failed(report: Report, job: BenchJob, reason: str) -> None:
    report("bench.failed", f"benchmark job {job.id} ({job.bundle.name}@{job.bundle.version}): {reason}",
           level="error", job=job.id, bundle=job.bundle.id, reason=reason)  # fmt: skip


def _measure(job: BenchJob, model: LoadedModel, runner: Runner, live: LiveLatency, before: float | None,
             threads: int | None) -> BenchResult:  # fmt: skip
    feeds = selftest_vectors(model.bundle.root, model.bundle.manifest).feeds
    rss_before = _rss_mib()
    runner.latency_tap = live.add
    timing = _Timing(model.session, feeds, job)
    _Niced(timing.run).run()
    during = live.take_p50_ms()
    time.sleep(AFTER_S)
    after = live.take_p50_ms()
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
    """The candidate run on its feeds, round robin, for `job.seconds` after `job.warmup` runs."""

    def __init__(self, session: Session, feeds: list[dict[str, np.ndarray]], job: BenchJob) -> None:
        self.session, self.feeds, self.job = session, feeds, job
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.peak_rss_mib: float | None = None

    def run(self) -> None:
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


class _Niced(Generic[T]):
    """`work` run to its end in a thread of its own at a lower priority than the live model's (nice +NICE: a thread
    cannot lower its own niceness again, so the agent's threads are never touched); its exception re-raised."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._work = work
        self._outcome: list[Any] = []

    def run(self) -> T:
        worker = threading.Thread(target=self._run, name="bench", daemon=True)
        worker.start()
        worker.join()
        value, error = self._outcome
        if error is not None:
            raise error
        return value  # type: ignore[no-any-return]

    def _run(self) -> None:
        _lower_priority()
        try:
            self._outcome = [self._work(), None]
        except Exception as error:  # handed to the calling thread
            self._outcome = [None, error]


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
