"""Host measurements: output agreement, latency percentiles and peak memory. numpy only."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.agents.runtimes import Session


@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    cosine: float
    top1_agreement: float | None


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    throughput_per_s: float
    iterations: int


def is_classifier_output(array: np.ndarray) -> bool:
    """(N, classes) with more than one class: argmax is meaningful."""
    return array.ndim == 2 and array.shape[1] > 1


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Agreement:
    """Worst case over outputs: largest absolute error and lowest cosine; top-1 on the first output."""
    errors, cosines = [], []
    for ref, got in zip(reference, candidate, strict=True):
        ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        errors.append(float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0)
        norm = np.linalg.norm(ref64) * np.linalg.norm(got64)
        cosines.append(float(ref64 @ got64 / norm) if norm else float(np.array_equal(ref64, got64)))
    top1 = None
    if is_classifier_output(reference[0]):
        top1 = float(np.mean(reference[0].argmax(axis=1) == candidate[0].argmax(axis=1)))
    return Agreement(max(errors), min(cosines), top1)


def run_batches(session: Session, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run every feed and concatenate each output along the batch axis."""
    per_feed = [session.run(feed) for feed in feeds]
    return [np.concatenate([outputs[i] for outputs in per_feed]) for i in range(len(per_feed[0]))]


def measure_latency(
    run: Callable[[], object], warmup: int = 5, min_iterations: int = 20, max_seconds: float = 2.0
) -> Latency:
    """Time `run` until max_seconds have passed (at least min_iterations runs), after a warm-up."""
    for _ in range(warmup):
        run()
    timings: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(timings) < min_iterations or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        timings.append(time.perf_counter() - start)
        if len(timings) >= 10_000:
            break
    samples = np.asarray(timings) * 1000.0
    return Latency(
        p50_ms=float(np.percentile(samples, 50)),
        p95_ms=float(np.percentile(samples, 95)),
        throughput_per_s=float(len(samples) / (samples.sum() / 1000.0)),
        iterations=len(samples),
    )


@dataclass
class PeakMemory:
    megabytes: float | None = None


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory() -> Iterator[PeakMemory]:
    """Peak resident memory added by the block, on Linux (resets the process high-water mark first)."""
    result = PeakMemory()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        baseline = None
    yield result
    peak = _status_kb("VmHWM")
    if baseline is not None and peak is not None:
        result.megabytes = max(0.0, (peak - baseline) / 1024.0)
