"""Schema migrations of the hub's database: Alembic, configured in code (no alembic.ini), the revisions in
`versions/` shipped inside the package.

`open_database` (edgekit.hub.db) calls `upgrade` under its migration lock on every start; `edgekit hub migrate`
calls it by hand, or shows the `plan` and its SQL without changing anything (--dry-run).

A database made before migrations existed has the hub's tables but no alembic_version: it is adopted — brought to
the baseline revision by the statements `adoption` lists (kept here, frozen, like the revisions themselves), then
stamped with it — and upgraded from there like any other.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from sqlalchemy import BigInteger, inspect
from sqlalchemy.engine import Connection

from edgekit.errors import OperationFailed

SCRIPTS = Path(__file__).resolve().parent
BASELINE = "0001"
# Every hub database has had these tables since the first release.
BASELINE_TABLES = frozenset({"devices", "telemetry", "telemetry_rollup", "results", "events", "bundles",
                             "deployments", "deployment_devices", "tokens", "audit"})  # fmt: skip
# Widened from INTEGER to BIGINT before migrations existed: PostgreSQL databases made earlier still have INTEGER.
# (SQLite's INTEGER is 64-bit already.)
WIDENED_TELEMETRY_COLUMNS = ("inferences", "queue_depth", "dropped_frames", "store_depth")
# Added before migrations existed: tokens made earlier are admin tokens.
TOKEN_SCOPE_COLUMN = "ALTER TABLE tokens ADD COLUMN scope VARCHAR(16) DEFAULT 'admin' NOT NULL"


@dataclass(frozen=True)
class Plan:
    """Where a database stands: its revision (None: unversioned), the head this hub knows, and what upgrading runs."""

    current: str | None
    head: str
    adoption: list[str] | None = None  # statements that bring a pre-migration database to the baseline
    revisions: list[Script] = field(default_factory=list)  # pending, oldest first

    @property
    def pending(self) -> bool:
        return self.adoption is not None or bool(self.revisions)

    def steps(self) -> list[str]:
        """One line per step, for people."""
        lines = []
        if self.adoption is not None:
            lines.append(f"adopt the tables made before migrations as {BASELINE}")
            lines += [f"  {statement}" for statement in self.adoption]
        lines += [f"{script.down_revision or 'empty'} -> {script.revision}: {script.doc}" for script in self.revisions]
        return lines


def config(output_buffer: io.StringIO | None = None, **attributes: object) -> Config:
    """Alembic's configuration for the hub's scripts; env.py reads `connection`, or `url` offline, from attributes."""
    alembic = Config(output_buffer=output_buffer)
    alembic.set_main_option("script_location", str(SCRIPTS))
    alembic.attributes.update(attributes)
    return alembic


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    return scripts().get_current_head() or BASELINE


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def plan(connection: Connection) -> Plan:
    """What `upgrade` would do to this database. Refuses one whose revision this hub does not know."""
    directory = scripts()
    target = directory.get_current_head() or BASELINE
    current = current_revision(connection)
    if current is not None and current not in {script.revision for script in directory.walk_revisions()}:
        raise OperationFailed(f"database schema {current} is newer than this hub (knows up to {target}): "
                              "upgrade edgekit")  # fmt: skip
    adoption = adoption_statements(connection) if current is None and _has_hub_tables(connection) else None
    start = BASELINE if adoption is not None else current
    return Plan(current, target, adoption, _pending(directory, start))


def _pending(directory: ScriptDirectory, start: str | None) -> list[Script]:
    newest_first = directory.iterate_revisions("heads", start or "base")
    return [script for script in reversed(list(newest_first)) if script.revision != start]


def _has_hub_tables(connection: Connection) -> bool:
    return bool(BASELINE_TABLES & set(inspect(connection).get_table_names()))


def adoption_statements(connection: Connection) -> list[str]:
    """The statements that bring a database made before migrations to the baseline revision: the hub's schema only
    grew two ways before then (see the constants above), and every one of its releases created every table."""
    inspector = inspect(connection)
    missing = BASELINE_TABLES - set(inspector.get_table_names())
    if missing:
        raise OperationFailed(f"the database has some of the hub's tables but not {', '.join(sorted(missing))}: "
                              "it is not a hub database this hub can upgrade")  # fmt: skip
    statements = []
    if "scope" not in {column["name"] for column in inspector.get_columns("tokens")}:
        statements.append(TOKEN_SCOPE_COLUMN)
    if connection.dialect.name == "postgresql":
        telemetry = {column["name"]: column["type"] for column in inspector.get_columns("telemetry")}
        narrow = [name for name in WIDENED_TELEMETRY_COLUMNS if not isinstance(telemetry[name], BigInteger)]
        statements += [f"ALTER TABLE telemetry ALTER COLUMN {name} TYPE BIGINT" for name in narrow]
    return statements


def upgrade(connection: Connection) -> Plan:
    """Bring the database to this hub's head, in the caller's transaction (which holds the migration lock)."""
    steps = plan(connection)
    if steps.adoption is not None:
        for statement in steps.adoption:
            connection.exec_driver_sql(statement)
        command.stamp(config(connection=connection), BASELINE)
    if steps.revisions:
        command.upgrade(config(connection=connection), "heads")
    return steps


def offline_sql(steps: Plan, url: str) -> str:
    """The SQL `upgrade` would run, rendered by Alembic's offline mode for the database's dialect, nothing run."""
    buffer = io.StringIO()
    offline = config(output_buffer=buffer, url=url)
    if steps.adoption is not None:
        buffer.write("".join(f"{statement};\n" for statement in steps.adoption))
        command.stamp(offline, BASELINE, sql=True)
    if steps.revisions:
        start = BASELINE if steps.adoption is not None else steps.current
        command.upgrade(offline, f"{start}:heads" if start else "heads", sql=True)
    return buffer.getvalue().strip()
