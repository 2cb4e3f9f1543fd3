"""Benchmark jobs end to end: a real hub (embedded Mosquitto, SQLite), real agents, real signed bundles, the real
CLI. `edgekit bench` times a bundle on a device without activating it; `edgekit compile --measure-on` ranks its
candidates by what the device measured; a device that refuses, or goes away mid-job, fails the measurement with its
reason, and the compile then falls back to the profile's order, saying so. (The arm64 device under emulation:
tests/examples/test_fleet.py.)"""

import json
import platform
import threading
from pathlib import Path

import pytest
from hub_helpers import devices, fleet, fleet_ids, wait_devices_reported, wait_until
from reliability import record

from edgekit.bundle import sha256_file
from edgekit.hub.auth import create_token
from edgekit.hub.db import BenchJobRecord
from edgekit.hub.service import Hub

PROFILE = "x86-64-avx2"  # what tests/helpers.compile_bundle builds for
SOURCE = "synthetic:?fps=20"
TIMEOUT_S = 120.0
SCENARIO = "fleet-measured compile (--measure-on)"


def _ops(hub: Hub) -> list[str]:
    return ["--hub", hub.http_url, "--token", create_token(hub.sessions, "ops", "test", scope="operate")]


def _compile(cli, model: Path, calibration: Path, key: Path, out: Path, device: str, seconds: str, ops: list[str]):
    return cli("compile", model, "-p", PROFILE, "--backend", "onnxruntime", "--calibration", calibration,
               "--sign-key", key, "--bench-seconds", "0.05", "--mixed-seconds", "0", "--max-accuracy-drop", "100",
               "--measure-on", device,
               "--measure-seconds", seconds, "-o", out, "--json", *ops)  # fmt: skip


def test_bench_times_a_bundle_on_a_device_without_activating_it(make_hub, cnn_bundles, tmp_path: Path, cli) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"])
    ops = _ops(hub)
    v1, v2 = sha256_file(cnn_bundles["v1"]), sha256_file(cnn_bundles["v2"])
    (device,) = fleet_ids("bench", 1)
    with fleet(hub, 1, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="bench", source=SOURCE,
               profile=PROFILE) as agents:  # fmt: skip
        wait_devices_reported(hub, [device])
        out = cli("bench", cnn_bundles["v2"], "--on", device, "--seconds", "1", "--json", *ops)
        assert out.exit_code == 0, out.stderr
        job = json.loads(out.stdout)
        result = job["result"]
        assert job["state"] == "done" and job["device_id"] == device and result["bundle"] == v2
        assert result["runs"] >= 10 and 0 < result["p50_ms"] <= result["p95_ms"] and result["throughput"] > 0
        assert result["machine"] == platform.machine() and result["cpu"] and result["peak_rss_mib"] > 0
        assert result["live_p50_before_ms"] and result["live_p50_during_ms"] and result["live_p50_after_ms"]
        agent = agents.agents[0]
        assert agent.runner.model.bundle.id == v1, "a benchmark job activated its candidate"
        assert not agent.store.has(v2), "the candidate stayed installed after its job"

        table = cli("bench", cnn_bundles["v2"], "--on", device, "--seconds", "0.2", *ops)
        assert table.exit_code == 0 and "p50" in table.stdout and device in table.stdout, table.stdout

        unknown = cli("bench", cnn_bundles["v2"], "--on", "nobody", *ops)
        assert unknown.exit_code == 2 and "no such device" in unknown.stderr, unknown.stderr
        with hub.sessions() as session:
            jobs = session.query(BenchJobRecord).all()
        assert [j.state for j in jobs] == ["done", "done"] and {j.device_id for j in jobs} == {device}
    wait_until(lambda: not devices(hub)[device].online, TIMEOUT_S, "the device to be offline")
    offline = cli("bench", cnn_bundles["v2"], "--on", device, *ops)
    assert offline.exit_code == 2 and f"{device}: offline" in offline.stderr, offline.stderr


def test_a_device_refuses_an_untrusted_bundle_and_says_why(make_hub, cnn_bundles, small_cnn_model: Path,
                                                          small_cnn_calibration: Path, tmp_path: Path,
                                                          cli) -> None:  # fmt: skip
    """The hub takes any bundle (no --trust-key); the device checks the signature like an update and refuses."""
    from helpers import compile_bundle
    from hub_helpers import signing_keys

    hub = make_hub()
    ops = _ops(hub)
    other_key, _ = signing_keys(tmp_path / "other")
    stranger = compile_bundle(
        small_cnn_model, small_cnn_calibration, other_key, "3.0.0", tmp_path / "s.ekb", name="cnn"
    )
    (device,) = fleet_ids("strict", 1)
    with fleet(hub, 1, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="strict", profile=PROFILE):
        wait_devices_reported(hub, [device])
        out = cli("bench", stranger, "--on", device, "--seconds", "0.2", *ops)
    assert out.exit_code == 1 and "refused" in out.stderr and "verification failed" in out.stderr, out.stderr
    record(SCENARIO, "bundle signed by an untrusted key: devices timing it (of 1)", 0, limit=0)


def test_compile_ranks_by_the_device_and_falls_back_when_it_goes_away(make_hub, cnn_bundles, small_cnn_model: Path,
                                                                     small_cnn_calibration: Path, tmp_path: Path,
                                                                     cli) -> None:  # fmt: skip
    hub = make_hub(trust_key=cnn_bundles["public"])
    ops = _ops(hub)
    (device,) = fleet_ids("lab", 1)
    with fleet(hub, 1, tmp_path, cnn_bundles["public"], cnn_bundles["v1"], prefix="lab", source=SOURCE,
               profile=PROFILE) as agents:  # fmt: skip
        wait_devices_reported(hub, [device])
        measured = _compile(cli, small_cnn_model, small_cnn_calibration, cnn_bundles["key"], tmp_path / "m.ekb",
                            device, "0.5", ops)  # fmt: skip
        assert measured.exit_code == 0, measured.stderr
        report = json.loads(measured.stdout)
        assert report["measured_on"]["device"] == device and report["measured_on"]["machine"] == platform.machine()
        assert f"measured on device {device}" in report["ranking"], report["ranking"]
        ranked = sorted((c for c in report["candidates"] if c["rank"]), key=lambda c: c["rank"])
        assert len(ranked) == 2 and all(c["device"]["runs"] >= 1 for c in ranked), report["candidates"]
        assert ranked[0]["device"]["p50_ms"] <= ranked[1]["device"]["p50_ms"]
        assert "slower on the device" in ranked[1]["reason"]
        record(SCENARIO, "candidates measured on the device (of 2)", len(ranked))

        # Mid-job, the device goes away: the measurement fails with that reason and the profile's order decides.
        outcome: dict = {}
        args = (cli, small_cnn_model, small_cnn_calibration, cnn_bundles["key"], tmp_path / "f.ekb", device, "60", ops)
        compiling = threading.Thread(target=lambda: outcome.update(result=_compile(*args)))
        compiling.start()
        agent = agents.agents[0]
        wait_until(lambda: agent.runner.latency_tap is not None, TIMEOUT_S, "the device to start timing a candidate")
        agent.stop()
        compiling.join(TIMEOUT_S)
    assert not compiling.is_alive(), "the compile kept waiting for a device that went away"
    fallback = outcome["result"]
    assert fallback.exit_code == 0, fallback.stderr
    report = json.loads(fallback.stdout)
    assert report["measured_on"] is None
    assert "measuring on the fleet failed" in report["ranking"] and "went offline" in report["ranking"], report
    assert "fastest host p50" in report["ranking"]  # an x86 profile on this x86 host; an ARM one: the profile's order
    record(SCENARIO, "device gone mid-job: compiles left waiting", 0, limit=0)


@pytest.mark.parametrize("target", ["group:nobody", "bench-9"])
def test_a_target_with_no_device_is_a_usage_error(make_hub, cnn_bundles, target: str, cli) -> None:
    hub = make_hub(trust_key=cnn_bundles["public"])
    out = cli("bench", cnn_bundles["v2"], "--on", target, *_ops(hub))
    assert out.exit_code == 2 and "no such device" in out.stderr, out.stderr
