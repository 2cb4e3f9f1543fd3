"""`make demo`: the whole workstation loop on one machine, shown command by command.

Trains the digits classifier, compiles it to a signed int8 bundle for an AVX-512 x86 device, then inspects,
verifies and benchmarks the bundle. Everything lands in ./demo-out. The device agent and the hub join this
demo when they exist (see the open issues); until then it stops after the bundle.
"""

import shlex
import subprocess
import sys
from pathlib import Path

OUT = Path("demo-out")
EDGEKIT = str(Path(sys.executable).with_name("edgekit"))


def step(title: str, *command: str) -> None:
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    keys = OUT / "keys"
    bundle = OUT / "digits-int8.ekb"
    step(
        "train a digit classifier on scikit-learn's digits and export ONNX",
        sys.executable,
        "examples/digits/train.py",
        str(OUT / "digits"),
    )
    if not (keys / "edgekit.key").exists():
        step("create a signing key pair", EDGEKIT, "keys", "generate", str(keys))
    step(
        "compile to int8 for an x86-64 AVX-512 device, verified against fp32",
        EDGEKIT,
        "compile",
        str(OUT / "digits" / "digits.onnx"),
        "--profile",
        "x86-64-avx512",
        "--precision",
        "int8",
        "--calibration",
        str(OUT / "digits" / "calibration.npz"),
        "--sign-key",
        str(keys / "edgekit.key"),
        "-o",
        str(bundle),
    )
    step("what is in the bundle", EDGEKIT, "inspect", str(bundle))
    step(
        "check signature and every file hash", EDGEKIT, "verify", str(bundle), "--trust-key", str(keys / "edgekit.pub")
    )
    step(
        "benchmark the bundle through its runtime (after its self-test)",
        EDGEKIT,
        "bench",
        str(bundle),
        "--seconds",
        "2",
    )
    print(
        "\nThe agent (run the bundle on a device, MQTT telemetry) and the hub (fleet dashboard, rollouts) join "
        "this demo in a later issue."
    )


if __name__ == "__main__":
    main()
