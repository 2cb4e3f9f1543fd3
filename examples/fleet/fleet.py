"""A mixed fleet under one hub: an x86-64 agent and an emulated arm64 agent receive the same staged rollout.

The arm64 agent is `edgekit agent` itself running as an aarch64 process under qemu-user, with Debian's arm64
Python and the aarch64 wheels of `edgekit[agent]` (`make arm64-sysroot` assembles them). One ONNX Runtime int8
bundle, compiled for the `rpi4` profile, serves both architectures; the hub rolls it out canary first, then the
rest, and each device reports it running with its own latency.

    python examples/fleet/fleet.py OUT [--duration 30] [--json]

It exits 0 once the rollout has completed and both devices have sent results on the new bundle (after
`--duration` more seconds of live summary), 1 otherwise.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from edgekit.compile import emulation
from edgekit.demo import compile_bundle, train
from edgekit.enrollment import write_enrollment
from edgekit.hub.broker import free_port
from edgekit.hub.db import Deployment, Device, ResultRecord
from edgekit.hub.service import Hub, HubSettings
from edgekit.mqtt import redact_url
from edgekit.signing import generate_keypair

PROFILE = "rpi4"
DEVICES = {"x86-1": "x86-64-avx2", "arm64-1": PROFILE}
SOURCE = "synthetic:?fps=2"
TIMEOUT_S = 240  # the emulated agent needs ~20 s to import its runtime under qemu on a 2-core machine

console = Console(stderr=True)


def build(out: Path) -> tuple[Path, Path]:
    """(bundle, public key): the digits classifier as a signed ONNX Runtime int8 bundle for rpi4."""
    train(out / "digits", console)
    if not (out / "keys" / "edgekit.key").exists():
        generate_keypair(out / "keys")
    bundle = compile_bundle(out / "digits" / "digits.onnx", out / "digits" / "calibration.npz",
                            out / "keys" / "edgekit.key", PROFILE, out / "digits-rpi4.ekb", console,
                            backend="onnxruntime")  # fmt: skip
    return bundle, out / "keys" / "edgekit.pub"


class Agents:
    """The two device processes: one native, one aarch64 under qemu-user."""

    def __init__(self, out: Path, enrollments: dict[str, Path]) -> None:
        self.out = out
        self.scratch = tempfile.TemporaryDirectory(prefix="edgekit-fleet-")
        self.processes: dict[str, subprocess.Popen] = {}
        self.commands: dict[str, list[str]] = {}
        for device_id, profile in DEVICES.items():
            args = ["--enrollment", str(enrollments[device_id]), "--source", SOURCE, "--data", str(out / device_id),
                    "--telemetry-s", "1", "--profile", profile]  # fmt: skip
            if profile == PROFILE:
                command, env = emulation.agent_command(args, Path(self.scratch.name))
            else:
                command, env = [sys.executable, "-m", "edgekit", "agent", *args], None
            log = open(out / f"{device_id}.log", "w")  # noqa: SIM115 (kept open for the agent's lifetime)
            self.processes[device_id] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            self.commands[device_id] = command
            console.print(f"agent {device_id} ({describe(command)}): pid {self.processes[device_id].pid}")

    def check_alive(self) -> None:
        for device_id, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.out / f"{device_id}.log").read_text()[-1500:]
                raise SystemExit(f"agent {device_id} exited with {process.returncode}:\n{tail}")

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.scratch.cleanup()


def enroll(hub: Hub, out: Path) -> dict[str, Path]:
    """Each device's enrollment file (0600), by id."""
    files = {}
    for enrollment in hub.enroll(list(DEVICES)):
        files[enrollment.device_id] = out / f"{enrollment.device_id}.enrollment.json"
        write_enrollment(files[enrollment.device_id], enrollment)
    return files


def describe(command: list[str]) -> str:
    return "aarch64 under qemu-user" if command[0] == emulation.QEMU else f"{platform.machine()}, native"


def wait_for(condition, agents: Agents, what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agents.check_alive()
        if value := condition():
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def devices(hub: Hub) -> dict[str, Device]:
    with hub.sessions() as session:
        return {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(DEVICES)))}


def results_on(hub: Hub, device_id: str, since: float) -> int:
    with hub.sessions() as session:
        return session.scalar(select(func.count()).select_from(ResultRecord)
                              .where(ResultRecord.device_id == device_id, ResultRecord.ts >= since))  # fmt: skip


def summary(hub: Hub, agents: Agents, bundle_id: str, deployment: dict[str, Any], since: float) -> dict[str, Any]:
    rows = {}
    for device_id, device in devices(hub).items():
        rows[device_id] = {"profile": device.profile, "runs_as": describe(agents.commands[device_id]),
                           "bundle": device.bundle_id, "on_new_bundle": device.bundle_id == bundle_id,
                           "latency_p50_ms": device.latency_p50_ms,
                           "results_since_rollout": results_on(hub, device_id, since)}  # fmt: skip
    return {"bundle": bundle_id, "deployment": deployment, "devices": rows}


def run(out: Path, duration: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    bundle, public_key = build(out)
    hub = Hub(HubSettings(data_dir=out / "hub", http_port=free_port(), broker_port=free_port(), trust_key=public_key))
    hub.start()
    agents = None
    try:
        if not (hub.wait_connected(20) and hub.wait_http(20)):
            raise SystemExit("the hub did not start (broker or HTTP server)")
        console.print(f"hub: broker {redact_url(hub.broker_url)}, dashboard {hub.http_url}")
        # Each device is enrolled as in the field: its own password, and the hub's and the bundles' keys.
        agents = Agents(out, enroll(hub, out))
        wait_for(lambda: sum(d.online for d in devices(hub).values()) == len(DEVICES), agents,
                 "both devices to come online")  # fmt: skip
        record, _ = hub.registry.add(bundle, "fleet example")
        deployment = hub.rollouts.create(record.id, "all", canary_percent=50, wave_percent=50, health_checks=5,
                                         actor="fleet example")  # fmt: skip
        started = time.time()
        console.print(f"rollout {deployment.id}: {record.name}@{record.version} → all (canary: 1 of 2 devices)")
        state = wait_for(lambda: _finished(hub, deployment.id), agents, "the rollout to finish")
        console.print(f"rollout {deployment.id}: {state['state']} {state['reason']}")
        time.sleep(duration)
        agents.check_alive()
        return summary(hub, agents, record.id, state, started)
    finally:
        if agents is not None:
            agents.stop()
        hub.stop()


def _finished(hub: Hub, deployment_id: int) -> dict[str, Any] | None:
    with hub.sessions() as session:
        deployment = session.get(Deployment, deployment_id)
        done = deployment.state in ("completed", "halted")
        return {"id": deployment.id, "state": deployment.state, "reason": deployment.reason} if done else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="Working folder: model, keys, bundle, hub and agent data, logs")
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds of live results after the rollout")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON on stdout")
    args = parser.parse_args()
    result = run(args.out, args.duration)
    ok = result["deployment"]["state"] == "completed" and all(
        d["on_new_bundle"] and d["results_since_rollout"] > 0 for d in result["devices"].values()
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for device_id, row in result["devices"].items():
            console.print(f"{device_id}: {row['runs_as']}, profile {row['profile']}, on the new bundle: "
                          f"{row['on_new_bundle']}, p50 {row['latency_p50_ms']} ms, "
                          f"{row['results_since_rollout']} results since the rollout")  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
