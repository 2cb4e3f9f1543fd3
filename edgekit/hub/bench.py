"""Benchmark jobs: a bundle from the registry timed on one online fleet device without activating it
(`edgekit bench`, `edgekit compile --measure-on`; docs/measure.md).

The hub picks the device (one named, or the first online member of a group whose profile is the bundle's and whose
agent takes jobs), signs a `BenchJob` for it like a desired state, and publishes it (`bench/job`, not retained: a
job is for now, not for whenever the device comes back). The device answers with an event, `bench.result` or
`bench.failed`, which ingest stores like any other; `status` reads it from there. A job also fails when the device
goes offline or its agent restarts before answering, or when no answer came by its deadline, each with its reason.
"""

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import BenchJobRecord, BundleRecord, Device, EventRecord
from edgekit.hub.rollouts import target_filter
from edgekit.protocol import BENCH_SINCE, BenchJob, BenchResult, DesiredBundle, TrialResult, agent_takes
from edgekit.schema import describe_validation_error

BASE_TIMEOUT_S = 120.0  # fetching, verifying and self-testing a candidate, on top of its timed seconds
SECONDS_PER_MIB = 1.0  # the download's share of a job's deadline
ANSWERS = ("bench.result", "bench.failed")
RECENT_EVENTS = 200  # a device's newest events searched for a job's answer

SendBench = Callable[[str, BenchJob, float], None]  # (device_id, job, ttl_s): sign and publish


class UnknownJob(LookupError):
    pass


@dataclass(frozen=True)
class BenchRequest:
    bundle_id: str
    target: str  # a device id or group:LABEL[=VALUE]
    seconds: float = 5.0
    timeout_s: float | None = None  # None: BASE_TIMEOUT_S + seconds + the download's share
    mode: Literal["bundle", "tvm-trials"] = "bundle"


class BenchJobs:
    def __init__(self, sessions: sessionmaker, send: SendBench) -> None:
        self.sessions = sessions
        self._send = send

    def start(self, request: BenchRequest, actor: str) -> BenchJobRecord:
        """Pick the device, record the job and send it; BadInput naming why no device can take it."""
        if not 0 < request.seconds <= 600:
            raise BadInput(f"seconds {request.seconds:g}: expected more than 0 and at most 600")
        with self.sessions() as session:
            bundle = session.get(BundleRecord, request.bundle_id)
            if bundle is None:
                raise BadInput(f"bundle {request.bundle_id[:12]}: not in the registry (push it first)")
            device = _pick_device(session, request.target, bundle)
            newest_event = session.scalar(select(func.max(EventRecord.seq)).where(EventRecord.device_id == device.id))
        timeout_s = request.timeout_s or BASE_TIMEOUT_S + request.seconds + bundle.size / 2**20 * SECONDS_PER_MIB
        now = time.time()
        record = BenchJobRecord(
            id=secrets.token_hex(8), device_id=device.id, bundle_id=bundle.id, created=now, state="running",
            device_seq=max(device.last_seq, newest_event or 0), expires=now + timeout_s, reason="", actor=actor,
        )  # fmt: skip
        with self.sessions.begin() as session:
            session.add(record)
        ref = DesiredBundle(id=bundle.id, name=bundle.name, version=bundle.version, size=bundle.size)
        self._send(device.id, BenchJob(id=record.id, bundle=ref, seconds=request.seconds, mode=request.mode), timeout_s)
        return self.status(record.id)

    def status(self, job_id: str) -> BenchJobRecord:
        """The job as it stands: a running one is settled here from the device's answer, its status or the clock."""
        with self.sessions.begin() as session:
            record = session.get(BenchJobRecord, job_id)
            if record is None:
                raise UnknownJob(f"benchmark job {job_id!r}: no such job")
            if record.state == "running":
                _settle(session, record)
                session.flush()
            session.expunge(record)
        return record


def _pick_device(session: Session, target: str, bundle: BundleRecord) -> Device:
    matches = target_filter(target)
    devices = sorted((d for d in session.scalars(select(Device)) if matches(d)), key=lambda d: d.id)
    if not devices:
        raise BadInput(f"target '{target}': no such device" + ("s" if target.startswith("group:") else ""))
    reasons = [f"{d.id}: {why}" for d in devices if (why := _unfit(d, bundle))]
    fit = [d for d in devices if not _unfit(d, bundle)]
    if not fit:
        raise BadInput(f"no device of '{target}' can time {bundle.name}@{bundle.version} ({bundle.profile}): "
                       + "; ".join(reasons[:5]))  # fmt: skip
    return fit[0]


def _unfit(device: Device, bundle: BundleRecord) -> str:
    """Why `device` cannot time `bundle`; '' when it can."""
    if not device.online:
        return "offline"
    if device.profile != bundle.profile:
        return f"profile {device.profile or 'not reported'}, the bundle is for {bundle.profile}"
    if not agent_takes(device.agent_version, BENCH_SINCE):
        return f"agent {device.agent_version or 'unknown'} takes no benchmark jobs (0.5 and newer do)"
    return ""


def _settle(session: Session, record: BenchJobRecord) -> None:
    answer = _answer(session, record)
    if answer is not None and answer.type == "bench.failed":
        record.state, record.reason = "failed", str(answer.data.get("reason", ""))[:2000] or answer.message
        return
    if answer is not None:
        try:
            record.result, record.state = _result(answer.data), "done"
        except ValidationError as error:  # what a device sends is untrusted: a bad answer fails its job, nothing more
            record.state = "failed"
            record.reason = f"the answer from {record.device_id} is malformed: {describe_validation_error(error)}"
        return
    device = session.get(Device, record.device_id)
    if device is not None and not device.online:
        record.state, record.reason = "failed", f"device {record.device_id} went offline before answering"
    elif _restarted(session, record):
        record.state, record.reason = "failed", f"the agent on {record.device_id} restarted before answering"
    elif time.time() > record.expires:
        record.state = "failed"
        record.reason = f"no answer from {record.device_id} within {record.expires - record.created:.0f} s"


def _result(data: dict) -> dict:
    """A device's answer, checked: a model's timing (BenchResult) or a trial bundle's (TrialResult)."""
    model: type[BenchResult | TrialResult] = TrialResult if "trials" in data else BenchResult
    return model.model_validate(data).model_dump()


def _newest_events(session: Session, record: BenchJobRecord, types: tuple[str, ...]) -> list[EventRecord]:
    query = (select(EventRecord).where(EventRecord.device_id == record.device_id, EventRecord.type.in_(types),
                                       EventRecord.seq > record.device_seq)
             .order_by(EventRecord.seq.desc()).limit(RECENT_EVENTS))  # fmt: skip
    return list(session.scalars(query))


def _job_event(session: Session, record: BenchJobRecord, types: tuple[str, ...]) -> EventRecord | None:
    return next((e for e in _newest_events(session, record, types) if e.data.get("job") == record.id), None)


def _answer(session: Session, record: BenchJobRecord) -> EventRecord | None:
    return _job_event(session, record, ANSWERS)


def _restarted(session: Session, record: BenchJobRecord) -> bool:
    """An `agent.started` after the device's `bench.started` for this job (by seq: the device's clock is not the
    hub's). Not judged before the device took the job: the `agent.started` of the run that takes it may still be on
    its way when the job is sent."""
    taken = _job_event(session, record, ("bench.started",))
    return taken is not None and any(e.seq > taken.seq for e in _newest_events(session, record, ("agent.started",))[:1])
