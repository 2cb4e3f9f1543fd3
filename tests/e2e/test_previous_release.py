"""The previous release against this one (#15): a fleet is never upgraded in lockstep.

The previous release is built in the test from the git history — `git archive` of a pinned commit, then a wheel,
installed into a folder of its own — and run as separate processes with that folder first on PYTHONPATH:

- its agent, enrolled on this hub: online, telemetry stored, and an update rolled out to it;
- this agent, enrolled on its hub (its `edgekit hub`, `hub enroll` and REST API): the same.
"""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hub_helpers import wait_until

from edgekit.enrollment import write_enrollment
from edgekit.hub.broker import free_port
from edgekit.hub.client import HubClient
from edgekit.hub.db import Deployment, Device, TelemetrySample

REPO = Path(__file__).resolve().parents[2]
# Release 0.2.0 (#16: replicas, HTTP downloads, deltas): the release this one (0.3.0) must work with. Moved on from
# 0.1 (1cf2a5ab, before tolerant payloads) at this release, as docs/protocol.md "Compatibility" asks: a 0.1 hub
# refuses the telemetry of a 0.3 agent (its model-health blocks are fields it does not know), so 0.3 agents need
# the hub at 0.2 or later (docs/protocol.md).
PREVIOUS_RELEASE = "4ffbe6fed2be0ca09203b2b0e5bd25a9c327cf42"
TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that runs the previous release: PYTHONPATH = a folder with its wheel installed."""
    work = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_RELEASE], capture_output=True)
    assert archive.returncode == 0, (
        f"commit {PREVIOUS_RELEASE[:12]} (the previous release) is not in this clone's history: "
        f"{archive.stderr.decode().strip()} (a shallow clone? clone with full history)"
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(work / "src", filter="tar")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", work / "dist", work / "src"],
                   check=True, capture_output=True)  # fmt: skip
    wheel = next((work / "dist").glob("edgekit-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", work / "site", wheel], check=True,
                   capture_output=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(work / "site"), "PYTHONUNBUFFERED": "1"}
    # Run from a folder without edgekit in it: `python -m`/`-c` put the working directory first on sys.path.
    where = subprocess.run([sys.executable, "-c", "import edgekit; print(edgekit.__file__)"], env=env, text=True,
                           capture_output=True, check=True, cwd=work).stdout  # fmt: skip
    assert where.startswith(str(work / "site")), f"the previous release did not shadow this one: {where}"
    return env


class Processes:
    """Processes started by a test, each with its output in a file; all stopped (SIGTERM, then kill) at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 (kept open for the process's lifetime)
        process = subprocess.Popen([sys.executable, "-m", "edgekit", *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=env, text=True, cwd=self.folder)  # fmt: skip
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def stop(self) -> None:
        for process in self.started:
            process.terminate()
        for process in self.started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes(tmp_path: Path):
    started = Processes(tmp_path)
    yield started
    started.stop()


def _agent_args(enrollment: Path, data: Path, bundle: Path) -> list[str]:
    return ["agent", "--enrollment", str(enrollment), "--data", str(data), "--bundle", str(bundle),
            "--source", "synthetic:?fps=5", "--telemetry-s", "0.5"]  # fmt: skip


def test_the_previous_agent_works_with_this_hub(make_hub, cnn_bundles, previous, processes, tmp_path):
    hub = make_hub(trust_key=cnn_bundles["public"])
    enrollment = tmp_path / "old-1.enrollment.json"
    write_enrollment(enrollment, hub.enroll(["old-1"])[0])
    processes.start("old-agent", _agent_args(enrollment, tmp_path / "old-agent", cnn_bundles["v1"]), previous)

    def telemetry_stored() -> int | None:
        with hub.sessions() as session:
            count = session.query(TelemetrySample).filter(TelemetrySample.device_id == "old-1").count()
            device = session.get(Device, "old-1")
        return count if count >= 3 and device is not None and device.online else None

    wait_until(telemetry_stored, TIMEOUT_S, "the previous release's agent online with telemetry stored")
    pushed, _ = hub.registry.add(cnn_bundles["v2"], "test")
    deployment = hub.rollouts.create(pushed.id, "all", wave_timeout_s=60, actor="test", health_checks=3)

    def finished() -> Deployment | None:
        with hub.sessions() as session:
            row = session.get(Deployment, deployment.id)
        return row if row.state != "running" else None

    done = wait_until(finished, TIMEOUT_S, "the rollout to the previous release's agent")
    assert done.state == "completed", (done.reason, processes.log("old-agent")[-3000:])
    with hub.sessions() as session:
        reported = session.get(Device, "old-1").reported
    assert reported["bundle"]["version"] == "2.0.0" and reported["update"]["state"] == "healthy"


def _admin_token(processes: Processes, name: str) -> str:
    def token() -> str | None:
        lines = [line for line in processes.log(name).splitlines() if "admin token" in line]
        return lines[0].split()[-1] if lines else None

    return wait_until(token, TIMEOUT_S, f"the admin token from {name}")


def test_this_agent_works_with_the_previous_hub(cnn_bundles, previous, processes, tmp_path):
    data, port = tmp_path / "old-hub", free_port()
    processes.start("old-hub", ["hub", "--data", str(data), "--http", f"127.0.0.1:{port}", "--broker-port",
                                str(free_port()), "--trust-key", str(cnn_bundles["public"])], previous)  # fmt: skip
    client = HubClient(f"http://127.0.0.1:{port}", _admin_token(processes, "old-hub"))
    enrollment = tmp_path / "new-1.enrollment.json"
    enrolled = subprocess.run([sys.executable, "-m", "edgekit", "hub", "enroll", "new-1", "--data", str(data),
                               "--out", str(enrollment)], env=previous, capture_output=True, text=True,
                              cwd=tmp_path)  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    processes.start("new-agent", _agent_args(enrollment, tmp_path / "new-agent", cnn_bundles["v1"]))

    def online_with_telemetry() -> dict | None:
        devices = {d["id"]: d for d in client.devices()}
        device = devices.get("new-1")
        return device if device and device["online"] and device.get("fps") else None

    wait_until(online_with_telemetry, TIMEOUT_S, "this agent online on the previous hub, with telemetry")
    pushed = client.push(cnn_bundles["v2"])
    deployment = client.deploy(pushed["id"], "all", wave_timeout_s=60, health_checks=3)
    done = wait_until(lambda: (d := client.deployment(deployment["id"]))["state"] != "running" and d, TIMEOUT_S,
                      "the previous hub's rollout to this agent")  # fmt: skip
    assert done["state"] == "completed", (done, processes.log("new-agent")[-3000:])
    device = client.device("new-1")
    assert device["reported"]["bundle"]["version"] == "2.0.0", device
    assert device["reported"]["update"]["state"] == "healthy", device
    client.close()
