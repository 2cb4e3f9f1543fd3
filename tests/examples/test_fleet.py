"""examples/fleet: an x86-64 agent and an emulated arm64 agent (qemu-user) under one hub, one rollout.

Slow: it needs the emulated arm64 device with its agent install (`make arm64-sysroot`, which `make test-all` runs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.compile import emulation

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "fleet" / "fleet.py"


@pytest.mark.slow
def test_one_rollout_reaches_an_x86_and_an_emulated_arm64_agent(tmp_path):
    root = emulation.sysroot()
    assert (root / "AGENT_READY").exists(), f"no emulated arm64 agent at {root}: run `make arm64-sysroot`"
    env = {**os.environ, "EDGEKIT_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--duration", "3", "--json"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["deployment"]["state"] == "completed", summary["deployment"]
    devices = summary["devices"]
    assert {d["runs_as"].split(",")[0].split(" ")[0] for d in devices.values()} == {"x86_64", "aarch64"}
    for device_id, device in devices.items():
        assert device["bundle"] == summary["bundle"], device_id
        assert device["results_since_rollout"] > 0 and device["latency_p50_ms"] is not None, device_id
