"""The hub's database: SQLAlchemy 2.0 models, one schema for SQLite (WAL) and PostgreSQL.

Device → hub messages are keyed by (device_id, seq), which is unique per device across telemetry, results and
events, so a replayed message is dropped by the primary key, whichever hub process receives it.

Every schema change needs a migration: a change to these models ships with a new revision in
edgekit/hub/migrations/versions/ (Alembic; `alembic.command.revision(edgekit.hub.migrations.config(connection=C,
target_metadata=Base.metadata), MESSAGE, autogenerate=True)` on a connection to a database at head drafts one).
The hub upgrades every database it opens to the newest revision; tests/hub/test_migrations.py fails while the
models and the revisions disagree.
"""

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from edgekit.errors import BadInput

log = logging.getLogger(__name__)
# Held while a hub process checks and upgrades the schema, so processes starting at once do it one after another.
MIGRATION_LOCK = 4242


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON, int: BigInteger}


class Device(Base):
    """One row per device: its identity and latest state, so the fleet table is one query."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    online: Mapped[bool] = mapped_column(default=False)
    first_seen: Mapped[float] = mapped_column(Float, default=time.time)
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    agent_version: Mapped[str | None] = mapped_column(String(32))
    profile: Mapped[str | None] = mapped_column(String(64))
    runtimes: Mapped[list[str]] = mapped_column(default=list)
    bundle_id: Mapped[str | None] = mapped_column(String(64))
    bundle_label: Mapped[str | None] = mapped_column(String(160))
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    memory_mb: Mapped[float | None] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    last_seq: Mapped[int] = mapped_column(default=0)
    desired_rev: Mapped[int] = mapped_column(default=0)
    # The last DesiredState the hub published for this device (JSON), so a rollout changes only the bundle.
    desired: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The newest telemetry's model-health blocks: {"model": ModelStats, "shadow": ShadowStats, "drift": DriftStats}
    # (edgekit.protocol), each present when the device sent it; what health gates and drift alerts read.
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class TelemetrySample(Base):
    __tablename__ = "telemetry"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    inferences: Mapped[int | None] = mapped_column(BigInteger)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    memory_mb: Mapped[float | None] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    queue_depth: Mapped[int | None] = mapped_column(BigInteger)
    dropped_frames: Mapped[int | None] = mapped_column(BigInteger)
    store_depth: Mapped[int | None] = mapped_column(BigInteger)
    bundle: Mapped[str | None] = mapped_column(String(160))
    drift_score: Mapped[float | None] = mapped_column(Float, comment="Telemetry.drift.score (PSI)")

    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts"),)


class TelemetryRollup(Base):
    """Old telemetry, downsampled to one row per device and minute (retention keeps these longer)."""

    __tablename__ = "telemetry_rollup"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[int] = mapped_column(primary_key=True, comment="unix time // 60")
    samples: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)


class ResultRecord(Base):
    __tablename__ = "results"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    bundle: Mapped[str] = mapped_column(String(160))
    latency_ms: Mapped[float] = mapped_column(Float)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


class EventRecord(Base):
    __tablename__ = "events"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    type: Mapped[str] = mapped_column(String(32), index=True)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class BundleRecord(Base):
    """A pushed bundle, verified on upload and stored content-addressed (file name = sha256)."""

    __tablename__ = "bundles"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column()
    profile: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(8))
    signing_key_id: Mapped[str] = mapped_column(String(32))
    uploaded: Mapped[float] = mapped_column(Float, default=time.time)
    uploaded_by: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)


class BundlePart(Base):
    """A bundle's bytes, in parts of `edgekit.hub.store.PART_SIZE`: where every hub replica on the database reads
    them (a replica keeps a verified copy as a file in its own `<data>/bundles`, a cache)."""

    __tablename__ = "bundle_parts"
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"), primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Deployment(Base):
    """A staged rollout: canary first, then waves; halts (and rolls back) past the failure threshold."""

    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    bundle_id: Mapped[str] = mapped_column(ForeignKey("bundles.id"))
    target: Mapped[str] = mapped_column(String(160), comment="device id, group:LABEL[=VALUE] or all")
    canary_percent: Mapped[float] = mapped_column(Float)
    wave_percent: Mapped[float] = mapped_column(Float)
    failure_threshold: Mapped[float] = mapped_column(Float, comment="fraction of a wave that may fail")
    wave_timeout_s: Mapped[float] = mapped_column(Float)
    health_checks: Mapped[int | None] = mapped_column(Integer, comment="None: the device's current setting")
    state: Mapped[str] = mapped_column(String(16), default="running", comment="running|completed|halted")
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    waves: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    created_by: Mapped[str] = mapped_column(String(64))
    updated: Mapped[float] = mapped_column(Float, default=time.time)
    # Health gates (edgekit.hub.gates): with `shadow`, the canary first runs the bundle as a shadow (phase
    # "shadow"), and waves start ("waves") only when its gates pass.
    shadow: Mapped[bool] = mapped_column(default=False)
    shadow_budget: Mapped[float] = mapped_column(Float, default=0.25, comment="DesiredShadow.budget")
    phase: Mapped[str] = mapped_column(String(8), default="waves", comment="shadow|waves")
    gates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, comment="[Gate]")
    min_samples: Mapped[int] = mapped_column(Integer, default=0, comment="inferences a gate needs per device")
    gate_results: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, comment="[GateResult]")


class DeploymentDevice(Base):
    __tablename__ = "deployment_devices"
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(
        String(16), default="pending", comment="pending|sent|healthy|failed|timed_out|rolled_back"
    )
    previous_bundle_id: Mapped[str | None] = mapped_column(String(64))
    # The BundleRef (JSON) the device ran when the deployment was created: what a rollback asks for.
    previous_bundle: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    rev: Mapped[int | None] = mapped_column()
    detail: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[float | None] = mapped_column(Float)
    resolved_at: Mapped[float | None] = mapped_column(Float, comment="when it became healthy/failed/timed_out")
    # ModelStats of the bundle the device ran when the deployment was created: what gates compare with.
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # What the gates measured on this device when it resolved (agreement, p95 ratio, error rate, shift).
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    updated: Mapped[float] = mapped_column(Float, default=time.time)
    # True while the deployment runs, NULL after: the unique index below lets a device be in one running deployment
    # only, checked by the database as the members are inserted (hubs creating deployments at once cannot both win).
    active: Mapped[bool | None] = mapped_column(default=True)

    __table_args__ = (
        Index(
            "ux_deployment_devices_active_device",
            "device_id",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )


class Lease(Base):
    """A job that one hub process at a time may do (the rollout controller, retention): `holder` has it until
    `expires` (unix time), renewing it while it works; another process takes it once it has expired."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), default="")
    expires: Mapped[float] = mapped_column(Float, default=0.0)


class HubSetting(Base):
    """Values every hub process on the database must share, e.g. the key that signs dashboard cookies."""

    __tablename__ = "hub_settings"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class GroupConfig(Base):
    """A device group's configuration (edgekit.hub.config): applied to its members when set, and to a device that
    joins the group later."""

    __tablename__ = "group_configs"
    selector: Mapped[str] = mapped_column(String(160), primary_key=True, comment="LABEL=VALUE or LABEL")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, comment="edgekit.hub.config.ConfigChange")
    version: Mapped[int] = mapped_column()
    updated: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(64))


class GroupConfigDevice(Base):
    """The version of a group's configuration a device was given: it gets each version once."""

    __tablename__ = "group_config_devices"
    selector: Mapped[str] = mapped_column(String(160), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(comment="the group_configs.version it was given")


class ApiToken(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str] = mapped_column(
        String(64), unique=True, comment="sha256 of the token; the token is shown once"
    )
    created: Mapped[float] = mapped_column(Float, default=time.time)
    created_by: Mapped[str] = mapped_column(String(64))
    revoked: Mapped[bool] = mapped_column(default=False)
    # read | operate | admin (edgekit.hub.scopes). Tokens made before scopes existed are admin.
    scope: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, default=time.time, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), comment="push|deploy|halt|token.create|token.revoke|login")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class BenchJobRecord(Base):
    """A candidate bundle sent to one device to be timed without activating it (edgekit.hub.bench)."""

    __tablename__ = "bench_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    bundle_id: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(Float, default=time.time)
    device_seq: Mapped[int] = mapped_column(BigInteger, comment="the device's last stored seq when it was sent")
    expires: Mapped[float] = mapped_column(Float, comment="no answer by then: failed")
    state: Mapped[str] = mapped_column(String(16), default="running", comment="running|done|failed")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, comment="edgekit.protocol.BenchResult")
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(64))


class Dataset(Base):
    """Inputs captured on devices (docs/datasets.md): one dataset per bundle name, with its retention limits."""

    __tablename__ = "datasets"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)
    samples: Mapped[int] = mapped_column(default=0)
    stored_bytes: Mapped[int] = mapped_column(default=0)
    dropped: Mapped[int] = mapped_column(default=0, comment="samples removed by retention, oldest first")
    max_samples: Mapped[int] = mapped_column(default=10_000)
    max_bytes: Mapped[int] = mapped_column(default=1024**3)


class DatasetSample(Base):
    """One captured input, content-addressed (its sha256) within its dataset; the bytes as the device sent them."""

    __tablename__ = "dataset_samples"
    dataset: Mapped[str] = mapped_column(ForeignKey("datasets.name"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ts: Mapped[float] = mapped_column(Float, comment="when the source gave it (device clock)")
    received: Mapped[float] = mapped_column(Float, index=True)
    bundle: Mapped[str] = mapped_column(String(160))
    bundle_id: Mapped[str] = mapped_column(String(64))
    input_name: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(8), comment="png|npy")
    reason: Mapped[str] = mapped_column(String(16), comment="low_confidence|disagreement|random")
    output: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column()
    label: Mapped[int | None] = mapped_column(Integer)
    labelled_by: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class SampleChunk(Base):
    """A chunk of a sample still being uploaded: kept until every chunk is here, so a hub restart loses none."""

    __tablename__ = "sample_chunks"
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sample: Mapped[str] = mapped_column(String(64), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column(Integer)
    received: Mapped[float] = mapped_column(Float, index=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


def dialect_insert(session: Session) -> Any:
    """The INSERT construct of the session's dialect, which has ON CONFLICT (SQLite and PostgreSQL alike)."""
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def database_url(db: str | None, data_dir: Path) -> str:
    """`--db` as given (sqlite:///…, postgresql://…), or SQLite in the data dir."""
    if not db:
        return f"sqlite:///{data_dir / 'hub.sqlite'}"
    if db.startswith("postgresql://"):
        return "postgresql+psycopg://" + db.removeprefix("postgresql://")
    if db.startswith(("sqlite:///", "postgresql+psycopg://")):
        return db
    raise BadInput(f"--db '{db}': expected sqlite:///PATH or postgresql://USER@HOST/DB")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API read while ingest writes; NORMAL sync is safe with WAL (no corruption on power loss).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def private_sqlite_file(url: str) -> None:
    """Create a SQLite database file readable by its owner only, before SQLite does with the umask's mode: SQLite
    gives its -wal and -shm files the database file's mode, so they are private too."""
    path = Path(make_url(url).database or "")
    if path.name and path.name != ":memory:":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def hub_engine(url: str) -> Engine:
    """The engine for the hub's database, as it is; `open_database` also brings the schema up to date."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's migration lock: PostgreSQL's advisory lock, or for SQLite an
    exclusive lock on `<name>.migrate-lock` beside the database file (SQLite's own locks cannot be held across the
    check and the upgrade without starting to write)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            yield connection
        return
    with _file_lock(engine), engine.begin() as connection:
        yield connection


@contextmanager
def _file_lock(engine: Engine) -> Iterator[None]:
    path = Path(engine.url.database or "")
    if not path.name or path.name == ":memory:":  # a private in-memory database: no other process to wait for
        yield
        return
    fd = os.open(path.with_name(f"{path.stem}.migrate-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def open_database(url: str) -> tuple[Engine, sessionmaker]:
    """Engine and session factory, the schema upgraded to this hub's newest revision first (see the module doc).
    Raises OperationFailed for a database whose schema is newer than this hub."""
    from edgekit.hub import migrations

    engine = hub_engine(url)
    with migration_lock(engine) as connection:
        done = migrations.upgrade(connection)
    if done.pending:
        was = done.current or ("a schema from before migrations" if done.adoption is not None else "empty")
        log.info("database schema upgraded from %s to %s", was, done.head)
    return engine, sessionmaker(engine, expire_on_commit=False)
