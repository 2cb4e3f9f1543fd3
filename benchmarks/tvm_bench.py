"""TVM on MobileNetV2-224 (x86 profile): untuned vs tuned vs ONNX Runtime fp32 vs the best other candidate, and
what the tuning database saves on a second compile — all in one run, timed side by side.

    python benchmarks/tvm_bench.py [--trials 2000] [--rounds 10] [--block 0.5]

Targets (issues #3, #19): tuned TVM <= 1.5x ORT fp32 within a 30-minute tuning budget on this 2-core machine; a
second compile with the database >= 5x faster than the first tuned compile, at the same latency within noise. Also: TVM
int8 (ONNX Runtime's QDQ graph imported into Relax) tuned on top of the fp32 database.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from compile_bench import interleaved, synthetic_images
from rich.console import Console
from rich.table import Table

from edgekit.agents.runtimes import get_runtime
from edgekit.bundle import open_bundle
from edgekit.compile.pipeline import CompileRequest, compile_model
from edgekit.compile.synthetic import mobilenet_v2
from edgekit.profiles import Candidate, load_profile
from edgekit.progress import RichProgress

TARGET_RATIO = 1.5  # tuned TVM fp32 over ONNX Runtime fp32 (issues #3 and #19)
TARGET_TUNING_S = 30 * 60


def host_profile() -> str:
    """The x86 profile this host can run TVM's code for: AVX-512 where the CPU has it, else AVX2 (an AVX-512 build
    dies of an illegal instruction on a CPU without it)."""
    return "x86-64-avx512" if load_profile("x86-64-avx512").host_can_run() else "x86-64-avx2"


def compile_bundle(work: Path, name: str, candidate: Candidate, progress: RichProgress,
                   profile_name: str) -> tuple[Path, float]:  # fmt: skip
    """(bundle, seconds) for one candidate on the profile."""
    profile = load_profile(profile_name).model_copy(update={"candidates": [candidate]})
    request = CompileRequest(
        model=work / "mobilenet_v2.onnx", profile=profile, out=work / f"{name}.ekb", backend=candidate.backend,
        precision=candidate.precision, calibration=work / "calibration.npz", max_accuracy_drop=100.0, min_cosine=0.0,
        bench_seconds=0.2,
    )  # fmt: skip
    started = time.perf_counter()
    compile_model(request, progress)
    return request.out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2000, help="MetaSchedule trials for the tuned fp32 build")
    parser.add_argument("--int8-trials", type=int, default=500, help="trials for the int8 (QDQ) build's own tasks")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=float, default=0.5)
    parser.add_argument("--profile", default=None, help="x86 profile [default: the host's, AVX-512 or AVX2]")
    args = parser.parse_args()
    profile = args.profile or host_profile()
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="edgekit-tvm-bench-") as scratch:
        work = Path(scratch)
        onnx.save(mobilenet_v2(), str(work / "mobilenet_v2.onnx"))
        np.savez(work / "calibration.npz", input=synthetic_images(64, 224))
        db = str(work / "tuning-db")
        untuned = Candidate(backend="tvm", precision="fp32", options={"database": str(work / "empty-db")})
        tuned = Candidate(backend="tvm", precision="fp32", options={"database": db, "tune_trials": args.trials})
        # Same database: the QDQ graph shares no fused kernels with fp32, so its tasks get their own trials.
        int8 = Candidate(backend="tvm", precision="int8", options={"database": db, "tune_trials": args.int8_trials})
        with RichProgress() as progress:
            builds = {label: compile_bundle(work, name, candidate, progress, profile) for label, name, candidate in (
                ("tvm fp32 untuned", "untuned", untuned),
                (f"tvm fp32 tuned ({args.trials} trials)", "tuned", tuned),
                ("tvm fp32 tuned, 2nd compile (database)", "again", tuned),
                (f"tvm int8 QDQ tuned (+{args.int8_trials} trials)", "int8", int8),
                ("openvino int8", "ov", Candidate(backend="openvino", precision="int8")),
            )}  # fmt: skip
        baseline = "onnxruntime fp32"
        sessions = {baseline: get_runtime("onnxruntime").load(work / "mobilenet_v2.onnx", {})}
        for label, (bundle, _) in builds.items():
            root = work / bundle.stem
            manifest = open_bundle(bundle, root, trust_key=None)
            sessions[label] = get_runtime(manifest.runtime).load(root / manifest.entrypoint, manifest.target)
        timed = interleaved(sessions, {"input": synthetic_images(1, 224)}, baseline, args.rounds, args.block)
    table = Table(title=f"MobileNetV2-224 on {profile}, {args.rounds} interleaved rounds of {args.block} s")
    for column in ("build", "compile s", "p50 ms", "vs ORT fp32"):
        table.add_column(column, justify="left" if column == "build" else "right")
    for label, (p50, ratio) in timed.items():
        seconds = f"{builds[label][1]:.1f}" if label in builds else "-"
        table.add_row(label, seconds, f"{p50:.2f}", f"{ratio:.2f}x")
    console.print(table)
    first = builds[f"tvm fp32 tuned ({args.trials} trials)"][1]
    second = builds["tvm fp32 tuned, 2nd compile (database)"][1]
    console.print(
        f"database reuse: second compile {second:.1f} s vs first {first:.1f} s = {first / second:.1f}x faster"
    )
    ratio = timed[f"tvm fp32 tuned ({args.trials} trials)"][1]
    met = ratio <= TARGET_RATIO and first <= TARGET_TUNING_S
    console.print(
        f"target: tuned TVM fp32 <= {TARGET_RATIO}x ONNX Runtime fp32 within {TARGET_TUNING_S / 60:.0f} min of "
        f"compiling: {ratio:.2f}x after {first / 60:.1f} min: {'met' if met else 'MISSED'}"
        + ("" if met else f" (by {ratio / TARGET_RATIO:.2f}x)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
