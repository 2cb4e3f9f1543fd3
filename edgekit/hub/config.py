"""Device configuration from the hub: a device's or a device group's input source, task, thresholds, rates and
capture policy (`CONFIG_FIELDS` of the desired state), sent as a new signed desired state like a deploy's.

A change names only what it changes: thresholds and rates key by key, the other fields whole; a field given as
null goes back to its default (no source from the hub: the agent's own `--source`; no capture). The bundle and the
shadow a rollout asked for stay (`rollouts.publish_change` reads the last desired state in the transaction that
takes the rev), and a later deploy keeps the configuration the same way.

A group is a label selector (`KEY=VALUE`, or `KEY`: the label is set). Its configuration is stored
(`GroupConfig`), each change merged into it and its version bumped; the whole of it is then sent to every current
member, and to a device that joins the group later (its labels change, or it connects — enrolled since, or away
while the group changed) once per version (`GroupConfigDevice` records the version each member got). A device in
several groups gets them in the order they were last changed; a change to one device lasts until one of its groups
changes again. Every change is in the audit log (`config`: actor, target, what changed, the devices and their revs).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from edgekit.errors import BadInput
from edgekit.hub.db import AuditEntry, Device, GroupConfig, GroupConfigDevice, dialect_insert
from edgekit.hub.rollouts import NoRevLeft, SendDesired, publish_change, target_filter
from edgekit.hub.schemas import LABEL_KEY
from edgekit.protocol import CONFIG_FIELDS, DesiredState
from edgekit.schema import describe_validation_error

log = logging.getLogger(__name__)
# Fields a change merges key by key; the others it replaces whole.
MERGED = ("thresholds", "rates")


class UnknownDevice(BadInput):
    """No device with that id (the API answers 404)."""


@dataclass(frozen=True)
class Sent:
    """What became of a change for one device: the rev it was sent as, or why it was not sent."""

    device: str
    rev: int | None = None
    error: str = ""


def merge(fields: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`fields` (a desired state's, or a group's stored change) with `change` applied: `MERGED` fields key by key,
    the others replaced, a None dropping the field (its default)."""
    out = dict(fields)
    for name, value in change.items():
        if value is None:
            out.pop(name, None)
        elif name in MERGED:
            out[name] = {**(out.get(name) or {}), **value}
        else:
            out[name] = value
    return out


def check_change(change: dict[str, Any]) -> None:
    """BadInput naming the field when `change` would not make a valid desired state."""
    unknown = sorted(set(change) - set(CONFIG_FIELDS))
    if unknown:
        raise BadInput(f"{', '.join(unknown)}: not configurable; expected {', '.join(CONFIG_FIELDS)}")
    try:
        DesiredState.model_validate(merge({"rev": 0}, change))
    except ValidationError as error:
        raise BadInput(describe_validation_error(error)) from None


def group_target(selector: str) -> str:
    """The deployment-style target of a group selector (`KEY=VALUE` or `KEY`), checked as labels are."""
    key, _, value = selector.partition("=")
    if not LABEL_KEY.match(key) or len(value) > 128 or any(c.isspace() for c in value):
        raise BadInput(f"group '{selector[:200]}': expected KEY=VALUE or KEY, a label key (1-64 letters, digits "
                       "and _ . / -) and a value of at most 128 characters without spaces")  # fmt: skip
    return f"group:{selector}"


class Configs:
    """Sets device and group configurations and follows devices into groups; `send` signs and publishes."""

    def __init__(self, sessions: sessionmaker, send: SendDesired) -> None:
        self.sessions = sessions
        self.send = send

    # ---- reads -------------------------------------------------------------------------------------------------

    def device(self, device_id: str) -> Device:
        with self.sessions() as session:
            device = session.get(Device, device_id)
        if device is None:
            raise UnknownDevice(f"no device '{device_id}'")
        return device

    def groups_of(self, device: Device) -> list[GroupConfig]:
        """The group configurations that apply to `device` now, in the order they are applied."""
        return [group for group in self.groups() if target_filter(f"group:{group.selector}")(device)]

    def groups(self) -> list[GroupConfig]:
        with self.sessions() as session:
            return list(session.scalars(select(GroupConfig).order_by(GroupConfig.updated, GroupConfig.selector)))

    def group(self, selector: str) -> GroupConfig | None:
        with self.sessions() as session:
            return session.get(GroupConfig, selector)

    # ---- changes -----------------------------------------------------------------------------------------------

    def set_device(self, device_id: str, change: dict[str, Any], actor: str) -> list[Sent]:
        """Send `change` to one device; audited."""
        check_change(change)
        device = self.device(device_id)
        sent = [self._send(device, change, _record_nothing)]
        self._audit(actor, target=device_id, change=change, sent=sent)
        return sent

    def set_group(self, selector: str, change: dict[str, Any], actor: str) -> tuple[GroupConfig, list[Sent]]:
        """Merge `change` into the group's configuration (stored first) and send the whole of it to every member;
        audited."""
        check_change(change)
        target = group_target(selector)
        group = self._store_group(selector, change, actor)
        with self.sessions() as session:
            members = [d for d in session.scalars(select(Device).order_by(Device.id)) if target_filter(target)(d)]
        sent = [self._send(device, group.config, _given(group, device.id)) for device in members]
        self._audit(actor, target=target, change=change, config=group.config, version=group.version, sent=sent)
        return group, sent

    def follow_groups(self, device_ids: list[str]) -> None:
        """Give each device the group configurations it has not had (it joined a group since, or was away when the
        group changed), and forget the groups it left, so it gets a group's configuration again if it rejoins."""
        groups = self.groups()
        with self.sessions() as session:
            given = {(row.device_id, row.selector): row.version for row in session.scalars(
                select(GroupConfigDevice).where(GroupConfigDevice.device_id.in_(device_ids)))}  # fmt: skip
            devices = list(session.scalars(select(Device).where(Device.id.in_(device_ids)).order_by(Device.id)))
        for device in devices:
            matching = [g for g in groups if target_filter(f"group:{g.selector}")(device)]
            self._forget_left(device.id, {g.selector for g in matching}, {s for d, s in given if d == device.id})
            for group in matching:
                had = given.get((device.id, group.selector))
                if had != group.version:
                    sent = self._send(device, group.config, _given(group, device.id))
                    why = "the device joined the group" if had is None else f"the device had version {had}"
                    self._audit("hub", target=device.id, group=group.selector, version=group.version,
                                config=group.config, sent=[sent], why=why)  # fmt: skip

    def _store_group(self, selector: str, change: dict[str, Any], actor: str) -> GroupConfig:
        with self.sessions.begin() as session:
            # A write first, then the read: on SQLite (WAL) a transaction that reads and then writes fails if
            # ingest committed in between (see edgekit.hub.rollouts); on PostgreSQL the row lock orders changes.
            row = {"selector": selector, "config": {}, "version": 0, "updated": time.time(), "updated_by": actor}
            new = dialect_insert(session)(GroupConfig).values(**row)
            session.execute(new.on_conflict_do_nothing(index_elements=["selector"]))
            group = session.get(GroupConfig, selector, with_for_update=True, populate_existing=True)
            group.config = merge(group.config, change)
            group.version += 1
            group.updated, group.updated_by = time.time(), actor
        return group

    def _forget_left(self, device_id: str, matching: set[str], had: set[str]) -> None:
        left = had - matching
        if left:
            with self.sessions.begin() as session:
                session.execute(delete(GroupConfigDevice).where(
                    GroupConfigDevice.device_id == device_id, GroupConfigDevice.selector.in_(left)))  # fmt: skip

    def _send(self, device: Device, change: dict[str, Any], record: Callable[[Session, int], None]) -> Sent:
        try:
            rev = publish_change(self.sessions, self.send, device, lambda fields: merge(fields, change), record)
        except (NoRevLeft, ValidationError) as error:  # this device's own data: the others still get the change
            log.warning("%s: configuration not sent: %s", device.id, error)
            return Sent(device.id, error=str(error)[:500])
        return Sent(device.id, rev)

    def _audit(self, actor: str, sent: list[Sent], **detail: Any) -> None:
        devices = [{"device": s.device, "rev": s.rev} if s.error == "" else {"device": s.device, "error": s.error}
                   for s in sent]  # fmt: skip
        with self.sessions.begin() as session:
            session.add(AuditEntry(ts=time.time(), actor=actor, action="config", detail={**detail, "devices": devices}))


def _record_nothing(_session: Session, _rev: int) -> None:
    """A device's own change records nothing beside its desired state."""


def _given(group: GroupConfig, device_id: str) -> Callable[[Session, int], None]:
    """Records, with the desired state that carries it, that the device got this version of the group's config."""

    def record(session: Session, _rev: int) -> None:
        values = {"selector": group.selector, "device_id": device_id, "version": group.version}
        insert = dialect_insert(session)(GroupConfigDevice).values(**values)
        session.execute(insert.on_conflict_do_update(index_elements=["selector", "device_id"],
                                                     set_={"version": group.version}))  # fmt: skip

    return record
