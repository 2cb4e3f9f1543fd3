"""Soak: 500 simulated devices (real agents: own MQTT connection, outbox and bundle store each, run by
`edgekit fleet simulate` in 4 processes) against `edgekit hub` in its own process for 10 minutes, with a staged
rollout to all of them along the way.

Figures: messages lost (every seq an agent queued is in the hub's database or still in its outbox), updates that
left a device without a model, and the hub process's RSS growth from the end of warm-up to the end of the run.
EDGEKIT_SOAK_S and EDGEKIT_SOAK_DEVICES shorten it for a quick look; `make test-all` runs the full size.
"""

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from brokers import wait_until
from reliability import record

from edgekit.agents.bundles import BundleStore
from edgekit.agents.fleet import device_ids
from edgekit.agents.store import Outbox
from edgekit.hub.broker import free_port
from edgekit.hub.client import HubClient

SOAK_S = float(os.environ.get("EDGEKIT_SOAK_S", 600))
DEVICES = int(os.environ.get("EDGEKIT_SOAK_DEVICES", 500))
PROCESSES = 4
WARM_UP_S = 60.0  # connections, first telemetry, SQLite and the broker settle before the RSS baseline
RSS_GROWTH_LIMIT_MIB = 64
MIB = 1024 * 1024


class HubProcess:
    """`edgekit hub` as users start it; an API token made with `edgekit hub token create` once it is up."""

    def __init__(self, data: Path, trust_key: Path) -> None:
        self.data = data
        self.http = f"http://127.0.0.1:{free_port()}"
        self.broker_port = free_port()
        self.log = open(data / "hub.log", "w")  # noqa: SIM115 (kept open for the process's lifetime)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgekit", "hub", "--data", data, "--trust-key", trust_key,
             "--http", self.http.removeprefix("http://"), "--broker-port", str(self.broker_port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self._healthy, 60, "the hub to answer /healthz")
        token = subprocess.run([sys.executable, "-m", "edgekit", "hub", "token", "create", "soak", "--data", data],
                               capture_output=True, text=True, check=True)  # fmt: skip
        self.client = HubClient(self.http, token.stdout.strip())

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the hub exited: {(self.data / 'hub.log').read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.http}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def enroll(self, device_ids: list[str], folder: Path) -> Path:
        """Each device's enrollment file in `folder`, by `edgekit hub enroll` as a user runs it."""
        subprocess.run([sys.executable, "-m", "edgekit", "hub", "enroll", *device_ids, "--data", self.data,
                        "--out-dir", folder], capture_output=True, check=True)  # fmt: skip
        return folder

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def stored_seqs(hub_db: Path) -> dict[str, set[int]]:
    """Every (device, seq) the hub stored: telemetry, results and events share one seq space per device."""
    seqs: dict[str, set[int]] = {}
    with sqlite3.connect(hub_db) as db:
        for table in ("telemetry", "results", "events"):
            for device_id, seq in db.execute(f"SELECT device_id, seq FROM {table}"):
                seqs.setdefault(device_id, set()).add(seq)
    return seqs


def still_queued(agent_dir: Path) -> tuple[int, set[int], int]:
    """The last seq this stopped agent assigned, the seqs still waiting in its outbox on disk, and how many its
    queue bound dropped (reported by the device, so not counted as lost)."""
    outbox = Outbox(agent_dir / "outbox.sqlite")
    try:
        return outbox.last_seq, {item.seq for item in outbox.peek(0, 1_000_000)}, outbox.dropped
    finally:
        outbox.close()


class FleetProcesses:
    """`edgekit fleet simulate` in a few processes: one process's GIL would not keep up with 500 agents' threads
    on 2 cores, and devices are separate machines anyway."""

    def __init__(self, folder: Path, enrollments: Path, bundles: dict[str, Path]) -> None:
        self.folder = folder
        self.processes = []
        for index in range(PROCESSES):
            log = open(folder / f"fleet-{index}.log", "w")  # noqa: SIM115 (kept open for the process's lifetime)
            command = [sys.executable, "-m", "edgekit", "fleet", "simulate", "--enrollments", enrollments,
                       "--n", str(DEVICES // PROCESSES), "--prefix", f"soak{index}", "--data", folder / f"p{index}",
                       "--trust-key", bundles["public"], "--bundle", bundles["v1"], "--source", "synthetic:?fps=0.2",
                       "--telemetry-s", "10"]  # fmt: skip
            self.processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))

    def check_alive(self) -> None:
        for index, (process, _) in enumerate(self.processes):
            assert process.poll() is None, (self.folder / f"fleet-{index}.log").read_text()[-2000:]

    def stop(self) -> None:
        """SIGTERM, as systemd would: each agent publishes offline and flushes; what stays queued stays on disk."""
        for process, _ in self.processes:
            process.terminate()
        for process, log in self.processes:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

    def device_dirs(self) -> list[Path]:
        return sorted(d for d in self.folder.glob("p*/soak*") if d.is_dir())


@pytest.mark.slow
@pytest.mark.soak
def test_soak(tmp_path, cnn_bundles):
    hub = HubProcess(_folder(tmp_path / "hub"), cnn_bundles["public"])
    ids = [d for index in range(PROCESSES) for d in device_ids(f"soak{index}", DEVICES // PROCESSES)]
    fleet = FleetProcesses(_folder(tmp_path / "fleet"), hub.enroll(ids, _folder(tmp_path / "enroll")), cnn_bundles)
    scenario = f"soak ({DEVICES} devices, {SOAK_S / 60:.2g} min)"
    started = time.monotonic()
    rss: list[int] = []
    try:
        online = lambda: sum(d["online"] for d in hub.client.devices()) == DEVICES  # noqa: E731
        wait_until(lambda: fleet.check_alive() or online(), 240, "every device to come online at the hub")
        time.sleep(max(0.0, started + WARM_UP_S - time.monotonic()))
        rss.append(hub.rss())
        v2 = hub.client.push(cnn_bundles["v2"])["id"]
        # 3 health checks at 0.2 fps: 15 s per wave, five waves well inside the run.
        deployment = hub.client.deploy(v2, "all", canary_percent=2, wave_percent=25, wave_timeout_s=300,
                                       health_checks=3)  # fmt: skip
        while time.monotonic() - started < SOAK_S:
            time.sleep(10)
            rss.append(hub.rss())
            fleet.check_alive()
            assert hub.process.poll() is None, "the hub exited during the soak"
        final = hub.client.deployment(deployment["id"])
    finally:
        fleet.stop()
    device_dirs = fleet.device_dirs()
    stores = [BundleStore(device) for device in device_dirs]
    active = [store.record().active for store in stores]
    without_model = sum(bundle is None or not store.has(bundle) for bundle, store in zip(active, stores, strict=True))
    on_v2 = active.count(v2)
    lost, queued, sent = _count_lost(device_dirs, hub.data / "hub.sqlite")
    hub.stop()

    record(scenario, "devices (agents in 4 processes)", len(device_dirs))
    record(scenario, "messages queued by the devices", sent)
    record(scenario, "messages still queued at the end", queued)
    record(scenario, "messages lost", lost, 0)
    record(scenario, f"rollout to all: state ({final['state']})", 0 if final["state"] == "completed" else 1, 0)
    record(scenario, "devices not on the new bundle", DEVICES - on_v2, 0)
    record(scenario, "updates that left a device without a model", without_model, 0)
    record(scenario, "hub RSS after warm-up (MiB)", round(rss[0] / MIB, 1))
    record(scenario, "hub RSS growth (MiB)", round((rss[-1] - rss[0]) / MIB, 1), RSS_GROWTH_LIMIT_MIB)
    assert len(device_dirs) == DEVICES
    assert lost == 0 and without_model == 0
    assert final["state"] == "completed", final["reason"]
    assert on_v2 == DEVICES
    assert rss[-1] - rss[0] <= RSS_GROWTH_LIMIT_MIB * MIB, [round(r / MIB) for r in rss]


def _count_lost(device_dirs: list[Path], hub_db: Path) -> tuple[int, int, int]:
    """(lost, still queued, queued in all): a seq is lost if it is neither in the hub nor in the device's outbox.
    The hub writes in batches, so wait until what it holds stops growing."""

    previous, stored = None, stored_seqs(hub_db)
    while stored != previous:
        time.sleep(3)
        previous, stored = stored, stored_seqs(hub_db)
    lost = queued = sent = 0
    for device_dir in device_dirs:
        last, waiting, dropped = still_queued(device_dir)
        sent += last
        queued += len(waiting)
        lost += max(0, len(set(range(1, last + 1)) - stored.get(device_dir.name, set()) - waiting) - dropped)
    return lost, queued, sent


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
