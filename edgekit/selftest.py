"""Self-test vectors: held-out inputs and the outputs the compiled model gave for them on the workstation.

A device runs them after loading a bundle and before activating it; a mismatch means the bundle must not go live.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.agents.runtimes import Session
from edgekit.manifest import Manifest

INPUT_PREFIX = "in."
OUTPUT_PREFIX = "out."


def expected_tolerance(outputs: list[np.ndarray]) -> tuple[float, float]:
    """(atol, rtol): 2% of the largest expected magnitude absorbs runtime and CPU differences
    (e.g. int8 rounding on ARM vs x86), while a wrong model, runtime or corrupt load misses by far more."""
    peak = max(float(np.max(np.abs(o))) if o.size else 0.0 for o in outputs)
    return max(1e-5, 0.02 * peak), 1e-2


def write_vectors(path: Path, feeds: list[dict[str, np.ndarray]], outputs: list[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{INPUT_PREFIX}{name}": np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    arrays.update({f"{OUTPUT_PREFIX}{index}": output for index, output in enumerate(outputs)})
    np.savez(path, **arrays)


@dataclass(frozen=True)
class SelfTestResult:
    passed: bool
    max_abs_error: float
    detail: str


def run_selftest(session: Session, root: Path, manifest: Manifest) -> SelfTestResult:
    """Run the bundle's vectors through a loaded session and compare within the manifest's tolerance."""
    with np.load(root / manifest.selftest.file, allow_pickle=False) as vectors:
        inputs = {key[len(INPUT_PREFIX) :]: vectors[key] for key in vectors.files if key.startswith(INPUT_PREFIX)}
        expected = [vectors[f"{OUTPUT_PREFIX}{i}"] for i in range(len(manifest.outputs))]
    batch = manifest.inputs[0].shape[0]
    count = len(next(iter(inputs.values())))
    got_parts = [session.run({k: v[s : s + batch] for k, v in inputs.items()}) for s in range(0, count, batch)]
    got = [np.concatenate([part[i] for part in got_parts]) for i in range(len(expected))]
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
