"""What drift monitoring costs the agent per inference, beside the inference itself (edgekit.agents.drift).

MobileNetV2-224 (random weights, 1×3×224×224 float32 in, 1,000 classes out) on ONNX Runtime: the model's p50 per
inference, then `DriftMonitor.observe` on the same input and output and its parts (features, binary searches).

    python benchmarks/drift_bench.py [--rounds 2000]
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from edgekit.agents.drift import DriftMonitor
from edgekit.agents.runtimes import get_runtime
from edgekit.compile.synthetic import mobilenet_v2
from edgekit.drift import bin_indices, build_reference, sample_features

REFERENCE_SAMPLES = 300


def median_us(call: Callable[[], object], rounds: int) -> float:
    """Median wall time of `call` over `rounds` calls, in µs (after one warm-up call)."""
    call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "mobilenet_v2.onnx"
        onnx.save(mobilenet_v2(resolution=224, width=1.0), str(path))
        session = get_runtime("onnxruntime").load(path, {})
        images = rng.random((REFERENCE_SAMPLES, 3, 224, 224), dtype=np.float32)
        outputs = np.concatenate([session.run({"input": image[None]})[0] for image in images])
        reference = build_reference({"input": images}, {"input": "NCHW"}, outputs)
        feeds, output = {"input": images[:1]}, [outputs[:1]]
        inference = median_us(lambda: session.run(feeds), max(20, args.rounds // 20))
    monitor = DriftMonitor(reference)
    edges = [np.asarray(f.edges) for f in reference.features]
    values = sample_features(reference, feeds, output[0])
    observe = median_us(lambda: monitor.observe(feeds, output), args.rounds)
    features = median_us(lambda: sample_features(reference, feeds, output[0]), args.rounds)
    bins = median_us(lambda: bin_indices(edges, values), args.rounds)
    print(f"MobileNetV2-224 inference p50: {inference / 1000:.2f} ms")
    print(f"DriftMonitor.observe p50: {observe:.0f} µs ({observe / inference:.2%} of the inference); "
          f"features {features:.0f} µs, binary searches {bins:.0f} µs; {len(reference.features)} features, "
          f"reference {len(reference.model_dump_json())} bytes of JSON")  # fmt: skip


if __name__ == "__main__":
    main()
