"""Benchmark jobs in the hub (`edgekit.hub.bench`), on a real SQLite database: which device may take a job, and how
a job ends — the device's answer (checked: what a device sends is untrusted), its going offline or restarting, or
the deadline. End to end with real agents: tests/e2e/test_measure_on_fleet.py."""

import time
from pathlib import Path

import pytest

from edgekit.errors import BadInput
from edgekit.hub.bench import BenchJobs, BenchRequest, UnknownJob
from edgekit.hub.db import BundleRecord, Device, EventRecord, open_database
from edgekit.protocol import BenchJob

BUNDLE = "a" * 64
RESULT = {"job": "", "bundle": BUNDLE, "runs": 40, "p50_ms": 2.0, "p95_ms": 3.0, "throughput": 480.0,
          "machine": "aarch64", "cpu": "Cortex-A72, 4 cores"}  # fmt: skip


@pytest.fixture
def jobs(tmp_path: Path) -> tuple[BenchJobs, list[tuple[str, BenchJob, float]], object]:
    _engine, sessions = open_database(f"sqlite:///{tmp_path / 'hub.sqlite'}")
    sent: list[tuple[str, BenchJob, float]] = []
    with sessions.begin() as session:
        session.add(BundleRecord(id=BUNDLE, name="cnn", version="1.0.0", size=2**20, profile="rpi4",
                                 backend="onnxruntime", precision="int8", signing_key_id="k", uploaded_by="t",
                                 manifest={}))  # fmt: skip
        for device, profile, version, online in (("pi-1", "rpi4", "0.5.0", True), ("pi-2", "rpi4", "0.4.0", True),
                                                 ("pi-3", "rpi4", "0.5.0", False), ("x86-1", "x86-64-avx2", "0.5.0",
                                                                                    True)):  # fmt: skip
            session.add(Device(id=device, labels={"site": "lab"}, runtimes=[], agent_version=version, profile=profile,
                               online=online))  # fmt: skip
    return BenchJobs(sessions, lambda *args: sent.append(args)), sent, sessions


def _answer(sessions, device: str, seq: int, kind: str, **data) -> None:
    with sessions.begin() as session:
        session.add(EventRecord(device_id=device, seq=seq, ts=time.time(), type=kind, level="info", message=kind,
                                data=data))  # fmt: skip


def test_a_group_job_goes_to_the_one_member_that_can_take_it(jobs) -> None:
    bench, sent, _ = jobs
    record = bench.start(BenchRequest(BUNDLE, "group:site=lab", seconds=2), "alice")
    assert record.device_id == "pi-1" and record.state == "running"
    ((device, job, ttl),) = sent
    assert device == "pi-1" and job.id == record.id and job.bundle.id == BUNDLE and job.seconds == 2
    assert ttl == pytest.approx(120 + 2 + 1)  # the base, the timed seconds, one second per MiB


@pytest.mark.parametrize(("target", "why"), [
    ("pi-2", "agent 0.4.0 takes no benchmark jobs"), ("pi-3", "offline"),
    ("x86-1", "profile x86-64-avx2, the bundle is for rpi4"), ("nobody", "no such device"),
])  # fmt: skip
def test_a_device_that_cannot_take_the_job_is_named_with_why(jobs, target: str, why: str) -> None:
    bench, sent, _ = jobs
    with pytest.raises(BadInput, match=why):
        bench.start(BenchRequest(BUNDLE, target), "alice")
    with pytest.raises(BadInput, match="not in the registry"):
        bench.start(BenchRequest("b" * 64, "pi-1"), "alice")
    with pytest.raises(BadInput, match="at most 600"):
        bench.start(BenchRequest(BUNDLE, "pi-1", seconds=601), "alice")
    assert not sent


def test_a_job_ends_with_the_answer_its_device_gives(jobs) -> None:
    bench, _, sessions = jobs
    done = bench.start(BenchRequest(BUNDLE, "pi-1"), "alice")
    _answer(sessions, "pi-1", 7, "bench.result", **{**RESULT, "job": "another job"})  # not this job's answer
    assert bench.status(done.id).state == "running"
    _answer(sessions, "pi-1", 8, "bench.result", **{**RESULT, "job": done.id})
    settled = bench.status(done.id)
    assert settled.state == "done" and settled.result["p50_ms"] == 2.0 and settled.result["machine"] == "aarch64"

    refused = bench.start(BenchRequest(BUNDLE, "pi-1"), "alice")
    _answer(sessions, "pi-1", 9, "bench.failed", job=refused.id, reason="refused: self-test failed")
    assert (bench.status(refused.id).state, bench.status(refused.id).reason) == ("failed", "refused: self-test failed")

    forged = bench.start(BenchRequest(BUNDLE, "pi-1"), "alice")
    _answer(sessions, "pi-1", 10, "bench.result", job=forged.id, p50_ms="fast")
    assert bench.status(forged.id).state == "failed" and "malformed" in bench.status(forged.id).reason
    with pytest.raises(UnknownJob):
        bench.status("no-such-job")


def test_a_job_fails_when_its_device_goes_away_restarts_or_never_answers(jobs) -> None:
    bench, _, sessions = jobs
    restarted = bench.start(BenchRequest(BUNDLE, "pi-1"), "alice")
    _answer(sessions, "pi-1", 20, "agent.started")  # the run that takes the job: its start may arrive after the job
    assert bench.status(restarted.id).state == "running"
    _answer(sessions, "pi-1", 21, "bench.started", job=restarted.id)
    assert bench.status(restarted.id).state == "running"
    _answer(sessions, "pi-1", 22, "agent.started")
    assert "restarted before answering" in bench.status(restarted.id).reason

    silent = bench.start(BenchRequest(BUNDLE, "pi-1", timeout_s=0.05), "alice")
    time.sleep(0.1)
    assert "no answer from pi-1" in bench.status(silent.id).reason

    gone = bench.start(BenchRequest(BUNDLE, "pi-1"), "alice")
    with sessions.begin() as session:
        session.get(Device, "pi-1").online = False
    assert bench.status(gone.id).reason == "device pi-1 went offline before answering"
