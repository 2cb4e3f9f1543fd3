"""Helpers for hub tests (importable because pytest.ini puts tests/ on the path): signed bundles of real models,
simulated fleets of real agents connected to a hub's broker, and waits on the hub's database.

No fixtures here on purpose: tests/hub modules build their own (session-scoped) fixtures from these functions.
"""

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from brokers import wait_until as wait_until  # one poller for every test; re-exported
from sqlalchemy import select

from edgekit.agents.fleet import Fleet, FleetSettings, device_ids
from edgekit.hub.db import DeploymentDevice, Device, EventRecord, ResultRecord, TelemetrySample
from edgekit.trust import DesiredStatement, Envelope

TIMEOUT_S = 30.0


def signing_keys(folder: Path) -> tuple[Path, Path]:
    """(private, public) key files in `folder`, freshly generated."""
    from edgekit.signing import generate_keypair

    folder.mkdir(parents=True, exist_ok=True)
    return generate_keypair(folder)


@contextmanager
def fleet(
    hub: Any,
    n: int,
    work_dir: Path,
    trust_key: Path | None,
    bundle: Path | None,
    prefix: str = "sim",
    source: str | dict[str, Any] | None = "synthetic:?fps=5",
    telemetry_s: float = 0.5,
    connect_timeout: float = TIMEOUT_S,
    profile: str | None = None,
) -> Iterator[Fleet]:
    """`n` real agents (`<prefix>-<i>`), each enrolled on the hub's broker with its own login, started with `bundle`
    installed and a low-rate synthetic source; yields once all are connected, stops them on exit. Data goes to
    `work_dir/<prefix>/<device id>`."""
    enrollments = hub.enroll(device_ids(prefix, n))
    broker = enrollments[0].broker  # as devices reach it, without a login: each device has its own in `brokers`
    settings = FleetSettings(count=n, broker=broker, data_dir=work_dir / prefix, trust_key=trust_key, bundle=bundle,
                             source=source, prefix=prefix, telemetry_s=telemetry_s, profile=profile,
                             brokers={e.device_id: e.broker_url() for e in enrollments},
                             hub_key=hub.trust.public_key_file, trust_version=hub.trust.root.version)  # fmt: skip
    agents = Fleet(settings)
    agents.start()
    try:
        connected = agents.wait_connected(connect_timeout)
        assert connected == n, f"only {connected} of {n} agents connected to {broker}"
        yield agents
    finally:
        agents.stop()


def desired_of(payload: bytes) -> DesiredStatement:
    """The signed statement in a `config/desired` payload the hub published (not verified: for reading what the hub
    sent; the agent's checks are tested in tests/security)."""
    import base64

    envelope = Envelope.model_validate_json(payload)
    return DesiredStatement.model_validate_json(base64.b64decode(envelope.payload))


def device_urls(hub: Any, ids: list[str]) -> dict[str, str]:
    """Each device enrolled on the hub's embedded broker: its broker URL with its own login, by id."""
    return {enrollment.device_id: enrollment.broker_url() for enrollment in hub.enroll(ids)}


def device_url(hub: Any, device_id: str) -> str:
    """One device's broker URL with its own login (`device_urls`)."""
    return device_urls(hub, [device_id])[device_id]


def watcher_url(hub: Any) -> str:
    """A broker URL with a user of its own that may read every device's topics, like the hub (a test client that
    logged in as the hub itself would take over the hub's connection: the broker binds client ids to users)."""
    return hub.add_hub_user(f"watch-{uuid.uuid4().hex[:8]}")


def fleet_ids(prefix: str, n: int) -> list[str]:
    """The device ids `fleet(…, n, prefix=prefix)` gives its agents."""
    return device_ids(prefix, n)


def devices(hub: Any) -> dict[str, Device]:
    """Every Device row of the hub, by id."""
    with hub.sessions() as session:
        return {device.id: device for device in session.scalars(select(Device))}


def wait_devices_reported(hub: Any, ids: list[str], timeout: float = TIMEOUT_S) -> dict[str, Device]:
    """Until the hub stored a reported state (with a running bundle) for every device in `ids`; their rows."""

    def ready() -> dict[str, Device] | None:
        rows = devices(hub)
        missing = [i for i in ids if i not in rows or not (rows[i].reported or {}).get("bundle")]
        return None if missing else {i: rows[i] for i in ids}

    return wait_until(ready, timeout, f"the hub to store the reported state of {len(ids)} devices")


def deployment_members(hub: Any, deployment_id: int) -> dict[str, DeploymentDevice]:
    """A deployment's members as stored, by device id."""
    with hub.sessions() as session:
        query = select(DeploymentDevice).where(DeploymentDevice.deployment_id == deployment_id)
        return {member.device_id: member for member in session.scalars(query)}


def stored_seqs(sessions) -> dict[str, set[int]]:
    """Every sequenced message the hub stored: the seqs per device."""
    found: dict[str, set[int]] = {}
    with sessions() as session:
        for table in (TelemetrySample, ResultRecord, EventRecord):
            for device_id, seq in session.execute(select(table.device_id, table.seq)):
                found.setdefault(device_id, set()).add(seq)
    return found


def broker_acknowledged(agents: Fleet) -> dict[str, set[int]]:
    """Per stopped agent, the seqs the broker acknowledged: every seq it gave out, less those left in its outbox."""
    acknowledged = {}
    for agent in agents.agents:
        with sqlite3.connect(agent.outbox.path) as outbox:
            left = {seq for (seq,) in outbox.execute("SELECT seq FROM outbox")}
        acknowledged[agent.settings.device_id] = set(range(1, agent.outbox.last_seq + 1)) - left
    return acknowledged


def lost_messages(acknowledged: dict[str, set[int]], sessions, timeout: float = 60.0) -> int:
    """Waits (up to `timeout`) for the hub's database to hold everything the broker acknowledged; how many it does
    not."""

    def missing() -> int:
        stored = stored_seqs(sessions)
        return sum(len(seqs - stored.get(device, set())) for device, seqs in acknowledged.items())

    with suppress(AssertionError):  # counted and asserted by the caller
        wait_until(lambda: missing() == 0, timeout, "the hub to store every acknowledged message")
    return missing()


def bundle_revs(sub: Any, bundle_id: str) -> dict[str, set[int]]:
    """Per device, the revs of the desired states published (retained copies included) that name `bundle_id`."""
    revs: dict[str, set[int]] = {}
    for topic, payload in sub.messages("edgekit/v1/+/config/desired"):
        desired = desired_of(payload).desired
        if desired.bundle is not None and desired.bundle.id == bundle_id:
            revs.setdefault(topic.split("/")[2], set()).add(desired.rev)
    return revs
