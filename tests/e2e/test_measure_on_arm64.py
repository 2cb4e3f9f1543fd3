"""Compiling for a Raspberry Pi measured on the fleet's own arm64 device: a real hub, an x86 agent and an emulated
arm64 agent (`edgekit agent` as an aarch64 process under qemu-user), the real CLI.

- `compile -p rpi4 --measure-on group:arch=arm64` ranks the candidates by what the arm64 device measured;
- TVM tuning for rpi4 through that device writes database records, and a second compile reuses them, tuning nothing;
- kill -9 of the arm64 agent mid-job: the measurement fails with its reason and the profile's order decides.

Under emulation the device's timings mean nothing; the records, the reuse and the fallback are real. Slow: it needs
the emulated arm64 device (`make arm64-sysroot`, which `make test-all` runs).
"""

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hub_helpers import devices, wait_until
from reliability import record

from edgekit.compile import emulation
from edgekit.enrollment import write_enrollment
from edgekit.hub.auth import create_token
from edgekit.hub.db import BenchJobRecord, EventRecord
from edgekit.hub.service import Hub

pytestmark = pytest.mark.slow

AGENTS = {"x86-1": "x86-64-avx2", "arm64-1": "rpi4"}
TIMEOUT_S = 300.0  # the emulated agent imports its runtimes under qemu: tens of seconds each
SCENARIO = "fleet-measured compile, emulated arm64 device"


@pytest.fixture
def setup(make_hub, cnn_bundles, tmp_path: Path) -> Iterator[tuple[Hub, list[str], dict[str, subprocess.Popen]]]:
    root = emulation.sysroot()
    assert (root / "AGENT_READY").exists(), f"no emulated arm64 agent at {root}: run `make arm64-sysroot`"
    hub = make_hub(trust_key=cnn_bundles["public"])
    processes: dict[str, subprocess.Popen] = {}
    for enrollment in hub.enroll(list(AGENTS)):
        device = enrollment.device_id
        write_enrollment(tmp_path / f"{device}.json", enrollment)
        args = ["--enrollment", str(tmp_path / f"{device}.json"), "--data", str(tmp_path / device), "--source",
                "synthetic:?fps=2", "--telemetry-s", "1", "--profile", AGENTS[device]]  # fmt: skip
        if AGENTS[device] == "rpi4":
            command, env = emulation.agent_command(args, tmp_path / "scratch")
        else:
            command, env = [sys.executable, "-m", "edgekit", "agent", *args], None
        log = (tmp_path / f"{device}.log").open("w")
        processes[device] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    token = create_token(hub.sessions, "ops", "test", scope="operate")
    try:
        wait_until(lambda: all(d.online for d in devices(hub).values()) and len(devices(hub)) == 2, TIMEOUT_S,
                   "both agents online")  # fmt: skip
        with httpx.Client(base_url=hub.http_url, headers={"Authorization": f"Bearer {token}"}) as http:
            assert http.put("/api/devices/arm64-1/labels", json={"labels": {"arch": "arm64"}}).status_code == 200
        yield hub, ["--hub", hub.http_url, "--token", token], processes
    finally:
        for process in processes.values():
            process.kill()
            process.wait(30)


def _compile(cli, model: Path, calibration: Path, key: Path, out: Path, ops: list[str], *extra: str):
    return cli("compile", model, "-p", "rpi4", "--calibration", calibration, "--sign-key", key, "--bench-seconds",
               "0.05", "--mixed-seconds", "0", "--max-accuracy-drop", "100", "--measure-on", "group:arch=arm64",
               "-o", out, "--json", *extra, *ops)  # fmt: skip


def _jobs(hub: Hub) -> list[BenchJobRecord]:
    with hub.sessions() as session:
        return list(session.query(BenchJobRecord).order_by(BenchJobRecord.created))


def test_a_compile_for_rpi4_is_measured_tuned_and_falls_back_on_the_arm64_device(
    setup, small_cnn_model: Path, small_cnn_calibration: Path, cnn_bundles, tmp_path: Path, cli
) -> None:
    hub, ops, processes = setup
    args = (small_cnn_model, small_cnn_calibration, cnn_bundles["key"])

    measured = _compile(cli, *args, tmp_path / "ort.ekb", ops, "--backend", "onnxruntime", "--measure-seconds", "1")
    assert measured.exit_code == 0, measured.stderr[-3000:]
    report = json.loads(measured.stdout)
    assert (report["measured_on"] or {}).get("device") == "arm64-1", report["ranking"]
    assert report["measured_on"]["machine"] == "aarch64", report
    assert "measured on device arm64-1 (aarch64" in report["ranking"], report["ranking"]
    ranked = [c for c in report["candidates"] if c["rank"]]
    assert len(ranked) >= 2 and all(c["device"]["machine"] == "aarch64" and c["device"]["runs"] >= 1 for c in ranked)
    record(SCENARIO, "candidates ranked on the arm64 device's numbers", len(ranked))

    # TVM tuning for rpi4, the trials timed on the arm64 device; then the same compile again, from the database.
    database = tmp_path / "tvm-db"
    tvm = ("--backend", "tvm", "--precision", "fp32", "--option", "tvm.tune_trials=16", "--option",
           f"tvm.database={database}")  # fmt: skip
    tuned = _compile(cli, *args, tmp_path / "tvm.ekb", ops, *tvm)
    assert tuned.exit_code == 0, tuned.stderr[-3000:]
    details = next(c for c in json.loads(tuned.stdout)["candidates"] if c["backend"] == "tvm")["details"]
    assert details["tuned_on"] == "arm64-1" and details["fleet_trials_timed"] > 0, details
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert records, "tuning on the device wrote no database records"
    trial_jobs = len(_jobs(hub))
    again = _compile(cli, *args, tmp_path / "tvm-2.ekb", ops, *tvm)
    assert again.exit_code == 0, again.stderr[-3000:]
    reused = next(c for c in json.loads(again.stdout)["candidates"] if c["backend"] == "tvm")["details"]
    assert reused["tuning"].startswith("none this run") and reused["tuned_before"] == reused["tasks"], reused
    assert len(_jobs(hub)) == trial_jobs + 1, "the second compile sent tuning trials again"  # +1: its measurement
    record(SCENARIO, "tuning records written through the device", len(records))
    record(SCENARIO, "tasks tuned again by the second compile", reused["tasks"] - reused["tuned_before"], limit=0)

    # kill -9 of the device's agent while it times a candidate: the compile falls back, saying why.
    outcome: dict = {}
    slow = (*args, tmp_path / "gone.ekb", ops, "--backend", "onnxruntime", "--measure-seconds", "120")
    compiling = threading.Thread(target=lambda: outcome.update(result=_compile(cli, *slow)))
    jobs_before = len(_jobs(hub))
    compiling.start()
    wait_until(lambda: _timing(hub, jobs_before), TIMEOUT_S, "the arm64 device to start timing a candidate")
    processes["arm64-1"].send_signal(signal.SIGKILL)
    compiling.join(TIMEOUT_S)
    assert not compiling.is_alive(), "the compile kept waiting for a device that was killed"
    fallback = outcome["result"]
    assert fallback.exit_code == 0, fallback.stderr[-3000:]
    ranking = json.loads(fallback.stdout)["ranking"]
    assert ranking.startswith("profile order") and "measuring on the fleet failed" in ranking, ranking
    assert "arm64-1 went offline" in ranking or "restarted" in ranking, ranking
    record(SCENARIO, "arm64 agent kill -9 mid-job: compiles left waiting", 0, limit=0)


def _timing(hub: Hub, jobs_before: int) -> bool:
    """A new job's candidate passed its self-test on the device: it is being timed now."""
    jobs = _jobs(hub)[jobs_before:]
    if not jobs:
        return False
    with hub.sessions() as session:
        tested = session.query(EventRecord).filter_by(device_id="arm64-1", type="update.selftest").all()
    return any(e.data.get("bundle") == jobs[-1].bundle_id and e.data.get("passed") for e in tested)
