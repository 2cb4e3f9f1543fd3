"""An emulated arm64 device on an x86 workstation: Debian arm64 Python + aarch64 wheels under qemu-user.

`make arm64-sysroot` (python -m edgekit.compile.emulation) assembles it once from Debian's and PyPI's packages (install
time, never during a compile); `edgekit compile --verify-emulated` then runs aarch64 TVM libraries in it, so the
report holds agreement numbers from real aarch64 execution. Location: $EDGEKIT_ARM64_SYSROOT, else the user cache.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edgekit.errors import BadInput, OperationFailed
from edgekit.paths import edgekit_cache

QEMU = "qemu-aarch64-static"
DEBIAN_PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libstdc++6",
    "libgcc-s1",
    "libssl3",
    "libffi8",
    "zlib1g",
    "libexpat1",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libzstd1",
    "libgomp1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libuuid1",
    "libnsl2",
    "libtirpc3",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libcom-err2",
    "libkrb5support0",
    "libkeyutils1",
    "libcrypt1",
    "libdb5.3",
]
WHEELS = ("apache-tvm==0.25.0", "apache-tvm-ffi==0.1.12", "numpy", "ml_dtypes", "typing_extensions", "psutil")
# onnxruntime 1.32's aarch64 wheel segfaults on import under qemu-user; 1.23.2 runs (versions between: not tried).
AGENT_PINS = ("onnxruntime==1.23.2",)
AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")

# Runs inside the emulated device with only numpy and the TVM runtime: load the library, run every feed.
RUNNER = """
import sys, numpy as np, tvm
from tvm import relax
vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
feeds = np.load(sys.argv[2])
outputs = {}
for i in range(int(feeds["count"])):
    result = vm["main"](*[tvm.runtime.tensor(feeds[f"feed{i}.{j}"]) for j in range(int(feeds["inputs"]))])
    for k, out in enumerate([result] if hasattr(result, "numpy") else list(result)):
        outputs[f"out{i}.{k}"] = out.numpy()
np.savez(sys.argv[3], **outputs)
"""


def sysroot() -> Path:
    return Path(os.environ.get("EDGEKIT_ARM64_SYSROOT") or edgekit_cache() / "arm64-sysroot")


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise OperationFailed(f"{what} failed: {tail}")


def build_sysroot(dest: Path) -> None:
    """Debian arm64 packages unpacked into dest/root, aarch64 wheels unpacked into dest/site."""
    for tool in ("apt-get", "dpkg", QEMU):
        if shutil.which(tool) is None:
            raise BadInput(f"building the arm64 sysroot needs {tool} (Debian: apt-get install qemu-user-static)")
    apt = [
        "apt-get",
        "-q",
        "-oAPT::Architecture=arm64",
        "-oAPT::Architectures=arm64",
        f"-oDir::State::Lists={dest}/lists",
    ]
    (dest / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (dest / "debs").mkdir(exist_ok=True)
    _run([*apt, "update"], "apt-get update (arm64 lists)")
    subprocess.run([*apt, "download", *DEBIAN_PACKAGES], cwd=dest / "debs", capture_output=True, check=True)
    for deb in sorted((dest / "debs").glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(dest / "root")], f"unpacking {deb.name}")
    platforms = [flag for platform in AARCH64_PLATFORMS for flag in ("--platform", platform)]
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *platforms, "--python-version", "3.11",
          "--implementation", "cp", "-d", str(dest / "wheels"), *WHEELS], "pip download (aarch64 wheels)")  # fmt: skip
    for wheel in sorted((dest / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(dest / "site")
    (dest / "READY").write_text("ok\n")


def build_agent_site(dest: Path) -> None:
    """What `pip install edgekit[agent]` puts on a real arm64 device, as aarch64 wheels in dest/agent-site, less
    edgekit itself: `agent_command` adds the current checkout's edgekit on each start, so it is never stale."""
    with tempfile.TemporaryDirectory(prefix="edgekit-wheel-") as scratch:
        wheel = _edgekit_wheel(Path(scratch))
        site = dest / "agent-site"
        shutil.rmtree(site, ignore_errors=True)
        platforms = [flag for platform in AARCH64_PLATFORMS for flag in ("--platform", platform)]
        _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--only-binary=:all:", *platforms,
              "--python-version", "3.11", "--implementation", "cp", f"edgekit[agent] @ {wheel.as_uri()}",
              *AGENT_PINS], "pip install --target (aarch64 edgekit[agent])")  # fmt: skip
    for installed in [site / "edgekit", *site.glob("edgekit-*.dist-info")]:
        shutil.rmtree(installed)
    (dest / "AGENT_READY").write_text("ok\n")


def _edgekit_wheel(folder: Path) -> Path:
    """A wheel of this checkout: the same files `pip install edgekit` would put on a device."""
    project = Path(__file__).resolve().parents[2]
    if not (project / "setup.py").is_file():
        raise BadInput("the emulated arm64 agent is built from an edgekit checkout (setup.py not found)")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
          str(project)], "pip wheel (edgekit)")  # fmt: skip
    shutil.rmtree(project / "build", ignore_errors=True)
    return next(folder.glob("edgekit-*.whl"))


def agent_command(agent_args: list[str], scratch: Path) -> tuple[list[str], dict[str, str]]:
    """`edgekit agent AGENT_ARGS` as an aarch64 process under qemu-user, with this checkout's edgekit unpacked into
    scratch: the command line and its environment."""
    root = sysroot()
    if not (root / "AGENT_READY").exists():
        raise BadInput(f"no emulated arm64 agent at {root}: run `make arm64-sysroot` (or set EDGEKIT_ARM64_SYSROOT)")
    with zipfile.ZipFile(_edgekit_wheel(scratch / "wheel")) as archive:
        archive.extractall(scratch / "edgekit-site")
    python = root / "root" / "usr" / "bin" / "python3.11"
    # -P: the working directory must not shadow the unpacked edgekit (in a checkout it holds the source tree).
    command = [QEMU, "-L", str(root / "root"), str(python), "-P", "-m", "edgekit", "agent", *agent_args]
    # site/: the TVM runtime, as on a device that runs TVM bundles (and times TVM tuning trials).
    env = {**os.environ, "PYTHONPATH": f"{scratch / 'edgekit-site'}:{root / 'agent-site'}:{root / 'site'}"}
    return command, env


def run_tvm_library(library: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Run an aarch64 TVM library on the feeds under qemu; outputs concatenated over feeds, in output order."""
    root = sysroot()
    if not (root / "READY").exists():
        raise BadInput(f"no arm64 sysroot at {root}: run `make arm64-sysroot` (or set EDGEKIT_ARM64_SYSROOT)")
    with tempfile.TemporaryDirectory(prefix="edgekit-emulated-") as scratch:
        work = Path(scratch)
        arrays = {f"feed{i}.{j}": a for i, feed in enumerate(feeds) for j, a in enumerate(feed.values())}
        np.savez(work / "feeds.npz", count=len(feeds), inputs=len(feeds[0]), **arrays)
        (work / "runner.py").write_text(RUNNER)
        python = root / "root" / "usr" / "bin" / "python3.11"
        command = [QEMU, "-L", str(root / "root"), str(python), str(work / "runner.py"), str(library),
                   str(work / "feeds.npz"), str(work / "outputs.npz")]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(root / "site")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip() or "no output").splitlines()[-1]
            raise OperationFailed(f"emulated aarch64 run of {library.name} failed: {tail}")
        with np.load(work / "outputs.npz") as outputs:
            count = sum(1 for key in outputs.files if key.startswith("out0."))
            return [np.concatenate([outputs[f"out{i}.{k}"] for i in range(len(feeds))]) for k in range(count)]


if __name__ == "__main__":
    target = sysroot()
    if (target / "READY").exists():
        print(f"arm64 sysroot ready at {target}")
    else:
        build_sysroot(target)
        print(f"built arm64 sysroot at {target}")
    if not (target / "AGENT_READY").exists():
        build_agent_site(target)
        print(f"built the emulated arm64 agent (edgekit[agent] for aarch64) at {target / 'agent-site'}")
