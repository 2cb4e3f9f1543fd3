"""Host measurements: output agreement, latency percentiles and peak memory. numpy only."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OutputAgreement:
    """One output against the reference: float outputs by cosine and SNR, integer ones (labels, class ids) exactly."""

    max_abs_error: float
    cosine: float | None = None
    snr_db: float | None = None
    exact: float | None = None  # fraction of equal elements, integer outputs only


@dataclass(frozen=True)
class Agreement:
    max_abs_error: float
    cosine: float | None  # the lowest over float outputs; None when every output is an integer
    top1_agreement: float | None
    outputs: list[OutputAgreement]


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    throughput_per_s: float
    iterations: int


def predictions(array: np.ndarray) -> np.ndarray | None:
    """Class predictions when the output is a classifier's: scores (N, classes) with more than one class (also
    (N, classes, 1, 1) from conv heads) → argmax per sample; integer labels (N,) → as they are; a sequence of
    probability distributions (N, steps, classes), as CTC text recognizers give, → argmax per step (what their
    decoder reads); else None."""
    if array.dtype.kind in "iu" and array.ndim == 1:
        return array
    if array.dtype.kind != "f" or array.ndim < 2 or array.shape[1] < 2:
        return None
    if all(d == 1 for d in array.shape[2:]):
        return array.reshape(array.shape[0], array.shape[1]).argmax(axis=1)
    if array.ndim == 3 and array.shape[2] > 1 and _distributions(array):
        return array.argmax(axis=2).ravel()
    return None


def _distributions(array: np.ndarray) -> bool:
    """Whether every row along the last axis is a probability distribution (a softmax output)."""
    return bool(array.min() >= -1e-6 and np.allclose(array.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-2))


def is_classifier_output(array: np.ndarray) -> bool:
    return predictions(array) is not None


def compare_output(ref: np.ndarray, got: np.ndarray) -> OutputAgreement:
    ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    error = float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0
    if ref.dtype.kind in "iub":
        return OutputAgreement(error, exact=float(np.mean(ref64 == got64)) if ref64.size else 1.0)
    norm = np.linalg.norm(ref64) * np.linalg.norm(got64)
    cosine = float(ref64 @ got64 / norm) if norm else float(np.array_equal(ref64, got64))
    noise = float(np.sum((ref64 - got64) ** 2))
    snr = float(10 * np.log10(np.sum(ref64**2) / noise)) if noise and np.any(ref64) else None  # None: identical
    return OutputAgreement(error, cosine=cosine, snr_db=snr)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Agreement:
    """Worst case over outputs: largest absolute error and lowest cosine; top-1 on the first output."""
    outputs = [compare_output(ref, got) for ref, got in zip(reference, candidate, strict=True)]
    cosines = [o.cosine for o in outputs if o.cosine is not None]
    ref_classes, got_classes = predictions(reference[0]), predictions(candidate[0])
    top1 = float(np.mean(ref_classes == got_classes)) if ref_classes is not None and got_classes is not None else None
    return Agreement(max(o.max_abs_error for o in outputs), min(cosines) if cosines else None, top1, outputs)


def like_reference(reference: list[np.ndarray], candidate: list[np.ndarray]) -> list[np.ndarray]:
    """Candidate outputs in the reference's dtype where the reference is integer (a runtime may hand a label back
    as float): labels are compared as labels, exactly."""
    return [
        np.rint(got).astype(ref.dtype) if ref.dtype.kind in "iub" and got.dtype.kind == "f" else got
        for ref, got in zip(reference, candidate, strict=True)
    ]


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
