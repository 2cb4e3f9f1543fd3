"""Every candidate bundle for a MobileNetV2-224 model vs plain ONNX Runtime fp32, measured side by side.

Each candidate is compiled into a real bundle (`edgekit compile --backend B --precision P`), then all bundles
and the ORT fp32 baseline are loaded together and timed in interleaved rounds (see `interleaved`). The model is
generated in code (random weights, exact MobileNetV2 architecture) and calibrated on synthetic images: speed
numbers are representative; agreement only shows the quantizer works.
Target (issue #2): best int8 candidate <= 0.40x ONNX Runtime fp32 latency.

    python benchmarks/compile_bench.py [--profile x86-64-avx512] [--rounds 10] [--block 0.5]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from edgekit.agents.runtimes import Session, get_runtime
from edgekit.bundle import open_bundle
from edgekit.compile.measure import measure_latency
from edgekit.compile.pipeline import CompileRequest, compile_model
from edgekit.compile.synthetic import mobilenet_v2
from edgekit.profiles import load_profile
from edgekit.progress import RichProgress

TARGET_INT8_RATIO = 0.40
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def synthetic_images(count: int, resolution: int) -> np.ndarray:
    """Smooth random images (blocky low-frequency noise), normalised like ImageNet inputs."""
    rng = np.random.default_rng(0)
    coarse = rng.random((count, 3, resolution // 16, resolution // 16), dtype=np.float32)
    images = coarse.repeat(16, axis=2).repeat(16, axis=3)
    return (images - IMAGENET_MEAN) / IMAGENET_STD


def compile_candidates(work: Path, profile: str, progress: RichProgress) -> list[tuple[str, Path, float]]:
    """(label, bundle, cosine vs fp32) for every candidate the profile lists that builds here."""
    built = []
    for candidate in load_profile(profile).candidates:
        request = CompileRequest(
            model=work / "mobilenet_v2.onnx",
            profile=load_profile(profile),
            out=work / f"{candidate.backend}-{candidate.precision}.ekb",
            backend=candidate.backend,
            precision=candidate.precision,
            calibration=work / "calibration.npz",
            max_accuracy_drop=100.0,  # random weights: report agreement, do not gate on it
            min_cosine=0.0,
            bench_seconds=0.2,
        )
        _, manifest = compile_model(request, progress)
        built.append((f"{candidate.backend} {candidate.precision}", request.out, manifest.verification.cosine))
    return built


def interleaved(sessions: dict[str, Session], feed: dict, baseline: str, rounds: int, block: float):
    """Per session: (median p50 over rounds, median ratio to the baseline's p50 in the same round).

    Each round times every session for `block` seconds in turn. Blocks, not single inferences, because the
    runtimes' thread pools keep spinning briefly after a call and would slow whichever runtime runs next;
    same-round ratios, because load from elsewhere on a shared machine drifts between rounds."""
    per_round: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            per_round[label].append(measure_latency(lambda s=session: s.run(feed), max_seconds=block).p50_ms)
    ratios = {
        label: float(np.median(np.asarray(values) / np.asarray(per_round[baseline])))
        for label, values in per_round.items()
    }
    return {label: (float(np.median(values)), ratios[label]) for label, values in per_round.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="x86-64-avx512")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=float, default=0.5, help="seconds per candidate per round")
    parser.add_argument("--samples", type=int, default=64, help="synthetic calibration images")
    args = parser.parse_args()
    console = Console(width=120)
    baseline = "onnxruntime fp32 (plain InferenceSession)"
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as scratch:
        work = Path(scratch)
        onnx.save(mobilenet_v2(), str(work / "mobilenet_v2.onnx"))
        np.savez(work / "calibration.npz", input=synthetic_images(args.samples, 224))
        with RichProgress() as progress:
            built = compile_candidates(work, args.profile, progress)
        sessions = {baseline: get_runtime("onnxruntime").load(work / "mobilenet_v2.onnx", {})}
        sizes = {baseline: (work / "mobilenet_v2.onnx").stat().st_size}
        for label, bundle, _ in built:
            root = work / bundle.stem
            manifest = open_bundle(bundle, root, trust_key=None)
            sessions[label] = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target)
            sizes[label] = sum(f.size for f in manifest.files if f.path.startswith("artifacts/"))
        feed = {"input": synthetic_images(1, 224)}
        timed = interleaved(sessions, feed, baseline, args.rounds, args.block)
    cosines = {label: cosine for label, _, cosine in built}
    title = f"MobileNetV2-224, batch 1, profile {args.profile}, {args.rounds} interleaved rounds of {args.block} s"
    table = Table(title=title)
    for column in ("candidate", "p50 ms", "vs ORT fp32", "artifact size", "cosine vs fp32"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for label, (p50, ratio) in timed.items():
        table.add_row(
            label, f"{p50:.2f}", f"{ratio:.2f}x", f"{sizes[label] / 1e6:.1f} MB", f"{cosines.get(label, 1.0):.4f}"
        )
    console.print(table)
    int8 = {label: ratio for label, (_, ratio) in timed.items() if label.endswith("int8")}
    if not int8:
        console.print("no int8 candidate was built")
        return 1
    best = min(int8, key=int8.get)
    verdict = "meets" if int8[best] <= TARGET_INT8_RATIO else "misses"
    console.print(
        f"best int8: {best} at {int8[best]:.2f}x ORT fp32 latency; {verdict} the {TARGET_INT8_RATIO:.2f}x target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
