"""edgekit: compile, verify, sign and ship ONNX models to edge devices, then run and watch them there."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    for line in (ROOT / "edgekit" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("edgekit/__init__.py has no __version__")


# The user's top-level folders `agents/`, `compilers/` and `firmware_profiles/` are installed inside the edgekit
# namespace (no bare `agents` import name is claimed: an `agents` distribution already exists on PyPI). The links
# edgekit/agents -> ../agents (and the others) express that on disk, so the package is one ordinary tree that
# import-graph tools, type checkers and IDEs follow without a package_dir mapping.
PACKAGES = find_packages(include=["edgekit", "edgekit.*"])

RUNTIME_ORT = ["onnxruntime>=1.20"]
EXTRAS = {
    # Workstation side: ONNX intake, quantization and the compiler backends.
    "compile": [
        "onnx>=1.16",
        "onnxslim>=0.1.40",
        *RUNTIME_ORT,
        "openvino>=2025.0",
        "nncf>=2.14",
        "opencv-python-headless>=4.8",
        # TVM pinned with its FFI: newer pairs crash or fail in MetaSchedule tuning (docs/tvm.md).
        "apache-tvm==0.25.0",
        "apache-tvm-ffi==0.1.12",
        "psutil>=5.9",
        "cloudpickle>=2.0",
        "tornado>=6.0",
        "xgboost-cpu>=2.0",
    ],
    # Device side: runtimes only, never the compiler stack.
    # zstandard: delta updates (edgekit/delta.py), on both ends of the transfer.
    "agent": [
        *RUNTIME_ORT,
        "paho-mqtt>=2.0",
        "pyserial>=3.5",
        "opencv-python-headless>=4.8",
        "psutil>=5.9",
        "zstandard>=0.22",
    ],
    "hub": [
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "sqlalchemy>=2.0",
        # Schema migrations: the hub upgrades its database on start (edgekit/hub/migrations).
        "alembic>=1.13",
        "amqtt>=0.11",
        "paho-mqtt>=2.0",
        "zstandard>=0.22",
        # /metrics exposition, and the HTTP client `edgekit push/deploy/devices` talk to the hub with.
        "prometheus-client>=0.20",
        "httpx>=0.27",
        # Swagger UI vendored, so /docs needs no CDN.
        "fastapi-offline>=1.7",
        # `edgekit hub --jetstream`: device messages from a NATS cluster's JetStream (edgekit/hub/jetstream.py).
        "nats-py>=2.16",  # the version tested here
    ],
    # The hub's bundle bytes in an S3 bucket (`edgekit hub --bundle-store s3://…`) instead of its database.
    "s3": ["boto3>=1.28"],
    # onnx2tf imports onnx_graphsurgeon and sng4onnx without declaring them.
    "tflite": [
        "tensorflow-cpu>=2.15",
        "tf_keras>=2.15",
        "onnx2tf>=1.20",
        "onnx-graphsurgeon>=0.5",
        "sng4onnx>=1.0",
        "ai-edge-litert>=1.0",
        "ethos-u-vela>=4.0",
    ],
    # amqtt: the in-process broker tests run against; playwright drives Debian's chromium; psycopg for PostgreSQL.
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        # `make lint`: import rules (.importlinter) and the type check of the shared contracts (mypy.ini).
        "import-linter>=2.1",
        "mypy>=1.10",
        "types-PyYAML>=6.0",
        "scikit-learn>=1.4",
        # Exports the scikit-learn models of the real-model corpus (benchmarks/zoo_corpus.py).
        "skl2onnx>=1.17",
        "amqtt>=0.11",
        "hypothesis>=6.100",
        "playwright>=1.40",
        "psycopg[binary]>=3.1",
        # The S3 bundle store is tested against moto's S3 server: no S3 service is reachable here.
        "boto3>=1.28",
        "moto[server]>=5.0",
    ],
}
EXTRAS["all"] = sorted({req for name in ("compile", "agent", "hub", "tflite") for req in EXTRAS[name]})

setup(
    name="edgekit",
    version=read_version(),
    description=__doc__,
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else __doc__,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_data={
        "edgekit.firmware_profiles": ["*.yaml"],
        "edgekit.agents": ["systemd/*.service"],
        "edgekit.hub": ["static/*", "static/**/*"],
        # The revisions are read by Alembic from files, not imported as a package.
        "edgekit.hub.migrations": ["script.py.mako", "versions/*.py"],
    },
    install_requires=[
        "numpy>=1.24",
        "pydantic>=2.6",
        "pyyaml>=6.0",
        "typer>=0.12",
        "rich>=13.7",
        "cryptography>=42",
        "platformdirs>=4.0",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["edgekit=edgekit.cli:main"]},
)
