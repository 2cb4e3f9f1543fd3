"""Self-test vectors: held-out inputs and the outputs the compiled model gave for them on the workstation.

A device runs them after loading a bundle and before activating it; a mismatch means the bundle must not go live.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgekit.agents.runtimes import Session, run_batches
from edgekit.manifest import Manifest, TensorSpec
from edgekit.samples import SampleSet, feed_size

INPUT_PREFIX = "in."
OUTPUT_PREFIX = "out."


def expected_tolerance(outputs: list[np.ndarray], quantization_error: float | None = None) -> tuple[float, float]:
    """(atol, rtol): 2% of the largest expected magnitude absorbs runtime and CPU differences, while a wrong model,
    runtime or corrupt load misses by far more. An int8 build may also miss by its own quantization error (its max
    abs error against fp32): ARM's integer kernels round differently from x86's (seen: an int8 CNN whose outputs
    peak at 0.28 came out 0.010 off on an arm64 device, 3.7% of the peak; its error against fp32 was 0.015)."""
    peak = max(float(np.max(np.abs(o))) if o.size else 0.0 for o in outputs)
    return max(1e-5, 0.02 * peak, quantization_error or 0.0), 1e-2


def write_vectors(
    path: Path, feeds: list[dict[str, np.ndarray]], outputs: list[np.ndarray], inputs: list[TensorSpec]
) -> None:
    """Inputs are stored item-major (as calibration samples are), so that axis-0 models keep the layout earlier
    agents read; outputs as `run_batches` joins them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{INPUT_PREFIX}{spec.name}": _items(feeds, spec) for spec in inputs}
    arrays.update({f"{OUTPUT_PREFIX}{index}": output for index, output in enumerate(outputs)})
    np.savez(path, **arrays)


def _items(feeds: list[dict[str, np.ndarray]], spec: TensorSpec) -> np.ndarray:
    if spec.batch_axis is None:
        return np.stack([feed[spec.name] for feed in feeds])
    return np.concatenate([np.moveaxis(feed[spec.name], spec.batch_axis, 0) for feed in feeds])


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    max_abs_error: float
    detail: str


class SelfTestVectors(NamedTuple):
    feeds: list[dict[str, np.ndarray]]  # batches the model takes
    expected: list[np.ndarray]  # its outputs over all of them
    count: int  # items in all


def selftest_vectors(root: Path, manifest: Manifest) -> SelfTestVectors:
    """The bundle's self-test inputs as feeds the model takes, and the outputs expected of them."""
    with np.load(root / manifest.selftest.file, allow_pickle=False) as vectors:
        inputs = {key[len(INPUT_PREFIX) :]: vectors[key] for key in vectors.files if key.startswith(INPUT_PREFIX)}
        expected = [vectors[f"{OUTPUT_PREFIX}{i}"] for i in range(len(manifest.outputs))]
    samples = SampleSet(inputs, None, "self-test vectors", {spec.name: spec.batch_axis for spec in manifest.inputs})
    return SelfTestVectors(list(samples.batches(feed_size(manifest.inputs))), expected, len(samples))


def run_selftest(session: Session, root: Path, manifest: Manifest) -> SelfTestResult:
    """Run the bundle's vectors through a loaded session and compare within the manifest's tolerance."""
    feeds, expected, count = selftest_vectors(root, manifest)
    got = run_batches(session, feeds)
    for index, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g.shape != e.shape:
            return SelfTestResult(False, float("inf"), f"output {index} has shape {g.shape}, expected {e.shape}")
    worst = max(float(np.max(np.abs(g.astype(np.float64) - e))) for g, e in zip(got, expected, strict=False))
    for index, (g, e) in enumerate(zip(got, expected, strict=False)):
        if not np.allclose(g, e, atol=manifest.selftest.atol, rtol=manifest.selftest.rtol):
            return SelfTestResult(
                False, worst, f"output {index} differs by up to {worst:.3g} (atol {manifest.selftest.atol:.3g})"
            )
    return SelfTestResult(True, worst, f"{count} vectors within atol {manifest.selftest.atol:.3g}")
