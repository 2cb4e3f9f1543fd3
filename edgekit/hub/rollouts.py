"""Staged rollouts: a canary wave first, then waves of the rest; each wave waits until its devices report the new
bundle healthy (or fail, or time out), and the rollout halts and rolls back when a wave's failures pass the threshold.

Two halves: `Deployments` plans, halts and reads deployments for a request (no thread), and `RolloutDriver` is
the loop that moves them on. Everything is in the database (Deployment, DeploymentDevice, Device.desired and
desired_rev), and the driver only moves a deployment forward from what the database says, so a hub restarted
mid-rollout picks up where it stopped. Desired states go out as retained messages with a rev above anything the
device has seen; a device ignores a rev it has already applied, which makes re-sending harmless.

Device outcomes come from `Device.reported` (the device's retained config/reported, stored by ingest):
- healthy: it runs the bundle and says its update is healthy, or it converged to our rev already running it;
- failed: it converged to our rev with the update refused (bad signature, self-test), rolled back (health check)
  or failed (download) — the agent is back on its old bundle by itself;
- timed_out: neither within `wave_timeout_s` of the send.
A member the hub cannot send to (a device reporting the highest rev there is, so it would ignore any desired state)
fails at once. Members are resolved one by one: whatever one device reports never stops the wave for the others.
Halting (automatic or `Deployments.halt()`) asks every device the deployment touched for its previous bundle again, with
`allow_downgrade`, so the fleet's desired state matches what it runs.

Database writes are plain UPDATE/INSERT statements issued after all reads, in their own short transaction: on
SQLite (WAL) a transaction that reads and then writes fails at once if ingest committed in between.

Several hub processes on one database (replicas): every one may run the driver, but only the holder of the
controller lease (`edgekit.hub.leases`) moves deployments; another takes over within `CONTROLLER_LEASE_S` when it
dies. Each of its transactions renews the lease first (a fence), so a controller that lost it commits nothing. A
member goes from pending to sent in the same transaction that takes its device's next rev (one UPDATE … RETURNING,
so revs are unique per device) and stores the desired state, before it is published: whichever process sends, a
member is sent once, and a controller that dies in between leaves a stored desired state the next one re-sends
(same rev). A desired state can still be lost past the hub (a clustered broker electing a new leader for its
retained store, a broker restarted without persistence): a member whose device shows no sign of it after
`RESEND_S` is sent it again, same rev, every `RESEND_S` until it does or the wave times out. A device is in at
most one running deployment: a unique index on active members, checked by the
database when a deployment's members are inserted.
"""

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError
from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import AuditEntry, BundleRecord, Deployment, DeploymentDevice, Device
from edgekit.hub.gates import (
    DEFAULT_MIN_SAMPLES,
    evaluate,
    failed_gates,
    model_measurement,
    parse_gates,
    shadow_measurement,
)
from edgekit.hub.leases import Lease, LostLease
from edgekit.hub.registry import Registry
from edgekit.protocol import DEVICE_ID, MAX_REV, SHADOW_SINCE, DesiredState, agent_takes

log = logging.getLogger(__name__)

TICK_S = 0.5
# A member whose device shows no sign of its desired state this long after it was sent gets it again (same rev).
RESEND_S = 30.0
# How long a dead controller holds up rollouts before another hub process takes over (renewed every tick).
CONTROLLER_LEASE_S = 5.0
FAILED_PHASES = {"refused", "rolled_back", "failed"}
IN_PROGRESS_PHASES = {"downloading", "verifying", "testing", "switching"}
RESOLVED = {"healthy", "failed", "timed_out"}
# Sign a device's desired state and publish it, retained (`Hub.send_desired`): device id, the state, and the
# device's agent version (which fields it takes).
SendDesired = Callable[[str, DesiredState, str | None], None]
# Run inside a transaction before it commits: raises to roll it back (the controller lease's fence).
Fence = Callable[[Session], None]


def no_fence(_session: Session) -> None:
    """Operator actions (halt) may run in any hub process: nothing to check."""


class UnknownDeployment(BadInput):
    """No deployment with that id (the API answers 404)."""


class MemberTaken(Exception):
    """A member this controller was about to send to was sent by another: this step stops, the next reloads."""


# ---- planning ---------------------------------------------------------------------------------------------------


def _ceil_percent(percent: float, count: int) -> int:
    # Rounded first: 30 % of 20 must be 6, not ceil(6.000000000000001) = 7.
    return math.ceil(round(percent * count / 100, 9))


def wave_sizes(count: int, canary_percent: float, wave_percent: float) -> list[int]:
    """Wave 0 (the canary) is ceil(canary% × N), at least 1; then waves of ceil(wave% × N) until all are covered."""
    canary = min(count, max(1, _ceil_percent(canary_percent, count)))
    step = max(1, _ceil_percent(wave_percent, count))
    sizes, rest = [canary], count - canary
    while rest > 0:
        sizes.append(min(step, rest))
        rest -= sizes[-1]
    return sizes


def target_filter(target: str) -> Callable[[Device], bool]:
    """`all`, `group:KEY=VALUE` (label KEY is VALUE), `group:KEY` (label KEY set) or one device id."""
    if target == "all":
        return lambda device: True
    if target.startswith("group:"):
        key, has_value, value = target.removeprefix("group:").partition("=")
        if not key:
            raise BadInput(f"target '{target}': expected group:LABEL or group:LABEL=VALUE")
        if has_value:
            return lambda device: key in (device.labels or {}) and str(device.labels[key]) == value
        return lambda device: key in (device.labels or {})
    if not re.match(DEVICE_ID, target):
        raise BadInput(f"target '{target}': expected a device id, group:LABEL[=VALUE] or all")
    return lambda device: device.id == target


def _check_settings(canary_percent: float, wave_percent: float, failure_threshold: float, timeout_s: float) -> None:
    for name, percent in (("canary percent", canary_percent), ("wave percent", wave_percent)):
        if not 0 < percent <= 100:
            raise BadInput(f"{name} {percent:g}: expected more than 0 and at most 100")
    if not 0 <= failure_threshold <= 1:
        raise BadInput(f"failure threshold {failure_threshold:g}: expected a fraction from 0 to 1")
    if not timeout_s > 0:
        raise BadInput(f"wave timeout {timeout_s:g} s: expected more than 0")


# ---- device state -------------------------------------------------------------------------------------------------


def _reported(device: Device | None) -> dict[str, Any]:
    return (device.reported if device is not None else None) or {}


class NoRevLeft(Exception):
    """The device reports the highest rev there is: it would ignore any desired state the hub sends it."""


def reported_rev(device: Device | None) -> int:
    """The rev the device says it converged to, -1 when it has none the hub can use. Ingest validates it, but a row
    written before revs were bounded (or by another hub version) is device data too: checked again here."""
    rev = _reported(device).get("rev", -1)
    return rev if type(rev) is int and -1 <= rev <= MAX_REV else -1


def take_rev(session: Session, device: Device) -> int:
    """The device's next rev, above both what the hub last asked for (as the database has it now) and what the
    device last applied (it ignores rev <= applied). Taken by one UPDATE … RETURNING in `session`'s transaction,
    so two hub processes never take the same rev."""
    floor = reported_rev(device)
    if floor >= MAX_REV:  # checked here: MAX_REV + 1 does not fit the column
        raise NoRevLeft(f"it reports rev {floor}, the highest there is, so it would ignore any desired state")
    above = case((Device.desired_rev > floor, Device.desired_rev), else_=floor) + 1
    row = (Device.id == device.id) & (Device.desired_rev < MAX_REV)
    rev = session.scalar(update(Device).where(row).values(desired_rev=above).returning(Device.desired_rev))
    if rev is None:
        raise NoRevLeft(f"the hub sent it rev {MAX_REV}, the highest there is, or it is no longer known to the hub")
    return rev


def outcome(member: DeploymentDevice, device: Device | None, bundle_id: str) -> tuple[str, str] | None:
    """(state, detail) once the device's reported state resolves this member, else None (still in flight)."""
    if device is None:
        return "failed", "the device is no longer known to the hub"
    reported = _reported(device)
    running = (reported.get("bundle") or {}).get("id")
    update_state = reported.get("update") or {}
    phase = update_state.get("state", "idle")
    detail = update_state.get("detail", "")
    if running == bundle_id and phase == "healthy" and update_state.get("bundle") == bundle_id:
        return "healthy", detail or "healthy"
    # Until it converged to our rev, a failure on record may be from an earlier attempt at the same bundle.
    if reported_rev(device) < (member.rev or 0):
        return None
    if running == bundle_id and phase not in IN_PROGRESS_PHASES:
        return "healthy", "already running it"
    if update_state.get("bundle") == bundle_id and phase in FAILED_PHASES:
        return "failed", f"{phase}: {detail}" if detail else phase
    return "failed", f"converged to rev {reported.get('rev')} without the bundle (update state {phase})"


def shadow_outcome(member: DeploymentDevice, device: Device | None, bundle_id: str,
                   min_samples: int) -> tuple[str, str, dict[str, Any] | None] | None:  # fmt: skip
    """(state, detail, measurement) once a shadow-phase member is resolved: healthy when the device has run the
    bundle as its shadow on `min_samples` inputs, failed when it could not prepare it; None while in flight."""
    if device is None:
        return "failed", "the device is no longer known to the hub", None
    shadow = _reported(device).get("shadow") or {}
    running_it = (shadow.get("bundle") or {}).get("id") == bundle_id
    if running_it and shadow.get("state") in ("refused", "failed"):
        return "failed", f"shadow {shadow['state']}: {shadow.get('detail', '')}", None
    measured = shadow_measurement(device.health, bundle_id, min_samples)
    if running_it and shadow.get("state") == "running" and measured is not None:
        return "healthy", f"shadow measured on {measured['samples']} inputs", measured
    if reported_rev(device) >= (member.rev or 0) and not running_it:
        return "failed", "converged to the rev without running the shadow (an agent before 0.3?)", None
    return None


def _baseline(device: Device, running: dict[str, Any] | None) -> dict[str, Any] | None:
    """The device's newest ModelStats when they are of the bundle it runs: what wave gates compare with."""
    model = (device.health or {}).get("model")
    return model if model and running and model.get("bundle") == running.get("id") else None


def _desired_base(desired: dict[str, Any] | None) -> dict[str, Any]:
    """The last desired state the hub sent a device, the defaults if none or if it no longer validates."""
    try:
        return DesiredState.model_validate(desired or {"rev": 0}).model_dump(mode="json", exclude_none=True)
    except ValidationError:
        return {"rev": 0}


# ---- buffered writes ----------------------------------------------------------------------------------------------


@dataclass
class _Writes:
    """Changes applied to the loaded (detached) rows at once and replayed as UPDATEs in one short transaction."""

    statements: list = field(default_factory=list)

    def member(self, member: DeploymentDevice, **values: Any) -> None:
        values["updated"] = time.time()
        for name, value in values.items():
            setattr(member, name, value)
        statement = update(DeploymentDevice).where(
            DeploymentDevice.deployment_id == member.deployment_id, DeploymentDevice.device_id == member.device_id
        )
        self.statements.append(statement.values(**values))

    def deployment(self, deployment: Deployment, **values: Any) -> None:
        values["updated"] = time.time()
        for name, value in values.items():
            setattr(deployment, name, value)
        # Only a running deployment changes: a halt from another hub process is never overwritten by this one.
        running = (Deployment.id == deployment.id) & (Deployment.state == "running")
        self.statements.append(update(Deployment).where(running).values(**values))
        if values.get("state", "running") != "running":  # its devices are free for another deployment
            members = DeploymentDevice.deployment_id == deployment.id
            self.statements.append(update(DeploymentDevice).where(members).values(active=None))

    def audit(self, action: str, **detail: Any) -> None:
        """An audit log entry by the hub itself (the rollout controller), committed with the change it records."""
        self.statements.append(insert(AuditEntry).values(ts=time.time(), actor="hub", action=action, detail=detail))

    def commit(self, sessions: sessionmaker, fence: Fence = no_fence) -> None:
        if not self.statements:
            return
        with sessions.begin() as session:
            fence(session)
            for statement in self.statements:
                session.execute(statement)
        self.statements.clear()


@dataclass
class _Loaded:
    deployment: Deployment
    members: list[DeploymentDevice]
    devices: dict[str, Device]

    def wave(self, number: int) -> list[DeploymentDevice]:
        return [m for m in self.members if m.wave == number]


# ---- shared by operator actions and the driver -------------------------------------------------------------------


def _deployment(session: Session, deployment_id: int) -> Deployment:
    deployment = session.get(Deployment, deployment_id)
    if deployment is None:
        raise UnknownDeployment(f"no deployment #{deployment_id}")
    return deployment


def _members(session: Session, deployment_id: int) -> list[DeploymentDevice]:
    query = select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)
    return list(session.scalars(query.order_by(DeploymentDevice.wave, DeploymentDevice.device_id)))


def load(sessions: sessionmaker, deployment_id: int) -> _Loaded:
    """A deployment with its members (by wave, then device) and their devices' rows; UnknownDeployment if none."""
    with sessions() as session:
        deployment = _deployment(session, deployment_id)
        members = _members(session, deployment_id)
        ids = [member.device_id for member in members]
        devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids)))} if ids else {}
    return _Loaded(deployment, members, devices)


def find_bundle(registry: Registry, bundle_id: str) -> BundleRecord:
    """A registry bundle by full id or unambiguous prefix; BadInput when unknown."""
    return registry.get(bundle_id) if len(bundle_id) == 64 else registry.find(bundle_id)


def publish_desired(sessions: sessionmaker, send: SendDesired, device: Device, bundle: dict[str, Any],
                    allow_downgrade: bool, health_checks: int | None, record: Callable[[Session, int], None],
                    shadow: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Publish (retained) the device's last desired state with `bundle` swapped in, `shadow` (a DesiredShadow's
    fields: a bundle to run beside it) or none, and a fresh rev (`publish_change`); returns the rev. Its
    configuration (`CONFIG_FIELDS`: source, thresholds, rates, capture) stays as it is."""

    def with_bundle(fields: dict[str, Any]) -> dict[str, Any]:
        fields = {**fields, "bundle": {**bundle, "allow_downgrade": allow_downgrade}}
        fields.pop("shadow", None)
        if shadow is not None:
            fields["shadow"] = shadow
        if health_checks is not None:
            fields["health_checks"] = health_checks
        return fields

    return publish_change(sessions, send, device, with_bundle, record)


def publish_change(sessions: sessionmaker, send: SendDesired, device: Device,
                   change: Callable[[dict[str, Any]], dict[str, Any]],
                   record: Callable[[Session, int], None]) -> int:  # fmt: skip
    """Publish (retained) `change` applied to the device's last desired state (its fields, JSON), with a fresh rev;
    returns the rev. The last desired state is read after the UPDATE that takes the rev, in its transaction: no
    other writer is in between, so a deploy keeps a configuration set since `device` was loaded, and a
    configuration change keeps the bundle a rollout sent meanwhile. ValidationError when the result is invalid.

    Recorded before it is published, in one transaction: the rev taken (`take_rev`), the desired state stored and
    whatever `record(session, rev)` writes (it raises to call the send off). If the hub dies before publishing,
    the stored desired state is sent again by the next controller's resume, or when the device reconnects."""
    with sessions.begin() as session:
        rev = take_rev(session, device)
        last = session.scalar(select(Device.desired).where(Device.id == device.id))
        desired = DesiredState.model_validate({**change(_desired_base(last)), "rev": rev})
        stored = desired.model_dump(mode="json", exclude_none=True)
        session.execute(update(Device).where(Device.id == device.id).values(desired=stored))
        record(session, rev)
    device.desired, device.desired_rev = stored, rev
    send(device.id, desired, device.agent_version)
    return rev


def halt_loaded(sessions: sessionmaker, loaded: _Loaded, send: SendDesired, writes: _Writes, reason: str,
                fence: Fence = no_fence) -> None:  # fmt: skip
    """Mark the deployment halted and ask every device it touched for its previous bundle again.

    Healthy ones (and ones still in flight or timed out, which may yet install the new bundle from the retained
    desired state) are rolled back; failed ones already run their old bundle, but their desired state is reset
    too so that it names what they run. Pending devices were never asked for anything."""
    deployment = loaded.deployment
    writes.deployment(deployment, state="halted", reason=reason)
    log.warning("deployment #%d halted: %s", deployment.id, reason)
    for member in loaded.members:
        if member.state == "pending" or member.state == "rolled_back":
            continue
        device = loaded.devices.get(member.device_id)
        previous = member.previous_bundle
        if device is None or not previous:
            if member.state != "failed":
                writes.member(member, detail=f"{member.detail}; cannot roll back: no previous bundle known")
            continue
        if previous["id"] == deployment.bundle_id:
            continue  # it ran this bundle before the deployment: nothing to go back to
        try:
            publish_desired(sessions, send, device, previous, True, None, lambda session, _rev: fence(session))
        except (NoRevLeft, ValidationError) as error:  # this device's own data: the others are still rolled back
            writes.member(member, detail=f"{member.detail}; cannot roll back: {error}"[:2000])
            continue
        if member.state != "failed":
            label = f"{previous['name']}@{previous['version']}"
            detail = f"{member.state}{': ' + member.detail if member.detail else ''}; rolled back to {label}"
            writes.member(member, state="rolled_back", detail=detail[:2000])


# ---- the driver ---------------------------------------------------------------------------------------------------


class RolloutDriver:
    """Moves every running deployment forward each `TICK_S`, from what the database says, while this process
    holds `lease` (None: a hub alone on its database, which always drives). A step writes only while the
    deployment is still running, so a halt from another process is never overwritten."""

    def __init__(self, sessions: sessionmaker, send: SendDesired, registry: Registry,
                 lease: Lease | None = None) -> None:  # fmt: skip
        self.sessions = sessions
        self.send = send
        self.registry = registry
        self.lease = lease
        self.leading = lease is None  # whether this process held the controller lease at its last tick
        # One step at a time: the loop and operator actions (Deployments) must not interleave on a deployment.
        self.lock = threading.RLock()
        self.ticks = 0  # completed ticks, for whoever waits for the driver to have looked again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resume = True
        self.resend_s = RESEND_S
        self._resent: dict[tuple[int, str], float] = {}  # (deployment, device) → when last sent again

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._stop.clear()
        self._resume = True
        self._thread = threading.Thread(target=self._loop, name="hub-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.lease is not None and self.leading:
            self.leading = False
            self.lease.release()  # another replica takes over at its next tick, not a lease period later

    def fence(self, session: Session) -> None:
        """Raises LostLease in `session`'s transaction when another process holds the controller lease."""
        if self.lease is not None:
            self.lease.fence(session)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # the driver must outlive a bad row or a database hiccup; next tick retries
                log.exception("rollout tick failed")
            self.ticks += 1

    def tick(self) -> None:
        """Move every running deployment as far as the devices' reported states allow, when this process holds
        (or now takes) the controller lease."""
        with self.lock:
            if not self._lead():
                return
            resume, self._resume = self._resume, False
            with self.sessions() as session:
                running = list(session.scalars(select(Deployment.id).where(Deployment.state == "running")))
            if resume and running:
                log.info("resuming running deployments %s", ", ".join(f"#{d}" for d in running))
            for deployment_id in running:
                self.step(deployment_id, resume)

    def _lead(self) -> bool:
        if self.lease is None:
            return True
        was, self.leading = self.leading, self.lease.acquire()
        if self.leading and not was:
            log.info("this hub process is now the rollout controller (%s)", self.lease.holder)
        if not self.leading:
            self._resume = True  # when it takes over, it first re-sends what the last controller had in flight
        return self.leading

    def step(self, deployment_id: int, resume: bool = False) -> None:
        """One deployment as far as it goes now. A broken one must not stop the others: logged, retried next tick."""
        with self.lock:
            if not self.leading:
                return
            try:
                self._step(deployment_id, resume)
            except LostLease:
                self.leading, self._resume = False, True
                log.warning("deployment #%d: another hub process took over the rollouts", deployment_id)
            except MemberTaken as error:
                log.warning("%s; reloading at the next tick", error)
            except Exception:
                log.exception("deployment #%d: step failed", deployment_id)

    def _step(self, deployment_id: int, resume: bool) -> None:
        loaded = load(self.sessions, deployment_id)
        deployment = loaded.deployment
        if deployment.state != "running":
            return
        writes = _Writes()
        if resume:
            self._republish(loaded)
        bundle = find_bundle(self.registry, deployment.bundle_id)
        while deployment.state == "running":
            wave = loaded.wave(deployment.current_wave)
            now = time.time()
            for member in wave:
                self._advance(deployment, bundle, member, loaded.devices.get(member.device_id), now, writes)
            if any(member.state not in RESOLVED for member in wave):
                break
            failures = [member for member in wave if member.state != "healthy"]
            gate_halt = self._check_gates(deployment, wave, writes)
            if wave and len(failures) / len(wave) > deployment.failure_threshold:
                self._halt(loaded, writes, _failure_reason(deployment, wave, failures))
            elif gate_halt:
                self._halt(loaded, writes, gate_halt)
            elif deployment.phase == "shadow":
                self._promote(deployment, wave, writes)
            elif deployment.current_wave + 1 >= deployment.waves:
                healthy = sum(member.state == "healthy" for member in loaded.members)
                done = f"every wave done: {healthy} of {len(loaded.members)} devices healthy on the bundle"
                writes.deployment(deployment, state="completed", current_wave=deployment.waves - 1, reason=done)
                log.info("deployment #%d: completed", deployment.id)
            else:
                writes.deployment(deployment, current_wave=deployment.current_wave + 1)
                log.info("deployment #%d: wave %d done, starting wave %d", deployment.id, deployment.current_wave - 1,
                         deployment.current_wave)  # fmt: skip
        writes.commit(self.sessions, self.fence)

    def _halt(self, loaded: _Loaded, writes: _Writes, reason: str) -> None:
        halt_loaded(self.sessions, loaded, self.send, writes, reason, self.fence)
        writes.audit("halt", deployment_id=loaded.deployment.id, reason=reason, automatic=True)

    def _check_gates(self, deployment: Deployment, wave: list[DeploymentDevice], writes: _Writes) -> str:
        """Evaluate the gates on a resolved wave and record the results; the halt reason when one failed."""
        if not deployment.gates:
            return ""
        gates = parse_gates([gate["text"] for gate in deployment.gates], deployment.shadow)
        measured = [member.health for member in wave if member.state == "healthy" and member.health]
        results = evaluate(gates, deployment.phase, deployment.current_wave, measured)
        expected = self._expected_p95(deployment, wave)
        for result in results:
            if result["metric"] == "p95" and expected is not None:
                result["expected"] = expected
                result["note"] = f"{result['note']}; the compile reports expected {expected:g}x".lstrip("; ")
        writes.deployment(deployment, gate_results=[*deployment.gate_results, *results])
        for result in results:
            log.info("deployment #%d: gate %s in %s: %s (%s)", deployment.id, result["gate"], deployment.phase,
                     result["value"], "passed" if result["passed"] else "FAILED")  # fmt: skip
        return failed_gates(results)

    def _expected_p95(self, deployment: Deployment, wave: list[DeploymentDevice]) -> float | None:
        """What the compile reports of the two bundles expect of the p95 ratio (their host measurements): shown
        beside a device's ratio, so a device that misses a promised speed-up (an int8 build without VNNI) shows."""
        previous = Counter(m.previous_bundle_id for m in wave if m.previous_bundle_id).most_common(1)
        if not previous:
            return None
        try:
            new, old = (self.registry.get(b).manifest["verification"] for b in (deployment.bundle_id, previous[0][0]))
        except (BadInput, KeyError, TypeError):  # the previous bundle is not in the registry
            return None
        new_p95, old_p95 = new.get("latency_p95_ms"), old.get("latency_p95_ms")
        return round(new_p95 / old_p95, 3) if new_p95 and old_p95 else None

    def _promote(self, deployment: Deployment, wave: list[DeploymentDevice], writes: _Writes) -> None:
        """The shadow passed on the canary: the canary now switches to the bundle it already holds (no download),
        then the waves go on as without a shadow."""
        writes.deployment(deployment, phase="waves")
        writes.audit("promote", deployment_id=deployment.id, reason="the shadow passed its gates on the canary")
        for member in wave:
            if member.state == "healthy":
                writes.member(member, state="pending", rev=None, sent_at=None, resolved_at=None,
                              detail=f"shadow passed ({member.detail}); promoting")  # fmt: skip
        writes.commit(self.sessions, self.fence)  # sending marks pending members sent: they must be pending by then
        log.info("deployment #%d: the shadow passed its gates on the canary; promoting", deployment.id)

    def _advance(self, deployment: Deployment, bundle: BundleRecord, member: DeploymentDevice, device: Device | None,
                 now: float, writes: _Writes) -> None:  # fmt: skip
        """Send to or resolve one member. Whatever its device's row holds, an error fails this member alone: one
        device must never hold up (or abort, tick after tick) the wave for the others."""
        try:
            if member.state == "pending":
                self._send(deployment, bundle, member, device, writes)
            elif member.state == "sent":
                self._resolve(deployment, member, device, now, writes)
        except (LostLease, MemberTaken):
            raise
        except NoRevLeft as error:
            writes.member(member, state="failed", detail=f"cannot send: {error}", resolved_at=now)
            log.warning("deployment #%d: %s failed: cannot send: %s", deployment.id, member.device_id, error)
        except Exception as error:  # a bug or a row nobody foresaw: logged with its trace, the wave goes on
            log.exception("deployment #%d: %s failed", deployment.id, member.device_id)
            writes.member(member, state="failed", detail=f"the hub failed on this device: {error}"[:2000],
                          resolved_at=now)  # fmt: skip

    def _send(self, deployment: Deployment, bundle: BundleRecord, member: DeploymentDevice, device: Device | None,
              writes: _Writes) -> None:  # fmt: skip
        now = time.time()
        if device is None:
            writes.member(member, state="failed", detail="the device is no longer known to the hub", resolved_at=now)
            return
        ref = {"id": bundle.id, "name": bundle.name, "version": bundle.version, "size": bundle.size}

        def mark_sent(session: Session, rev: int) -> None:
            self.fence(session)
            # Halted meanwhile through another hub process: send nothing more (this also locks the row until commit).
            running = (Deployment.id == deployment.id) & (Deployment.state == "running")
            if session.execute(update(Deployment).where(running).values(updated=now)).rowcount != 1:
                raise MemberTaken(f"deployment #{deployment.id} is no longer running")
            pending = (DeploymentDevice.deployment_id == member.deployment_id) & (
                DeploymentDevice.device_id == member.device_id) & (DeploymentDevice.state == "pending")  # fmt: skip
            values = {"state": "sent", "rev": rev, "sent_at": now, "detail": "", "updated": now}
            if session.execute(update(DeploymentDevice).where(pending).values(**values)).rowcount != 1:
                raise MemberTaken(f"deployment #{member.deployment_id}: {member.device_id} is no longer pending")
            for name, value in values.items():
                setattr(member, name, value)

        if deployment.phase == "shadow":
            refusal = _cannot_shadow(member, device)
            if refusal:
                writes.member(member, state="failed", detail=refusal, resolved_at=now)
                return
            shadow = {"bundle": ref, "budget": deployment.shadow_budget}
            publish_desired(self.sessions, self.send, device, member.previous_bundle or {}, False, None, mark_sent,
                            shadow)  # fmt: skip
            return
        publish_desired(self.sessions, self.send, device, ref, False, deployment.health_checks, mark_sent)

    def _republish(self, loaded: _Loaded) -> None:
        """After a (re)start: send the in-flight desired states again, for a broker that lost its retained ones
        (amqtt keeps none across restarts). Same rev, so a device that already has it only reports its state again."""
        for member in loaded.members:
            device = loaded.devices.get(member.device_id)
            if member.state == "sent" and device is not None:
                self._send_again(member, device)

    def _send_again(self, member: DeploymentDevice, device: Device) -> None:
        """The member's desired state as the hub stored it, published again (same rev): a device that has it
        only reports its state again."""
        if not device.desired or device.desired.get("rev") != member.rev:
            return
        try:
            desired = DesiredState.model_validate(device.desired)
        except ValidationError:  # stored by an older hub under looser bounds; the wave timeout resolves it
            log.warning("deployment #%d: %s: stored desired state no longer valid, not re-sent",
                        member.deployment_id, device.id)  # fmt: skip
            return
        self._resent[(member.deployment_id, device.id)] = time.time()
        self.send(device.id, desired, device.agent_version)

    def _resend_if_unseen(self, deployment: Deployment, member: DeploymentDevice, device: Device | None,
                          now: float) -> None:  # fmt: skip
        """Send again a desired state the device shows no sign of after `resend_s`: it reports neither the rev
        nor an update of the bundle."""
        if device is None or reported_rev(device) >= (member.rev or 0):
            return
        reported = _reported(device)
        if deployment.bundle_id in ((reported.get("update") or {}).get("bundle"),
                                    ((reported.get("shadow") or {}).get("bundle") or {}).get("id")):  # fmt: skip
            return
        last = max(member.sent_at or now, self._resent.get((deployment.id, device.id), 0.0))
        if now - last >= self.resend_s:
            log.info("deployment #%d: %s shows no sign of rev %s after %.0f s: sending it again", deployment.id,
                     device.id, member.rev, now - last)  # fmt: skip
            self._send_again(member, device)

    # ---- resolving ----------------------------------------------------------------------------------------------

    def _resolve(self, deployment: Deployment, member: DeploymentDevice, device: Device | None, now: float,
                 writes: _Writes) -> None:  # fmt: skip
        result = member_outcome(deployment, member, device)
        if result is None and now - (member.sent_at or now) > deployment.wave_timeout_s:
            progress = _progress(deployment, device)
            result = "timed_out", f"not healthy within {deployment.wave_timeout_s:g} s ({progress})", None
        if result is None:
            self._resend_if_unseen(deployment, member, device, now)
            return
        state, detail, measured = result
        writes.member(member, state=state, detail=detail[:2000], resolved_at=now, health=measured)
        self._resent.pop((deployment.id, member.device_id), None)
        log.info("deployment #%d: %s %s (%s)", deployment.id, member.device_id, state, detail)


def member_outcome(deployment: Deployment, member: DeploymentDevice,
                   device: Device | None) -> tuple[str, str, dict[str, Any] | None] | None:  # fmt: skip
    """(state, detail, what the gates measured) once the member is resolved, else None. With gates, a member that
    installed the bundle waits until its device has run it `min_samples` times."""
    if deployment.phase == "shadow":
        return shadow_outcome(member, device, deployment.bundle_id, deployment.min_samples)
    result = outcome(member, device, deployment.bundle_id)
    if result is None or result[0] != "healthy" or not deployment.gates or device is None:
        return (*result, None) if result else None
    measured = model_measurement(device.health, member.baseline, deployment.bundle_id, deployment.min_samples)
    if measured is None:
        return None
    return "healthy", f"{result[1]}; measured on {measured['samples']} inferences", measured


def _progress(deployment: Deployment, device: Device | None) -> str:
    """Where a member that timed out had got to, for its detail."""
    reported = _reported(device)
    if deployment.phase == "shadow":
        shadow = reported.get("shadow") or {}
        samples = ((device.health if device else None) or {}).get("shadow", {}).get("samples", 0)
        return f"shadow state: {shadow.get('state', 'none')}; {samples} of {deployment.min_samples} inputs measured"
    phase = (reported.get("update") or {}).get("state", "unknown")
    if not deployment.gates:
        return f"update state: {phase}"
    model = ((device.health if device else None) or {}).get("model") or {}
    count = model.get("inferences", 0) if model.get("bundle") == deployment.bundle_id else 0
    return f"update state: {phase}; {count} of {deployment.min_samples} inferences measured"


def _cannot_shadow(member: DeploymentDevice, device: Device) -> str:
    """Why a device cannot run the shadow phase; '' when it can."""
    if not member.previous_bundle:
        return "it runs no bundle for a shadow to be compared with"
    if not agent_takes(device.agent_version, SHADOW_SINCE):
        return f"its agent ({device.agent_version or 'version unknown'}) cannot run a shadow: 0.3 or later can"
    return ""


def _failure_reason(deployment: Deployment, wave: list[DeploymentDevice], failures: list) -> str:
    name = "the canary" if deployment.current_wave == 0 else f"wave {deployment.current_wave}"
    causes = "; ".join(f"{m.device_id} {m.state}: {m.detail}" for m in failures[:3])
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    return (f"{len(failures)} of {len(wave)} devices in {name} failed (over the {deployment.failure_threshold:.0%} "
            f"threshold): {causes}{more}")  # fmt: skip


# ---- operator actions ---------------------------------------------------------------------------------------------


class DeploymentDetail(NamedTuple):
    deployment: Deployment
    members: list[DeploymentDevice]  # by wave, then device
    bundle: BundleRecord | None


class Deployments:
    """What a request needs of rollouts: plan one, halt one, read them. No thread: `driver` (None in a hub process
    run with --no-controller) moves them on; without one, a plan waits for the driver in another process."""

    def __init__(self, sessions: sessionmaker, send: SendDesired, registry: Registry,
                 driver: RolloutDriver | None) -> None:  # fmt: skip
        self.sessions = sessions
        self.send = send
        self.registry = registry
        self.driver = driver
        self._lock = driver.lock if driver is not None else threading.RLock()

    def create(self, bundle_id: str, target: str, canary_percent: float = 10, wave_percent: float = 30,
               failure_threshold: float = 0.2, wave_timeout_s: float = 600, actor: str = "hub",
               health_checks: int | None = None, shadow: bool = False, gates: list[str] | None = None,
               min_samples: int | None = None, shadow_budget: float = 0.25) -> Deployment:  # fmt: skip
        """Plan a rollout of a registry bundle to the devices `target` names now, and send the canary wave.

        `health_checks` sets how many inferences each device must get through on the new bundle before it calls
        it healthy; None keeps each device's current setting. With `shadow`, the canary first runs the bundle as a
        shadow beside its current one; `gates` (edgekit.hub.gates; the defaults with a shadow) must pass on every
        wave, each device counting once it measured `min_samples` inputs (default DEFAULT_MIN_SAMPLES); the shadow
        may take `shadow_budget` of the active model's inference time."""
        _check_settings(canary_percent, wave_percent, failure_threshold, wave_timeout_s)
        if health_checks is not None and not 1 <= health_checks <= 10_000:
            raise BadInput(f"health checks {health_checks}: expected 1 to 10000")
        if min_samples is not None and not 1 <= min_samples <= 1_000_000:
            raise BadInput(f"min samples {min_samples}: expected 1 to 1000000")
        if not 0 < shadow_budget <= 4:
            raise BadInput(f"shadow budget {shadow_budget:g}: expected more than 0 and at most 4 (times the active "
                           "model's inference time)")  # fmt: skip
        parsed = parse_gates(gates, shadow)
        bundle = find_bundle(self.registry, bundle_id)
        with self._lock:
            chosen = self._resolve_target(target)
            sizes = wave_sizes(len(chosen), canary_percent, wave_percent)
            deployment = Deployment(
                bundle_id=bundle.id, target=target, canary_percent=canary_percent, wave_percent=wave_percent,
                failure_threshold=failure_threshold, wave_timeout_s=wave_timeout_s, health_checks=health_checks,
                state="running", current_wave=0, waves=len(sizes), reason="", created_by=actor, shadow=shadow,
                shadow_budget=shadow_budget,
                phase="shadow" if shadow else "waves", gates=[{"text": str(g), **g.model_dump()} for g in parsed],
                min_samples=(min_samples or DEFAULT_MIN_SAMPLES) if parsed or shadow else 0, gate_results=[],
            )  # fmt: skip
            try:
                self._insert(deployment, chosen, sizes)
            except IntegrityError:  # the unique index on active members: a device is in a running deployment
                raise BadInput(self._busy_message([d.id for d in chosen])) from None
            log.info("deployment #%d: %s@%s to %s (%d devices in waves %s) by %s", deployment.id, bundle.name,
                     bundle.version, target, len(chosen), sizes, actor)  # fmt: skip
            if self.driver is not None and self.driver.running:
                self.driver.step(deployment.id)  # the canary goes out now rather than at the next tick
            return self.get(deployment.id)

    def halt(self, deployment_id: int, actor: str, reason: str) -> Deployment:
        """Stop a running deployment and roll back every device it moved to the new bundle."""
        with self._lock:
            reason = f"halted by {actor}: {reason or 'no reason given'}"
            self._mark_halted(deployment_id, reason)
            loaded = load(self.sessions, deployment_id)  # after the mark: every member a controller sent is in it
            writes = _Writes()
            halt_loaded(self.sessions, loaded, self.send, writes, reason)
            writes.commit(self.sessions)
            return self.get(deployment_id)

    def _mark_halted(self, deployment_id: int, reason: str) -> None:
        """Halted first, in a transaction of its own: a controller in another hub process then sends nothing more
        for it (it marks a member sent only while the deployment runs, under the deployment row's lock)."""
        running = (Deployment.id == deployment_id) & (Deployment.state == "running")
        with self.sessions.begin() as session:  # writes before any read: see the module doc on SQLite
            halted = session.execute(update(Deployment).where(running).values(
                state="halted", reason=reason, updated=time.time())).rowcount  # fmt: skip
            if halted:
                members = DeploymentDevice.deployment_id == deployment_id
                session.execute(update(DeploymentDevice).where(members).values(active=None))
        if not halted:
            state = self.get(deployment_id).state  # UnknownDeployment when there is none
            raise BadInput(f"deployment #{deployment_id} is {state}; only a running one halts")

    def get(self, deployment_id: int) -> Deployment:
        with self.sessions() as session:
            return _deployment(session, deployment_id)

    def detail(self, deployment_id: int) -> DeploymentDetail:
        """The deployment, its members and its bundle, read together."""
        with self.sessions() as session:
            deployment = _deployment(session, deployment_id)
            members = _members(session, deployment_id)
            return DeploymentDetail(deployment, members, session.get(BundleRecord, deployment.bundle_id))

    def recent(self, state: str | None, limit: int) -> list[tuple[Deployment, Counter]]:
        """The newest `limit` deployments (in `state`, when given), each with its members counted by state."""
        statement = select(Deployment).order_by(Deployment.id.desc()).limit(limit)
        if state is not None:
            statement = statement.where(Deployment.state == state)
        with self.sessions() as session:
            deployments = list(session.scalars(statement))
            counts: dict[int, Counter] = {d.id: Counter() for d in deployments}
            if counts:
                rows = session.execute(
                    select(DeploymentDevice.deployment_id, DeploymentDevice.state, func.count())
                    .where(DeploymentDevice.deployment_id.in_(counts))
                    .group_by(DeploymentDevice.deployment_id, DeploymentDevice.state)
                )
                for deployment_id, member_state, count in rows:
                    counts[deployment_id][member_state] = count
        return [(d, counts[d.id]) for d in deployments]

    def _resolve_target(self, target: str) -> list[Device]:
        matches = target_filter(target)
        with self.sessions() as session:
            chosen = [device for device in session.scalars(select(Device).order_by(Device.id)) if matches(device)]
        if not chosen:
            raise BadInput(f"target '{target}': no devices match")
        return chosen

    def _insert(self, deployment: Deployment, chosen: list[Device], sizes: list[int]) -> None:
        """The deployment and its members, active, in one transaction. A device in two running deployments would
        get two bundles fighting over it: the database refuses the second (IntegrityError), also when two hub
        processes insert at the same moment."""
        with self.sessions.begin() as session:
            session.add(deployment)
            session.flush()
            waves = [number for number, size in enumerate(sizes) for _ in range(size)]
            for number, device in zip(waves, chosen, strict=True):
                previous = _reported(device).get("bundle")
                session.add(DeploymentDevice(
                    deployment_id=deployment.id, device_id=device.id, wave=number, state="pending", active=True,
                    previous_bundle_id=previous["id"] if previous else None, previous_bundle=previous, detail="",
                    baseline=_baseline(device, previous),
                ))  # fmt: skip

    def _busy_message(self, device_ids: list[str]) -> str:
        """Which device was busy, for the refusal (read after the database refused the insert)."""
        query = select(DeploymentDevice.device_id, DeploymentDevice.deployment_id).where(
            DeploymentDevice.active.is_(True), DeploymentDevice.device_id.in_(device_ids)
        )
        with self.sessions() as session:
            busy = session.execute(query.order_by(DeploymentDevice.device_id)).first()
        if busy is None:  # the deployment that held it ended since
            return "a device was in another running deployment; try again"
        return f"device {busy[0]} is already in running deployment #{busy[1]}; halt it first"
