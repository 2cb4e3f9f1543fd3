"""Soak: 500 simulated devices (real agents: own MQTT connection, outbox and bundle store each, in this process)
against `edgekit hub` in its own process for 10 minutes, with a staged rollout to all of them along the way.

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

from edgekit.agents.fleet import Fleet, FleetSettings
from edgekit.agents.store import Outbox
from edgekit.broker import free_port
from edgekit.hub.client import HubClient

SOAK_S = float(os.environ.get("EDGEKIT_SOAK_S", 600))
DEVICES = int(os.environ.get("EDGEKIT_SOAK_DEVICES", 500))
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

    @property
    def broker(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker_port}"

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


@pytest.mark.slow
def test_soak(tmp_path, cnn_bundles):
    hub = HubProcess(_folder(tmp_path / "hub"), cnn_bundles["public"])
    fleet = Fleet(FleetSettings(count=DEVICES, broker=hub.broker, data_dir=tmp_path / "fleet",
                                trust_key=cnn_bundles["public"], bundle=cnn_bundles["v1"], source="synthetic:?fps=0.2",
                                telemetry_s=10.0))  # fmt: skip
    scenario = f"soak ({DEVICES} devices, {SOAK_S / 60:g} min)"
    started = time.monotonic()
    rss: list[int] = []
    try:
        fleet.start()
        connected = fleet.wait_connected(120)
        assert connected == DEVICES, f"only {connected} of {DEVICES} agents connected"
        wait_until(lambda: len(hub.client.devices()) == DEVICES, 120, "every device to reach the hub")
        time.sleep(max(0.0, started + WARM_UP_S - time.monotonic()))
        rss.append(hub.rss())
        v2 = hub.client.push(cnn_bundles["v2"])["id"]
        # 3 health checks at 0.2 fps: 15 s per wave, five waves well inside the run.
        deployment = hub.client.deploy(
            v2, "all", canary_percent=2, wave_percent=25, wave_timeout_s=300, health_checks=3
        )
        while time.monotonic() - started < SOAK_S:
            time.sleep(10)
            rss.append(hub.rss())
            assert hub.process.poll() is None, "the hub exited during the soak"
        final = hub.client.deployment(deployment["id"])
    finally:
        fleet.stop()
    without_model = sum(agent.runner.model is None for agent in fleet.agents)
    on_v2 = sum(agent.runner.model is not None and agent.runner.model.bundle.id == v2 for agent in fleet.agents)
    lost, queued, sent = _count_lost(tmp_path / "fleet", hub.data / "hub.sqlite", [a.device_id for a in fleet.agents])
    hub.stop()

    record(scenario, "messages queued by the devices", sent)
    record(scenario, "messages still queued at the end", queued)
    record(scenario, "messages lost", lost, 0)
    record(scenario, f"rollout to all: state ({final['state']})", 0 if final["state"] == "completed" else 1, 0)
    record(scenario, "devices not on the new bundle", DEVICES - on_v2, 0)
    record(scenario, "updates that left a device without a model", without_model, 0)
    record(scenario, "hub RSS after warm-up (MiB)", round(rss[0] / MIB, 1))
    record(scenario, "hub RSS growth (MiB)", round((rss[-1] - rss[0]) / MIB, 1), RSS_GROWTH_LIMIT_MIB)
    assert lost == 0 and without_model == 0
    assert final["state"] == "completed", final["reason"]
    assert on_v2 == DEVICES
    assert rss[-1] - rss[0] <= RSS_GROWTH_LIMIT_MIB * MIB, [round(r / MIB) for r in rss]


def _count_lost(fleet_dir: Path, hub_db: Path, device_ids: list[str]) -> tuple[int, int, int]:
    """(lost, still queued, queued in all): a seq is lost if it is neither in the hub nor in the device's outbox.
    The hub writes in batches, so wait until what it holds stops growing."""

    def total() -> int:
        return sum(len(s) for s in stored_seqs(hub_db).values())

    previous = -1
    while (current := total()) != previous:
        previous = current
        time.sleep(3)
    stored = stored_seqs(hub_db)
    lost = queued = sent = 0
    for device_id in device_ids:
        last, waiting, dropped = still_queued(fleet_dir / device_id)
        sent += last
        queued += len(waiting)
        lost += max(0, len(set(range(1, last + 1)) - stored.get(device_id, set()) - waiting) - dropped)
    return lost, queued, sent


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
