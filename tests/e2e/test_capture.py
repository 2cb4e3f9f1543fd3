"""Field data back to the workstation, end to end (docs/datasets.md): a real hub with its embedded Mosquitto, a real
`edgekit agent` process on a video, a capture policy set through the hub's configuration API. Captured samples reach
the hub's dataset — as many as the agent's `sample.captured` events, each once — through an agent kill -9 and a
broker (and hub) restart during the upload; then they are labelled in the dashboard (Chromium), exported with
`edgekit dataset export`, and `edgekit compile --calibration` takes the export and names it in its report."""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
from agent_helpers import agent_command
from browser import chromium, open_logged_in, until
from hub_helpers import device_url, wait_devices_reported, wait_until
from reliability import record
from sqlalchemy import select

from edgekit.hub.auth import create_token
from edgekit.hub.broker import free_port
from edgekit.hub.db import Dataset, DatasetSample, EventRecord

DEVICE = "cam-1"
FRAMES = 60  # distinct frames in the clip, which loops
BOUND = 12  # the policy's max_per_day
TIMEOUT_S = 90.0


def write_clip(path: Path, frames: int) -> Path:
    """A 320x240 clip of noise: every frame different, and its PNG (~230 KB) four chunks long."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (320, 240))
    for seed in range(frames):
        writer.write(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    writer.release()
    return path


def captured_events(hub) -> set[str]:
    """The samples the agent reported capturing (sample.captured events the hub stored), by sha256."""
    with hub.sessions() as session:
        rows = session.scalars(select(EventRecord).where(EventRecord.device_id == DEVICE,
                                                         EventRecord.type == "sample.captured"))  # fmt: skip
        return {row.data["sample"] for row in rows}


def dataset_samples(hub) -> set[str]:
    with hub.sessions() as session:
        return set(session.scalars(select(DatasetSample.sha256).where(DatasetSample.dataset == "cnn")))


def spool(data: Path) -> tuple[int, int]:
    """(samples waiting, samples captured) in the agent's spool, read beside the running agent."""
    with sqlite3.connect(data / "spool.sqlite") as db:
        waiting = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        captured = db.execute("SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = 'captured'").fetchone()[0]
    return waiting, captured


def test_captured_samples_reach_the_dataset_through_a_kill_and_a_broker_restart_then_calibrate_a_compile(
    make_hub, cnn_bundles, small_cnn_model: Path, tmp_path: Path, cli
) -> None:
    settings = {"data_dir": tmp_path / "hub", "broker_port": free_port(), "trust_key": cnn_bundles["public"]}
    hub = make_hub(**settings)
    hub.registry.add(cnn_bundles["v1"], "test")
    clip = write_clip(tmp_path / "clip.avi", FRAMES)
    data = tmp_path / "agent"
    options = ("--source", f"video:{clip}", "--bundle", str(cnn_bundles["v1"]))
    command = agent_command(device_url(hub, DEVICE), data, cnn_bundles["public"], hub.trust.public_key_file, *options,
                            device_id=DEVICE)  # fmt: skip
    log = (tmp_path / "agent.log").open("ab")
    agent = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        wait_devices_reported(hub, [DEVICE], TIMEOUT_S)
        token = create_token(hub.sessions, "operator", "test", "operate")
        headers = {"Authorization": f"Bearer {token}"}
        policy = {"below_confidence": 0.99, "max_per_day": BOUND}
        answer = httpx.put(f"{hub.http_url}/api/devices/{DEVICE}/config", json={"capture": policy}, headers=headers,
                           timeout=30)  # fmt: skip
        assert answer.status_code == 200, answer.text

        # kill -9 while samples wait in the spool (the upload under way), then start the agent again. Once the day's
        # bound is reached and the hub has every capture's event: a kill between a capture and its event (the last
        # one queued a moment after its sample was spooled) would leave a capture without its event.
        wait_until(lambda: spool(data)[1] == BOUND and len(captured_events(hub)) == BOUND and spool(data)[0] >= 1,
                   TIMEOUT_S, "the day's samples captured and reported, some still waiting for upload")  # fmt: skip
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(10)
        waiting_at_kill, _ = spool(data)
        agent = subprocess.Popen(command, stdout=log, stderr=log)
        wait_until(lambda: dataset_samples(hub), TIMEOUT_S, "the first sample stored")

        # The broker goes down (with the hub: it is embedded) while the rest uploads, and comes back.
        waiting_at_restart, _ = spool(data)
        hub.stop()
        time.sleep(2)
        hub = make_hub(**settings)
        try:
            wait_until(lambda: spool(data)[0] == 0 and len(captured_events(hub)) == spool(data)[1], TIMEOUT_S,
                       "every captured sample uploaded, and every capture event stored")  # fmt: skip
        except AssertionError as error:
            state = f"spool (waiting, captured) {spool(data)}, events {len(captured_events(hub))}, "
            state += f"stored {len(dataset_samples(hub))}; agent log: {(tmp_path / 'agent.log').read_text()[-3000:]}"
            raise AssertionError(f"{error}; {state}") from None
        wait_until(lambda: dataset_samples(hub) == captured_events(hub), TIMEOUT_S, "the dataset to hold them all")
    finally:
        agent.kill()
        agent.wait(10)
        log.close()
    captured = captured_events(hub)
    scenario = f"capture upload (agent kill -9 and broker restart, policy {BOUND}/day)"
    record(scenario, "samples waiting at the kill", waiting_at_kill)
    record(scenario, "samples waiting at the broker restart", waiting_at_restart)
    record(scenario, "samples captured (events)", len(captured))
    record(scenario, "samples lost", len(captured - dataset_samples(hub)), 0)
    assert waiting_at_kill > 0, "the kill came after the upload: it proved nothing"
    assert len(captured) == BOUND, "the day's bound holds, after a kill and a restart too"
    assert dataset_samples(hub) == captured, "each captured sample stored once, none lost"
    with hub.sessions() as session:
        assert session.get(Dataset, "cnn").samples == len(captured)

    # Label every sample with the model's own answer in the dashboard, export with the CLI, compile on it.
    rows = httpx.get(f"{hub.http_url}/api/datasets/cnn/samples", headers=headers, timeout=30).json()
    with chromium() as browser:
        page = browser.new_page()
        open_logged_in(page, f"{hub.http_url}/datasets/cnn", token, "dataset")
        for row in rows:
            form = f"figure[data-sample='{row['sha256']}'] form.label"
            page.fill(f"{form} input", str(row["output"]["top"][0]["label"]))
            page.click(f"{form} button")
            until(page, f"document.querySelector(\"{form}\").dataset.saved === '{row['output']['top'][0]['label']}'")
    with hub.sessions() as session:
        labels = dict(session.execute(select(DatasetSample.sha256, DatasetSample.label)).all())
    assert labels == {row["sha256"]: row["output"]["top"][0]["label"] for row in rows}
    exported = tmp_path / "exported.npz"
    done = cli("dataset", "export", "cnn", "-o", exported, "--hub", hub.http_url, "--token", token)
    assert done.exit_code == 0 and f"{len(captured)} samples of cnn" in done.stdout, done.stderr
    arrays = np.load(exported)
    assert arrays["labels"].shape == (len(captured),) and arrays["input"].shape == (len(captured), 3, 32, 32)
    compiled = cli("compile", small_cnn_model, "-p", "x86-64-avx2", "--precision", "fp32", "--backend", "onnxruntime",
                   "--calibration", exported, "--bench-seconds", "0.02", "--name", "cnn", "-o",
                   tmp_path / "cnn-field.ekb", "--json")  # fmt: skip
    assert compiled.exit_code == 0, compiled.stderr
    report = json.loads(compiled.stdout)
    assert f"hub dataset cnn: {len(captured)} field samples of cnn@1.0.0" in report["data"], report["data"]
