"""`edgekit bench`: latency of a bundle (through its runtime adapter) or a plain ONNX model on this host."""

import tempfile
from pathlib import Path

import numpy as np

from edgekit.agents.runtimes import Session, get_runtime, runtimes
from edgekit.bundle import open_bundle
from edgekit.compile.calibration import synthetic_feed
from edgekit.compile.measure import measure_latency
from edgekit.errors import BadInput, OperationFailed
from edgekit.schema import StrictModel
from edgekit.selftest import run_selftest


class BenchResult(StrictModel):
    subject: str
    runtime: str
    device: str
    batch_size: int
    iterations: int
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_per_s: float
    selftest: str | None = None


def _measure(
    subject: Path,
    runtime: str,
    session: Session,
    feed: dict[str, np.ndarray],
    seconds: float,
    selftest: str | None = None,
) -> BenchResult:
    latency = measure_latency(lambda: session.run(feed), max_seconds=seconds)
    batch = len(next(iter(feed.values())))
    return BenchResult(
        subject=str(subject),
        runtime=runtime,
        device=session.device,
        batch_size=batch,
        iterations=latency.iterations,
        latency_p50_ms=latency.p50_ms,
        latency_p95_ms=latency.p95_ms,
        throughput_per_s=latency.throughput_per_s * batch,
        selftest=selftest,
    )


def bench_bundle(path: Path, seconds: float, threads: int | None) -> BenchResult:
    """Unpack, check file hashes, load through the bundle's runtime, run its self-test, then time it."""
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as scratch:
        root = Path(scratch)
        manifest = open_bundle(path, root, trust_key=None)
        if manifest.runtime not in runtimes():
            raise BadInput(
                f"{path}: this {manifest.profile} bundle runs with '{manifest.runtime}' on the device, which this host "
                f"cannot run; its compile-time estimate is in `edgekit inspect` (build details)"
            )
        session = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target, threads)
        selftest = run_selftest(session, root, manifest)
        if not selftest.passed:
            raise OperationFailed(f"{path}: self-test failed on this host: {selftest.detail}")
        feed = synthetic_feed(manifest.inputs)
        return _measure(path, manifest.runtime, session, feed, seconds, f"passed ({selftest.detail})")


def bench_model(path: Path, seconds: float, threads: int | None, input_shapes: dict[str, list[int]]) -> BenchResult:
    """Check the model as `compile` does, then time it with ONNX Runtime fp32 on synthetic inputs."""
    from edgekit.compile.intake import prepare_model

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as scratch:
        model = prepare_model(path, Path(scratch), input_shapes)
        session = get_runtime("onnxruntime").load(model.path, {}, threads)
        feed = synthetic_feed(model.inputs, model.value_hints)
        return _measure(path, "onnxruntime", session, feed, seconds)


def bench(path: Path, seconds: float, threads: int | None, input_shapes: dict[str, list[int]]) -> BenchResult:
    if path.suffix == ".ekb":
        return bench_bundle(path, seconds, threads)
    if path.suffix == ".onnx":
        return bench_model(path, seconds, threads, input_shapes)
    raise BadInput(f"{path}: expected a bundle (.ekb) or an ONNX model (.onnx)")
